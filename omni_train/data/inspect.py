"""`omni-train shards inspect PATTERN [--decode] [--json]`: what a shard set holds, and what the loader can use.

Without `--decode` it reads each sample's JSON and its media headers (durations, sizes, frame
rates; no full decode) and computes the token count of the rendered sample (exact but for compressed-audio header durations) from the same
placeholder arithmetic the training pipeline uses (the media's positions as the recipe's fusion makes
them, data.sequence_tokens). With `--decode`, every sample goes through the
pipeline's real decoding and tokenization and each unusable one is listed with its reason. Either way,
samples the pipeline skips before reading them (a member over `data.max_member_mb` / `max_json_mb` /
`max_sample_mb`, a key two samples share, text over `data.max_text_chars`) are listed as unusable too.
"""

from __future__ import annotations

import argparse
import io
import json
from collections import Counter
from typing import Any

import torch

from omni_train.data.audio import num_audio_tokens, num_mel_frames
from omni_train.data.format import ShardFormatError, media_parts, parse_sample
from omni_train.data.image import smart_resize
from omni_train.data.pipeline import DataConfig, check_text_length, decode_sample, expand_shards, index_tar, read_entry
from omni_train.data.sample import EncodedMedia
from omni_train.data.sequence_tokens import apply_sequence_tokens
from omni_train.data.text import Tokenizer, render_chat
from omni_train.data.video import sample_frame_times


def _header_media(part: dict, data: bytes, cfg: DataConfig) -> tuple[EncodedMedia, float, int]:
    """(placeholder stand-in with the exact token count, seconds of audio, sampled video frames) from headers."""
    merge = cfg.image.patch_size * cfg.image.merge_size
    if part["type"] == "audio":
        from torchcodec.decoders import AudioDecoder

        meta = AudioDecoder(data).metadata
        duration_s = meta.duration_seconds_from_header or meta.duration_seconds or 0.0
        num_tokens = num_audio_tokens(num_mel_frames(int(duration_s * cfg.audio.sample_rate_hz), cfg.audio), cfg.audio)
        return _stand_in("audio", num_tokens), duration_s, 0
    if part["type"] == "image":
        from PIL import Image

        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
        h, w = smart_resize(height, width, cfg.image)
        return _stand_in("image", (h // merge) * (w // merge)), 0.0, 0
    from torchcodec.decoders import VideoDecoder

    meta = VideoDecoder(data).metadata
    indices, _ = sample_frame_times(meta.duration_seconds or 0.0, meta.num_frames, meta.average_fps, cfg.video)
    h, w = smart_resize(meta.height, meta.width, cfg.image, min_pixels=cfg.video.min_pixels, max_pixels=cfg.video.max_pixels)
    num_frames = len(indices)
    return _stand_in("video", num_frames // cfg.video.temporal_patch_size * (h // merge) * (w // merge)), 0.0, num_frames


def _stand_in(modality: str, num_tokens: int) -> EncodedMedia:
    return EncodedMedia(modality=modality, num_tokens=num_tokens, token_timestamps_s=torch.zeros(num_tokens), tensors={})


def inspect_shards(pattern: str, *, decode: bool = False, cfg: DataConfig | None = None,
                   tokenizer: Tokenizer | None = None) -> dict[str, Any]:
    cfg = cfg or DataConfig()
    tokenizer = tokenizer or Tokenizer.from_path(cfg.tokenizer)
    urls = expand_shards(pattern, allow_remote=False)
    tasks, languages, media_counts = Counter(), Counter(), Counter()
    audio_s = 0.0
    num_samples = num_tokens = num_frames = 0
    longest = 0
    unusable, refused = [], []
    for url in urls:
        try:
            entries = index_tar(url, cfg)
        except ShardFormatError as e:
            refused.append({"shard": url, "reason": str(e)})
            continue
        for entry in entries:
            where = f"{url}:{entry.key}"
            try:
                if entry.error:
                    raise ShardFormatError(entry.error)
                raw = read_entry(url, entry)
                sample = parse_sample(raw.get("json", b""), where)
                check_text_length(sample, where, cfg)
                if decode:
                    tokenized = decode_sample(raw, where, cfg, tokenizer)
                    stats = [(m.duration_s if m.modality == "audio" else 0.0,
                              m.tensors["frame_timestamps_s"].numel() if m.modality == "video" else 0) for m in tokenized.media]
                    kinds = [m.modality for m in tokenized.media]
                else:
                    media = []
                    stats, kinds = [], []
                    for part in media_parts(sample):
                        if part["member"] not in raw:
                            raise ShardFormatError(f"member {part['member']!r} is not in the shard")
                        stand_in, seconds, frames = _header_media(part, raw[part["member"]], cfg)
                        media.append(apply_sequence_tokens(stand_in, cfg.sequence_tokens))  # the fusion's positions
                        stats.append((seconds, frames))
                        kinds.append(part["type"])
                    tokenized = render_chat(sample["messages"], media, tokenizer, where=where)
                if len(tokenized) > cfg.seq_len:
                    raise ValueError(f"{len(tokenized)} tokens > data.seq_len={cfg.seq_len}")
            except Exception as e:  # noqa: BLE001 - every unusable sample is listed, with its reason
                unusable.append({"shard": url, "key": entry.key, "reason": str(e).removeprefix(f"{where}: ")})
                continue
            num_samples += 1
            meta = sample.get("meta", {})
            tasks[meta.get("task", "?")] += 1
            languages[meta.get("language", "?")] += 1
            media_counts.update(kinds)
            audio_s += sum(s for s, _ in stats)
            num_frames += sum(f for _, f in stats)
            num_tokens += len(tokenized)
            longest = max(longest, len(tokenized))
    return {
        "pattern": pattern, "shards": len(urls), "samples": num_samples, "decoded": decode,
        "tasks": dict(sorted(tasks.items())), "languages": dict(sorted(languages.items())),
        "audio_items": media_counts["audio"], "audio_hours": audio_s / 3600, "images": media_counts["image"],
        "videos": media_counts["video"], "video_frames": num_frames, "tokens": num_tokens, "longest_sample_tokens": longest,
        "seq_len": cfg.seq_len, "unusable": unusable, "refused_shards": refused,
    }


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"{report['pattern']}: {report['shards']} shards, {report['samples']} usable samples"
        + (" (decoded)" if report["decoded"] else " (headers; --decode runs the training decode)"),
        f"  audio: {report['audio_items']} items, {report['audio_hours']:.3f} h   images: {report['images']}   "
        f"videos: {report['videos']} ({report['video_frames']} sampled frames)",
        f"  tokens: {report['tokens']:,} (longest sample {report['longest_sample_tokens']}, seq_len {report['seq_len']})",
        f"  tasks ({len(report['tasks'])}): " + ", ".join(f"{k} {v}" for k, v in report["tasks"].items()),
        f"  languages ({len(report['languages'])}): " + ", ".join(f"{k} {v}" for k, v in report["languages"].items()),
    ]
    for shard in report["refused_shards"]:
        lines.append(f"  REFUSED shard {shard['shard']}: {shard['reason']}")
    if report["unusable"]:
        lines.append(f"  unusable samples: {len(report['unusable'])}")
        lines += [f"    {u['shard']}:{u['key']}: {u['reason']}" for u in report["unusable"]]
    return "\n".join(lines)


def inspect_cli(args: argparse.Namespace) -> int:
    cfg = DataConfig()
    if args.recipe:
        from omni_train.config import load_recipe

        cfg = load_recipe(args.recipe).data
    tokenizer = Tokenizer.from_path(args.tokenizer or cfg.tokenizer)
    report = inspect_shards(args.pattern, decode=args.decode, cfg=cfg, tokenizer=tokenizer)
    print(json.dumps(report, ensure_ascii=False, indent=1) if args.json else format_report(report))
    return 1 if report["unusable"] or report["refused_shards"] else 0
