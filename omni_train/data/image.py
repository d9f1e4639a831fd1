"""Image decoding into the vision encoder's patch layout (Qwen2-VL / Qwen2.5-VL style).

An image is decoded with PIL, resized so both sides are multiples of `patch_size * merge_size`
with its area inside `[min_pixels, max_pixels]` (`smart_resize`), normalized, and cut into
flattened patches plus a `grid_thw` of (temporal, height, width) patch counts. The patch order
puts every 2x2 merge block in `merge_size**2` consecutive rows, so the encoder's patch merger is a
plain reshape. An image is repeated to `temporal_patch_size` frames so that images and video
(`video.py`) share one 3-D patch embedding; `image_to_patches` serves both.

Layout of one patch row: (C, temporal_patch_size, patch_size, patch_size) flattened, i.e. the input
of a `Conv3d(3, dim, kernel=(temporal_patch_size, patch_size, patch_size))`.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageOps

from omni_train.data.sample import EncodedMedia, MediaError

if TYPE_CHECKING:
    from omni_train.data.degrade import MediaTransform


@dataclass(kw_only=True)
class ImageConfig:
    patch_size: int = 14                  # pixels per patch side
    merge_size: int = 2                   # merge_size x merge_size patches become one token
    temporal_patch_size: int = 2          # frames per patch; an image is repeated this many times
    min_pixels: int = 56 * 56             # resized area bounds (pixels)
    max_pixels: int = 448 * 448
    max_source_pixels: int = 40_000_000   # refuse larger images from the header, before decoding
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # SigLIP normalization
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    # training only: ops of degrade.OPS applied to each image's decoded pixels before resizing (augment.py)
    augment: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self):
        for name in ("patch_size", "merge_size", "temporal_patch_size", "min_pixels", "max_pixels", "max_source_pixels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"image.{name} must be a positive integer, got {value!r}")
        if self.max_pixels < self.factor ** 2:
            raise ValueError(f"image.max_pixels must be >= (patch_size * merge_size)**2 = {self.factor ** 2}, got {self.max_pixels}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"image.min_pixels ({self.min_pixels}) must be <= image.max_pixels ({self.max_pixels})")
        self.mean, self.std = tuple(self.mean), tuple(self.std)  # YAML gives lists
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"image.mean and image.std need 3 values (R, G, B), got {list(self.mean)} and {list(self.std)}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"image.std values must be > 0, got {list(self.std)}")
        from omni_train.data.augment import parse_augment  # here: augment imports degrade, which may import this module

        self._augment_ops = parse_augment(self.augment, "image.augment", "image")

    @property
    def augment_ops(self) -> list:
        """`augment` parsed (augment.AugmentOp each)."""
        return self._augment_ops

    @property
    def factor(self) -> int:
        """Side lengths are multiples of this: one merged token covers factor x factor pixels."""
        return self.patch_size * self.merge_size


def smart_resize(height: int, width: int, cfg: ImageConfig, *, min_pixels: int | None = None,
                 max_pixels: int | None = None) -> tuple[int, int]:
    """Target (height, width): multiples of `cfg.factor`, aspect ratio kept as closely as the grid allows.

    The area never exceeds `max_pixels` (it bounds memory and tokens); it reaches `min_pixels`
    whenever that is possible below `max_pixels`. Very thin images keep one side at `factor` and
    lose some of their aspect ratio rather than being refused.
    """
    f = cfg.factor
    min_pixels = cfg.min_pixels if min_pixels is None else min_pixels
    max_pixels = cfg.max_pixels if max_pixels is None else max_pixels
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if max_pixels < f * f or min_pixels > max_pixels:
        raise ValueError(f"pixel bounds [{min_pixels}, {max_pixels}] need min <= max and max >= {f * f}")

    area = height * width
    scale = math.sqrt(max_pixels / area) if area > max_pixels else math.sqrt(min_pixels / area) if area < min_pixels else 1.0
    h, w = height * scale / f, width * scale / f  # in units of factor

    def snap(rounding) -> tuple[int, int]:
        return max(1, rounding(h)), max(1, rounding(w))

    gh, gw = snap(round)
    if gh * gw * f * f > max_pixels:
        gh, gw = snap(math.floor)
    elif gh * gw * f * f < min_pixels:
        up_h, up_w = snap(math.ceil)
        if up_h * up_w * f * f <= max_pixels:
            gh, gw = up_h, up_w
    # Only a side clamped to one unit can still overflow: shorten the other side to fit.
    max_units = max_pixels // (f * f)
    if gh * gw > max_units:
        if gh <= gw:
            gw = max(1, max_units // gh)
        else:
            gh = max(1, max_units // gw)
    return gh * f, gw * f


def normalize(pixels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(..., 3, H, W) float in [0, 255] -> (x / 255 - mean) / std, float32."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (pixels.float() / 255.0 - mean_t) / std_t


def image_to_patches(pixels: torch.Tensor, cfg: ImageConfig, temporal_patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, 3, H, W) normalized frames -> (patches (N, 3 * tp * p * p), grid_thw (3,) int64).

    N = gt * gh * gw with gt = T / tp, gh = H / p, gw = W / p. Rows are ordered (gt, gh/m, gw/m, m, m):
    each run of m*m consecutive rows is one m x m merge block, as in Qwen2-VL's image processor.
    """
    num_frames, channels, height, width = pixels.shape
    p, m, tp = cfg.patch_size, cfg.merge_size, temporal_patch_size
    if num_frames % tp or height % (p * m) or width % (p * m):
        raise ValueError(f"pixels of shape {tuple(pixels.shape)} need T % {tp} == 0 and H, W multiples of {p * m}")
    gt, gh, gw = num_frames // tp, height // p, width // p
    x = pixels.reshape(gt, tp, channels, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (gt, gh/m, gw/m, m, m, C, tp, p, p)
    patches = x.reshape(gt * gh * gw, channels * tp * p * p)
    return patches, torch.tensor([gt, gh, gw], dtype=torch.long)


def patches_to_frames(patches: torch.Tensor, grid_thw: torch.Tensor, cfg: ImageConfig, temporal_patch_size: int) -> torch.Tensor:
    """Inverse of `image_to_patches`: (N, 3 * tp * p * p) -> (T, 3, H, W). For tests and visualisation."""
    gt, gh, gw = (int(v) for v in grid_thw)
    p, m, tp = cfg.patch_size, cfg.merge_size, temporal_patch_size
    x = patches.reshape(gt, gh // m, gw // m, m, m, -1, tp, p, p)
    x = x.permute(0, 6, 5, 1, 3, 7, 2, 4, 8)  # (gt, tp, C, gh/m, m, p, gw/m, m, p)
    return x.reshape(gt * tp, -1, gh * p, gw * p)


def num_tokens_of(grid_thw: torch.Tensor, cfg: ImageConfig) -> int:
    """Positions the encoder produces after the merge: gt * gh * gw / merge_size**2."""
    gt, gh, gw = (int(v) for v in grid_thw)
    return gt * gh * gw // cfg.merge_size ** 2


def _label(src: bytes | str | Path, where: str) -> str:
    return where or (str(src) if isinstance(src, (str, Path)) else "<image bytes>")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PNG / JPEG / WebP mode -> 8-bit RGB; transparent pixels become white (as transformers' convert_rgb)."""
    if img.mode.startswith("I;16") or img.mode == "I":
        # 16-bit greyscale PNG: PIL's convert would clip at 255 instead of scaling.
        grey = (np.asarray(img, dtype=np.float64) / 257.0).clip(0, 255).round().astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode in ("P", "L", "RGB") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, RGB


def decode_image_pixels(src: bytes | str | Path, cfg: ImageConfig, *, where: str = "") -> torch.Tensor:
    """Encoded image -> (3, H, W) uint8 RGB as decoded (EXIF orientation applied, transparency on white), not
    resized. Raises MediaError."""
    label = _label(src, where)
    try:
        with Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src) as img:
            # Image.open reads only the header: refuse decompression bombs before any pixel is decoded.
            # The cap is ours (cfg), PIL's global Image.MAX_IMAGE_PIXELS is left alone.
            num_source_pixels = img.size[0] * img.size[1]
            if num_source_pixels > cfg.max_source_pixels:
                raise MediaError(f"{label}: image is {img.size[0]}x{img.size[1]} = {num_source_pixels} pixels, "
                                 f"over image.max_source_pixels={cfg.max_source_pixels}")
            img = ImageOps.exif_transpose(img)  # decodes the pixels
            rgb = _to_rgb(img)
    except MediaError:
        raise
    except Exception as e:  # noqa: BLE001
        # Untrusted input: PIL's plugins raise OSError (unidentified, truncated), SyntaxError,
        # struct.error, ... PIL's own DecompressionBombError fires only above 2 * Image.MAX_IMAGE_PIXELS,
        # i.e. when max_source_pixels is set higher than that.
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MediaError(f"{label}: cannot decode image ({message})") from None
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1)  # (3, H, W)


def resize_image(pixels: torch.Tensor, cfg: ImageConfig) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, h, w) float32 normalized, h and w from `smart_resize` (PIL bicubic)."""
    height, width = smart_resize(pixels.shape[-2], pixels.shape[-1], cfg)
    if (height, width) != tuple(pixels.shape[-2:]):
        rgb = Image.fromarray(np.ascontiguousarray(pixels.permute(1, 2, 0).numpy()))
        rgb = rgb.resize((width, height), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1)
    return normalize(pixels, cfg.mean, cfg.std)


def decode_image(src: bytes | str | Path, cfg: ImageConfig, *, where: str = "") -> torch.Tensor:
    """Encoded image -> (3, H, W) float32 normalized, H and W from `smart_resize`. Raises MediaError."""
    return resize_image(decode_image_pixels(src, cfg, where=where), cfg)


def encode_image(src: bytes | str | Path, cfg: ImageConfig, *, where: str = "", transform: MediaTransform | None = None,
                 part: int = 0) -> EncodedMedia:
    """Decode an image into {"patches": (N, 3 * tp * p * p), "grid_thw": (3,)} with grid_thw = (1, gh, gw).

    `transform` (degrade.MediaTransform) changes the decoded pixels (as one frame) before resizing."""
    pixels = decode_image_pixels(src, cfg, where=where)  # (3, H, W) uint8
    if transform is not None:
        frames, _ = transform.frames(pixels.unsqueeze(0), torch.zeros(1), part, "image")
        assert frames.shape[0] == 1 and frames.dtype == torch.uint8, (frames.shape, frames.dtype)
        pixels = frames[0]
    return image_features(pixels, cfg)


def image_features(pixels: torch.Tensor, cfg: ImageConfig) -> EncodedMedia:
    """(3, H, W) uint8 as decoded -> the image's EncodedMedia (resized, normalized, cut into patches)."""
    pixels = resize_image(pixels, cfg)
    frames = pixels.unsqueeze(0).expand(cfg.temporal_patch_size, -1, -1, -1)  # (tp, 3, H, W)
    patches, grid_thw = image_to_patches(frames, cfg, cfg.temporal_patch_size)
    num_tokens = num_tokens_of(grid_thw, cfg)
    return EncodedMedia(modality="image", num_tokens=num_tokens, token_timestamps_s=torch.zeros(num_tokens),
                        tensors={"patches": patches, "grid_thw": grid_thw})
