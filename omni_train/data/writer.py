"""Build WebDataset shards from a ShareGPT-style manifest (`omni-train shards build`).

The manifest is a JSON list or JSONL file in the form LLaMA-Factory and ms-swift read:

    {"messages": [{"role": "user", "content": "<audio>Transcribe this."},
                  {"role": "assistant", "content": "hello world"}],
     "audios": ["clips/a.flac"], "images": [], "videos": [], "meta": {"task": "asr", "language": "en"}}

(LLaMA-Factory's `conversations` with `from: human|gpt|system` and `value` is read too.) Each
entry becomes one sample of the shard format in `format.py`: content strings are split at their
placeholders into text and media parts, and the media files are copied into the tar byte for byte.

Audio in video is chosen per entry, with the key ms-swift and LLaMA-Factory use for the whole run:
`"use_audio_in_video": true` (every video of the entry), or a list with one true/false per video.
It is written into each video part; an entry without it leaves the choice to the recipe
(data.video.use_audio_in_video). A video that should bring its audio but has no audio stream is
refused while the manifest is validated.

Building runs in two passes. The first validates every entry and reads its media headers
(durations, frame counts); only when the whole manifest is usable does the second write shards,
so a bad manifest leaves nothing behind. Each shard is written under a temporary name and renamed
when complete, so a crash never leaves a truncated tar under a final shard name.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import subprocess
import tarfile
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omni_train.data.format import EXTENSIONS, MODALITIES, ROLES, media_member_name

PLACEHOLDER = re.compile(r"(<audio>|<image>|<video>)")
# Recordings FFmpeg reads whose audio track can be an audio item (a video call's .mp4, an .m4a ...). In a
# manifest's `audios` list, those outside the shard format's audio extensions are re-encoded to FLAC.
RECORDING_EXTENSIONS = EXTENSIONS["audio"] + ("m4a", "aac", "wma", "aiff", "aif", "amr", "mka",
                                              "mp4", "m4v", "mkv", "webm", "mov", "avi", "3gp")
# JSON nesting deeper than this is refused (deeper still, Python's json parser ends in RecursionError).
MAX_JSON_DEPTH = 200
MEDIA_LIST_KEYS = {"audio": "audios", "image": "images", "video": "videos"}
# LLaMA-Factory's sharegpt tags; the OpenAI-style names are accepted under `from` as well.
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
UNSET = "(unset)"  # the summary's bucket for samples without meta.task / meta.language
# Fixed so that the same manifest and media always give byte-identical shards.
MEMBER_MTIME = 0


@dataclass(kw_only=True)
class PreparedSample:
    """One validated manifest entry, ready to be written: the sample JSON minus its key, and its media."""
    messages: list[dict[str, Any]]
    meta: dict[str, Any]
    media: list[tuple[str, Path, int]]  # (member name, source path, size in bytes); audio, then images, then videos
    audio_duration_s: float = 0.0
    num_images: int = 0
    num_videos: int = 0
    num_video_frames: int = 0

    def json_bytes(self) -> bytes:
        return json.dumps({"messages": self.messages, "meta": self.meta}, ensure_ascii=False).encode("utf-8")


@dataclass(kw_only=True)
class BuildSummary:
    """What `build_shards` wrote; `format()` is the text the CLI prints."""
    num_samples: int
    num_shards: int
    shards: list[str]
    audio_hours: float
    num_images: int
    num_videos: int
    num_video_frames: int
    num_bytes: int
    samples_per_task: dict[str, int] = field(default_factory=dict)
    samples_per_language: dict[str, int] = field(default_factory=dict)
    largest_member_mb: float = 0.0

    def format(self) -> str:
        def counts(per: dict[str, int]) -> str:
            return ", ".join(f"{name}={n}" for name, n in sorted(per.items())) or "-"

        names = [Path(p).name for p in self.shards]
        first_last = " .. ".join(dict.fromkeys([names[0], names[-1]])) if names else "-"
        return "\n".join([
            f"samples: {self.num_samples} in {self.num_shards} shard(s) ({first_last}), {self.num_bytes} bytes",
            f"audio: {self.audio_hours:.4f} h; images: {self.num_images}; "
            f"videos: {self.num_videos} ({self.num_video_frames} frames)",
            f"tasks: {counts(self.samples_per_task)}",
            f"languages: {counts(self.samples_per_language)}",
            *self._warnings(),
        ])

    def _warnings(self) -> list[str]:
        from omni_train.data.pipeline import DataConfig

        cap = DataConfig().max_member_mb
        if self.largest_member_mb <= cap:
            return []
        return [f"warning: the largest media file is {self.largest_member_mb:.1f} MB; the loader skips members over "
                f"data.max_member_mb={cap} (its default): raise it in the recipe to train on them"]


# ----------------------------------------------------------------------------------------------
# Pass 1: read and validate the manifest


def read_manifest(path: Path) -> list[tuple[str, Any]]:
    """The manifest's entries, each with the `where` prefix its errors carry ('m.jsonl: entry 3 (line 4)')."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # tolerate a byte-order mark
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    stripped = text.lstrip()
    if stripped.startswith("["):  # a JSON list (LLaMA-Factory); a JSONL file never starts with '['
        entries = _loads(text, f"{path}")
        if not isinstance(entries, list):
            raise ValueError(f"{path}: a JSON manifest must be a list of entries")
        located = [(f"{path}: entry {i}", entry) for i, entry in enumerate(entries)]
    else:
        located = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            entry = _loads(line, f"{path}", line_number)
            located.append((f"{path}: entry {len(located)} (line {line_number})", entry))
    if not located:
        raise ValueError(f"{path}: the manifest has no entries")
    return [(_with_id(where, entry), entry) for where, entry in located]


def _loads(text: str, where: str, lineno: int | None = None) -> Any:
    """json.loads with one-line errors; nesting deeper than MAX_JSON_DEPTH is refused (deeper still, Python's
    parser itself would end in RecursionError, and writing the sample back out would too)."""
    at = where if lineno is None else f"{where}: line {lineno}"
    try:
        value = json.loads(text)
        too_deep = _nesting(value) > MAX_JSON_DEPTH
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON on line {lineno or e.lineno}, column {e.colno} ({e.msg})") from None
    except RecursionError:
        too_deep = True
    if too_deep:
        raise ValueError(f"{at}: JSON nested more than {MAX_JSON_DEPTH} levels deep")
    return value


def _nesting(value: Any) -> int:
    """How deeply lists and objects nest in `value` (iteratively: no recursion to exhaust)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, depth)
            if depth > MAX_JSON_DEPTH:
                return depth
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def _with_id(where: str, entry: Any) -> str:
    if isinstance(entry, dict) and "id" in entry:
        return f"{where} (id {entry['id']!r})"
    return where


def _media_paths(entry: dict[str, Any], modality: str, where: str) -> list[str]:
    key = MEDIA_LIST_KEYS[modality]
    paths = entry.get(key) or []
    if isinstance(paths, str):  # ms-swift accepts a single path for a single item
        paths = [paths]
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        raise ValueError(f"{where}: '{key}' must be a list of file paths")
    return paths


def _messages(entry: dict[str, Any], where: str) -> list[tuple[str, str]]:
    """(role, content string) pairs from `messages` (role/content) or `conversations` (from/value)."""
    list_key = "messages" if "messages" in entry else "conversations"
    raw = entry.get(list_key)
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{where}: needs a non-empty 'messages' list (or LLaMA-Factory 'conversations')")
    messages = []
    system = entry.get("system")  # LLaMA-Factory's sharegpt keeps the system prompt beside the turns
    if isinstance(system, str) and system and not any(isinstance(m, dict) and m.get(
            "role", m.get("from")) == "system" for m in raw):
        messages.append(("system", system))
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise ValueError(f"{where}: {list_key}[{i}] must be an object")
        role_key, content_key = ("role", "content") if "role" in message else ("from", "value")
        role = message.get(role_key)
        if role_key == "role" and role not in ROLES:
            raise ValueError(f"{where}: {list_key}[{i}].role {role!r} is not supported (allowed: {', '.join(ROLES)})")
        if role_key == "from" and role not in SHAREGPT_ROLES:
            raise ValueError(f"{where}: {list_key}[{i}].from {role!r} is not supported "
                             f"(allowed: {', '.join(SHAREGPT_ROLES)})")
        content = message.get(content_key)
        if not isinstance(content, str):
            raise ValueError(f"{where}: {list_key}[{i}].{content_key} must be a string")
        messages.append((SHAREGPT_ROLES.get(role, role), content))
    return messages


def _header_error(modality: str, path: Path, where: str, error: Exception) -> ValueError:
    # torchcodec's messages run over several lines; the first says what went wrong.
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ValueError(f"{where}: cannot read the {modality} header of {path} ({reason})")


def probe_audio(path: Path, where: str) -> float:
    """Duration in seconds from the container header (no decoding)."""
    from torchcodec.decoders import AudioDecoder

    try:
        metadata = AudioDecoder(str(path)).metadata
    except (RuntimeError, ValueError, OSError) as e:
        raise _header_error("audio", path, where, e) from None
    duration_s = metadata.duration_seconds_from_header
    if duration_s is None:
        duration_s = metadata.duration_seconds
    if duration_s is None:
        raise ValueError(f"{where}: the audio header of {path} has no duration")
    return float(duration_s)


def probe_video(path: Path, where: str) -> tuple[int, float]:
    """(frames, duration in seconds) from the container header; 'approximate' mode skips the full scan."""
    from torchcodec.decoders import VideoDecoder

    try:
        metadata = VideoDecoder(str(path), seek_mode="approximate").metadata
    except (RuntimeError, ValueError, OSError) as e:
        raise _header_error("video", path, where, e) from None
    # webm/mkv headers carry no frame count; torchcodec then derives it from duration x fps.
    if metadata.num_frames is None or metadata.duration_seconds is None:
        raise ValueError(f"{where}: the video header of {path} has no frame count or duration")
    return int(metadata.num_frames), float(metadata.duration_seconds)


def probe_image(path: Path, where: str) -> None:
    """Read the image header (PIL opens lazily), so an unreadable image fails here and not in training."""
    from PIL import Image

    try:
        with Image.open(path):
            pass
    except (OSError, Image.DecompressionBombError) as e:
        raise _header_error("image", path, where, e) from None


def media_path(relative: str, media_root: Path, where: str, label: str, *, allow_outside: bool = False) -> Path:
    """A manifest's media path -> the file to read. Unless `allow_outside`, it must stay under `media_root` once
    `..` and symbolic links are resolved: a manifest from elsewhere must not make the build copy other files
    (keys, /etc/...) into shards."""
    path = Path(relative) if os.path.isabs(relative) else media_root / relative
    if not allow_outside:
        real = path.resolve()
        if not real.is_relative_to(media_root.resolve()):
            raise ValueError(f"{where}: {label} {relative!r} is outside --media-root {media_root} (it resolves to "
                             f"{real}); pass --allow-outside-media-root to read it")
    return path


def check_audio_stream(path: Path, where: str, label: str, *, why: str = "") -> None:
    """ValueError (one line) unless ffprobe finds an audio stream in `path`."""
    probe = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "a", "-show_entries", "stream=index",
                            "-of", "csv=p=0", str(path)], capture_output=True, text=True)
    if probe.returncode != 0:
        reason = (probe.stderr.strip().splitlines() or ["ffprobe failed"])[-1]
        raise ValueError(f"{where}: {label} {path} cannot be read ({reason})")
    if not probe.stdout.strip():
        raise ValueError(f"{where}: {label} {path} has no audio stream{why}")


def extract_audio(path: Path, spool: Path, where: str, label: str) -> Path:
    """The audio track of a recording in any container (a video's first audio stream) as 16-bit mono FLAC at its
    own rate, written into `spool`. ffmpeg streams it, so memory stays flat however long the recording is; the
    bit-exact flags keep the bytes (and so the shards) the same from one build to the next."""
    check_audio_stream(path, where, label)
    handle, name = tempfile.mkstemp(suffix=".flac", dir=spool)
    os.close(handle)
    out = Path(name)
    result = subprocess.run(["ffmpeg", "-nostdin", "-y", "-v", "error", "-i", str(path), "-map", "0:a:0", "-vn", "-sn",
                             "-dn", "-ac", "1", "-sample_fmt", "s16", "-c:a", "flac", "-map_metadata", "-1",
                             "-fflags", "+bitexact", "-flags:a", "+bitexact", "-f", "flac", str(out)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or [f"ffmpeg exited {result.returncode}"])[-1]
        raise ValueError(f"{where}: {label} {path}: cannot extract its audio ({reason})")
    return out


def prepare_entry(entry: Any, where: str, media_root: Path, *, task: str | None = None, language: str | None = None,
                  allow_outside_media_root: bool = False, spool: Path | None = None) -> PreparedSample:
    """Validate one manifest entry and read its media headers; every error names `where`.

    An `audios` item may be any recording FFmpeg reads (RECORDING_EXTENSIONS: the audio track of an .mp4 call,
    an .m4a ...); one outside the shard format's audio extensions is re-encoded to FLAC into `spool` (required
    then), so the shard holds only its audio."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: must be a JSON object")
    messages = _messages(entry, where)
    paths = {modality: _media_paths(entry, modality, where) for modality in MODALITIES}

    placeholders = [PLACEHOLDER.findall(content) for _, content in messages]
    counts = Counter(token[1:-1] for found in placeholders for token in found)
    for modality in MODALITIES:
        if counts[modality] != len(paths[modality]):
            raise ValueError(f"{where}: {counts[modality]} <{modality}> placeholder(s) in the messages but "
                             f"{len(paths[modality])} path(s) in '{MEDIA_LIST_KEYS[modality]}'")

    audio_in_video = _audio_in_video_flags(entry, len(paths["video"]), where)

    meta = entry.get("meta", {})
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: 'meta' must be an object")
    meta = dict(meta)
    if task is not None:
        meta.setdefault("task", task)
    if language is not None:
        meta.setdefault("language", language)
    if "id" in entry:
        meta.setdefault("id", entry["id"])

    sample = PreparedSample(messages=[], meta=meta, media=[])
    video_duration_s = 0.0
    members: dict[str, list[str]] = {}
    for modality in MODALITIES:
        members[modality] = []
        list_key = MEDIA_LIST_KEYS[modality]
        allowed = RECORDING_EXTENSIONS if modality == "audio" else EXTENSIONS[modality]
        for index, relative in enumerate(paths[modality]):
            label = f"{list_key}[{index}]"
            path = media_path(relative, media_root, where, label, allow_outside=allow_outside_media_root)
            ext = path.suffix.lstrip(".").lower()
            if ext not in allowed:
                raise ValueError(f"{where}: {label} {relative!r} has an unsupported extension "
                                 f"'.{ext}' (allowed for {modality}: {', '.join(allowed)})")
            if not path.is_file():
                raise ValueError(f"{where}: {label} {relative!r} does not exist (looked for {path})")
            if modality == "audio":
                if ext not in EXTENSIONS["audio"]:
                    assert spool is not None, "re-encoded audio needs a spool folder"
                    path, ext = extract_audio(path, spool, where, label), "flac"
                sample.audio_duration_s += probe_audio(path, where)
            elif modality == "video":
                num_frames, duration_s = probe_video(path, where)
                if audio_in_video[index]:
                    check_audio_stream(path, where, label, why=" (use_audio_in_video needs one)")
                sample.num_video_frames += num_frames
                video_duration_s += duration_s
            else:
                probe_image(path, where)
            member = media_member_name(modality, index, ext)
            members[modality].append(member)
            sample.media.append((member, path, path.stat().st_size))
    if paths["audio"]:
        meta["duration_s"] = round(sample.audio_duration_s, 4)
    if paths["video"]:
        meta["num_frames"] = sample.num_video_frames
        meta["video_duration_s"] = round(video_duration_s, 4)
    sample.num_images = len(paths["image"])
    sample.num_videos = len(paths["video"])

    next_index = Counter()
    for role, content in messages:
        parts = []
        for piece in PLACEHOLDER.split(content):
            if piece in ("<audio>", "<image>", "<video>"):
                modality = piece[1:-1]
                parts.append({"type": modality, "member": members[modality][next_index[modality]]})
                if modality == "video" and audio_in_video[next_index[modality]] is not None:
                    parts[-1]["use_audio_in_video"] = audio_in_video[next_index[modality]]
                next_index[modality] += 1
            elif piece:
                parts.append({"type": "text", "text": piece})
        sample.messages.append({"role": role, "content": parts})
    return sample


def _audio_in_video_flags(entry: dict[str, Any], num_videos: int, where: str) -> list[bool | None]:
    """Per video of the entry: its `use_audio_in_video` (None: not said, the recipe's default applies)."""
    flags = entry.get("use_audio_in_video")
    if flags is None or isinstance(flags, bool):
        return [flags] * num_videos
    if isinstance(flags, list) and len(flags) == num_videos and all(isinstance(f, bool) for f in flags):
        return flags
    raise ValueError(f"{where}: 'use_audio_in_video' must be true, false or a list of {num_videos} true/false "
                     f"(one per video), got {json.dumps(flags)[:100]}")


# ----------------------------------------------------------------------------------------------
# Pass 2: write shards


def _padded(num_bytes: int) -> int:
    return -(-num_bytes // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


class ShardSink:
    """Writes samples into `<out>/<prefix>-NNNNNN.tar`, each under `<name>.tmp` until it is closed."""

    def __init__(self, out: Path, prefix: str, *, max_samples: int, max_bytes: int):
        self.out, self.prefix = out, prefix
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.shards: list[Path] = []
        self.tar: tarfile.TarFile | None = None
        self.tmp: Path | None = None
        self.num_in_shard = 0

    def tar_size(self, sample_bytes: int) -> int:
        """The shard's file size if it were closed after a sample of `sample_bytes` more tar bytes."""
        offset = self.tar.offset if self.tar is not None else 0
        end = offset + sample_bytes + 2 * tarfile.BLOCKSIZE  # the end-of-archive blocks
        return -(-end // tarfile.RECORDSIZE) * tarfile.RECORDSIZE  # tarfile pads the file to whole records

    def write(self, key: str, sample: PreparedSample) -> None:
        payload = sample.json_bytes()
        sample_bytes = sum(tarfile.BLOCKSIZE + _padded(size) for size in [len(payload)] + [m[2] for m in sample.media])
        # Roll over before a sample that would push the shard past max_bytes, so shards stay within
        # the limit unless one sample alone is larger.
        if self.num_in_shard and (self.num_in_shard >= self.max_samples or self.tar_size(sample_bytes) > self.max_bytes):
            self.close_shard()
        if self.tar is None:
            self.open_shard()
        self._add(f"{key}.json", len(payload), io.BytesIO(payload))
        for member, path, _ in sample.media:
            with open(path, "rb") as source:
                self._add(f"{key}.{member}", os.fstat(source.fileno()).st_size, source)
        self.num_in_shard += 1

    def _add(self, name: str, size: int, fileobj: Any) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, MEMBER_MTIME, 0o644
        self.tar.addfile(info, fileobj)

    def open_shard(self) -> None:
        final = self.out / f"{self.prefix}-{len(self.shards):06d}.tar"
        self.tmp = final.with_name(final.name + ".tmp")
        self.tar = tarfile.open(self.tmp, "w", format=tarfile.GNU_FORMAT)
        self.shards.append(final)
        self.num_in_shard = 0

    def close_shard(self) -> None:
        self.tar.close()
        os.replace(self.tmp, self.shards[-1])
        self.tar, self.tmp, self.num_in_shard = None, None, 0

    def abort(self) -> None:
        """Drop the shard being written (completed ones stay: each is a whole, valid tar)."""
        if self.tar is not None:
            self.tar.close()
            self.tmp.unlink(missing_ok=True)
            self.shards.pop()
            self.tar, self.tmp = None, None


def existing_shards(out: Path, prefix: str) -> list[Path]:
    pattern = re.compile(rf"{re.escape(prefix)}-\d{{6,}}\.tar")
    return sorted(p for p in out.iterdir() if pattern.fullmatch(p.name)) if out.is_dir() else []


def build_shards(manifest: str | Path, media_root: str | Path, out: str | Path, *, prefix: str = "train",
                 max_samples: int = 1000, max_bytes: float = 1e9, task: str | None = None,
                 language: str | None = None, overwrite: bool = False,
                 allow_outside_media_root: bool = False) -> BuildSummary:
    """Validate every entry of `manifest`, then write its samples as `<out>/<prefix>-NNNNNN.tar` shards.
    Audio re-encoded from other containers is spooled in a temporary folder until its shard is written."""
    with tempfile.TemporaryDirectory(prefix="omni_shards_") as spool:
        return _build_shards(Path(manifest), Path(media_root), Path(out), prefix=prefix, max_samples=max_samples,
                             max_bytes=max_bytes, task=task, language=language, overwrite=overwrite,
                             allow_outside_media_root=allow_outside_media_root, spool=Path(spool))


def _build_shards(manifest: Path, media_root: Path, out: Path, *, prefix: str, max_samples: int, max_bytes: float,
                  task: str | None, language: str | None, overwrite: bool, allow_outside_media_root: bool,
                  spool: Path) -> BuildSummary:
    if max_samples < 1:
        raise ValueError(f"--max-samples must be at least 1 (got {max_samples})")
    if max_bytes <= 0 or not math.isfinite(max_bytes):
        raise ValueError(f"--max-bytes must be a positive number of bytes (got {max_bytes})")
    if not prefix or "/" in prefix or os.sep in prefix:
        raise ValueError(f"--prefix must be a plain file name prefix such as 'train' (got {prefix!r})")
    if not manifest.is_file():
        raise ValueError(f"--manifest {manifest} does not exist")
    if not media_root.is_dir():
        raise ValueError(f"--media-root {media_root} is not a directory")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    old = existing_shards(out, prefix)
    if old and not overwrite:
        raise ValueError(f"{old[0]} already exists ({len(old)} shard(s) named {prefix}-*.tar in {out}); "
                         f"pass --overwrite to replace them or choose another --prefix")

    samples = [prepare_entry(entry, where, media_root, task=task, language=language,
                             allow_outside_media_root=allow_outside_media_root, spool=spool)
               for where, entry in read_manifest(manifest)]

    out.mkdir(parents=True, exist_ok=True)
    for path in old:  # a shorter rebuild must not leave stale shards behind for a glob to pick up
        path.unlink()
    sink = ShardSink(out, prefix, max_samples=max_samples, max_bytes=int(max_bytes))
    try:
        for index, sample in enumerate(samples):
            sink.write(f"{index:06d}", sample)
        if sink.tar is not None:
            sink.close_shard()
    except BaseException:
        sink.abort()
        raise

    return BuildSummary(
        num_samples=len(samples),
        num_shards=len(sink.shards),
        shards=[str(p) for p in sink.shards],
        audio_hours=sum(s.audio_duration_s for s in samples) / 3600.0,
        num_images=sum(s.num_images for s in samples),
        num_videos=sum(s.num_videos for s in samples),
        num_video_frames=sum(s.num_video_frames for s in samples),
        num_bytes=sum(p.stat().st_size for p in sink.shards),
        samples_per_task=dict(Counter(str(s.meta.get("task", UNSET)) for s in samples)),
        samples_per_language=dict(Counter(str(s.meta.get("language", UNSET)) for s in samples)),
        largest_member_mb=max((size for s in samples for _, _, size in s.media), default=0) / 2**20,
    )


def build_shards_cli(args: argparse.Namespace) -> int:
    if not args.manifest:
        raise ValueError("shards build: --manifest is required (or --audio-dir DIR for a folder of recordings)")
    summary = build_shards(args.manifest, args.media_root, args.out, prefix=args.prefix or "train",
                           max_samples=args.max_samples, max_bytes=args.max_bytes, task=args.task,
                           language=args.language, overwrite=args.overwrite,
                           allow_outside_media_root=args.allow_outside_media_root)
    print(summary.format())
    return 0
