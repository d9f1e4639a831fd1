"""Synthesize real media files with ffmpeg, espeak-ng and PIL.

Used by the tests (which never download data) and by generated corpora. Every function writes a
real file in the container its extension names, so what it makes goes through the same decoders
as users' media.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

AUDIO_CODECS = {"wav": ["-c:a", "pcm_s16le"], "flac": ["-c:a", "flac"], "mp3": ["-c:a", "libmp3lame", "-b:a", "64k"],
                "ogg": ["-c:a", "libvorbis"], "opus": ["-c:a", "libopus", "-b:a", "32k"]}


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise RuntimeError(f"'{tool}' is not installed: run `apt-get install -y ffmpeg espeak-ng` (or `make install`)")
    return path


def _ffmpeg(args: list[str]) -> None:
    cmd = [require("ffmpeg"), "-hide_banner", "-loglevel", "error", "-y", *args]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ffmpeg failed ({' '.join(cmd)}): {result.stderr.strip()}")


def tone(path: str | Path, duration_s: float, *, frequency_hz: float = 440.0, sample_rate_hz: int = 44100,
         channels: int = 1) -> Path:
    """A sine tone in the codec named by the extension (wav, flac, mp3, ogg, opus)."""
    path = Path(path)
    ext = path.suffix.lstrip(".").lower()
    if ext == "opus":
        sample_rate_hz = 48000  # opus only encodes 8/12/16/24/48 kHz
    _ffmpeg(["-f", "lavfi", "-i", f"sine=frequency={frequency_hz}:sample_rate={sample_rate_hz}:duration={duration_s}",
             "-ac", str(channels), *AUDIO_CODECS.get(ext, []), str(path)])
    return path


def speech(path: str | Path, text: str, *, voice: str = "en-us", rate_wpm: int = 160, pitch: int = 50,
           sample_rate_hz: int | None = None) -> Path:
    """Text spoken by espeak-ng, converted by ffmpeg to the extension's codec (espeak writes 22.05 kHz wav)."""
    path = Path(path)
    wav = path.with_suffix(".espeak.wav")
    result = subprocess.run([require("espeak-ng"), "-v", voice, "-s", str(rate_wpm), "-p", str(pitch), "-w", str(wav), text],
                            capture_output=True, text=True)
    if result.returncode != 0 or not wav.exists():
        raise RuntimeError(f"espeak-ng failed for voice {voice!r}: {result.stderr.strip()}")
    if path.suffix.lower() == ".wav" and sample_rate_hz is None:
        wav.replace(path)
        return path
    rate = ["-ar", str(sample_rate_hz)] if sample_rate_hz else []
    ext = path.suffix.lstrip(".").lower()
    if ext == "opus" and not sample_rate_hz:
        rate = ["-ar", "48000"]
    _ffmpeg(["-i", str(wav), *rate, *AUDIO_CODECS.get(ext, []), str(path)])
    wav.unlink()
    return path


def test_pattern_video(path: str | Path, duration_s: float, *, fps: int = 25, width: int = 320, height: int = 240,
                       with_audio: bool = False) -> Path:
    """ffmpeg's testsrc pattern (a frame counter is drawn in it) encoded by the extension's container."""
    path = Path(path)
    ext = path.suffix.lstrip(".").lower()
    codec = {"mp4": ["-c:v", "libx264", "-pix_fmt", "yuv420p"], "mkv": ["-c:v", "libx264", "-pix_fmt", "yuv420p"],
             "webm": ["-c:v", "libvpx-vp9", "-b:v", "200k"], "avi": ["-c:v", "mpeg4"]}[ext]
    audio = ["-f", "lavfi", "-i", f"sine=frequency=300:duration={duration_s}"] if with_audio else []
    audio_codec = (["-c:a", "aac"] if ext in ("mp4", "mkv") else ["-c:a", "libopus"] if ext == "webm" else ["-c:a", "mp3"]) if with_audio else []
    _ffmpeg(["-f", "lavfi", "-i", f"testsrc=duration={duration_s}:size={width}x{height}:rate={fps}", *audio,
             *codec, *audio_codec, "-t", str(duration_s), str(path)])
    return path


def pattern_image(path: str | Path, width: int, height: int, *, seed: int = 0) -> Path:
    """A PIL image with coloured bands and a diagonal, saved in the extension's format."""
    from PIL import Image, ImageDraw

    path = Path(path)
    image = Image.new("RGB", (width, height), ((37 * seed) % 256, 90, 160))
    draw = ImageDraw.Draw(image)
    for i in range(0, width, max(1, width // 8)):
        draw.rectangle([i, 0, i + max(1, width // 16), height], fill=((i * 7 + seed) % 256, 200, 40))
    draw.line([0, 0, width, height], fill=(255, 255, 255), width=max(1, min(width, height) // 30))
    image.save(path)
    return path
