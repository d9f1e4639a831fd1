"""Video decoding: frames sampled at a set rate, in the same patch layout as images (`image.py`).

Frames are taken every 1/fps seconds (at most `max_frames`, then spread over the whole clip),
decoded with torchcodec (or decord), resized to a shared `smart_resize` size within the video's
per-frame pixel bounds, normalized, and cut into patches of `temporal_patch_size` frames x
`patch_size`^2 pixels by `image.image_to_patches`. Each merged token carries the timestamp of the
first frame of its temporal patch (the source's real presentation time). TMRoPE's time ids
(`positions.py`) follow the nominal rate instead, `seconds_per_grid` = temporal_patch_size / fps,
as Qwen2.5-Omni's processor does, also for clips sampled more sparsely than fps (over max_frames).
A video's audio track (audio in video) is decoded by `audio.encode_audio` from the same bytes.
"""

from __future__ import annotations

import importlib.util
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from omni_train.data.image import ImageConfig, image_to_patches, normalize, num_tokens_of, smart_resize
from omni_train.data.sample import EncodedMedia, MediaError

if TYPE_CHECKING:
    from omni_train.data.degrade import MediaTransform

BACKENDS = ("torchcodec", "decord")


@dataclass(kw_only=True)
class VideoConfig:
    fps: float = 2.0                 # frames sampled per second of video
    max_frames: int = 64             # longer clips are sampled more sparsely, over their whole duration
    min_frames: int = 2
    temporal_patch_size: int = 2     # frames per temporal patch; must equal the image config's
    min_pixels: int = 28 * 28 * 4    # per-frame resized area bounds (pixels)
    max_pixels: int = 224 * 224
    max_duration_s: float = 1200.0   # longer videos are refused (MediaError), not truncated
    backend: str = "torchcodec"      # torchcodec | decord (optional extra)
    # Default for video parts that do not say: interleave the video's own audio track with its frames (Qwen2.5-Omni's
    # audio in video; a part's "use_audio_in_video" decides for itself). A video without an audio track is skipped.
    use_audio_in_video: bool = False
    # training only: ops of degrade.OPS applied to each video's decoded frames before resizing (augment.py); its audio
    # track takes data.audio.augment
    augment: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self):
        if not self.fps > 0:
            raise ValueError(f"video.fps must be > 0, got {self.fps!r}")
        for name in ("max_frames", "min_frames", "temporal_patch_size", "min_pixels", "max_pixels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"video.{name} must be a positive integer, got {value!r}")
        if self.max_frames % self.temporal_patch_size:
            raise ValueError(f"video.max_frames ({self.max_frames}) must be a multiple of "
                             f"video.temporal_patch_size ({self.temporal_patch_size})")
        if self.min_frames > self.max_frames:
            raise ValueError(f"video.min_frames ({self.min_frames}) must be <= video.max_frames ({self.max_frames})")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"video.min_pixels ({self.min_pixels}) must be <= video.max_pixels ({self.max_pixels})")
        if not self.max_duration_s > 0:
            raise ValueError(f"video.max_duration_s must be > 0, got {self.max_duration_s!r}")
        if not isinstance(self.use_audio_in_video, bool):
            raise ValueError(f"video.use_audio_in_video must be true or false, got {self.use_audio_in_video!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"video.backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        # A missing optional backend stops the run here instead of turning every video into a skipped sample.
        if self.backend == "decord" and importlib.util.find_spec("decord") is None:
            raise ValueError("video.backend=decord needs the decord package: `pip install decord` "
                             "(or `pip install omni_train[decord]`), or use video.backend=torchcodec")
        from omni_train.data.augment import parse_augment  # here: augment imports degrade, which may import this module

        self._augment_ops = parse_augment(self.augment, "video.augment", "video")

    @property
    def augment_ops(self) -> list:
        """`augment` parsed (augment.AugmentOp each)."""
        return self._augment_ops


def sample_frame_times(duration_s: float, num_source_frames: int, source_fps: float,
                       cfg: VideoConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Which source frames to decode: (indices (T,) int64, nominal timestamps_s (T,) float32).

    Times 0, 1/fps, 2/fps, ... up to the last frame, each mapped to the nearest source frame. More
    than `max_frames` (or fewer than `min_frames`) such times -> that many spread evenly from the
    first to the last frame. Never more distinct frames than the source has. T is then padded up
    to a multiple of `temporal_patch_size` (and to `min_frames`) by repeating the last frame, with
    its timestamp, so that a temporal patch never mixes in a frame that is not in the video.
    """
    if num_source_frames < 1 or not source_fps > 0:
        raise ValueError(f"a video needs at least one frame and a positive frame rate, got "
                         f"{num_source_frames} frames at {source_fps} fps")
    last_s = (num_source_frames - 1) / source_fps
    if duration_s > 0:
        last_s = min(last_s, duration_s)
    num_at_fps = math.floor(last_s * cfg.fps + 1e-6) + 1
    num_frames = min(max(num_at_fps, cfg.min_frames), cfg.max_frames, num_source_frames)
    if num_frames == num_at_fps:
        times_s = torch.arange(num_frames, dtype=torch.float64) / cfg.fps
    else:
        times_s = torch.linspace(0.0, last_s, num_frames, dtype=torch.float64)
    indices = (times_s * source_fps + 0.5).floor().long().clamp(0, num_source_frames - 1)  # nearest; ties go later
    num_padded = max(cfg.min_frames, num_frames)
    num_padded = -(-num_padded // cfg.temporal_patch_size) * cfg.temporal_patch_size
    indices = torch.cat([indices, indices[-1:].expand(num_padded - num_frames)])
    return indices, (indices.double() / source_fps).float()


def _label(src: bytes | str | Path, where: str) -> str:
    return where or (str(src) if isinstance(src, (str, Path)) else "<video bytes>")


def _first_line(error: Exception) -> str:
    """Decoder errors are multi-line and prefixed with C++ source locations; keep the useful line."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return re.sub(r"^.*?\.(?:cpp|cc):\d+:?,?\s*", "", line)


def _decode_torchcodec(src: bytes | str | Path, cfg: VideoConfig, label: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    from torchcodec.decoders import VideoDecoder

    decoder = VideoDecoder(bytes(src) if isinstance(src, (bytes, bytearray)) else str(src))
    meta = decoder.metadata
    num_source_frames = meta.num_frames or len(decoder)
    duration_s = meta.duration_seconds or 0.0
    source_fps = meta.average_fps or (num_source_frames / duration_s if duration_s else 0.0)
    _check_duration(duration_s, cfg, label)
    indices, _ = sample_frame_times(duration_s, num_source_frames, source_fps, cfg)
    unique, inverse = torch.unique(indices, return_inverse=True)  # sorted: decoding moves forward only
    batch = decoder.get_frames_at(indices=unique.tolist())
    frames = batch.data[inverse]                   # (T, 3, H, W) uint8
    timestamps_s = batch.pts_seconds[inverse].float()
    return frames, timestamps_s, float(duration_s or num_source_frames / source_fps)


def _decode_decord(src: bytes | str | Path, cfg: VideoConfig, label: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    import decord  # importable: VideoConfig checked it
    reader = decord.VideoReader(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else str(src))
    num_source_frames = len(reader)
    source_fps = reader.get_avg_fps()
    duration_s = float(reader.get_frame_timestamp(num_source_frames - 1)[1]) if num_source_frames else 0.0
    _check_duration(duration_s, cfg, label)
    indices, _ = sample_frame_times(duration_s, num_source_frames, source_fps, cfg)
    unique, inverse = torch.unique(indices, return_inverse=True)
    frames = torch.from_numpy(reader.get_batch(unique.tolist()).asnumpy()).permute(0, 3, 1, 2)[inverse]  # (T, 3, H, W)
    starts_s = torch.from_numpy(reader.get_frame_timestamp(unique.tolist())[:, 0].copy())
    return frames, starts_s[inverse].float(), duration_s


def _check_duration(duration_s: float, cfg: VideoConfig, label: str) -> None:
    if duration_s > cfg.max_duration_s:
        raise MediaError(f"{label}: video is {duration_s:.1f} s, over video.max_duration_s={cfg.max_duration_s}")


def _resize_normalize(frames: torch.Tensor, height: int, width: int, image_cfg: ImageConfig) -> torch.Tensor:
    """(T, 3, H0, W0) uint8 -> (T, 3, height, width) float32 normalized.

    Resized in uint8: torch's CPU kernel for uint8 bicubic with antialias follows PIL's (within 2 of
    255 levels of `Image.resize(BICUBIC)`, measured), so video frames match the image path, and it
    is about 4x faster than the float kernel, which also overshoots by up to about 20 levels.
    """
    if frames.shape[-2:] != (height, width):
        frames = F.interpolate(frames, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    return normalize(frames, image_cfg.mean, image_cfg.std)


def decode_video_frames(src: bytes | str | Path, cfg: VideoConfig, *,
                        where: str = "") -> tuple[torch.Tensor, torch.Tensor, float]:
    """Encoded video -> (frames (T, 3, H, W) uint8 as decoded, timestamps_s (T,) float32 real pts, duration_s).

    T is a multiple of temporal_patch_size (`sample_frame_times`); H, W are the source's. Raises MediaError."""
    label = _label(src, where)
    if isinstance(src, (bytes, bytearray)) and not src:
        raise MediaError(f"{label}: video is empty (0 bytes)")
    backend = _decode_torchcodec if cfg.backend == "torchcodec" else _decode_decord
    try:
        return backend(src, cfg, label)
    except MediaError:
        raise
    except Exception as e:  # noqa: BLE001
        # Untrusted input: torchcodec raises RuntimeError / ValueError, decord its own DECORDError.
        raise MediaError(f"{label}: cannot decode video ({_first_line(e)})") from None


def _resize_frames(frames: torch.Tensor, cfg: VideoConfig, image_cfg: ImageConfig) -> torch.Tensor:
    """(T, 3, H0, W0) uint8 as decoded -> (T, 3, H, W) float32 normalized, H and W the video's `smart_resize`."""
    height, width = smart_resize(frames.shape[-2], frames.shape[-1], image_cfg,
                                 min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    return _resize_normalize(frames, height, width, image_cfg)


def decode_video(src: bytes | str | Path, cfg: VideoConfig, image_cfg: ImageConfig | None = None, *,
                 where: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Encoded video -> (frames (T, 3, H, W) float32 normalized, timestamps_s (T,) float32 real pts).

    `image_cfg` supplies the patch grid (sides are multiples of patch_size * merge_size) and the
    normalization; the pixel bounds are the video's. Raises MediaError.
    """
    frames, timestamps_s, _ = decode_video_frames(src, cfg, where=where)
    return _resize_frames(frames, cfg, image_cfg or ImageConfig()), timestamps_s


def encode_video(src: bytes | str | Path, cfg: VideoConfig, image_cfg: ImageConfig, *, where: str = "",
                 transform: MediaTransform | None = None, part: int = 0) -> EncodedMedia:
    """Decode a video into {"patches": (N, 3 * tp * p * p), "grid_thw": (3,), "frame_timestamps_s": (T,)}.

    `transform` (degrade.MediaTransform) changes the decoded frames before resizing; `part` is what it is told."""
    if cfg.temporal_patch_size != image_cfg.temporal_patch_size:
        raise ValueError(f"video.temporal_patch_size ({cfg.temporal_patch_size}) must equal image.temporal_patch_size "
                         f"({image_cfg.temporal_patch_size}): images and video share one patch embedding")
    frames, timestamps_s, duration_s = decode_video_frames(src, cfg, where=where)
    if transform is not None:
        frames, timestamps_s = transform.frames(frames, timestamps_s, part, "video")
    return video_features(frames, timestamps_s, duration_s, cfg, image_cfg)


def video_features(frames: torch.Tensor, timestamps_s: torch.Tensor, duration_s: float, cfg: VideoConfig,
                   image_cfg: ImageConfig) -> EncodedMedia:
    """(T, 3, H, W) uint8 frames and their times -> the video's EncodedMedia.

    A T that is no longer a multiple of temporal_patch_size (frames dropped by a transform) is padded by repeating
    the last frame, as `sample_frame_times` pads."""
    assert frames.ndim == 4 and frames.shape[0] == timestamps_s.shape[0] >= 1, (frames.shape, timestamps_s.shape)
    num_frames = frames.shape[0]
    num_padded = -(-max(num_frames, cfg.min_frames) // cfg.temporal_patch_size) * cfg.temporal_patch_size
    if num_padded != num_frames:
        frames = torch.cat([frames, frames[-1:].expand(num_padded - num_frames, -1, -1, -1)])
        timestamps_s = torch.cat([timestamps_s, timestamps_s[-1:].expand(num_padded - num_frames)])
    pixels = _resize_frames(frames, cfg, image_cfg)
    patches, grid_thw = image_to_patches(pixels, image_cfg, cfg.temporal_patch_size)
    num_tokens = num_tokens_of(grid_thw, image_cfg)
    tokens_per_step = num_tokens // int(grid_thw[0])
    token_timestamps_s = timestamps_s[::cfg.temporal_patch_size].repeat_interleave(tokens_per_step)
    return EncodedMedia(modality="video", num_tokens=num_tokens, token_timestamps_s=token_timestamps_s,
                        tensors={"patches": patches, "grid_thw": grid_thw, "frame_timestamps_s": timestamps_s},
                        duration_s=duration_s, seconds_per_grid=cfg.temporal_patch_size / cfg.fps)
