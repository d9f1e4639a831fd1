"""Image and video decoding into the Qwen2-VL patch layout (omni_train.data.image / .video).

All media is generated here (PIL, ffmpeg via omni_train.data.synth) and checked against its
source: resized sizes, sampled frame times, token counts, patch order (against transformers'
Qwen2VLImageProcessorPil and a loop-based reference), and the errors bad files raise.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from PIL import Image

from omni_train.data import synth
from omni_train.data.image import (ImageConfig, decode_image, encode_image, image_to_patches, patches_to_frames,
                                   smart_resize)
from omni_train.data.sample import MediaError
from omni_train.data.video import VideoConfig, decode_video, encode_video, sample_frame_times

IMAGE_CFG = ImageConfig()
FACTOR = IMAGE_CFG.patch_size * IMAGE_CFG.merge_size
MERGE = IMAGE_CFG.merge_size


def check_resized(height: int, width: int, out_h: int, out_w: int, min_pixels: int, max_pixels: int) -> None:
    """Multiples of the factor, area within bounds, aspect ratio within what the grid can represent."""
    assert out_h % FACTOR == 0 and out_w % FACTOR == 0, (out_h, out_w)
    assert min_pixels <= out_h * out_w <= max_pixels, (out_h, out_w)
    # Each side is off by less than one grid unit from the ideal scaled size.
    aspect_error = abs(math.log((out_w / out_h) / (width / height)))
    assert aspect_error <= math.log1p(FACTOR / min(out_h, out_w)) + 1e-9, (height, width, out_h, out_w)


def check_tokens(media, cfg: ImageConfig = IMAGE_CFG) -> None:
    gt, gh, gw = media.tensors["grid_thw"].tolist()
    assert media.num_tokens == gt * gh * gw // cfg.merge_size ** 2
    assert media.tensors["patches"].shape == (gt * gh * gw, 3 * 2 * cfg.patch_size ** 2)
    assert media.num_tokens * cfg.merge_size ** 2 == media.tensors["patches"].shape[0]
    assert media.token_timestamps_s.shape == (media.num_tokens,)


# ---------------------------------------------------------------- images

@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    made = {}
    for ext in ("png", "jpg", "webp"):
        for width, height in ((20, 20), (1000, 300), (3000, 2000)):
            made[(ext, width, height)] = synth.pattern_image(root / f"{width}x{height}.{ext}", width, height, seed=width)
    return made


@pytest.mark.parametrize("height, width", [(20, 20), (300, 1000), (2000, 3000), (480, 640), (777, 333), (1, 1),
                                           (28, 28), (448, 448), (449, 449), (10, 5000), (5000, 10), (100000, 3)])
def test_smart_resize_bounds(height, width):
    out_h, out_w = smart_resize(height, width, IMAGE_CFG)
    if max(height, width) / min(height, width) > IMAGE_CFG.max_pixels // FACTOR ** 2:
        # Thinner than the grid can hold within max_pixels: one side is a single unit, the area still capped.
        assert min(out_h, out_w) == FACTOR and out_h * out_w <= IMAGE_CFG.max_pixels
        assert (out_h > out_w) == (height > width)
        return
    check_resized(height, width, out_h, out_w, IMAGE_CFG.min_pixels, IMAGE_CFG.max_pixels)
    if IMAGE_CFG.min_pixels <= height * width <= IMAGE_CFG.max_pixels and height % FACTOR == 0 and width % FACTOR == 0:
        assert (out_h, out_w) == (height, width)


@pytest.mark.parametrize("ext", ["png", "jpg", "webp"])
@pytest.mark.parametrize("width, height", [(20, 20), (1000, 300), (3000, 2000)])
def test_encode_image_sizes(images, ext, width, height):
    path = images[(ext, width, height)]
    media = encode_image(path, IMAGE_CFG, where="shard-0:000001")
    gt, gh, gw = media.tensors["grid_thw"].tolist()
    out_h, out_w = gh * IMAGE_CFG.patch_size, gw * IMAGE_CFG.patch_size
    assert gt == 1 and media.modality == "image" and media.duration_s == 0.0
    check_resized(height, width, out_h, out_w, IMAGE_CFG.min_pixels, IMAGE_CFG.max_pixels)
    if width * height < IMAGE_CFG.min_pixels:
        assert out_h * out_w >= IMAGE_CFG.min_pixels  # upscaled
    check_tokens(media)
    assert torch.equal(media.token_timestamps_s, torch.zeros(media.num_tokens))
    # Un-permuting the patches gives the image resized by PIL's bicubic, normalized; both frames equal.
    frames = patches_to_frames(media.tensors["patches"], media.tensors["grid_thw"], IMAGE_CFG, 2)
    assert torch.equal(frames[0], frames[1])
    with Image.open(path) as img:
        expected = np.asarray(img.convert("RGB").resize((out_w, out_h), Image.Resampling.BICUBIC), dtype=np.float32)
    expected = torch.from_numpy(expected).permute(2, 0, 1) / 255.0 * 2.0 - 1.0
    torch.testing.assert_close(frames[0], expected, atol=1e-6, rtol=0)
    # Bytes in give the same as a path in.
    assert torch.equal(encode_image(path.read_bytes(), IMAGE_CFG).tensors["patches"], media.tensors["patches"])


def test_patch_order_against_qwen2vl_processor(images):
    processor_cls = pytest.importorskip("transformers").Qwen2VLImageProcessorPil  # the PIL one needs no torchvision
    # Order only: the processor patchifies an already-sized float array as is.
    processor = processor_cls(do_resize=False, do_rescale=False, do_normalize=False)
    array = np.random.default_rng(0).random((56, 84, 3), dtype=np.float32)
    ref = processor(images=array, return_tensors="pt")
    frames = torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).expand(2, -1, -1, -1)
    patches, grid_thw = image_to_patches(frames, IMAGE_CFG, 2)
    assert grid_thw.tolist() == ref["image_grid_thw"][0].tolist() == [1, 4, 6]
    assert torch.equal(patches, ref["pixel_values"])
    # The whole pipeline (convert, resize, rescale, normalize, patchify) on files where both resizes agree.
    processor = processor_cls(image_mean=list(IMAGE_CFG.mean), image_std=list(IMAGE_CFG.std),
                              min_pixels=IMAGE_CFG.min_pixels, max_pixels=IMAGE_CFG.max_pixels)
    for key in (("png", 20, 20), ("png", 1000, 300), ("jpg", 3000, 2000)):
        media = encode_image(images[key], IMAGE_CFG)
        with Image.open(images[key]) as img:
            ref = processor(images=img, return_tensors="pt")
        assert media.tensors["grid_thw"].tolist() == ref["image_grid_thw"][0].tolist()
        torch.testing.assert_close(media.tensors["patches"], ref["pixel_values"], atol=1e-5, rtol=0)


def test_patch_order_multi_frame_reference():
    """Against a loop written from the layout's definition, with several temporal patches and merge blocks."""
    cfg = ImageConfig(patch_size=2, merge_size=2, min_pixels=16, max_pixels=64 * 64)
    num_frames, height, width, p, m, tp = 4, 8, 12, 2, 2, 2
    pixels = torch.arange(num_frames * 3 * height * width, dtype=torch.float32).reshape(num_frames, 3, height, width)
    patches, grid_thw = image_to_patches(pixels, cfg, tp)
    gt, gh, gw = grid_thw.tolist()
    assert (gt, gh, gw) == (2, 4, 6)
    row = 0
    for t in range(gt):
        for block_h in range(gh // m):
            for block_w in range(gw // m):
                for in_h in range(m):      # within a merge block: row-major
                    for in_w in range(m):
                        y, x = (block_h * m + in_h) * p, (block_w * m + in_w) * p
                        expected = pixels[t * tp:(t + 1) * tp, :, y:y + p, x:x + p]  # (tp, C, p, p)
                        assert torch.equal(patches[row], expected.permute(1, 0, 2, 3).reshape(-1)), row
                        row += 1
    assert row == patches.shape[0]
    assert torch.equal(patches_to_frames(patches, grid_thw, cfg, tp), pixels)


def _pixel(tensor: torch.Tensor, y: int, x: int) -> list[float]:
    return [round(float(v), 3) for v in tensor[:, y, x]]


def test_palette_transparency_greyscale_cmyk_16bit(tmp_path):
    # Palette PNG, index 0 transparent: those pixels become white; the opaque red stays red.
    palette = Image.new("P", (100, 60), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.paste(1, (50, 0, 100, 60))
    palette.save(tmp_path / "palette.png", transparency=0)
    pixels = decode_image(tmp_path / "palette.png", IMAGE_CFG)
    assert _pixel(pixels, 5, 5) == [1.0, 1.0, 1.0]
    assert _pixel(pixels, 5, pixels.shape[2] - 5) == [1.0, -1.0, -1.0]
    # RGBA WebP with a transparent half.
    rgba = Image.new("RGBA", (100, 60), (0, 0, 255, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 50, 60))
    rgba.save(tmp_path / "alpha.webp", lossless=True)
    pixels = decode_image(tmp_path / "alpha.webp", IMAGE_CFG)
    assert _pixel(pixels, 5, 5) == [1.0, 1.0, 1.0] and _pixel(pixels, 5, pixels.shape[2] - 5) == [-1.0, -1.0, 1.0]
    # Greyscale: three equal channels.
    Image.linear_gradient("L").resize((120, 90)).save(tmp_path / "grey.png")
    pixels = decode_image(tmp_path / "grey.png", IMAGE_CFG)
    assert pixels.shape[0] == 3 and torch.equal(pixels[0], pixels[1]) and torch.equal(pixels[1], pixels[2])
    assert pixels.min() < -0.5 and pixels.max() > 0.5
    # 16-bit greyscale is scaled to 8 bits, not clipped at 255.
    Image.fromarray(np.full((60, 80), 32768, dtype=np.uint16)).save(tmp_path / "grey16.png")
    assert abs(float(decode_image(tmp_path / "grey16.png", IMAGE_CFG).mean()) - (128 / 255 * 2 - 1)) < 0.01
    # CMYK JPEG: full cyan -> (0, 255, 255).
    Image.new("CMYK", (80, 80), (255, 0, 0, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    assert [round(v) for v in _pixel(decode_image(tmp_path / "cmyk.jpg", IMAGE_CFG), 40, 40)] == [-1, 1, 1]


def test_exif_orientation(tmp_path):
    image = Image.new("RGB", (200, 100), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 100, 100))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    pixels = decode_image(tmp_path / "rotated.jpg", IMAGE_CFG)
    height, width = pixels.shape[1:]
    assert height > width  # displayed portrait
    top, bottom = pixels[:, 5, width // 2], pixels[:, height - 5, width // 2]
    assert top[2] > 0.9 and top[0] < -0.9  # the blue left half is on top after a clockwise turn
    assert bottom[0] > 0.9 and bottom[2] < -0.9


def test_image_errors(tmp_path):
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"\x00not an image at all" * 50)
    truncated = tmp_path / "truncated.jpg"
    synth.pattern_image(tmp_path / "full.jpg", 400, 300)
    truncated.write_bytes((tmp_path / "full.jpg").read_bytes()[:1500])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    for where, src in (("s0:garbage", garbage), ("s0:truncated", truncated), ("s0:empty", empty),
                       ("s0:bytes", garbage.read_bytes()), ("s0:missing", tmp_path / "missing.png")):
        with pytest.raises(MediaError) as info:
            decode_image(src, IMAGE_CFG, where=where)
        message = str(info.value)
        assert message.startswith(f"{where}: ") and "\n" not in message, message
    # Over the source pixel cap: refused from the header, before the 48 MP are decoded.
    Image.new("L", (8000, 6000)).save(tmp_path / "bomb.png")
    assert (tmp_path / "bomb.png").stat().st_size < 200_000
    start = time.perf_counter()
    with pytest.raises(MediaError, match=r"^s1:bomb: image is 8000x6000 .*max_source_pixels=40000000"):
        encode_image(tmp_path / "bomb.png", IMAGE_CFG, where="s1:bomb")
    assert time.perf_counter() - start < 0.5


def test_image_config_validation():
    with pytest.raises(ValueError, match="image.patch_size"):
        ImageConfig(patch_size=0)
    with pytest.raises(ValueError, match="image.min_pixels"):
        ImageConfig(min_pixels=10**6, max_pixels=10**5)
    with pytest.raises(ValueError, match="image.max_pixels"):
        ImageConfig(max_pixels=100)
    with pytest.raises(ValueError, match="image.std"):
        ImageConfig(std=(0.5, 0.0, 0.5))
    with pytest.raises(ValueError, match="image.mean"):
        ImageConfig(mean=(0.5, 0.5))


# ---------------------------------------------------------------- video

@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    made = {ext: synth.test_pattern_video(root / f"clip.{ext}", 5.0, fps=25, width=320, height=240)
            for ext in ("mp4", "webm", "mkv", "avi")}
    made["long"] = synth.test_pattern_video(root / "long.mp4", 60.0, fps=10, width=160, height=120)
    made["four"] = synth.test_pattern_video(root / "four.mp4", 2.0, fps=2, width=320, height=240)  # 4 frames
    return made


def test_sample_frame_times():
    cfg = VideoConfig()
    indices, times = sample_frame_times(5.0, 125, 25.0, cfg)
    assert indices.tolist() == [0, 13, 25, 38, 50, 63, 75, 88, 100, 113]  # nearest frame to k * 0.5 s, ties later
    torch.testing.assert_close(times, indices.float() / 25)
    # 2.4 s -> 0, 0.5, ..., 2.0 = 5 frames, padded to 6 with the last frame repeated.
    indices, times = sample_frame_times(2.4, 60, 25.0, cfg)
    assert indices.tolist() == [0, 13, 25, 38, 50, 50] and times[-1] == times[-2]
    # One frame -> padded to min_frames = 2.
    assert sample_frame_times(0.04, 1, 25.0, cfg)[0].tolist() == [0, 0]
    # A 1 fps source sampled at 2 fps never asks for more distinct frames than it has.
    indices, _ = sample_frame_times(10.0, 10, 1.0, cfg)
    assert indices.unique().numel() == indices.numel() == 10
    # Over max_frames: spread from the first to the last frame.
    indices, times = sample_frame_times(600.0, 15000, 25.0, cfg)
    assert indices.numel() == 64 and indices[0] == 0 and indices[-1] == 14999
    assert torch.all(torch.diff(indices) > 0)
    # An odd max_frames could not be honoured after padding.
    with pytest.raises(ValueError, match="video.max_frames"):
        VideoConfig(max_frames=63)


@pytest.mark.parametrize("ext", ["mp4", "webm", "mkv", "avi"])
def test_encode_video_containers(videos, ext):
    cfg = VideoConfig()
    media = encode_video(videos[ext], cfg, IMAGE_CFG, where=f"shard-3:{ext}")
    frame_ts = media.tensors["frame_timestamps_s"]
    num_frames = min(math.floor(4.96 * cfg.fps) + 1, cfg.max_frames)  # last frame at 4.96 s
    num_frames += num_frames % 2
    assert frame_ts.shape == (num_frames,) == (10,)
    assert torch.all(torch.diff(frame_ts) > 0) and frame_ts[0] >= 0 and frame_ts[-1] <= 5.0
    assert torch.all((torch.diff(frame_ts) - 1 / cfg.fps).abs() <= 1 / 25 + 1e-6)
    assert media.modality == "video" and abs(media.duration_s - 5.0) < 0.05
    gt, gh, gw = media.tensors["grid_thw"].tolist()
    assert gt == num_frames // 2
    check_resized(240, 320, gh * 14, gw * 14, cfg.min_pixels, cfg.max_pixels)
    check_tokens(media)
    tokens_per_step = gh * gw // MERGE ** 2
    assert torch.equal(media.token_timestamps_s, frame_ts[::2].repeat_interleave(tokens_per_step))
    assert torch.all(torch.diff(media.token_timestamps_s) >= 0)


def test_long_video_capped_at_max_frames(videos):
    cfg = VideoConfig()
    frames, times = decode_video(videos["long"], cfg, IMAGE_CFG, where="s:long")
    assert frames.shape[0] == times.shape[0] == cfg.max_frames
    assert times[0] == 0 and abs(float(times[-1]) - 59.9) < 1e-3  # the whole clip, to its last frame
    steps = torch.diff(times)
    assert torch.all(steps > 0) and torch.all((steps - 59.9 / 63).abs() <= 0.1 + 1e-6)  # source frames are 0.1 s apart
    assert frames.shape[2] * frames.shape[3] <= cfg.max_pixels and frames.shape[2] % FACTOR == 0
    # Longer than the duration cap: refused before any frame is decoded.
    with pytest.raises(MediaError, match=r"^s:long: video is 60.0 s, over video.max_duration_s=30"):
        decode_video(videos["long"], VideoConfig(max_duration_s=30), IMAGE_CFG, where="s:long")


def test_four_frame_video_round_trip(videos):
    """Each frame comes back from the patches at its place, equal to the source frame resized independently (PIL)."""
    from torchcodec.decoders import VideoDecoder

    media = encode_video(videos["four"], VideoConfig(), IMAGE_CFG)
    assert media.tensors["grid_thw"].tolist()[0] == 2
    assert media.tensors["frame_timestamps_s"].tolist() == [0.0, 0.5, 1.0, 1.5]
    assert media.token_timestamps_s.unique().tolist() == [0.0, 1.0]
    frames = patches_to_frames(media.tensors["patches"], media.tensors["grid_thw"], IMAGE_CFG, 2)  # (4, 3, H, W)
    height, width = frames.shape[2:]
    source = VideoDecoder(str(videos["four"])).get_frames_at(indices=[0, 1, 2, 3]).data  # (4, 3, 240, 320) uint8
    references = []
    for frame in source:
        resized = Image.fromarray(frame.permute(1, 2, 0).numpy()).resize((width, height), Image.Resampling.BICUBIC)
        references.append(torch.from_numpy(np.asarray(resized, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0)
    distances = torch.tensor([[float((f - r).abs().mean()) for r in references] for f in frames])
    assert max(float((f - r).abs().max()) for f, r in zip(frames, references)) <= 2 / 127.5 + 1e-6
    assert torch.all(distances.diagonal() < 0.002), distances  # torch's uint8 bicubic follows PIL's
    off_diagonal = distances + torch.eye(4) * 1e9
    assert torch.all(distances.diagonal() * 3 < off_diagonal.min(dim=1).values), distances  # frames really differ
    # First row of patches: channel-major, then the two frames of the temporal patch, then 14x14 pixels.
    first = media.tensors["patches"][0].reshape(3, 2, 14, 14)
    assert torch.equal(first[:, 0], frames[0, :, :14, :14]) and torch.equal(first[:, 1], frames[1, :, :14, :14])
    second = media.tensors["patches"][1].reshape(3, 2, 14, 14)  # right neighbour inside the 2x2 merge block
    assert torch.equal(second[:, 0], frames[0, :, :14, 14:28])


def test_video_bytes_equal_path(videos):
    cfg = VideoConfig()
    from_path = encode_video(videos["webm"], cfg, IMAGE_CFG)
    from_bytes = encode_video(videos["webm"].read_bytes(), cfg, IMAGE_CFG)
    assert torch.equal(from_path.tensors["patches"], from_bytes.tensors["patches"])
    assert torch.equal(from_path.token_timestamps_s, from_bytes.token_timestamps_s)


def test_video_errors(videos, tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(videos["mp4"].read_bytes()[:4000])
    audio_only = synth.tone(tmp_path / "audio_only.mp4", 1.0)
    garbage = tmp_path / "garbage.avi"
    garbage.write_bytes(bytes(range(256)) * 40)
    cases = {"s2:empty": empty, "s2:empty-bytes": b"", "s2:truncated": truncated, "s2:audio-only": audio_only,
             "s2:garbage": garbage, "s2:garbage-bytes": garbage.read_bytes()}
    for where, src in cases.items():
        with pytest.raises(MediaError) as info:
            encode_video(src, VideoConfig(), IMAGE_CFG, where=where)
        message = str(info.value)
        assert message.startswith(f"{where}: ") and "\n" not in message, message


def test_video_config_validation():
    with pytest.raises(ValueError, match="video.backend must be one of torchcodec, decord"):
        VideoConfig(backend="pyav")
    with pytest.raises(ValueError, match="video.fps"):
        VideoConfig(fps=0)
    with pytest.raises(ValueError, match="video.min_frames"):
        VideoConfig(min_frames=100)
    with pytest.raises(ValueError, match="temporal_patch_size"):
        encode_video(b"unused", VideoConfig(temporal_patch_size=4), IMAGE_CFG)


def test_decord_matches_torchcodec(videos):
    pytest.importorskip("decord")
    for key in ("mp4", "webm", "mkv", "avi", "long"):
        frames_tc, times_tc = decode_video(videos[key], VideoConfig(backend="torchcodec"), IMAGE_CFG)
        frames_dc, times_dc = decode_video(videos[key], VideoConfig(backend="decord"), IMAGE_CFG)
        assert frames_dc.shape == frames_tc.shape, key
        torch.testing.assert_close(times_dc, times_tc, atol=1e-3, rtol=0)
        assert float((frames_dc - frames_tc).abs().mean()) < 0.02, key  # same frames, decoder rounding aside
    with pytest.raises(MediaError, match="^s:dc: cannot decode video"):
        decode_video(b"\x00" * 100, VideoConfig(backend="decord"), where="s:dc")
