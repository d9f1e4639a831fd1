"""Audio decoding and Whisper-compatible log-mel features, windowed so long audio is never truncated.

    decode_audio(src, cfg)  -> (num_samples,) float32 mono at cfg.sample_rate_hz (torchcodec; also the
                               audio track of mp4/mkv/webm)
    log_mel(waveform, cfg)  -> (num_mel_bins, num_mel_frames(num_samples, cfg))
    encode_audio(src, cfg)  -> EncodedMedia {"mel": ...} with the encoder's token count and timestamps
                               (decode_audio, an optional MediaTransform on the waveform, audio_features)

Long audio is cut into independent `window_s` windows (30 s, Whisper's receptive field). Each
window's features equal what transformers' `WhisperFeatureExtractor` computes on that window's
audio alone (its zero padding to 30 s, centered STFT, dropped last frame and per-window
`max - 8` dynamic range), and the windows' frames are concatenated, so a one-hour meeting keeps
all its frames. The audio encoder sees each window independently; `num_audio_tokens`,
`audio_token_timestamps` and `split_windows` are the single definition of that windowing, which
the model reuses.

Two options reproduce Qwen2-Audio's and Qwen2.5-Omni's processors (defaults: today's behaviour):
- `valid_frames: ceil`: an audio of n samples has ceil(n / hop_length) valid frames, the count
  of WhisperFeatureExtractor's attention mask (it samples the per-sample mask every hop_length
  samples), which those processors pass to the encoder as `feature_attention_mask`. The extra
  frame is the STFT frame centered on the audio's last partial hop. `floor` (default) keeps only
  frames whose 10 ms lie wholly in the audio.
- `pool_tail: drop`: the last factor 2 of `downsample` is an AvgPool1d(2) that drops an odd last
  position (transformers' `_get_feat_extract_output_lengths`: (n - 2) // 2 + 1 for n positions),
  where `keep` (default) averages it alone. Every window but an item's last is full and has an
  even number of positions (window_frames is a multiple of downsample), so dropping per window
  drops only at the end of the item, as transformers does for the whole item.
"""

from __future__ import annotations

import functools
import io
import math
import re
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from omni_train.data.sample import EncodedMedia, MediaError

if TYPE_CHECKING:
    from omni_train.data.degrade import MediaTransform

# Audio per batched torch.stft call. One 30 s window's intermediates (frames, complex spectrum,
# squares) take about 12 MB; batches much past two windows fall out of a typical 32 MB L3 cache
# and measured 2-3x slower per window on a 2-core EPYC, and a two-hour recording must not
# materialize gigabytes of spectrum at once.
_SAMPLES_PER_BATCH = 1_000_000
_MELS_PER_BLOCK = 16
_LOG_FLOOR = 1e-10        # Whisper: log10(clamp(mel, 1e-10))
VALID_FRAMES = ("floor", "ceil")
POOL_TAILS = ("keep", "drop")


@dataclass(kw_only=True)
class AudioConfig:
    """How audio becomes encoder input; the defaults reproduce Whisper-large-v3's features."""

    sample_rate_hz: int = 16000
    num_mel_bins: int = 128         # 128: Whisper-large-v3 and Qwen2.5-Omni; 80: earlier Whisper sizes
    n_fft: int = 400                # 25 ms Hann window at 16 kHz
    hop_length: int = 160           # 10 ms per frame
    window_s: float = 30.0          # the encoder sees independent windows of this length; never truncated
    max_duration_s: float = 7200.0  # longer audio is refused (MediaError) before it is decoded
    downsample: int = 4             # frames per token: the encoder's stride-2 convs (kernel 3, padding 1)
    valid_frames: str = "floor"     # VALID_FRAMES: floor(samples / hop) | ceil (WhisperFeatureExtractor's mask: Qwen2.5-Omni)
    pool_tail: str = "keep"         # POOL_TAILS: the last factor 2 keeps an odd last position | drops it (AvgPool1d(2))
    # None: a window is subsampled whole; 100: each 1 s chunk is subsampled on its own (Qwen3-Omni's audio encoder:
    # 100 frames -> 13 tokens), so tokens are counted per chunk; = model.audio.chunk_frames where the counts differ
    chunk_frames: int | None = None
    # log-mel floor below each window's peak: 80 is Whisper's maximum(log_spec, log_spec.max() - 8.0); a narrower
    # range hides low-level noise under the floor (40 dB: white noise at 20 dB SNR moves the features 10x less)
    dynamic_range_db: float = 80.0
    # training only: ops of degrade.OPS applied to each waveform (a video's track too) before its features (augment.py)
    augment: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self):
        if not isinstance(self.sample_rate_hz, int) or self.sample_rate_hz <= 0:
            raise ValueError(f"audio.sample_rate_hz must be a positive integer (16000 for Whisper encoders), got {self.sample_rate_hz!r}")
        if not isinstance(self.n_fft, int) or self.n_fft < 2:
            raise ValueError(f"audio.n_fft must be an integer >= 2 (400 for Whisper), got {self.n_fft!r}")
        if not isinstance(self.num_mel_bins, int) or not 1 <= self.num_mel_bins <= self.n_fft // 2 + 1:
            raise ValueError(f"audio.num_mel_bins must be an integer in 1..{self.n_fft // 2 + 1} "
                             f"(128 or 80 for Whisper encoders), got {self.num_mel_bins!r}")
        if not isinstance(self.hop_length, int) or not 1 <= self.hop_length <= self.n_fft:
            raise ValueError(f"audio.hop_length must be an integer in 1..n_fft={self.n_fft} (160 for Whisper), got {self.hop_length!r}")
        window_samples = self.window_s * self.sample_rate_hz if isinstance(self.window_s, (int, float)) else -1.0
        if (window_samples < self.n_fft or window_samples != round(window_samples)
                or round(window_samples) % self.hop_length != 0):
            raise ValueError(f"audio.window_s must be positive, at least n_fft samples long and a whole number of hops "
                             f"({self.hop_length / self.sample_rate_hz:g} s each), got {self.window_s!r}")
        if not isinstance(self.max_duration_s, (int, float)) or not self.max_duration_s > 0:
            raise ValueError(f"audio.max_duration_s must be a positive number of seconds, got {self.max_duration_s!r}")
        if not isinstance(self.downsample, int) or self.downsample < 1 or self.downsample & (self.downsample - 1):
            raise ValueError(f"audio.downsample must be a power of 2 (1, 2, 4, 8, ...; one stride-2 conv per factor 2), "
                             f"got {self.downsample!r}")
        if (isinstance(self.dynamic_range_db, bool) or not isinstance(self.dynamic_range_db, (int, float))
                or not 0 < self.dynamic_range_db <= 200):
            raise ValueError(f"audio.dynamic_range_db must be a number of decibels in (0, 200] (80 for Whisper), "
                             f"got {self.dynamic_range_db!r}")
        if self.valid_frames not in VALID_FRAMES:
            raise ValueError(f"audio.valid_frames must be one of {', '.join(VALID_FRAMES)}, got {self.valid_frames!r}")
        if self.pool_tail not in POOL_TAILS:
            raise ValueError(f"audio.pool_tail must be one of {', '.join(POOL_TAILS)}, got {self.pool_tail!r}")
        if self.chunk_frames is not None and (not isinstance(self.chunk_frames, int) or isinstance(self.chunk_frames, bool)
                                              or self.chunk_frames <= 0 or self.window_frames % self.chunk_frames):
            raise ValueError(f"audio.chunk_frames must be null or a positive integer dividing the window's "
                             f"{self.window_frames} frames (100 for Qwen3-Omni), got {self.chunk_frames!r}")
        # Dropping per window equals dropping per item only when full windows have an even number of positions.
        if self.pool_tail == "drop" and (self.downsample < 2 or self.window_frames % self.downsample):
            raise ValueError(f"audio.pool_tail drop needs audio.downsample >= 2 dividing the window's "
                             f"{self.window_frames} frames, got downsample {self.downsample}")
        from omni_train.data.augment import parse_augment  # here: augment imports degrade, which may import this module

        self._augment_ops = parse_augment(self.augment, "audio.augment", "audio")

    @property
    def augment_ops(self) -> list:
        """`augment` parsed (augment.AugmentOp each)."""
        return self._augment_ops

    @property
    def window_samples(self) -> int:
        return round(self.window_s * self.sample_rate_hz)

    @property
    def window_frames(self) -> int:
        return self.window_samples // self.hop_length


# ---------------------------------------------------------------------------------------------
# Decoding


def _one_line(e: BaseException) -> str:
    """An exception's first sentence on one line, without torchcodec's C++ source-location prefix."""
    text = " ".join(str(e).split())
    text = re.sub(r"^\w+, \S+\.cpp:\d+, ", "", text).split(". ")[0]
    return f"{type(e).__name__}: {text[:200]}"


def decode_audio(src: bytes | str | Path, cfg: AudioConfig, *, where: str = "") -> torch.Tensor:
    """Decode, resample to cfg.sample_rate_hz and downmix to mono: (num_samples,) float32.

    Raises MediaError (one line starting with `where`) for undecodable, empty, truncated or
    over-long audio; the duration cap is checked from the header before anything is decoded.
    """
    from torchcodec.decoders import AudioDecoder

    prefix = f"{where}: " if where else ""
    if isinstance(src, bytes) and not src:
        raise MediaError(f"{prefix}cannot decode audio: empty input (0 bytes)")
    waveform = _read_pcm_wav(src, cfg, prefix)
    header_s = None if waveform is None else waveform.shape[0] / cfg.sample_rate_hz
    if waveform is None:
        try:
            decoder = AudioDecoder(src, sample_rate=cfg.sample_rate_hz)
            header_s = decoder.metadata.duration_seconds
            if header_s is not None and header_s > cfg.max_duration_s + 1.0:  # +1 s: header durations are estimates
                raise MediaError(f"{prefix}audio is {header_s:.1f} s long, over audio.max_duration_s={cfg.max_duration_s:g}")
            # Bounded even when the header is missing or lies, so a corrupt header cannot make us
            # decode hours of audio into memory.
            samples = decoder.get_samples_played_in_range(0.0, cfg.max_duration_s + 1.0).data  # (C, N)
        except MediaError:
            raise
        except Exception as e:  # torchcodec raises RuntimeError / ValueError with FFmpeg's reason
            raise MediaError(f"{prefix}cannot decode audio ({_one_line(e)})") from None
        if samples.ndim != 2 or samples.shape[-1] == 0:
            raise MediaError(f"{prefix}audio decoded to zero samples")
        waveform = samples.mean(dim=0) if samples.shape[0] > 1 else samples[0]  # (N,)
        waveform = waveform.to(torch.float32).contiguous()
    duration_s = waveform.shape[0] / cfg.sample_rate_hz
    if duration_s > cfg.max_duration_s:
        raise MediaError(f"{prefix}audio is longer than audio.max_duration_s={cfg.max_duration_s:g} (decoded {duration_s:.1f} s)")
    # FFmpeg decodes a cut-off file up to the cut without an error; the header's length gives it away.
    if header_s is not None and duration_s < 0.9 * header_s - 0.1:
        raise MediaError(f"{prefix}audio is truncated or corrupt: header says {header_s:.2f} s, decoded {duration_s:.2f} s")
    if not torch.isfinite(waveform).all():
        raise MediaError(f"{prefix}audio decoded to non-finite samples")
    return waveform


def _read_pcm_wav(src: bytes | str | Path, cfg: AudioConfig, prefix: str) -> torch.Tensor | None:
    """16-bit PCM WAV at the target rate, in memory: read directly, or None for torchcodec to decode.

    The same samples as torchcodec's (int16 / 32768, channels averaged), without an FFmpeg
    context per clip: that costs ~5 ms, more than the log-mel of a 2 s clip, and short WAV
    clips are what the demo corpus and folder-mode segments hold.
    """
    if not isinstance(src, bytes) or src[:4] != b"RIFF" or src[8:12] != b"WAVE":
        return None
    try:
        with wave.open(io.BytesIO(src)) as wav:
            if wav.getsampwidth() != 2 or wav.getframerate() != cfg.sample_rate_hz or wav.getcomptype() != "NONE":
                return None
            num_channels, num_frames = wav.getnchannels(), wav.getnframes()
            if num_frames / cfg.sample_rate_hz > cfg.max_duration_s + 1.0:
                raise MediaError(f"{prefix}audio is {num_frames / cfg.sample_rate_hz:.1f} s long, over "
                                 f"audio.max_duration_s={cfg.max_duration_s:g}")
            data = wav.readframes(num_frames)
    except (wave.Error, EOFError):
        return None  # an unusual header (extensible format, ...): FFmpeg decides
    samples = np.frombuffer(data[: len(data) // (2 * num_channels) * 2 * num_channels], dtype="<i2")
    if samples.size < num_frames * num_channels:
        raise MediaError(f"{prefix}audio is truncated or corrupt: header says {num_frames / cfg.sample_rate_hz:.2f} s, "
                         f"data holds {samples.size // max(num_channels, 1) / cfg.sample_rate_hz:.2f} s")
    if samples.size == 0:
        raise MediaError(f"{prefix}audio decoded to zero samples")
    waveform = torch.from_numpy(samples.astype(np.float32) / 32768.0).view(-1, num_channels).mean(dim=1)
    return waveform.contiguous()


# ---------------------------------------------------------------------------------------------
# Features


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale (librosa's default, used by Whisper): linear below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    linear = 3.0 * hz / 200.0
    log = 15.0 + np.log(np.maximum(hz, 1e-12) / 1000.0) * (27.0 / np.log(6.4))
    return np.where(hz >= 1000.0, log, linear)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    linear = 200.0 * mel / 3.0
    log = 1000.0 * np.exp((mel - 15.0) * (np.log(6.4) / 27.0))
    return np.where(mel >= 15.0, log, linear)


@functools.lru_cache(maxsize=16)
def mel_filters(sample_rate_hz: int, n_fft: int, num_mel_bins: int) -> torch.Tensor:
    """(n_fft // 2 + 1, num_mel_bins) float32 triangular filters, Slaney scale and area normalization, 0 .. Nyquist.

    Cached and shared: treat the result as read-only.

    The same bank as librosa.filters.mel(sr, n_fft, n_mels) that Whisper ships as mel_filters.npz,
    and as transformers' mel_filter_bank(norm="slaney", mel_scale="slaney").
    """
    fft_hz = np.linspace(0.0, sample_rate_hz / 2, n_fft // 2 + 1)                   # (F,)
    edges_hz = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sample_rate_hz / 2), num_mel_bins + 2))  # (M + 2,)
    lower, center, upper = edges_hz[:-2], edges_hz[1:-1], edges_hz[2:]             # (M,) each
    rising = (fft_hz[:, None] - lower) / (center - lower)                          # (F, M)
    falling = (upper - fft_hz[:, None]) / (upper - center)
    bank = np.maximum(0.0, np.minimum(rising, falling))
    bank *= 2.0 / (upper - lower)  # Slaney: each filter has unit area, so wide high filters are not louder
    return torch.from_numpy(bank.astype(np.float32))


@functools.lru_cache(maxsize=16)
def _hann_window(n_fft: int) -> torch.Tensor:
    return torch.hann_window(n_fft)  # periodic, as Whisper and transformers use


@functools.lru_cache(maxsize=16)
def _mel_blocks(sample_rate_hz: int, n_fft: int, num_mel_bins: int) -> tuple[tuple[int, int, torch.Tensor], ...]:
    """The filterbank as blocks of _MELS_PER_BLOCK filters: (first column, end column, (end - first, mels) weights).

    Columns index the (T, 2F) squared STFT, real and imaginary parts interleaved; each weight
    row is duplicated so the matmul also sums re^2 + im^2. Triangular filters are band-limited,
    so a block of neighbouring filters touches one short range of FFT bins: about 8x fewer
    multiply-adds than the dense (F, M) product at 128 bins, with identical results.
    """
    bank = mel_filters(sample_rate_hz, n_fft, num_mel_bins)  # (F, M)
    blocks = []
    for m0 in range(0, num_mel_bins, _MELS_PER_BLOCK):
        m1 = min(num_mel_bins, m0 + _MELS_PER_BLOCK)
        bins = (bank[:, m0:m1] > 0).any(dim=1).nonzero()[:, 0]
        f0, f1 = (int(bins[0]), int(bins[-1]) + 1) if bins.numel() else (0, 0)
        blocks.append((2 * f0, 2 * f1, bank[f0:f1, m0:m1].repeat_interleave(2, dim=0).contiguous()))
    return tuple(blocks)


def _log_mel_windows(windows: torch.Tensor, cfg: AudioConfig) -> torch.Tensor:
    """(B, P) zero-padded window audio -> (B, frames, num_mel_bins) normalized log-mel, Whisper's per-window max."""
    spec = torch.stft(windows, cfg.n_fft, cfg.hop_length, window=_hann_window(cfg.n_fft), center=True,
                      pad_mode="reflect", return_complex=True)                        # (B, F, T), stored as (B, T, F)
    # Whisper drops the STFT's last frame of a 30 s window; shorter windows have fewer frames anyway.
    spec = spec[..., : cfg.window_frames].transpose(1, 2)                              # (B, T, F), contiguous
    squares = torch.view_as_real(spec).flatten(-2).square_()                           # (B, T, 2F): re^2, im^2
    mel = torch.cat([squares[..., c0:c1] @ weights for c0, c1, weights in
                     _mel_blocks(cfg.sample_rate_hz, cfg.n_fft, cfg.num_mel_bins)], dim=-1)  # (B, T, M)
    log_spec = mel.clamp_(min=_LOG_FLOOR).log10_()
    peak = log_spec.amax(dim=(1, 2), keepdim=True)                                     # (B, 1, 1)
    return torch.maximum(log_spec, peak - cfg.dynamic_range_db / 10.0, out=log_spec).add_(4.0).div_(4.0)


def num_mel_frames(num_samples: int, cfg: AudioConfig) -> int:
    """Valid mel frames of `num_samples` samples: floor or ceil of num_samples / hop_length (cfg.valid_frames)."""
    if cfg.valid_frames == "ceil":
        return -(-num_samples // cfg.hop_length)
    return num_samples // cfg.hop_length


def log_mel(waveform: torch.Tensor, cfg: AudioConfig) -> torch.Tensor:
    """(num_samples,) -> (num_mel_bins, num_mel_frames(num_samples)) float32 Whisper log-mel, window by window.

    Each window is zero-padded at its end (to at least n_fft samples, at most window_s) before
    the centered STFT: Whisper pads every input to 30 s with zeros, so its frames near the end of
    the audio see zeros, not reflected audio, and frames past the audio take part in its max.
    """
    assert waveform.ndim == 1, waveform.shape
    waveform = waveform.to(torch.float32)
    num_samples = int(waveform.shape[0])
    num_frames = num_mel_frames(num_samples, cfg)
    window_samples = cfg.window_samples
    num_windows = max(1, math.ceil(num_samples / window_samples))
    # One window: pad only as far as Whisper's zeros are ever seen; several: all are full windows.
    padded_len = min(window_samples, num_samples + cfg.n_fft) if num_windows == 1 else window_samples
    padded = torch.nn.functional.pad(waveform, (0, (num_windows - 1) * window_samples + padded_len - num_samples))
    windows = padded.unfold(0, padded_len, window_samples)                             # (W, P), a view
    batch = max(1, _SAMPLES_PER_BATCH // window_samples)
    features = torch.empty(cfg.num_mel_bins, num_frames)                               # (M, num_frames)
    for first in range(0, num_windows, batch):
        part = _log_mel_windows(windows[first : first + batch], cfg)                  # (b, T, M)
        # Every window but the last is exactly window_frames long, so flattening lines up the frames.
        start = first * cfg.window_frames
        end = min(num_frames, start + part.shape[0] * part.shape[1])
        features[:, start:end] = part.reshape(-1, cfg.num_mel_bins)[: end - start].T
    return features


# ---------------------------------------------------------------------------------------------
# Windows and tokens: the audio encoder's view


def _window_frame_counts(num_frames: int, cfg: AudioConfig) -> list[int]:
    full, rest = divmod(num_frames, cfg.window_frames)
    return [cfg.window_frames] * full + ([rest] if rest else [])


def _tokens_in_window(frames: int, cfg: AudioConfig) -> int:
    """Positions after the encoder's factors 2 of `frames` valid frames of one window (ints or a tensor of them).

    With cfg.chunk_frames each chunk is subsampled on its own: full chunks times a chunk's positions, plus the rest's."""
    if cfg.chunk_frames is None:
        return _subsampled(frames, cfg.downsample, cfg.pool_tail)
    full, rest = frames // cfg.chunk_frames, frames % cfg.chunk_frames
    return full * _subsampled(cfg.chunk_frames, cfg.downsample, cfg.pool_tail) + _subsampled(rest, cfg.downsample, cfg.pool_tail)


def _subsampled(frames: int, downsample: int, pool_tail: str) -> int:
    """ceil(n / 2) per factor 2 of `downsample` (a stride-2 conv, kernel 3, padding 1, or a pool keeping the tail);
    the last factor is floor(n / 2) with pool_tail drop. 0 frames give 0 positions."""
    num_stages = downsample.bit_length() - 1
    for stage in range(num_stages):
        if stage == num_stages - 1 and pool_tail == "drop":
            frames = frames // 2  # AvgPool1d(2): (n - 2) // 2 + 1, an odd last position is dropped
        else:
            frames = (frames - 1) // 2 + 1
    return frames


def num_audio_tokens(num_frames: int, cfg: AudioConfig) -> int:
    """Encoder positions for `num_frames` mel frames: each window is subsampled on its own, then summed."""
    return sum(_tokens_in_window(f, cfg) for f in _window_frame_counts(num_frames, cfg))


def audio_token_timestamps(num_frames: int, cfg: AudioConfig) -> torch.Tensor:
    """(num_tokens,) float32 start time of each encoder position: window (and chunk) start + j * hop * downsample / rate."""
    token_s = cfg.hop_length * cfg.downsample / cfg.sample_rate_hz
    span = cfg.chunk_frames or cfg.window_frames                     # frames subsampled together
    span_s = span * cfg.hop_length / cfg.sample_rate_hz
    parts = [w * cfg.window_s + c * span_s + torch.arange(_subsampled(min(span, f - c * span), cfg.downsample, cfg.pool_tail),
                                                           dtype=torch.float64) * token_s
             for w, f in enumerate(_window_frame_counts(num_frames, cfg)) for c in range(-(-f // span))]
    return torch.cat(parts).to(torch.float32) if parts else torch.zeros(0, dtype=torch.float32)


def split_windows(mel: torch.Tensor, cfg: AudioConfig, *, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(num_mel_bins, frames) -> ((num_windows, num_mel_bins, width) zero-padded, (num_windows,) valid frames).

    `width` (default window_frames) may be less, down to the longest window's valid frames (`max_window_frames`): a
    batch of short clips is padded to its longest, not to 30 s."""
    assert mel.ndim == 2, mel.shape
    num_mels, num_frames = mel.shape
    counts = _window_frame_counts(num_frames, cfg)
    width = cfg.window_frames if width is None else width
    if not max(counts, default=0) <= width <= cfg.window_frames:
        raise ValueError(f"split_windows: width {width} must lie between the longest window's {max(counts, default=0)} "
                         f"frames and window_frames {cfg.window_frames}")
    if len(counts) <= 1:  # one window (a clip under window_frames): padded straight to width
        windows = torch.nn.functional.pad(mel, (0, width - num_frames))[None]
    else:
        padded = torch.nn.functional.pad(mel, (0, len(counts) * cfg.window_frames - num_frames))
        windows = padded.reshape(num_mels, len(counts), cfg.window_frames).transpose(0, 1)[..., :width]
    return windows.contiguous(), torch.tensor(counts, dtype=torch.long)  # (W, M, width)


def max_window_frames(num_frames: int, cfg: AudioConfig) -> int:
    """The valid frames of the longest window of `num_frames` frames."""
    return min(num_frames, cfg.window_frames)


def encode_audio(src: bytes | str | Path, cfg: AudioConfig, *, where: str = "", transform: MediaTransform | None = None,
                 part: int = 0) -> EncodedMedia:
    """Decode one audio member (or a video's audio track) into the audio encoder's input and token layout.

    `transform` (degrade.MediaTransform) changes the decoded waveform before its features; `part` is what it is told."""
    waveform = decode_audio(src, cfg, where=where)
    if transform is not None:
        waveform = transform.audio(waveform, cfg.sample_rate_hz, part)
    return audio_features(waveform, cfg, where=where)


def audio_features(waveform: torch.Tensor, cfg: AudioConfig, *, where: str = "") -> EncodedMedia:
    """(num_samples,) float32 at cfg.sample_rate_hz -> EncodedMedia {"mel": ...}; MediaError when too short for a token."""
    mel = log_mel(waveform, cfg)  # (M, num_frames)
    num_frames = int(mel.shape[1])
    num_tokens = num_audio_tokens(num_frames, cfg)
    if num_tokens == 0:
        prefix = f"{where}: " if where else ""
        raise MediaError(f"{prefix}audio is {waveform.shape[0]} samples long, {num_frames} {cfg.hop_length}-sample "
                         f"frames: too short for one audio token")
    return EncodedMedia(modality="audio", num_tokens=num_tokens, token_timestamps_s=audio_token_timestamps(num_frames, cfg),
                        tensors={"mel": mel}, duration_s=waveform.shape[0] / cfg.sample_rate_hz)
