"""The shard format (DESIGN.md): one sample = `<key>.json` plus its media members in the same tar.

    000123.json           {"messages": [...], "meta": {"task": "asr", "language": "de", ...}}
    000123.audio_0.flac   referenced from a message as {"type": "audio", "member": "audio_0.flac"}
    000123.image_0.jpg
    000123.video_0.mp4

A video part may carry `"use_audio_in_video": true|false` (interleave the video's own audio track
with its frames, Qwen2.5-Omni's audio in video; absent: the recipe's data.video.use_audio_in_video)
and, with true, `"audio_member": "audio_1.flac"` to interleave that member's audio instead of the
video's own track.

Only the extensions below may appear in a shard; anything else (pickles, `.pth`, ...) is refused,
because the pipeline never unpickles shard content.
"""

from __future__ import annotations

import json
from typing import Any

MODALITIES = ("audio", "image", "video")
EXTENSIONS = {
    "audio": ("flac", "wav", "mp3", "ogg", "opus"),
    "image": ("jpg", "jpeg", "png", "webp"),
    "video": ("mp4", "webm", "mkv", "avi"),
}
EXTENSION_MODALITY = {ext: modality for modality, exts in EXTENSIONS.items() for ext in exts}
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A user's data problem the pipeline stops on or skips (a refused shard, an over-long or oversized sample,
    too many unusable samples in a row); the message is one line naming the shard, key or pattern."""


class ShardFormatError(DataError):
    """A shard, sample or manifest entry that breaks the format; the message names where."""


def split_member_name(name: str, shard: str = "") -> tuple[str, str]:
    """'dir/000123.audio_0.flac' -> ('dir/000123', 'audio_0.flac') (WebDataset's key rule: first dot of the basename)."""
    head, _, base = name.rpartition("/")
    key, dot, suffix = base.partition(".")
    if not dot or not key:
        raise ShardFormatError(f"{shard + ': ' if shard else ''}tar member {name[:200]!r} has no '<key>.<suffix>' form")
    return (f"{head}/{key}" if head else key), suffix


def member_extension(suffix: str) -> str:
    return suffix.rsplit(".", 1)[-1].lower()


def check_member_suffix(suffix: str, where: str) -> None:
    """Refuse any member that is not the sample JSON or a media file of an allowed extension."""
    ext = member_extension(suffix)
    if suffix == "json" or ext in EXTENSION_MODALITY:
        return
    raise ShardFormatError(
        f"{where}: member '{suffix}' has a refused extension '.{ext}' (allowed: json, "
        f"{', '.join(sorted(EXTENSION_MODALITY))}); shards never carry pickles or checkpoints"
    )


def media_member_name(modality: str, index: int, ext: str) -> str:
    assert modality in MODALITIES, modality
    ext = ext.lower().lstrip(".")
    if EXTENSION_MODALITY.get(ext) != modality:
        raise ShardFormatError(f"extension '.{ext}' is not a {modality} format (allowed: {', '.join(EXTENSIONS[modality])})")
    return f"{modality}_{index}.{ext}"


def parse_sample(raw: bytes | str, where: str) -> dict[str, Any]:
    """Parse and validate a sample's JSON; `where` (shard:key) goes into every error message."""
    try:
        sample = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardFormatError(f"{where}: invalid JSON ({e})") from None
    except RecursionError:
        raise ShardFormatError(f"{where}: invalid JSON (nested too deeply)") from None
    if not isinstance(sample, dict) or not isinstance(sample.get("messages"), list) or not sample["messages"]:
        raise ShardFormatError(f"{where}: sample JSON needs a non-empty 'messages' list")
    for i, message in enumerate(sample["messages"]):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ShardFormatError(f"{where}: messages[{i}].role must be one of {', '.join(ROLES)}")
        content = message.get("content")
        if isinstance(content, str):
            message["content"] = content = [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise ShardFormatError(f"{where}: messages[{i}].content must be a list of parts or a string")
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise ShardFormatError(f"{where}: messages[{i}].content[{j}].text must be a string")
            elif kind in MODALITIES:
                member = part.get("member")
                if not isinstance(member, str) or EXTENSION_MODALITY.get(member_extension(member)) != kind:
                    raise ShardFormatError(f"{where}: messages[{i}].content[{j}] needs a {kind} 'member' such as '{kind}_0.{EXTENSIONS[kind][0]}'")
                _check_audio_in_video(part, kind, f"{where}: messages[{i}].content[{j}]")
            else:
                raise ShardFormatError(f"{where}: messages[{i}].content[{j}].type must be text, audio, image or video")
    meta = sample.setdefault("meta", {})
    if not isinstance(meta, dict):
        raise ShardFormatError(f"{where}: 'meta' must be an object")
    return sample


def _check_audio_in_video(part: dict[str, Any], kind: str, where: str) -> None:
    """A media part's audio-in-video keys: only on videos, a boolean, and an audio `audio_member` only with true."""
    if "use_audio_in_video" not in part and "audio_member" not in part:
        return
    if kind != "video":
        raise ShardFormatError(f"{where}: use_audio_in_video / audio_member belong to video parts, not {kind}")
    flag = part.get("use_audio_in_video")
    if "use_audio_in_video" in part and not isinstance(flag, bool):
        raise ShardFormatError(f"{where}.use_audio_in_video must be true or false, got {flag!r}")
    if "audio_member" in part:
        member = part["audio_member"]
        if flag is not True:
            raise ShardFormatError(f"{where}.audio_member needs \"use_audio_in_video\": true beside it")
        if not isinstance(member, str) or EXTENSION_MODALITY.get(member_extension(member)) != "audio":
            raise ShardFormatError(f"{where}.audio_member must name an audio member such as 'audio_0.{EXTENSIONS['audio'][0]}'")


def sample_text_chars(sample: dict[str, Any]) -> int:
    """Characters of text a parsed sample would tokenize: its messages' text parts and `meta.transcript`."""
    num_chars = sum(len(part["text"]) for message in sample["messages"] for part in message["content"]
                    if part["type"] == "text")
    transcript = sample["meta"].get("transcript")
    return num_chars + (len(transcript) if isinstance(transcript, str) else 0)


def media_parts(sample: dict[str, Any]) -> list[dict[str, Any]]:
    """The media parts of a sample in conversation order (the order placeholders are expanded)."""
    return [part for message in sample["messages"] for part in message["content"] if part["type"] in MODALITIES]
