"""The data pipeline: WebDataset shards in, packed and tokenized batches out, resumable exactly.

Read order. Each (rank, DataLoader worker) pair is one of G = world_size x num_workers *streams*.
Per source and epoch, the shard list is shuffled by (seed, source, epoch); with at least G shards
each stream takes every G-th shard, otherwise every stream walks all shards and takes every G-th
sample. Inside a local shard, samples are read in a permutation drawn from (seed, source, epoch,
shard) through a member index of the tar (random access: a full shuffle with no shuffle buffer).
Remote shards (`http(s)://`, `pipe:`), only read when `data.allow_remote` is set, stream in tar
order; a `pipe:` source is one shell command, spaces and all. Several sources are mixed by
weight with a counter-based draw, so a stream's k-th sample depends only on (seed, stream, k).

Resume. A stream's state is a few integers: the position k, each source's (epoch, position),
and the addresses of the samples waiting in the packing pool. A restored stream re-decodes the
pooled samples from their addresses and continues; the main process records each worker's state
as its batches arrive and rotates worker ids on restore so DataLoader's round robin continues
where it stopped. Batches after a restore are identical to the batches an uninterrupted run
would have produced. A resume at another world size or number of workers (`load_state_dicts`, `Carry`) first
reads what the old streams left of their epochs and pools, by stride, then splits the next epoch anew: no
sample of an epoch is lost or read twice across the change.

Decoding. Each sample is decoded (audio, images, video and, for audio in video, a video's audio
track) and rendered by the chat template into a TokenizedSample, with its per-document 3-D positions
when model.positions (copied to data.positions) is mrope or tmrope (`positions.py`), and each media
item taking the backbone positions the model's fusion makes of it (data.sequence_tokens, derived
from model.fusion / model.projector: `sequence_tokens.py`). A training pipeline with data.*.augment passes each
sample an `augment.Augmenter` drawn from (seed, epoch, shard file name, key) as decode_sample's `transform`; with the
decode cache on, it keeps the clean decoded signals and augments them anew each epoch (`DecodeCache`).

Failures. A sample whose JSON or media cannot be used is skipped and appended to
`skipped.jsonl` with its shard, key and reason (a truncated tar logs where it ends, a shard that
cannot be opened as a tar is one line); `data.max_consecutive_failures` failures in a row stop the
run. Members outside the shard format (pickles, `.pth`, ...) refuse the whole shard.

Hostile shards. Memory per decoding process is bounded before anything is decoded: a member over
`data.max_member_mb` (`max_json_mb` for the JSON; `max_sample_mb` for a sample's members together)
is skipped from its tar header, never read, on local and streamed shards alike (`TarReader` also
bounds what tarfile reads for one header); text over `data.max_text_chars` is skipped before it is
tokenized; decoding stops once a sample's media alone pass `seq_len`. Two samples with one key never
merge: both are skipped (a stream, read once, can skip only the later one when others came between).
The errors that stop a run are `DataError` / `FileNotFoundError` with a
one-line message naming the shard, key or pattern, raised in the main process even when a DataLoader
worker met them.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import functools
import glob
import json
import logging
import os
import re
import signal
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import braceexpand
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from omni_train.data.audio import AudioConfig, audio_features, decode_audio
from omni_train.data.augment import Augmenter, sample_seed
from omni_train.data.format import (DataError, ShardFormatError, check_member_suffix, media_parts, parse_sample,
                                    sample_text_chars, split_member_name)
from omni_train.data.image import ImageConfig, decode_image_pixels, image_features
from omni_train.data.packing import Packer, collate_packed
from omni_train.data.positions import POSITION_KINDS
from omni_train.data.sample import EncodedMedia, MediaError, TokenizedSample
from omni_train.data.sequence_tokens import SequenceTokens, apply_sequence_tokens
from omni_train.data.text import Tokenizer, render_chat
from omni_train.data.video import VideoConfig, decode_video_frames, video_features

if TYPE_CHECKING:
    from omni_train.data.degrade import MediaTransform

log = logging.getLogger(__name__)
# The pipeline's errors a user fixes from the message; raised in a DataLoader worker they reach the main
# process as themselves, one line. Anything else is a bug and keeps DataLoader's traceback.
USER_ERRORS = (DataError, FileNotFoundError)

REMOTE_PREFIXES = ("http://", "https://", "pipe:", "s3://", "gs://")
OVERLONG_POLICIES = ("error", "skip")
MB = 2**20


@dataclass(kw_only=True)
class SourceConfig:
    shards: str              # local path, brace pattern (train-{000000..000007}.tar) or glob; remote needs allow_remote
    weight: float = 1.0      # mixing weight relative to the other sources
    tasks: list[str] | None = None  # only samples whose meta.task is listed (one shard set, mixed per task)

    def __post_init__(self):
        if not self.shards:
            raise ValueError("shards must name at least one shard")
        if not self.weight > 0:
            raise ValueError(f"weight must be > 0, got {self.weight}")
        if self.tasks is not None and (not self.tasks or not all(isinstance(t, str) and t for t in self.tasks)):
            raise ValueError(f"tasks must be a non-empty list of meta.task names, got {self.tasks!r}")


@dataclass(kw_only=True)
class DataConfig:
    seq_len: int = 2048                 # tokens per packed sequence
    batch_size: int = 1                 # packed sequences per micro-batch and rank
    num_workers: int = 2                # DataLoader worker processes per rank (0: decode in the main process)
    train: list[SourceConfig] = field(default_factory=list)
    eval: list[SourceConfig] = field(default_factory=list)
    tokenizer: str = "byte"             # sentencepiece .model, local HF tokenizer dir, or "byte"
    shuffle: bool = True
    allow_remote: bool = False          # opt in to http(s):// and pipe: shard URLs (pipe: runs a shell command)
    overlong: str = "error"             # a sample longer than seq_len: error (stop) | skip (logged)
    pack_pool: int = 64                 # samples pooled for best-fit packing
    decode_cache_mb: int = 0            # per worker: keep decoded samples (log-mel, pixels, tokens) for later epochs
    max_consecutive_failures: int = 32
    # What one sample may make a decoding process hold before decoding (decoded media have their own caps in
    # audio/image/video). A member over its cap is never read: the sample is skipped and logged. 64 MB is ~1 h
    # of 16 kHz speech as FLAC, 2 h as 64 kbps MP3, a few minutes of HD video, any camera photo; raise it for
    # longer recordings. 1M characters is a ~20 h transcript (tokenizing it costs ~45 MB); the JSON cap leaves room
    # for that text even \u-escaped and bounds what json.loads can build from a hostile 8 MB (~200 MB).
    max_member_mb: int = 64             # any one media member
    max_sample_mb: int = 256            # all members of one sample together
    max_json_mb: int = 8                # the sample's .json member
    max_text_chars: int = 1_000_000     # text one sample tokenizes (message text + meta.transcript)
    audio: AudioConfig = field(default_factory=AudioConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    # The positions samples are rendered with (positions.POSITION_KINDS). Recipes set model.positions, which the
    # recipe loader copies here (config.RecipeConfig); set it directly only when building a DataConfig in code.
    positions: str = "1d"
    # The backbone positions each media item takes (sequence_tokens.py): the encoder's tokens by default; the recipe
    # loader derives it from model.fusion / model.projector (config.RecipeConfig), like positions
    sequence_tokens: SequenceTokens = field(default_factory=SequenceTokens)

    def __post_init__(self):
        for name in ("seq_len", "batch_size", "pack_pool", "max_consecutive_failures", "max_member_mb", "max_sample_mb",
                     "max_json_mb", "max_text_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_workers", "decode_cache_mb"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.overlong not in OVERLONG_POLICIES:
            raise ValueError(f"overlong must be one of {', '.join(OVERLONG_POLICIES)}, got {self.overlong!r}")
        if self.positions not in POSITION_KINDS:
            raise ValueError(f"positions must be one of {', '.join(POSITION_KINDS)} (set model.positions), got {self.positions!r}")

    def member_limit(self, suffix: str) -> tuple[int, str]:
        """(bytes, setting name) a member with this suffix may hold."""
        if suffix == "json":
            return self.max_json_mb * MB, "data.max_json_mb"
        return self.max_member_mb * MB, "data.max_member_mb"


# ---------------------------------------------------------------------------------------------
# Shard URLs and tar access


def expand_shards(pattern: str, *, allow_remote: bool = False) -> list[str]:
    """Brace patterns and globs -> shard URLs. Remote URLs only with allow_remote; local ones must exist.

    Whitespace separates several patterns, except in a `pipe:` source: its whole string is one shell command
    (`pipe:curl -s URL`), in which only numeric ranges such as `{000000..000099}` are expanded."""
    pattern = pattern.strip()
    if pattern.startswith("pipe:"):
        parts = [pattern]
    else:
        parts = pattern.split()
        if any(part.startswith("pipe:") for part in parts):
            raise ValueError(f"shards {pattern!r}: a pipe: command must be the whole shards string of its source "
                             "(it runs as one shell command); give it a source of its own")
    urls: list[str] = []
    for part in parts:
        for url in _expand_pipe(part) if part.startswith("pipe:") else braceexpand.braceexpand(part):
            if url.startswith(REMOTE_PREFIXES):
                if not allow_remote:
                    raise ValueError(f"shard URL {url!r} is remote or runs a command; set data.allow_remote=true to read it")
                if url.startswith("s3://"):
                    raise ValueError(f"shard URL {url!r}: s3:// has no reader here; stream it with "
                                     f"'pipe:aws s3 cp {url} -'")
                urls.append(url)
            elif any(ch in url for ch in "*?["):
                matches = sorted(glob.glob(url))
                if not matches:
                    raise FileNotFoundError(f"shard pattern {url!r} matches no file")
                urls.extend(matches)
            else:
                if not os.path.exists(url):
                    raise FileNotFoundError(f"shard {url} does not exist")
                if not os.path.isfile(url):
                    raise ValueError(f"shard {url} is not a regular file")
                urls.append(url)
    if not urls:
        raise ValueError(f"shard pattern {pattern!r} names no shard")
    return urls


_NUMERIC_RANGE = re.compile(r"\{\d+\.\.\d+\}")


def _expand_pipe(command: str) -> list[str]:
    """A pipe: command per shard number of each `{a..b}` range (WebDataset's `pipe:curl .../train-{000..099}.tar`).

    Nothing else is expanded: commas and braces belong to the shell command (`awk '{print $1, $2}'`), and
    expanding them would run commands the user never wrote."""
    match = _NUMERIC_RANGE.search(command)
    if match is None:
        return [command]
    head, tail = command[:match.start()], command[match.end():]
    return [head + number + rest for number in braceexpand.braceexpand(match.group()) for rest in _expand_pipe(tail)]


@dataclass
class TarEntry:
    key: str
    members: dict[str, tuple[int, int]] = field(default_factory=dict)  # suffix -> (data offset, size)
    error: str | None = None  # set when the sample cannot be used (truncated, oversized, duplicate key)


# Headers of one tar member (with its pax records or GNU long name) are under 1 KiB in practice; tarfile reads
# them whole, so a hostile 200 MB "long name" would otherwise be read into memory before any member check.
MAX_HEADER_BYTES = MB


class TarReader:
    """The file object tarfile reads a shard through: header reads are bounded per member, and on a stream
    (http, pipe:) seeking forward reads and drops in 1 MB chunks, so a member that is not wanted is never held."""

    def __init__(self, raw, *, seekable: bool):
        self.raw, self.seekable = raw, seekable
        self.position = raw.tell() if seekable else 0
        self.header_bytes = 0  # what tarfile read since `_members` last asked it for the next member

    def read(self, size: int) -> bytes:
        """tarfile's reads: headers only (member data is read with `read_data`)."""
        if self.header_bytes + size > MAX_HEADER_BYTES:
            raise OSError(f"tar header at byte {self.position} is over {MAX_HEADER_BYTES} bytes")
        self.header_bytes += size
        return self.read_data(size)

    def read_data(self, size: int) -> bytes:
        data = self.raw.read(size)
        self.position += len(data)
        return data

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        assert whence == os.SEEK_SET, whence
        if self.seekable:
            self.position = self.raw.seek(offset)
            return self.position
        if offset < self.position:
            raise OSError(f"cannot seek back to byte {offset} in a streamed shard (at {self.position})")
        while self.position < offset and self.read_data(min(MB, offset - self.position)):
            pass
        return self.position


def _members(tar: tarfile.TarFile, reader: TarReader) -> Iterator[tarfile.TarInfo]:
    """The tar's file members in order; a damaged header raises TarError / OSError / EOFError where it is."""
    while True:
        reader.header_bytes = 0
        info = tar.next()
        tar.members = []  # tarfile keeps every header it read; a shard of many small members would pile them up
        if info is None:
            return
        if info.isfile():
            yield info


def _member_error(entry_size: int, suffix: str, size: int, cfg: DataConfig) -> str | None:
    """Why a member of `size` bytes cannot be read (the sample's members so far hold `entry_size`), or None."""
    limit, setting = cfg.member_limit(suffix)
    if size > limit:
        return f"member {suffix} is {size / MB:.1f} MB ({size} bytes), over {setting}={limit // MB}; not read"
    if entry_size + size > cfg.max_sample_mb * MB:
        return (f"members hold {(entry_size + size) / MB:.1f} MB with {suffix}, over "
                f"data.max_sample_mb={cfg.max_sample_mb}; not read")
    return None


def _duplicate_key(key: str, *, earlier_read: bool = False) -> str:
    if earlier_read:  # a stream cannot take back the sample it read before the key came back
        return f"duplicate key {key!r}: an earlier sample of this streamed shard has it (already read); this one is skipped"
    return f"duplicate key {key!r}: more than one sample in this shard has it; all of them are skipped"


def _flat(e: BaseException) -> str:
    """An exception's message on one line (tar and stream errors can span several)."""
    return " ".join(str(e).split())


def _unreadable(e: BaseException) -> str:
    return f"shard cannot be read as a tar ({type(e).__name__}: {_flat(e)})"


def index_tar(path: str, cfg: DataConfig | None = None) -> list[TarEntry]:
    """Index a local tar's samples by reading headers only.

    A sample with a member over `cfg`'s size caps, or whose key appears twice, carries an error (skipped
    and logged by the pipeline, nothing of it read). A truncated tar yields the samples before the damage
    plus one entry carrying the error; a shard that cannot be opened as a tar is one such entry (`<shard>`);
    a refused member raises ShardFormatError."""
    cfg = cfg or DataConfig()
    entries: dict[str, TarEntry] = {}
    error = None
    last_key = None
    try:
        f = open(path, "rb")
        file_size = os.fstat(f.fileno()).st_size
    except OSError as e:
        return [TarEntry("<shard>", error=_unreadable(e))]
    with f:
        reader = TarReader(f, seekable=True)
        try:
            tar = tarfile.open(fileobj=reader, mode="r:")
        except (tarfile.TarError, EOFError, OSError) as e:
            return [TarEntry("<shard>", error=_unreadable(e))]
        members = _members(tar, reader)
        while True:
            try:
                info = next(members, None)
            except (tarfile.TarError, EOFError, OSError) as e:
                error = f"truncated or corrupt tar after key {last_key!r}: {e}"
                break
            if info is None:
                break
            key, suffix = split_member_name(info.name, path)
            if key.startswith("__"):
                continue
            check_member_suffix(suffix, f"{path}:{key}")
            entry = entries.get(key)
            if entry is None:
                entry = entries[key] = TarEntry(key)
            elif key != last_key or suffix in entry.members:
                entry.error = _duplicate_key(key)
            if entry.error is None:
                entry.error = _member_error(sum(size for _, size in entry.members.values()), suffix, info.size, cfg)
            if entry.error is None and info.offset_data + info.size > file_size:
                entry.error = f"tar truncated inside member {info.name} ({file_size} bytes on disk)"
            entry.members[suffix] = (info.offset_data, info.size)
            last_key = key
    result = list(entries.values())
    if error and not (result and result[-1].error):  # damage inside the last member is already recorded there
        result.append(TarEntry(f"<after {last_key}>", error=error))
    return result


def read_entry(path: str, entry: TarEntry, suffixes: tuple[str, ...] | None = None) -> dict[str, bytes]:
    """The members of an indexed sample (those in `suffixes`); one with an error is never read."""
    if entry.error:
        raise ShardFormatError(f"{path}:{entry.key}: {entry.error}")
    with open(path, "rb") as f:
        out = {}
        for suffix, (offset, size) in entry.members.items():
            if suffixes is not None and suffix not in suffixes:
                continue
            f.seek(offset)
            out[suffix] = f.read(size)
    return out


def iter_remote(url: str, cfg: DataConfig | None = None) -> Iterator[tuple[str, dict[str, bytes] | None, str | None]]:
    """Sequential (key, members, error) from a streamed shard (webdataset's gopen opens http and pipe:).

    The size caps and the duplicate-key rule are index_tar's, checked from each header before the member is
    read. A stream is read once, in order: a key that comes back after other samples is skipped and logged,
    but its first sample was already read (two samples in a row with one key are both skipped)."""
    import webdataset as wds

    cfg = cfg or DataConfig()
    key, members, error = None, {}, None
    suffixes: set[str] = set()  # of the sample being read (its members are dropped once it has an error)
    seen: set[str] = set()
    try:
        stream = wds.gopen(url, "rb")
    except Exception as e:  # noqa: BLE001 - a stream that cannot start is one logged failure, like a broken one
        yield "<shard>", None, f"stream cannot be opened: {type(e).__name__}: {e}"
        return
    try:
        reader = TarReader(stream, seekable=False)
        for info in _members(tarfile.open(fileobj=reader, mode="r:"), reader):
            k, suffix = split_member_name(info.name, url)
            if k.startswith("__"):
                continue
            check_member_suffix(suffix, f"{url}:{k}")
            if k != key:
                if key is not None:
                    yield key, (None if error else members), error
                key, members, suffixes, error = k, {}, set(), (_duplicate_key(k, earlier_read=True) if k in seen else None)
                seen.add(k)
            elif suffix in suffixes:
                error = _duplicate_key(k)
            suffixes.add(suffix)
            if error is None:
                error = _member_error(sum(map(len, members.values())), suffix, info.size, cfg)
            if error is not None:
                members = {}
                continue
            members[suffix] = reader.read_data(info.size)
            if len(members[suffix]) < info.size:
                members, error = {}, f"stream ends inside member {info.name}"
                break
    except ShardFormatError:
        raise
    except Exception as e:  # noqa: BLE001 - a broken stream ends the shard; what is lost gets logged
        reason = f"{type(e).__name__}: {_flat(e)}"
        if key is None:
            yield "<shard>", None, f"stream cannot be read as a tar ({reason})"
        else:  # as in a truncated local tar: the sample before the damage, then what the damage cost
            yield key, (None if error else members), error
            yield f"<after {key}>", None, f"stream broke after key {key!r}: {reason}"
        return
    finally:
        try:
            stream.close()
        except Exception as e:  # noqa: BLE001 - a command that exits non-zero (webdataset raises it at close)
            log.warning("%s: %s", url, _flat(e))
    if key is not None:
        yield key, (None if error else members), error


# ---------------------------------------------------------------------------------------------
# Decoding one sample


class OverlongSample(DataError):
    """A sample with more tokens than data.seq_len (an error or a skip, by data.overlong)."""


def check_text_length(sample: dict[str, Any], where: str, cfg: DataConfig) -> None:
    """Refuse a parsed sample whose text is over data.max_text_chars, before anything tokenizes it."""
    num_chars = sample_text_chars(sample)
    if num_chars > cfg.max_text_chars:
        raise ShardFormatError(f"{where}: sample text is {num_chars} characters, over "
                               f"data.max_text_chars={cfg.max_text_chars}; not tokenized")


@dataclass
class CleanPart:
    """One media part decoded, before any transform: what the decode cache keeps to augment a sample anew each epoch.

    signal: audio (waveform (S,) float32,); image (pixels (1, 3, H, W) uint8,); video (frames (T, 3, H, W) uint8,
    timestamps_s (T,), duration_s). `track`: a video's audio track waveform (audio in video). `media` and
    `track_media` are the clean signal's features (before sequence tokens), filled the first time they are computed."""
    modality: str
    signal: tuple
    track: torch.Tensor | None = None
    media: EncodedMedia | None = None
    track_media: EncodedMedia | None = None


@dataclass
class CleanSample:
    """A sample decoded up to its clean media parts: the decode cache's entry when augmentation is on. `rendered`:
    the sample rendered from its clean parts, kept the first time an epoch changes none of them (no op fires on it,
    or it has no media) and returned as it is whenever that happens again."""
    sample: dict
    parts: list[CleanPart]
    rendered: TokenizedSample | None = None


def decode_sample(raw: dict[str, bytes], where: str, cfg: DataConfig, tokenizer: Tokenizer, *,
                  max_tokens: int | None = None, transform: MediaTransform | None = None,
                  keep: list[CleanSample] | None = None) -> TokenizedSample:
    """Raw members of one sample -> TokenizedSample, or an exception whose message says why not.

    With `max_tokens`, a sample over it raises OverlongSample, as soon as its media alone are over: a sample
    that names one long recording many times never holds more than `max_tokens` of decoded media plus one.

    A video part with audio in video (its `use_audio_in_video`, else data.video.use_audio_in_video) gets its
    audio track, decoded from the video's bytes (or from its `audio_member`), as `EncodedMedia.audio`; a video
    without a usable audio track then raises MediaError (the sample is skipped, with that reason).

    `transform` (degrade.MediaTransform) changes each media part's decoded signal before its features: told the part's
    index among the sample's media parts (a video's audio track: its video's index). `keep`, a list, gets the
    sample's CleanSample appended (for `redecode_sample`)."""
    if "json" not in raw:
        raise ShardFormatError(f"{where}: sample has no .json member (members: {', '.join(sorted(raw))})")
    sample = parse_sample(raw["json"], where)
    check_text_length(sample, where, cfg)
    for part in media_parts(sample):
        for name in (part["member"], part.get("audio_member", part["member"])):
            if name not in raw:
                raise ShardFormatError(f"{where}: message references member {name!r}, which is not in the shard")
    parts: list[CleanPart] = []  # held only for `keep`: a video's frames as decoded can be large
    if keep is not None:
        keep.append(CleanSample(sample, parts))

    def clean_part(index: int, part: dict, at: str) -> CleanPart:
        decoded = _decode_part(raw, part, at, cfg)
        if keep is not None:
            parts.append(decoded)
        return decoded

    return _build_sample(sample, clean_part, where, cfg, tokenizer, max_tokens=max_tokens, transform=transform,
                         clean=keep[-1] if keep is not None else None)


def redecode_sample(clean: CleanSample, where: str, cfg: DataConfig, tokenizer: Tokenizer, *,
                    max_tokens: int | None = None, transform: MediaTransform | None = None) -> TokenizedSample:
    """`decode_sample` from a sample's clean parts (kept by it): the same result, decoding nothing again. A part that
    `transform` leaves as it was (returns the object it was given) reuses its clean features, and a sample whose
    parts it all leaves so is its `clean.rendered` (the same object each time: treat it as read-only)."""
    return _build_sample(clean.sample, lambda index, part, at: clean.parts[index], where, cfg, tokenizer,
                         max_tokens=max_tokens, transform=transform, clean=clean)


def _build_sample(sample: dict, clean_part, where: str, cfg: DataConfig, tokenizer: Tokenizer, *,
                  max_tokens: int | None, transform: MediaTransform | None,
                  clean: CleanSample | None = None) -> TokenizedSample:
    """Parts (`clean_part(index, part, at)` -> CleanPart) -> transformed -> features -> the rendered sample. With
    `clean` (the sample's CleanSample), a rendering from unchanged parts is kept as, or taken from, `clean.rendered`."""
    media, unchanged = [], True
    for index, part in enumerate(media_parts(sample)):
        at = f"{where}.{part['member']}"
        item, same = _part_media(clean_part(index, part, at), index, part, at, cfg, transform)
        unchanged = unchanged and same
        media.append(apply_sequence_tokens(item, cfg.sequence_tokens))  # the positions the fusion makes of its tokens
        if max_tokens is not None and (num_tokens := sum(m.total_tokens for m in media)) > max_tokens:
            raise OverlongSample(f"{where}: sample's media alone have {num_tokens} tokens > "
                                 f"data.seq_len={max_tokens}; raise data.seq_len or set data.overlong=skip")
    if unchanged and clean is not None and clean.rendered is not None:
        return clean.rendered
    tokenized = render_chat(sample["messages"], media, tokenizer, where=where, positions=cfg.positions)
    if max_tokens is not None and len(tokenized) > max_tokens:
        raise OverlongSample(f"{where}: sample has {len(tokenized)} tokens > data.seq_len={max_tokens}; "
                             "raise data.seq_len or set data.overlong=skip")
    shard, _, key = where.rpartition(":")
    tokenized.shard, tokenized.key, tokenized.meta = shard, key, sample.get("meta", {})
    transcript = tokenized.meta.get("transcript")
    if isinstance(transcript, str) and sum(m.modality == "audio" for m in media) == 1:
        tokenized.audio_transcript_ids = torch.tensor(tokenizer.encode(transcript), dtype=torch.long)
    if unchanged and clean is not None:
        clean.rendered = tokenized
    return tokenized


def _decode_part(raw: dict[str, bytes], part: dict, at: str, cfg: DataConfig) -> CleanPart:
    """One media part's clean signal (and a video's audio track when it uses audio in video)."""
    member = raw[part["member"]]
    if part["type"] == "audio":
        return CleanPart("audio", (decode_audio(member, cfg.audio, where=at),))
    if part["type"] == "image":
        return CleanPart("image", (decode_image_pixels(member, cfg.image, where=at).unsqueeze(0),))
    if cfg.video.temporal_patch_size != cfg.image.temporal_patch_size:
        raise ValueError(f"video.temporal_patch_size ({cfg.video.temporal_patch_size}) must equal "
                         f"image.temporal_patch_size ({cfg.image.temporal_patch_size}): images and video share one "
                         "patch embedding")
    clean = CleanPart("video", decode_video_frames(member, cfg.video, where=at))
    if part.get("use_audio_in_video", cfg.video.use_audio_in_video):
        clean.track = _audio_in_video(raw, part, at, cfg)
    return clean


def _part_media(clean: CleanPart, index: int, part: dict, at: str, cfg: DataConfig,
                transform: MediaTransform | None) -> tuple[EncodedMedia, bool]:
    """A part's EncodedMedia from its clean signal through `transform`, and whether the transform left the part as it
    was: returned every signal as the very object it was given. An unchanged signal's clean features are computed
    once and kept on the part."""
    if clean.modality == "audio":
        (waveform,) = clean.signal
        out = transform.audio(waveform, cfg.audio.sample_rate_hz, index) if transform is not None else waveform
        same = out is waveform
        return _features(clean, "media", same, lambda: audio_features(out, cfg.audio, where=at)), same
    if clean.modality == "image":
        (pixels,) = clean.signal  # (1, 3, H, W) uint8
        out = transform.frames(pixels, torch.zeros(1), index, "image")[0] if transform is not None else pixels
        assert out.shape[0] == 1 and out.dtype == torch.uint8, (out.shape, out.dtype)
        same = out is pixels
        return _features(clean, "media", same, lambda: image_features(out[0], cfg.image)), same
    frames, timestamps_s, duration_s = clean.signal
    new_frames, new_timestamps_s = (transform.frames(frames, timestamps_s, index, "video") if transform is not None
                                    else (frames, timestamps_s))
    unchanged = new_frames is frames and new_timestamps_s is timestamps_s
    media = _features(clean, "media", unchanged,
                      lambda: video_features(new_frames, new_timestamps_s, duration_s, cfg.video, cfg.image))
    if clean.track is None:
        return media, unchanged
    track = transform.audio(clean.track, cfg.audio.sample_rate_hz, index) if transform is not None else clean.track
    track_at = f"{at} ({part['audio_member']}, audio in video)" if "audio_member" in part else at
    try:
        track_media = _features(clean, "track_media", track is clean.track,
                                lambda: audio_features(track, cfg.audio, where=track_at))
    except MediaError as e:
        raise _no_track(e, part, at) from None
    return dataclasses.replace(media, audio=track_media), unchanged and track is clean.track


def _features(clean: CleanPart, name: str, unchanged: bool, compute) -> EncodedMedia:
    """compute() for a transformed signal; for an unchanged one the part's clean features `name`, computed once."""
    if not unchanged:
        return compute()
    if getattr(clean, name) is None:
        setattr(clean, name, compute())
    return getattr(clean, name)


def _audio_in_video(raw: dict[str, bytes], part: dict, at: str, cfg: DataConfig) -> torch.Tensor:
    """The audio waveform interleaved with a video part's frames: the video's own track, or its `audio_member`."""
    if cfg.positions == "mrope":
        raise MediaError(f"{at}: audio in video needs model.positions tmrope or tmrope_qwen3 (or 1d), not mrope; set the part's "
                         "use_audio_in_video to false or data.video.use_audio_in_video: false")
    if cfg.sequence_tokens.kind != "encoder":
        raise MediaError(f"{at}: audio in video interleaves encoder tokens, not data.sequence_tokens.kind="
                         f"{cfg.sequence_tokens.kind} (model.fusion / model.projector); set the part's use_audio_in_video "
                         "to false")
    if "audio_member" in part:
        return decode_audio(raw[part["audio_member"]], cfg.audio, where=f"{at} ({part['audio_member']}, audio in video)")
    try:
        return decode_audio(raw[part["member"]], cfg.audio, where=at)
    except MediaError as e:
        raise _no_track(e, part, at) from None


def _no_track(e: MediaError, part: dict, at: str) -> MediaError:
    """A video's own audio track that cannot be used (an `audio_member`'s errors name that member instead)."""
    if "audio_member" in part:
        return e
    reason = str(e).removeprefix(f"{at}: ")
    return MediaError(f"{at}: use_audio_in_video needs the video's audio track, and it has none that decodes ({reason})")


def sample_nbytes(sample: TokenizedSample | CleanSample) -> int:
    """Bytes the tensors of a decoded sample hold (a CleanSample: its clean signals and the features computed so far)."""
    if isinstance(sample, CleanSample):
        media = [m for p in sample.parts for m in (p.media, p.track_media) if m is not None]
        tensors = [t for p in sample.parts for t in (*p.signal, p.track) if isinstance(t, torch.Tensor)]
        if sample.rendered is not None:  # its media are the parts' (or hold the same tensors): counted above
            tensors += _token_tensors(sample.rendered)
    else:
        tensors = _token_tensors(sample)
        media = [*sample.media, *(m.audio for m in sample.media if m.audio is not None)]
    tensors += [t for m in media for t in (m.token_timestamps_s, *m.tensors.values())]
    return sum(t.numel() * t.element_size() for t in tensors)


def _token_tensors(sample: TokenizedSample) -> list[torch.Tensor]:
    tensors = [sample.input_ids, sample.labels, sample.modality_ids, sample.timestamps_s]
    return tensors + [t for t in (sample.position_ids, sample.audio_transcript_ids) if t is not None]


class DecodeCache:
    """Decoded samples by (shard, key), least recently used out first, within `max_mb` (0: off).

    Decoding is deterministic, so a cached sample is the sample a fresh decode would give: batches,
    and exact resume, are unchanged. It saves the audio/video decode, log-mel, image resize and
    tokenization of every later epoch: on a small corpus (the demo's 1.5 h of speech is ~0.6 GB
    decoded) that work runs once, and the training processes get the cores the workers used.
    Samples that fail are not kept (they are retried, and logged once, each epoch).

    With augmentation (data.*.augment) an entry is the sample's CleanSample instead: its decoded clean signals
    (waveforms, frames as decoded) and their features, from which each epoch's augmentation is drawn anew
    (`redecode_sample`): only the parts an op fires on get new features, and only a sample with such a part is
    rendered again (one without is its first rendering, `CleanSample.rendered`).
    """

    def __init__(self, max_mb: int):
        self.max_bytes = max_mb * 2**20
        self.bytes = 0
        self.samples: collections.OrderedDict[tuple[str, str], tuple[TokenizedSample | CleanSample, int]] = \
            collections.OrderedDict()
        self.hits = self.misses = 0

    def get(self, url: str, key: str) -> TokenizedSample | CleanSample | None:
        if not self.max_bytes:
            return None
        found = self.samples.get((url, key))
        if found is None:
            self.misses += 1
            return None
        self.hits += 1
        self.samples.move_to_end((url, key))
        return found[0]

    def put(self, url: str, key: str, sample: TokenizedSample | CleanSample) -> None:
        """Keep a sample (the oldest go to make room), or count it again when it grew (a CleanSample's features are
        filled in as they are first needed); one over the whole budget is not kept."""
        if not self.max_bytes:
            return
        if (old := self.samples.pop((url, key), None)) is not None:
            self.bytes -= old[1]
        size = sample_nbytes(sample)
        if size > self.max_bytes:
            return
        while self.bytes + size > self.max_bytes:
            _, (_, freed) = self.samples.popitem(last=False)
            self.bytes -= freed
        self.samples[(url, key)] = (sample, size)
        self.bytes += size


class SkipLog:
    """Appends one JSON line per unusable sample (O_APPEND: lines from several processes stay whole)."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self._seen: set[tuple[str, str, str]] = set()

    def __call__(self, shard: str, key: str, reason: str) -> None:
        if (shard, key, reason) in self._seen:  # the same damage seen again in a later epoch
            return
        self._seen.add((shard, key, reason))
        log.warning("skipped %s:%s: %s", shard, key, reason)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            line = json.dumps({"shard": shard, "key": key, "reason": reason, "time": time.time()}, ensure_ascii=False)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")


def _kill_workers(workers: list) -> None:
    for worker in workers:
        if worker.is_alive():
            worker.kill()
            worker.join(timeout=10)


def _ignore_preemption_signals(worker_id: int) -> None:
    """A loader worker's start: a scheduler signals every process of a job, but SIGTERM / SIGUSR1 are for the
    rank, which checkpoints and then ends its workers itself (train/faults.py)."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


# ---------------------------------------------------------------------------------------------
# One source as seen by one stream


def sample_task(members: dict[str, bytes]) -> str | None:
    """meta.task of a sample's JSON member (None when it sets none); raises when the JSON is unreadable."""
    meta = json.loads(members["json"]).get("meta") or {}
    return meta.get("task") if isinstance(meta, dict) else None


@dataclass(frozen=True)
class Carry:
    """What the streams of an earlier layout (another world size or number of loader workers) left of one source:
    the rest of each one's epochs up to the latest any of them reached, and its packing pool. The streams of the new
    layout read these first, by stride, then begin the next epoch with their own shares: across the change every
    sample of an epoch is read once. Defined by the old streams' positions, so it is a few integers, not a list."""
    num_streams: int
    positions: tuple[tuple[int, int], ...]   # each old stream's (epoch, position) in this source
    pool: tuple[tuple[int, int, int], ...]   # (old stream, epoch, position) of this source's samples in their pools
    previous: Carry | None                   # the carry the old streams themselves began with

    @property
    def last_epoch(self) -> int:
        return max(epoch for epoch, _ in self.positions)

    @classmethod
    def of(cls, layout: dict | None, source: int) -> Carry | None:
        """The carry of one source from a layout as `layout_of` writes it (None: no change of layout)."""
        if layout is None:
            return None
        streams = layout["streams"]
        return cls(num_streams=len(streams), positions=tuple((e, p) for e, p in (st["sources"][source] for st in streams)),
                   pool=tuple((g, e, p) for g, st in enumerate(streams) for s, e, p in st["pool"] if s == source),
                   previous=cls.of(layout["carry"], source))


def start_position(carry: Carry | None) -> tuple[int, int]:
    """A source's (epoch, position) before its first sample: with a carry, the head of the carried samples."""
    return (carry.last_epoch + 1, -1) if carry is not None else (0, 0)


class SourceStream:
    """The samples of one source that belong to stream g of G, epoch by epoch, addressable by position.

    A position >= 0 counts the stream's samples of its epoch's plan; with a carry (a resume at another layout) the
    stream first reads its share of the carried samples, item i at position -1 - i (its epoch the one it was left in).
    With `tasks`, the source holds only the samples whose meta.task is listed (read from each sample's
    JSON once, when its shard is indexed); samples whose JSON cannot be read stay in, to be logged."""

    def __init__(self, urls: list[str], source: int, *, cfg: DataConfig, seed: int, stream: int, num_streams: int,
                 tasks: list[str] | None = None, carry: Carry | None = None, index: dict | None = None):
        self.urls, self.source, self.cfg, self.seed, self.shuffle = urls, source, cfg, seed, cfg.shuffle
        self.tasks = set(tasks) if tasks is not None else None
        self.stream, self.num_streams, self.carry = stream, num_streams, carry
        self.epoch, self.position = start_position(carry)
        self._iter: Iterator | None = None
        self._index: dict[str, list[TarEntry]] = index if index is not None else {}  # shared with the carry's streams
        self._carried: list[tuple[int, str, str, Any]] | None = None

    def _entries(self, url: str) -> list[TarEntry]:
        if url not in self._index:
            entries = index_tar(url, self.cfg)
            if self.tasks is not None:
                entries = [e for e in entries if e.error or "json" not in e.members or self._wanted(read_entry(url, e, ("json",)))]
            self._index[url] = entries
        return self._index[url]

    def _wanted(self, members: dict[str, bytes]) -> bool:
        if self.tasks is None:
            return True
        try:
            return sample_task(members) in self.tasks
        except Exception:  # noqa: BLE001 - an unreadable sample stays in, to be skipped and logged where it is decoded
            return True

    def _plan(self, epoch: int) -> Iterator[tuple[str, str, Any]]:
        """(url, key, fetch) for this stream's samples of `epoch`, in order; fetch() -> (members | None, error)."""
        order = list(range(len(self.urls)))
        if self.shuffle:
            order = list(np.random.default_rng([self.seed, self.source, epoch]).permutation(len(self.urls)))
        by_shard = len(self.urls) >= self.num_streams
        if by_shard:
            order = order[self.stream::self.num_streams]
        counter = 0
        for rank_in_order, shard in enumerate(order):
            url = self.urls[shard]
            if url.startswith(REMOTE_PREFIXES):
                samples = ((key, (lambda m=members, e=error: (m, e))) for key, members, error in iter_remote(url, self.cfg)
                           if error or self._wanted(members))
            else:
                entries = self._entries(url)
                perm = range(len(entries))
                if self.shuffle:
                    perm = np.random.default_rng([self.seed, self.source, epoch, int(shard)]).permutation(len(entries))
                samples = ((entries[i].key, (lambda e=entries[i], u=url: (None, e.error) if e.error else (read_entry(u, e), None)))
                           for i in perm)
            for key, fetch in samples:
                mine = by_shard or counter % self.num_streams == self.stream
                counter += 1
                if mine:
                    yield url, key, fetch

    def carried(self) -> list[tuple[int, str, str, Any]]:
        """The carry's samples, (epoch, url, key, fetch) in order: the old streams' pools, then what each old stream
        had still to read up to the end of the carry's last epoch. Every new stream computes the same list."""
        if self._carried is None:
            carry, items = self.carry, []
            assert carry is not None
            olds = [SourceStream(self.urls, self.source, cfg=self.cfg, seed=self.seed, stream=g, num_streams=carry.num_streams,
                                 tasks=list(self.tasks) if self.tasks is not None else None, carry=carry.previous,
                                 index=self._index) for g in range(carry.num_streams)]
            for g, old in enumerate(olds):
                pooled = [(e, p) for stream, e, p in carry.pool if stream == g]
                found = old.fetch_at(pooled)
                items += [(e, *found[(e, p)]) for e, p in pooled]
            for old, (epoch, position) in zip(olds, carry.positions):
                old.epoch, old.position = epoch, position
                for (_, item_epoch, _), url, key, fetch in old.walk(last_epoch=carry.last_epoch):
                    items.append((item_epoch, url, key, fetch))
            self._carried = items
        return self._carried

    def walk(self, infinite: bool = True, last_epoch: int | None = None) -> Iterator[tuple[tuple[int, int, int], str, str, Any]]:
        """(address, url, key, fetch) from the current (epoch, position) on, advancing them: the stream's share of
        the carried samples, then its plans epoch by epoch (through `last_epoch`, or for ever when `infinite`)."""
        if self.position < 0:
            items = self.carried()
            for i in range(-self.position - 1, len(items)):
                if i % self.num_streams == self.stream:
                    epoch, url, key, fetch = items[i]
                    self.position = -i - 2
                    yield (self.source, epoch, -i - 1), url, key, fetch
            self.position = 0
        while last_epoch is None or self.epoch <= last_epoch:
            count = 0
            for position, (url, key, fetch) in enumerate(self._plan(self.epoch)):
                count += 1
                if position >= self.position:
                    self.position = position + 1
                    yield (self.source, self.epoch, position), url, key, fetch
            if not infinite and last_epoch is None:
                return
            if count == 0 and last_epoch is None:
                raise DataError(f"shards {self.urls[0]}...: stream {self.stream} of {self.num_streams} gets no sample; "
                                "use fewer ranks x workers or more samples")
            self.epoch, self.position = self.epoch + 1, 0

    def seek(self, epoch: int, position: int) -> None:
        self.epoch, self.position = epoch, position
        self._iter = None

    def next(self, infinite: bool) -> tuple[tuple[int, int, int], str, str, Any] | None:
        """The next (address, url, key, fetch), rolling into the next epoch when infinite; None at the end."""
        if self._iter is None:
            self._iter = self.walk(infinite)
        return next(self._iter, None)

    def fetch_at(self, epochs_positions: list[tuple[int, int]]) -> dict[tuple[int, int], tuple[str, str, Any]]:
        """Look up several (epoch, position) addresses with one walk per epoch (used to rebuild a pool)."""
        found = {}
        for epoch, position in epochs_positions:
            if position < 0:
                found[(epoch, position)] = self.carried()[-position - 1][1:]
        for epoch in sorted({e for e, p in epochs_positions if p >= 0}):
            wanted = {p for e, p in epochs_positions if e == epoch and p >= 0}
            for position, (url, key, fetch) in enumerate(self._plan(epoch)):
                if position in wanted:
                    found[(epoch, position)] = (url, key, fetch)
                    if len(found) == len(epochs_positions):
                        break
                if position > max(wanted):
                    break
        return found


# ---------------------------------------------------------------------------------------------
# The iterable dataset run in each DataLoader worker


class PackedStream(IterableDataset):
    """Yields collated batches with the producing stream's state attached under "_data_state"."""

    def __init__(self, cfg: DataConfig, sources: list[SourceConfig], tokenizer: Tokenizer, *, rank: int, world_size: int,
                 seed: int, skip_log: SkipLog, infinite: bool, augment: bool = False):
        self.cfg, self.tokenizer, self.skip_log, self.infinite = cfg, tokenizer, skip_log, infinite
        self.augment = augment and Augmenter.from_config(cfg, [0]) is not None
        self.urls = [expand_shards(s.shards, allow_remote=cfg.allow_remote) for s in sources]
        self.tasks = [s.tasks for s in sources]
        self.weights = np.array([s.weight for s in sources], dtype=np.float64)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.num_workers = max(cfg.num_workers, 1)
        self.rotation = 0
        self.restore: dict[int, dict] = {}
        self.carry: dict | None = None  # the layout of the run this one resumed at another layout (`layout_of`)
        self.cache = DecodeCache(cfg.decode_cache_mb)  # each worker fills its own copy
        self.last_error = ""  # why the last unusable sample was skipped

    def __iter__(self):
        info = get_worker_info()
        physical = info.id if info is not None else 0
        logical = (physical + self.rotation) % self.num_workers
        stream = self.rank * self.num_workers + logical
        num_streams = self.world_size * self.num_workers
        try:
            yield from self._run(logical, stream, num_streams, self.restore.get(logical))
        except USER_ERRORS as e:
            # Raised in a DataLoader worker, it would reach the main process inside DataLoader's multi-line
            # "Caught ... in DataLoader worker process" text; as a marker, DataPipeline raises it there as itself.
            yield {"_error": (type(e), _flat(e))}

    def _choose(self, stream: int, k: int, active: list[int]) -> int:
        if len(active) == 1:
            return active[0]
        weights = self.weights[active] / self.weights[active].sum()
        u = np.random.default_rng([self.seed, 7919, stream, k]).random()
        return active[int(np.searchsorted(np.cumsum(weights), u, side="right").clip(max=len(active) - 1))]

    def _decode(self, url: str, key: str, fetch, epoch: int) -> TokenizedSample | None:
        """The sample at (url, key), read in `epoch` (which draws its augmentation), or None when it cannot be used."""
        transform = (Augmenter.from_config(self.cfg, sample_seed(self.seed, epoch, url, key), epoch)
                     if self.augment else None)
        cached = self.cache.get(url, key)
        if cached is not None and transform is None:
            return cached
        members, error = None, None
        if cached is None:
            try:
                members, error = fetch()
            except OSError as e:  # the shard became unreadable after it was indexed (moved, I/O error)
                error = f"cannot read the sample ({type(e).__name__}: {_flat(e)})"
        if error is None:
            where = f"{url}:{key}"
            keep: list[CleanSample] | None = [] if transform is not None and self.cache.max_bytes else None
            try:
                if cached is not None:
                    sample = redecode_sample(cached, where, self.cfg, self.tokenizer, max_tokens=self.cfg.seq_len,
                                             transform=transform)
                    self.cache.put(url, key, cached)  # counted again: its clean features may have been filled in
                else:
                    sample = decode_sample(members, where, self.cfg, self.tokenizer, max_tokens=self.cfg.seq_len,
                                           transform=transform, keep=keep)
            except OverlongSample as e:
                if self.cfg.overlong == "error":
                    raise
                error = str(e)
            except ShardFormatError as e:
                error = str(e)
            except Exception as e:  # noqa: BLE001 - any decode failure skips the sample, with its reason
                error = f"{type(e).__name__}: {e}"
            else:
                if cached is None:
                    self.cache.put(url, key, keep[0] if keep is not None else sample)
                return sample
        self.last_error = error.removeprefix(f"{url}:{key}: ")
        self.skip_log(url, key, self.last_error)
        return None

    def _run(self, worker: int, stream: int, num_streams: int, state: dict | None) -> Iterator[dict]:
        sources = [SourceStream(urls, i, cfg=self.cfg, seed=self.seed, stream=stream, num_streams=num_streams, tasks=tasks,
                                carry=Carry.of(self.carry, i))
                   for i, (urls, tasks) in enumerate(zip(self.urls, self.tasks))]
        packer = Packer(self.cfg.seq_len, self.cfg.pack_pool)
        k, failures = self.carry["k"] if self.carry else 0, 0  # a new layout's mixing draws go on past the old ones'
        exhausted: set[int] = set()
        if state is not None:
            k, exhausted = state["k"], set(state["exhausted"])
            for source, (epoch, position) in zip(sources, state["sources"]):
                source.seek(epoch, position)
            for i, source in enumerate(sources):
                pooled = [tuple(a) for a in state["pool"] if a[0] == i]
                found = source.fetch_at([(e, p) for _, e, p in pooled])
                for address in pooled:
                    url, key, fetch = found[address[1:]]
                    sample = self._decode(url, key, fetch, address[1])
                    if sample is None:
                        raise DataError(f"resume: {url}:{key}, pooled when the data state was saved, no longer "
                                        "decodes (see skipped.jsonl); were the shards or data settings changed?")
                    packer.add(sample, address)
            packer.pool.sort(key=lambda item: state["pool"].index(list(item.address)))

        while True:
            sequences = []
            for _ in range(self.cfg.batch_size):
                while not packer.full() and len(exhausted) < len(sources):
                    active = [i for i in range(len(sources)) if i not in exhausted]
                    choice = self._choose(stream, k, active)
                    item = sources[choice].next(self.infinite)
                    if item is None:
                        exhausted.add(choice)
                        continue
                    k += 1
                    address, url, key, fetch = item
                    sample = self._decode(url, key, fetch, address[1])
                    if sample is None:
                        failures += 1
                        if failures >= self.cfg.max_consecutive_failures:
                            raise DataError(f"{failures} samples in a row could not be used (data.max_consecutive_failures);"
                                            f" the last, {url}:{key}: {self.last_error}; see skipped.jsonl")
                        continue
                    failures = 0
                    packer.add(sample, address)
                sequence = packer.pop_pooled()
                if sequence:
                    sequences.append(sequence)
            if not sequences:
                return
            batch = collate_packed([[item.sample for item in sequence] for sequence in sequences], self.cfg.seq_len,
                                   self.tokenizer.pad_id, self.cfg.audio)
            for entry, item in zip(batch["samples"], (item for sequence in sequences for item in sequence)):
                entry["epoch"] = item.address[1]  # the epoch of its source it was read in
            batch["_data_state"] = {"worker": worker, "state": {
                "k": k, "exhausted": sorted(exhausted),
                "sources": [[s.epoch, s.position] for s in sources],
                "pool": [list(a) for a in packer.addresses()]}}
            yield batch


# ---------------------------------------------------------------------------------------------
# The main-process view


class DataPipeline:
    """Iterate packed batches for one rank; `state_dict()` after any batch resumes exactly there.

    `epochs=None` streams forever (training); `epochs=1` reads each sample once (eval, inspection). `augment`
    (training) applies data.audio/image/video.augment, drawn per (seed, epoch, sample): `augment.py`.
    """

    def __init__(self, cfg: DataConfig, sources: list[SourceConfig] | None = None, *, tokenizer: Tokenizer | None = None,
                 rank: int = 0, world_size: int = 1, seed: int = 0, skip_log: str | Path | None = None,
                 epochs: int | None = None, augment: bool = False):
        assert epochs in (None, 1), "a finite pipeline reads one epoch"
        sources = cfg.train if sources is None else sources
        if not sources:
            raise ValueError("data.train names no shards")
        self.cfg = cfg
        self.tokenizer = tokenizer if tokenizer is not None else Tokenizer.from_path(cfg.tokenizer)
        self.dataset = PackedStream(cfg, sources, self.tokenizer, rank=rank, world_size=world_size, seed=seed,
                                    skip_log=SkipLog(skip_log), infinite=epochs is None, augment=augment)
        self.num_batches = 0
        self.worker_states: dict[int, dict] = {}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.dataset.rotation = self.num_batches % self.dataset.num_workers
        self.dataset.restore = dict(self.worker_states)
        # Its own generator: DataLoader draws a seed per iterator, which from torch's global one would leave that one
        # where a resumed run's is not (the restored RNG state feeds model.audio.spec_augment, LoRA dropout)
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.cfg.num_workers,
                            generator=torch.Generator().manual_seed(self.dataset.seed),
                            prefetch_factor=2 if self.cfg.num_workers else None,
                            persistent_workers=False, multiprocessing_context="fork" if self.cfg.num_workers else None,
                            worker_init_fn=_ignore_preemption_signals)
        batches = iter(loader)
        # The workers ignore SIGTERM, which is also how DataLoader ends one that does not stop by itself (and
        # multiprocessing then waits on it at exit forever): whatever is still alive when this stream or the
        # process ends is SIGKILLed instead, before multiprocessing's own exit handler runs.
        release = functools.partial(_kill_workers, list(getattr(batches, "_workers", [])))
        atexit.register(release)
        try:
            for batch in batches:
                if "_error" in batch:
                    error_type, message = batch["_error"]
                    raise error_type(message)
                data_state = batch.pop("_data_state")
                self.worker_states[data_state["worker"]] = data_state["state"]
                self.num_batches += 1
                yield batch
        finally:
            atexit.unregister(release)
            if hasattr(batches, "_shutdown_workers"):
                batches._shutdown_workers()  # the polite way first: a done event, then a join with a timeout
            release()

    def state_dict(self) -> dict[str, Any]:
        return {"num_batches": self.num_batches, "num_workers": self.dataset.num_workers,
                "rank": self.dataset.rank, "world_size": self.dataset.world_size, "seed": self.dataset.seed,
                "worker_states": {str(w): s for w, s in self.worker_states.items()}, "carry": self.dataset.carry}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`'s output; ValueError when it is not one (a damaged or foreign state file)."""
        if (problem := state_problem(state)) is not None:
            raise ValueError(f"not a data pipeline state ({problem})")
        for name in ("num_workers", "rank", "world_size", "seed"):
            if state[name] != getattr(self.dataset, name):
                raise ValueError(f"data state was saved with {name}={state[name]}, this run has "
                                 f"{getattr(self.dataset, name)}; resume with the same setting")
        self.num_batches = state["num_batches"]
        self.worker_states = {int(w): s for w, s in state["worker_states"].items()}
        self.dataset.carry = state.get("carry")

    def load_state_dicts(self, states: list[dict[str, Any]]) -> str | None:
        """Resume from the states of every rank of a run (`state_dict()` of ranks 0..n-1), at any world size and
        number of loader workers. With the same ones it is `load_state_dict` of this rank's state, exact. With
        others, every stream of the new layout first reads its share (by stride) of what the old streams left
        of their epochs and pools (`Carry`), then goes on with the next epoch: no sample of an epoch is lost or
        read twice across the change. Returns a line saying what changed, or None. ValueError on a bad state."""
        for rank, state in enumerate(states):
            if (problem := state_problem(state)) is not None:
                raise ValueError(f"rank {rank}: not a data pipeline state ({problem})")
            if state["rank"] != rank or state["world_size"] != len(states):
                raise ValueError(f"rank {rank}: the state of rank {state['rank']} of {state['world_size']}")
            if state["seed"] != self.dataset.seed:
                raise ValueError(f"data state was saved with seed={state['seed']}, this run has {self.dataset.seed}; "
                                 "resume with the same setting")
        old = (len(states), states[0]["num_workers"])
        if old == (self.dataset.world_size, self.dataset.num_workers):
            self.load_state_dict(states[self.dataset.rank])
            return None
        if not self.dataset.infinite:
            raise ValueError("a pipeline that reads one epoch resumes only with its own layout")
        self.num_batches, self.worker_states = 0, {}
        self.dataset.carry = layout_of(states, num_sources=len(self.dataset.urls))
        return (f"data: {old[0]} ranks x {old[1]} loader workers before, {self.dataset.world_size} x "
                f"{self.dataset.num_workers} now: the samples left of the epochs in progress are read first, each once")


def layout_of(states: list[dict[str, Any]], num_sources: int) -> dict[str, Any]:
    """The streams of a run (the data states of all its ranks) as the `carry` of a run with another layout:
    each stream's (epoch, position) per source and its pool, the carry they began with, and the next mixing draw."""
    previous = states[0].get("carry")
    if any(state.get("carry") != previous for state in states):
        raise ValueError("the ranks' data states began from different layouts")
    streams = []
    for state in states:
        for worker in range(state["num_workers"]):
            stream = state["worker_states"].get(str(worker))
            if stream is None:  # it never produced a batch that was used: where it started
                stream = {"k": previous["k"] if previous else 0, "exhausted": [], "pool": [],
                          "sources": [list(start_position(Carry.of(previous, i))) for i in range(num_sources)]}
            if len(stream["sources"]) != num_sources:
                raise ValueError(f"data state has {len(stream['sources'])} data.train sources, this run has "
                                 f"{num_sources}; resume with the same sources")
            if stream["exhausted"]:
                raise ValueError("a pipeline that reads one epoch resumes only with its own layout")
            streams.append({"k": stream["k"], "sources": stream["sources"], "pool": stream["pool"]})
    return {"streams": streams, "k": max(stream["k"] for stream in streams), "carry": previous}


def _layout_problem(layout: Any) -> str | None:
    while layout is not None:
        if not (isinstance(layout, dict) and isinstance(layout.get("k"), int) and isinstance(layout.get("streams"), list)
                and layout["streams"] and all(isinstance(st, dict) for st in layout["streams"])):
            return "carry is not a layout"
        for stream in layout["streams"]:
            if not (isinstance(stream.get("k"), int) and _ints_lists(stream.get("sources"), 2)
                    and _ints_lists(stream.get("pool"), 3)):
                return "carry lacks k / sources / pool"
        layout = layout.get("carry")
    return None


def _ints_lists(value: Any, length: int) -> bool:
    return isinstance(value, list) and all(isinstance(item, list) and len(item) == length
                                           and all(isinstance(v, int) for v in item) for item in value)


def state_problem(state: Any) -> str | None:
    """What makes `state` unlike `DataPipeline.state_dict()`'s output, or None: checked before any worker uses it."""
    if not isinstance(state, dict):
        return "not an object"
    for name in ("num_batches", "num_workers", "rank", "world_size", "seed"):
        if not isinstance(state.get(name), int):
            return f"{name} is not an integer"
    workers = state.get("worker_states")
    if not isinstance(workers, dict):
        return "worker_states is not an object"
    for worker, stream in workers.items():
        if not (isinstance(worker, str) and worker.isdigit() and isinstance(stream, dict)):
            return f"worker_states[{worker!r}] is not a worker's state"
        if not (isinstance(stream.get("k"), int) and isinstance(stream.get("exhausted"), list)
                and all(isinstance(v, int) for v in stream["exhausted"])
                and _ints_lists(stream.get("sources"), 2) and _ints_lists(stream.get("pool"), 3)):
            return f"worker_states[{worker!r}] lacks k / exhausted / sources / pool"
    return _layout_problem(state.get("carry"))
