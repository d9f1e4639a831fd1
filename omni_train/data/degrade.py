"""Degradations of decoded media: what a probe's `degrade:` applies and what `data.*.augment` draws from.

`MediaTransform` is the hook `pipeline.decode_sample(transform=...)` calls on each media part's decoded
signal before its features are computed: the waveform of an audio part (or of a video's audio track), the
frames of an image or video part as decoded, before resizing and normalisation. An implementation is built
per sample with its own random state, so what it does depends only on its seed material (a probe's seed and
the item, or a run's seed, the epoch and the sample key), never on the order samples are decoded in.

Below it, the degradations themselves and the spec a probe's `degrade:` list is written in:

    degrade: [{op: white_noise, snr_db: [20, 10, 5]}, {op: mp3, kbps: 16}, {op: speed, factor: [0.9, 1.1]},
              {op: overlap, level_db: [-10]}, {op: frame_drop, rate: [0.5]}]

Each entry names an `op` (OPS) and its severity field (OPS[op].severity), one value or a list of them: each
value is one condition, `Condition(op, severity, params)`, params being the op's other fields (their defaults
where not given). `parse_degrade` checks everything before any work: an unknown op or field, a value out of
range, or a condition given twice raises ValueError naming the field (`degrade[1].kbps must be ...`).

| op | severity (default) | other fields | what it does |
|---|---|---|---|
| white_noise, brown_noise | snr_db | | Gaussian noise (brown: integrated, drift removed) at the SNR over voiced samples |
| babble | snr_db | talkers (4) | the sum of `talkers` other utterances (equal speech power each), at the SNR |
| reverb | rt60_s | | convolution with exponentially decaying noise whose energy falls 60 dB in rt60_s |
| mp3, opus | kbps (16, 8) | | an FFmpeg round trip (libmp3lame, libopus in ogg) at that bitrate |
| telephone | sample_rate_hz (8000) | low_hz (300), high_hz (3400) | down to that rate, the band kept, back up |
| speed | factor | | resampled: factor 1.1 is 10% faster and shorter, and higher |
| pitch | semitones | | pitch shifted, length kept (resampling, then a phase vocoder back to the length) |
| eq | gain_db | bands (8) | a gain in [-gain_db, gain_db] at `bands` log-spaced frequencies, interpolated (eq) |
| gain | gain_db | | louder or quieter by gain_db (the features are log-mel of the level as recorded; no clipping) |
| clip | level | | clipped at level x the waveform's peak |
| packet_loss | rate | frame_ms (20) | each frame_ms frame zeroed with probability rate |
| overlap | level_db | | another utterance added from a random point of the first half, at level_db to the speech |
| frame_drop | rate | | each video frame dropped with probability rate (never all; their timestamps go with them) |
| downscale | factor | | frames shrunk by factor (the pipeline then resizes them as usual) |
| jpeg | quality | | a PIL JPEG round trip at that quality |
| blur | radius | | PIL Gaussian blur of that radius in pixels |

Speech power is the mean square over voiced samples (|x| above 1% of the peak), as `demo.render_speech`
measures it, so silences do not understate it. `Degradation(condition, seed, others)` is the MediaTransform
of one condition for one item: its random draws come from numpy Generators seeded with the list
[*seed, crc32 of the op and its non-severity params, part, stream] (a probe passes [probe.seed, item index]),
so an item is degraded byte-identically on every run and rank. The severity is left out of the seed on
purpose: the severities of an op share their draws (the same noise at each SNR, the lost packets at rate 0.1
a subset of those at 0.2), so a curve over severity shows the severity, not a new draw. Babble and overlap
add `others`, utterances the caller picks (a probe: other items of its own, decoded clean).
"""

from __future__ import annotations

import functools
import io
import math
import subprocess
import tempfile
import zlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch


class MediaTransform(Protocol):
    def audio(self, waveform: torch.Tensor, sample_rate_hz: int, part: int) -> torch.Tensor:
        """(S,) float32 mono at sample_rate_hz -> (S',) float32 at the same rate (S' may differ: speed, codec
        padding). `part`: the part's index among the sample's media parts (a video's track: its video's index)."""
        ...

    def frames(self, frames: torch.Tensor, timestamps_s: torch.Tensor, part: int,
               modality: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, 3, H, W) uint8 RGB as decoded (an image: T = 1) and each frame's time in seconds (T,) -> the same
        kinds; T may shrink (dropped frames, never to 0) and H, W change (downscaling). `modality`: image | video."""
        ...


# ---------------------------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class Field:
    default: float | None   # None: required
    rule: str               # what a value must be, for the error message
    ok: Callable[[float], bool]


def _number(rule: str, ok: Callable[[float], bool] = lambda v: True, default: float | None = None) -> Field:
    return Field(default, rule, ok)


@dataclass(frozen=True)
class Op:
    modalities: tuple[str, ...]   # the parts it changes: audio (an audio part or a video's track), image, video
    severity: str                 # the field whose values are the conditions
    fields: dict[str, Field]      # the severity field first, then the others


SNR = _number("a number of dB", lambda v: -30 <= v <= 60)
RATE = _number("a rate in [0, 1]", lambda v: 0 <= v <= 1)
OPS: dict[str, Op] = {
    "white_noise": Op(("audio",), "snr_db", {"snr_db": SNR}),
    "brown_noise": Op(("audio",), "snr_db", {"snr_db": SNR}),
    "babble": Op(("audio",), "snr_db", {
        "snr_db": SNR,
        "talkers": _number("an integer in 1..16", lambda v: v == int(v) and 1 <= v <= 16, 4)}),
    "reverb": Op(("audio",), "rt60_s", {"rt60_s": _number("seconds in (0, 5]", lambda v: 0 < v <= 5)}),
    "mp3": Op(("audio",), "kbps", {
        "kbps": _number("a bitrate in 8..160 (libmp3lame at 16 kHz)", lambda v: 8 <= v <= 160, 16)}),
    "opus": Op(("audio",), "kbps", {"kbps": _number("a bitrate in 6..256", lambda v: 6 <= v <= 256, 8)}),
    "telephone": Op(("audio",), "sample_rate_hz", {
        "sample_rate_hz": _number("an integer rate in 4000..16000", lambda v: v == int(v) and 4000 <= v <= 16000, 8000),
        "low_hz": _number("a frequency >= 0", lambda v: v >= 0, 300),
        "high_hz": _number("a frequency > 0", lambda v: v > 0, 3400)}),
    "speed": Op(("audio",), "factor", {"factor": _number("a factor in [0.5, 2]", lambda v: 0.5 <= v <= 2)}),
    "pitch": Op(("audio",), "semitones", {"semitones": _number("semitones in [-12, 12]", lambda v: -12 <= v <= 12)}),
    "eq": Op(("audio",), "gain_db", {
        "gain_db": _number("dB in [0, 30]", lambda v: 0 <= v <= 30),
        "bands": _number("an integer in 2..32", lambda v: v == int(v) and 2 <= v <= 32, 8)}),
    "gain": Op(("audio",), "gain_db", {"gain_db": _number("dB in [-60, 60]", lambda v: -60 <= v <= 60)}),
    "clip": Op(("audio",), "level", {"level": _number("a fraction of the peak in (0, 1]", lambda v: 0 < v <= 1)}),
    "packet_loss": Op(("audio",), "rate", {
        "rate": RATE,
        "frame_ms": _number("milliseconds in [1, 1000]", lambda v: 1 <= v <= 1000, 20)}),
    "overlap": Op(("audio",), "level_db", {"level_db": _number("a number of dB", lambda v: -60 <= v <= 30)}),
    "frame_drop": Op(("video",), "rate", {"rate": RATE}),
    "downscale": Op(("image", "video"), "factor", {"factor": _number("a factor in [1, 64]", lambda v: 1 <= v <= 64)}),
    "jpeg": Op(("image", "video"), "quality", {
        "quality": _number("an integer in 1..95", lambda v: v == int(v) and 1 <= v <= 95)}),
    "blur": Op(("image", "video"), "radius", {"radius": _number("pixels in (0, 100]", lambda v: 0 < v <= 100)}),
}
CLEAN = "none"  # the `degradation` of the rows of the undegraded items


@dataclass(frozen=True)
class Condition:
    """One op at one severity: a probe's items are run once under each."""
    op: str
    severity: float
    params: tuple[tuple[str, float], ...] = ()   # the op's other fields, all of them, in OPS order

    def __getitem__(self, name: str) -> float:
        return self.severity if name == OPS[self.op].severity else dict(self.params)[name]

    @property
    def label(self) -> str:
        """"white_noise snr_db=10", the other fields after it where they differ from their defaults."""
        fields = OPS[self.op].fields
        extra = [f"{k}={v:g}" for k, v in self.params if v != fields[k].default]
        return " ".join([severity_label(self.op, self.severity), *extra])

    @property
    def seed_word(self) -> int:
        """The op and its other fields as one number: what the draws depend on besides the item (not the severity)."""
        return zlib.crc32(" ".join([self.op, *(f"{k}={v:g}" for k, v in self.params)]).encode())

    @property
    def num_others(self) -> int:
        """How many other utterances it adds: babble its talkers, overlap one."""
        return int(self["talkers"]) if self.op == "babble" else 1 if self.op == "overlap" else 0

    def applies_to(self, modalities: Sequence[str]) -> bool:
        """Whether it can change an item whose media parts are `modalities` (a video may carry an audio track)."""
        wanted = set(OPS[self.op].modalities)
        if "audio" in wanted:
            wanted.add("video")
        return bool(wanted & set(modalities))


def severity_label(op: str, severity: Any) -> str:
    """"white_noise snr_db=10": a row's degradation and severity as text (an unknown op: "op severity")."""
    if op not in OPS:
        return f"{op} {severity}"
    return f"{op} {OPS[op].severity}={severity:g}" if isinstance(severity, (int, float)) else f"{op} {severity}"


def parse_degrade(spec: Sequence[dict]) -> list[Condition]:
    """A `degrade:` list -> its conditions in order, or ValueError naming the field (module docstring)."""
    conditions: list[Condition] = []
    for i, entry in enumerate(spec):
        where = f"degrade[{i}]"
        if not isinstance(entry, dict) or "op" not in entry:
            raise ValueError(f"{where} must be a mapping with an op, e.g. {{op: white_noise, snr_db: [20, 10]}}, "
                             f"got {entry!r}")
        if entry["op"] not in OPS:
            raise ValueError(f"{where}.op must be one of {', '.join(OPS)}, got {entry['op']!r}")
        op = OPS[entry["op"]]
        unknown = [k for k in entry if k != "op" and k not in op.fields]
        if unknown:
            raise ValueError(f"{where}.{unknown[0]} is not a field of op {entry['op']} (fields: {', '.join(op.fields)})")
        values: dict[str, list] = {}
        for name, spec_field in op.fields.items():
            value = entry.get(name, spec_field.default)
            if value is None:
                raise ValueError(f"{where}.{name} is required by op {entry['op']}: {spec_field.rule}, or a list of them")
            listed = value if isinstance(value, list) and name == op.severity else [value]
            if not listed:
                raise ValueError(f"{where}.{name} must be {spec_field.rule}, or a non-empty list of them; got []")
            for v in listed:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not spec_field.ok(v):
                    raise ValueError(f"{where}.{name} must be {spec_field.rule}, got {v!r}")
            values[name] = listed
        if entry["op"] == "telephone" and not values["low_hz"][0] < values["high_hz"][0] < values["sample_rate_hz"][0] / 2:
            raise ValueError(f"{where}.high_hz must lie above low_hz and below half of sample_rate_hz "
                             f"({values['low_hz'][0]} < {values['high_hz'][0]} < {values['sample_rate_hz'][0] / 2:g})")
        params = tuple((name, values[name][0]) for name in op.fields if name != op.severity)
        for severity in values[op.severity]:
            condition = Condition(entry["op"], severity, params)
            if any((c.op, c.severity) == (condition.op, severity) for c in conditions):
                raise ValueError(f"{where}.{op.severity} repeats {severity_label(condition.op, severity)}: each op and "
                                 f"severity is one condition (one row per metric)")
            conditions.append(condition)
    return conditions


# ---------------------------------------------------------------------------------------------- audio


def speech_power(waveform: np.ndarray) -> float:
    """Mean square over the voiced samples (|x| above 1% of the peak): silences would understate the speech."""
    magnitude = np.abs(waveform)
    peak = magnitude.max(initial=0.0)
    if peak == 0:
        return 0.0
    return float(np.mean(waveform[magnitude > 0.01 * peak].astype(np.float64) ** 2))


def white_noise(num_samples: int, rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal(num_samples)


def brown_noise(num_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Integrated white noise with its slow drift removed (a 256-sample moving average): a low rumble."""
    noise = np.cumsum(rng.standard_normal(num_samples))
    return noise - np.convolve(noise, np.ones(256) / 256, mode="same")


def babble_noise(num_samples: int, others: Sequence[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """The sum of `others`, each at the same speech power, repeated to `num_samples` from a random start."""
    babble = np.zeros(num_samples)
    for other in others:
        other = np.asarray(other, dtype=np.float64)
        power = speech_power(other)
        if power > 0:
            babble += np.resize(np.roll(other, -int(rng.integers(other.size))), num_samples) / math.sqrt(power)
    return babble


def add_at_snr(waveform: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """waveform + noise scaled so that speech_power(waveform) / mean(noise ** 2) is snr_db."""
    noise_power = float(np.mean(noise ** 2))
    if noise_power == 0:
        return waveform
    return waveform + noise * math.sqrt(speech_power(waveform) / 10.0 ** (snr_db / 10.0) / noise_power)


def room_impulse_response(rt60_s: float, sample_rate_hz: int, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise under an exponential envelope whose energy falls 60 dB in rt60_s, 1.5 x rt60_s long (the
    tail then 90 dB down), unit energy. Schroeder's backward integral of its square measures rt60_s back."""
    t = np.arange(max(2, round(1.5 * rt60_s * sample_rate_hz))) / sample_rate_hz
    rir = rng.standard_normal(t.size) * 10.0 ** (-3.0 * t / rt60_s)   # amplitude: -60 dB of energy at rt60_s
    return rir / np.sqrt(np.sum(rir ** 2))


def reverberate(waveform: np.ndarray, rt60_s: float, sample_rate_hz: int, rng: np.random.Generator) -> np.ndarray:
    """The waveform convolved with a room_impulse_response, cut to its own length (the last tail is lost)."""
    from scipy.signal import fftconvolve

    return fftconvolve(waveform, room_impulse_response(rt60_s, sample_rate_hz, rng))[: waveform.size]


CODECS = {"mp3": (["-c:a", "libmp3lame"], "mp3"), "opus": (["-c:a", "libopus"], "ogg")}


def codec_round_trip(waveform: np.ndarray, sample_rate_hz: int, codec: str, kbps: float) -> np.ndarray:
    """Encoded by FFmpeg at `kbps`, decoded back by torchcodec (the pipeline's decoder) at the same rate, cut or
    zero-padded to the input's length. Through a file, not a pipe: the muxer then writes the encoder delay in the
    header (LAME's tag, Ogg's pre-skip), which the decoder removes, so the output stays aligned with the input."""
    from torchcodec.decoders import AudioDecoder

    from omni_train.data.synth import require

    args, container = CODECS[codec]
    pcm = np.clip(waveform, -1.0, 1.0).astype("<f4")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"degraded.{container}"
        # -threads 1 and +bitexact: the same bytes on every run and machine with this FFmpeg
        cmd = [require("ffmpeg"), "-hide_banner", "-loglevel", "error", "-y", "-f", "f32le", "-ar", str(sample_rate_hz),
               "-ac", "1", "-i", "-", *args, "-b:a", f"{kbps:g}k", "-threads", "1", "-fflags", "+bitexact",
               "-map_metadata", "-1", str(path)]
        result = subprocess.run(cmd, input=pcm.tobytes(), capture_output=True)
        if result.returncode != 0:
            raise RuntimeError(f"ffmpeg could not encode {codec} at {kbps:g} kbps: "
                               f"{result.stderr.decode(errors='replace').strip()}")
        encoded = path.read_bytes()
    decoded = AudioDecoder(encoded, sample_rate=sample_rate_hz).get_all_samples().data.mean(dim=0).numpy()
    out = np.zeros(waveform.size)
    out[: min(decoded.size, out.size)] = decoded[: out.size]
    return out


def _resample(waveform: np.ndarray, ratio: Fraction) -> np.ndarray:
    """Polyphase resampling to `ratio` x the samples (scipy's Kaiser-windowed filter, designed once per ratio)."""
    from scipy.signal import resample_poly

    if ratio == 1:
        return waveform.copy()
    return resample_poly(waveform, ratio.numerator, ratio.denominator, window=_lowpass(ratio))


@functools.lru_cache(maxsize=256)
def _lowpass(ratio: Fraction) -> np.ndarray:
    """resample_poly's own anti-aliasing filter for `ratio` (its defaults: a Kaiser window of beta 5, 10 taps per
    phase), designed once: for a ratio of large terms (a speed of 1.115 is 200/223) the design costs more than the
    filtering."""
    from scipy.signal import firwin

    max_rate = max(ratio.numerator, ratio.denominator)
    return firwin(2 * 10 * max_rate + 1, 1 / max_rate, window=("kaiser", 5.0))


def telephone_band(waveform: np.ndarray, sample_rate_hz: int, *, telephone_hz: int, low_hz: float,
                   high_hz: float) -> np.ndarray:
    """Down to `telephone_hz`, band-passed to low_hz..high_hz (4th-order Butterworth, forward and back: no phase
    shift), up again; the length is kept."""
    from scipy.signal import butter, sosfiltfilt

    narrow = _resample(waveform, Fraction(telephone_hz, sample_rate_hz))
    if narrow.size > 30:  # sosfiltfilt's padding needs a few dozen samples
        narrow = sosfiltfilt(butter(4, [low_hz, high_hz], btype="bandpass", fs=telephone_hz, output="sos"), narrow)
    out = _resample(narrow, Fraction(sample_rate_hz, telephone_hz))
    return np.pad(out, (0, max(0, waveform.size - out.size)))[: waveform.size]


def change_speed(waveform: np.ndarray, factor: float) -> np.ndarray:
    """Played `factor` times faster: 1 / factor times the samples, every frequency times factor."""
    return _resample(waveform, 1 / Fraction(factor).limit_denominator(1000))


def _time_stretch(waveform: np.ndarray, num_samples: int, *, n_fft: int = 512, hop: int = 128) -> np.ndarray:
    """A phase vocoder (Flanagan and Golden 1966; torchaudio's phase_vocoder): the STFT's frames read at a
    different rate, magnitudes interpolated, phases advanced by each bin's own rate, to `num_samples`."""
    x = torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float64))
    if x.numel() < n_fft:
        x = torch.nn.functional.pad(x, (0, n_fft - x.numel()))
    window = torch.hann_window(n_fft, dtype=torch.float64)
    spec = torch.stft(x, n_fft, hop, window=window, return_complex=True)                   # (F, N)
    steps = torch.linspace(0, spec.shape[1] - 1, 1 + num_samples // hop, dtype=torch.float64)  # the frames read
    spec = torch.nn.functional.pad(spec, (0, 2))
    first, second = spec[:, steps.long()], spec[:, steps.long() + 1]
    alpha = steps % 1
    magnitude = (1 - alpha) * first.abs() + alpha * second.abs()
    expected = torch.linspace(0, math.pi * hop, spec.shape[0], dtype=torch.float64)[:, None]  # each bin's advance per hop
    delta = second.angle() - first.angle() - expected
    delta = delta - 2 * math.pi * torch.round(delta / (2 * math.pi))
    phase = torch.cat([spec[:, :1].angle(), (delta + expected)[:, :-1]], dim=1).cumsum(dim=1)
    stretched = torch.polar(magnitude, phase)                                               # (F, N')
    return torch.istft(stretched, n_fft, hop, window=window, length=num_samples).numpy()


def shift_pitch(waveform: np.ndarray, semitones: float) -> np.ndarray:
    """Every frequency times 2 ** (semitones / 12), the length kept: played faster by that factor, then
    stretched back to the original length."""
    faster = change_speed(waveform, 2.0 ** (semitones / 12.0))
    return _time_stretch(faster, waveform.size)


def eq_frequencies_hz(bands: int, sample_rate_hz: int) -> np.ndarray:
    """The equalizer's `bands` control frequencies: log-spaced from 100 Hz to Nyquist."""
    return np.geomspace(100.0, sample_rate_hz / 2, int(bands))


def equalize(waveform: np.ndarray, sample_rate_hz: int, gains_db: np.ndarray) -> np.ndarray:
    """Each frequency's amplitude times the gain (dB) interpolated in log frequency between the control frequencies
    of eq_frequencies_hz(len(gains_db)) (held below the first), with phases kept: a channel, a microphone, another
    vocal tract's tilt."""
    from scipy.fft import irfft, next_fast_len, rfft

    size = next_fast_len(waveform.size, real=True)  # zero-padded: a length with a large prime factor took 10x as long
    bins_hz = np.fft.rfftfreq(size, 1.0 / sample_rate_hz)
    controls = np.log(eq_frequencies_hz(len(gains_db), sample_rate_hz))
    gain_db = np.interp(np.log(np.maximum(bins_hz, 1.0)), controls, gains_db)
    return irfft(rfft(waveform, n=size) * 10.0 ** (gain_db / 20.0), n=size)[: waveform.size]


def clip(waveform: np.ndarray, level: float) -> np.ndarray:
    """Clipped at `level` x the waveform's peak."""
    limit = level * np.abs(waveform).max(initial=0.0)
    return np.clip(waveform, -limit, limit)


def drop_packets(waveform: np.ndarray, sample_rate_hz: int, rate: float, frame_ms: float,
                 draws: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Each `frame_ms` frame zeroed where its uniform draw is below `rate` (a lost packet, no concealment).
    `draws`: at least one uniform [0, 1) per frame. Returns (waveform, frames lost, frames)."""
    frame = max(1, round(frame_ms * sample_rate_hz / 1000))
    num_frames = -(-waveform.size // frame)
    lost = draws[:num_frames] < rate
    out = waveform.copy()
    out[np.repeat(lost, frame)[: waveform.size]] = 0.0
    return out, int(lost.sum()), num_frames


def overlap_speaker(waveform: np.ndarray, other: np.ndarray, level_db: float, rng: np.random.Generator) -> np.ndarray:
    """`other` added from a random point of the waveform's first half (cut at its end), scaled so that its speech
    power, over the part added, is level_db relative to the waveform's."""
    start = int(rng.integers(0, waveform.size // 2 + 1))
    piece = np.asarray(other, dtype=np.float64)[: waveform.size - start]
    power = speech_power(piece)
    if power == 0:
        return waveform
    out = waveform.copy()
    out[start: start + piece.size] += piece * math.sqrt(speech_power(waveform) * 10.0 ** (level_db / 10.0) / power)
    return out


# ---------------------------------------------------------------------------------------------- frames


def drop_frames(frames: torch.Tensor, timestamps_s: torch.Tensor, rate: float,
                draws: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Each frame dropped where its uniform draw is below `rate`; when that would drop them all, the one with the
    highest draw stays. The kept frames keep their timestamps."""
    keep = draws[: frames.shape[0]] >= rate
    if not keep.any():
        keep[int(np.argmax(draws[: frames.shape[0]]))] = True
    index = torch.from_numpy(np.flatnonzero(keep))
    return frames[index], timestamps_s[index]


def _per_frame(frames: torch.Tensor, fn: Callable) -> torch.Tensor:
    """(T, 3, H, W) uint8 -> fn(PIL image) on each frame -> (T, 3, H', W') uint8."""
    from PIL import Image

    out = [torch.from_numpy(np.asarray(fn(Image.fromarray(frame.permute(1, 2, 0).numpy())).convert("RGB")).copy())
           for frame in frames]
    return torch.stack(out).permute(0, 3, 1, 2).contiguous()


def downscale(frames: torch.Tensor, factor: float) -> torch.Tensor:
    """Each frame shrunk by `factor` (bicubic, antialiased), at least 1 x 1 pixel."""
    height, width = frames.shape[-2:]
    size = (max(1, round(width / factor)), max(1, round(height / factor)))
    return _per_frame(frames, lambda image: image.resize(size, resample=3))  # 3: Image.Resampling.BICUBIC


def jpeg(frames: torch.Tensor, quality: int) -> torch.Tensor:
    """Each frame through a JPEG encode and decode (PIL, libjpeg) at `quality`."""
    from PIL import Image

    def round_trip(image):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=int(quality))
        return Image.open(io.BytesIO(buffer.getvalue()))

    return _per_frame(frames, round_trip)


def blur(frames: torch.Tensor, radius: float) -> torch.Tensor:
    from PIL import ImageFilter

    return _per_frame(frames, lambda image: image.filter(ImageFilter.GaussianBlur(radius)))


# ---------------------------------------------------------------------------------------------- the transform


_AUDIO_STREAM, _FRAME_STREAM = 0, 1  # one Generator per (part, stream): draws never depend on the call order


class Degradation:
    """One condition applied to one item's media parts (a MediaTransform). `seed`: the item's seed material,
    e.g. [probe seed, item index]; `others`: the utterances babble and overlap add, (S,) float32 at the
    waveform's rate. After decoding, `applied` tells whether any part was changed and `stats` counts what the
    op did (packets_lost of packets, frames_dropped of frames)."""

    def __init__(self, condition: Condition, seed: Sequence[int], others: Sequence[torch.Tensor] = ()):
        self.condition = condition
        self.seed = [int(s) for s in seed]
        self.others = [np.asarray(o, dtype=np.float64) for o in others]
        self.applied = False
        self.stats: dict[str, int] = defaultdict(int)

    def _rng(self, part: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([*self.seed, self.condition.seed_word, part, stream])

    def audio(self, waveform: torch.Tensor, sample_rate_hz: int, part: int) -> torch.Tensor:
        c = self.condition
        if "audio" not in OPS[c.op].modalities or waveform.numel() == 0 or (c.num_others and not self.others):
            return waveform
        x = waveform.numpy().astype(np.float64)
        rng = self._rng(part, _AUDIO_STREAM)
        if c.op == "white_noise":
            y = add_at_snr(x, white_noise(x.size, rng), c.severity)
        elif c.op == "brown_noise":
            y = add_at_snr(x, brown_noise(x.size, rng), c.severity)
        elif c.op == "babble":
            y = add_at_snr(x, babble_noise(x.size, self.others[: c.num_others], rng), c.severity)
        elif c.op == "reverb":
            y = reverberate(x, c.severity, sample_rate_hz, rng)
        elif c.op in CODECS:
            y = codec_round_trip(x, sample_rate_hz, c.op, c.severity)
        elif c.op == "telephone":
            y = telephone_band(x, sample_rate_hz, telephone_hz=int(c.severity), low_hz=c["low_hz"], high_hz=c["high_hz"])
        elif c.op == "speed":
            y = change_speed(x, c.severity)
        elif c.op == "pitch":
            y = shift_pitch(x, c.severity)
        elif c.op == "eq":  # the same shape at every gain_db: the draws are in units of it
            y = equalize(x, sample_rate_hz, c.severity * rng.uniform(-1.0, 1.0, int(c["bands"])))
        elif c.op == "gain":
            y = x * 10.0 ** (c.severity / 20.0)
        elif c.op == "clip":
            y = clip(x, c.severity)
        elif c.op == "packet_loss":
            frame = max(1, round(c["frame_ms"] * sample_rate_hz / 1000))
            y, lost, frames = drop_packets(x, sample_rate_hz, c.severity, c["frame_ms"],
                                           rng.random(-(-x.size // frame)))
            self.stats["packets_lost"] += lost
            self.stats["packets"] += frames
        else:
            assert c.op == "overlap", c.op
            y = overlap_speaker(x, self.others[0], c.severity, rng)
        self.applied = True
        return torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))

    def frames(self, frames: torch.Tensor, timestamps_s: torch.Tensor, part: int,
               modality: str) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.condition
        if modality not in OPS[c.op].modalities or frames.shape[0] == 0:
            return frames, timestamps_s
        if c.op == "frame_drop":
            num_frames = frames.shape[0]
            frames, timestamps_s = drop_frames(frames, timestamps_s, c.severity,
                                               self._rng(part, _FRAME_STREAM).random(num_frames))
            self.stats["frames_dropped"] += num_frames - frames.shape[0]
            self.stats["frames"] += num_frames
        elif c.op == "downscale":
            frames = downscale(frames, c.severity)
        elif c.op == "jpeg":
            frames = jpeg(frames, int(c.severity))
        else:
            assert c.op == "blur", c.op
            frames = blur(frames, c.severity)
        self.applied = True
        return frames, timestamps_s
