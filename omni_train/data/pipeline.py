"""The data pipeline: WebDataset shards in, packed and tokenized batches out, resumable exactly.

Read order. Each (rank, DataLoader worker) pair is one of G = world_size x num_workers *streams*.
Per source and epoch, the shard list is shuffled by (seed, source, epoch); with at least G shards
each stream takes every G-th shard, otherwise every stream walks all shards and takes every G-th
sample. Inside a local shard, samples are read in a permutation drawn from (seed, source, epoch,
shard) through a member index of the tar (random access: a full shuffle with no shuffle buffer).
Remote shards (`http(s)://`, `pipe:`), only read when `data.allow_remote` is set, stream in tar
order. Several sources are mixed by weight with a counter-based draw, so a stream's k-th sample
depends only on (seed, stream, k).

Resume. A stream's state is a few integers: the position k, each source's (epoch, position),
and the addresses of the samples waiting in the packing pool. A restored stream re-decodes the
pooled samples from their addresses and continues; the main process records each worker's state
as its batches arrive and rotates worker ids on restore so DataLoader's round robin continues
where it stopped. Batches after a restore are identical to the batches an uninterrupted run
would have produced.

Failures. A sample whose JSON or media cannot be used is skipped and appended to
`skipped.jsonl` with its shard, key and reason (a truncated tar logs where it ends);
`data.max_consecutive_failures` failures in a row stop the run. Members outside the shard format
(pickles, `.pth`, ...) refuse the whole shard.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import logging
import os
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from omni_train.data.audio import AudioConfig, encode_audio
from omni_train.data.format import ShardFormatError, check_member_suffix, media_parts, parse_sample, split_member_name
from omni_train.data.image import ImageConfig, encode_image
from omni_train.data.packing import Packer, collate_packed
from omni_train.data.sample import TokenizedSample
from omni_train.data.text import Tokenizer, render_chat
from omni_train.data.video import VideoConfig, encode_video

log = logging.getLogger(__name__)

REMOTE_PREFIXES = ("http://", "https://", "pipe:", "s3://", "gs://")
OVERLONG_POLICIES = ("error", "skip")


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
    audio: AudioConfig = field(default_factory=AudioConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    video: VideoConfig = field(default_factory=VideoConfig)

    def __post_init__(self):
        for name in ("seq_len", "batch_size", "pack_pool", "max_consecutive_failures"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_workers", "decode_cache_mb"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.overlong not in OVERLONG_POLICIES:
            raise ValueError(f"overlong must be one of {', '.join(OVERLONG_POLICIES)}, got {self.overlong!r}")


# ---------------------------------------------------------------------------------------------
# Shard URLs and tar access


def expand_shards(pattern: str, *, allow_remote: bool = False) -> list[str]:
    """Brace patterns and globs -> shard URLs. Remote URLs only with allow_remote; local ones must exist."""
    import braceexpand

    urls: list[str] = []
    for part in pattern.split():
        for url in braceexpand.braceexpand(part):
            if url.startswith(REMOTE_PREFIXES):
                if not allow_remote:
                    raise ValueError(f"shard URL {url!r} is remote or runs a command; set data.allow_remote=true to read it")
                urls.append(url)
            elif any(ch in url for ch in "*?["):
                matches = sorted(glob.glob(url))
                if not matches:
                    raise FileNotFoundError(f"shard pattern {url!r} matches no file")
                urls.extend(matches)
            else:
                if not os.path.isfile(url):
                    raise FileNotFoundError(f"shard {url} does not exist")
                urls.append(url)
    if not urls:
        raise ValueError(f"shard pattern {pattern!r} names no shard")
    return urls


@dataclass
class TarEntry:
    key: str
    members: dict[str, tuple[int, int]] = field(default_factory=dict)  # suffix -> (data offset, size)
    error: str | None = None  # set when the sample cannot be read (the tar is truncated inside it)


def index_tar(path: str) -> list[TarEntry]:
    """Index a local tar's samples by reading headers only. A truncated tar yields the samples before
    the damage plus one entry carrying the error; a refused member raises ShardFormatError."""
    entries: dict[str, TarEntry] = {}
    file_size = os.path.getsize(path)
    error = None
    last_key = None
    with tarfile.open(path, "r:") as tar:
        while True:
            try:
                info = tar.next()
            except (tarfile.TarError, EOFError, OSError) as e:
                error = f"truncated or corrupt tar after key {last_key!r}: {e}"
                break
            if info is None:
                break
            if not info.isfile():
                continue
            key, suffix = split_member_name(info.name)
            if key.startswith("__"):
                continue
            check_member_suffix(suffix, f"{path}:{key}")
            entry = entries.setdefault(key, TarEntry(key))
            if info.offset_data + info.size > file_size:
                entry.error = f"tar truncated inside member {info.name} ({file_size} bytes on disk)"
            entry.members[suffix] = (info.offset_data, info.size)
            last_key = key
    result = list(entries.values())
    if error and not (result and result[-1].error):  # damage inside the last member is already recorded there
        result.append(TarEntry(f"<after {last_key}>", error=error))
    return result


def read_entry(path: str, entry: TarEntry, suffixes: tuple[str, ...] | None = None) -> dict[str, bytes]:
    with open(path, "rb") as f:
        out = {}
        for suffix, (offset, size) in entry.members.items():
            if suffixes is not None and suffix not in suffixes:
                continue
            f.seek(offset)
            out[suffix] = f.read(size)
    return out


def iter_remote(url: str) -> Iterator[tuple[str, dict[str, bytes] | None, str | None]]:
    """Sequential (key, members, error) from a streamed shard (webdataset's gopen handles http and pipe:)."""
    import webdataset as wds
    from webdataset.tariterators import tar_file_iterator

    stream = wds.gopen(url, "rb")
    key, members = None, {}
    try:
        for item in tar_file_iterator(stream):
            k, suffix = split_member_name(item["fname"])
            check_member_suffix(suffix, f"{url}:{k}")
            if k != key and key is not None:
                yield key, members, None
                members = {}
            key = k
            members[suffix] = item["data"]
    except ShardFormatError:
        raise
    except Exception as e:  # noqa: BLE001 - a broken stream ends the shard; what is lost gets logged
        yield f"<after {key}>", None, f"stream broke after key {key!r}: {e}"
        return
    finally:
        stream.close()
    if key is not None:
        yield key, members, None


# ---------------------------------------------------------------------------------------------
# Decoding one sample


def decode_sample(raw: dict[str, bytes], where: str, cfg: DataConfig, tokenizer: Tokenizer) -> TokenizedSample:
    """Raw members of one sample -> TokenizedSample, or an exception whose message says why not."""
    if "json" not in raw:
        raise ShardFormatError(f"{where}: sample has no .json member (members: {', '.join(sorted(raw))})")
    sample = parse_sample(raw["json"], where)
    media = []
    for part in media_parts(sample):
        member = part["member"]
        if member not in raw:
            raise ShardFormatError(f"{where}: message references member {member!r}, which is not in the shard")
        at = f"{where}.{member}"
        if part["type"] == "audio":
            media.append(encode_audio(raw[member], cfg.audio, where=at))
        elif part["type"] == "image":
            media.append(encode_image(raw[member], cfg.image, where=at))
        else:
            media.append(encode_video(raw[member], cfg.video, cfg.image, where=at))
    tokenized = render_chat(sample["messages"], media, tokenizer, where=where)
    shard, _, key = where.rpartition(":")
    tokenized.shard, tokenized.key, tokenized.meta = shard, key, sample.get("meta", {})
    transcript = tokenized.meta.get("transcript")
    if isinstance(transcript, str) and sum(m.modality == "audio" for m in media) == 1:
        tokenized.audio_transcript_ids = torch.tensor(tokenizer.encode(transcript), dtype=torch.long)
    return tokenized


def sample_nbytes(sample: TokenizedSample) -> int:
    tensors = [sample.input_ids, sample.labels, sample.modality_ids, sample.timestamps_s]
    tensors += [t for m in sample.media for t in (m.token_timestamps_s, *m.tensors.values())]
    if sample.audio_transcript_ids is not None:
        tensors.append(sample.audio_transcript_ids)
    return sum(t.numel() * t.element_size() for t in tensors)


class DecodeCache:
    """Decoded samples by (shard, key), least recently used out first, within `max_mb` (0: off).

    Decoding is deterministic, so a cached sample is the sample a fresh decode would give: batches,
    and exact resume, are unchanged. It saves the audio/video decode, log-mel, image resize and
    tokenization of every later epoch: on a small corpus (the demo's 1.5 h of speech is ~0.6 GB
    decoded) that work runs once, and the training processes get the cores the workers used.
    Samples that fail are not kept (they are retried, and logged once, each epoch).
    """

    def __init__(self, max_mb: int):
        self.max_bytes = max_mb * 2**20
        self.bytes = 0
        self.samples: collections.OrderedDict[tuple[str, str], tuple[TokenizedSample, int]] = collections.OrderedDict()
        self.hits = self.misses = 0

    def get(self, url: str, key: str) -> TokenizedSample | None:
        if not self.max_bytes:
            return None
        found = self.samples.get((url, key))
        if found is None:
            self.misses += 1
            return None
        self.hits += 1
        self.samples.move_to_end((url, key))
        return found[0]

    def put(self, url: str, key: str, sample: TokenizedSample) -> None:
        """Keep a sample that `get` just missed (the oldest go to make room); one over the whole budget is not kept."""
        if not self.max_bytes:
            return
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


# ---------------------------------------------------------------------------------------------
# One source as seen by one stream


def sample_task(members: dict[str, bytes]) -> str | None:
    """meta.task of a sample's JSON member (None when it sets none); raises when the JSON is unreadable."""
    meta = json.loads(members["json"]).get("meta") or {}
    return meta.get("task") if isinstance(meta, dict) else None


class SourceStream:
    """The samples of one source that belong to stream g of G, epoch by epoch, addressable by position.

    With `tasks`, the source holds only the samples whose meta.task is listed (read from each sample's
    JSON once, when its shard is indexed); samples whose JSON cannot be read stay in, to be logged."""

    def __init__(self, urls: list[str], source: int, *, seed: int, shuffle: bool, stream: int, num_streams: int,
                 tasks: list[str] | None = None):
        self.urls, self.source, self.seed, self.shuffle = urls, source, seed, shuffle
        self.tasks = set(tasks) if tasks is not None else None
        self.stream, self.num_streams = stream, num_streams
        self.epoch, self.position = 0, 0
        self._iter: Iterator | None = None
        self._index: dict[str, list[TarEntry]] = {}

    def _entries(self, url: str) -> list[TarEntry]:
        if url not in self._index:
            entries = index_tar(url)
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
                samples = ((key, (lambda m=members, e=error: (m, e))) for key, members, error in iter_remote(url)
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

    def seek(self, epoch: int, position: int) -> None:
        self.epoch, self.position = epoch, position
        self._iter = self._plan(epoch)
        for _ in range(position):
            next(self._iter)

    def next(self, infinite: bool) -> tuple[tuple[int, int, int], str, str, Any] | None:
        """The next (address, url, key, fetch), rolling into the next epoch when infinite; None at the end."""
        if self._iter is None:
            self.seek(self.epoch, self.position)
        for _attempt in range(2):
            try:
                url, key, fetch = next(self._iter)
            except StopIteration:
                if not infinite:
                    return None
                if self.position == 0:
                    raise ValueError(f"shards {self.urls[0]}...: stream {self.stream} of {self.num_streams} gets no sample; "
                                     "use fewer ranks x workers or more samples") from None
                self.epoch, self.position = self.epoch + 1, 0
                self._iter = self._plan(self.epoch)
                continue
            address = (self.source, self.epoch, self.position)
            self.position += 1
            return address, url, key, fetch
        return None

    def fetch_at(self, epochs_positions: list[tuple[int, int]]) -> dict[tuple[int, int], tuple[str, str, Any]]:
        """Look up several (epoch, position) addresses with one walk per epoch (used to rebuild a pool)."""
        found = {}
        for epoch in sorted({e for e, _ in epochs_positions}):
            wanted = {p for e, p in epochs_positions if e == epoch}
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
                 seed: int, skip_log: SkipLog, infinite: bool):
        self.cfg, self.tokenizer, self.skip_log, self.infinite = cfg, tokenizer, skip_log, infinite
        self.urls = [expand_shards(s.shards, allow_remote=cfg.allow_remote) for s in sources]
        self.tasks = [s.tasks for s in sources]
        self.weights = np.array([s.weight for s in sources], dtype=np.float64)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.num_workers = max(cfg.num_workers, 1)
        self.rotation = 0
        self.restore: dict[int, dict] = {}
        self.cache = DecodeCache(cfg.decode_cache_mb)  # each worker fills its own copy

    def __iter__(self):
        info = get_worker_info()
        physical = info.id if info is not None else 0
        logical = (physical + self.rotation) % self.num_workers
        stream = self.rank * self.num_workers + logical
        num_streams = self.world_size * self.num_workers
        yield from self._run(logical, stream, num_streams, self.restore.get(logical))

    def _choose(self, stream: int, k: int, active: list[int]) -> int:
        if len(active) == 1:
            return active[0]
        weights = self.weights[active] / self.weights[active].sum()
        u = np.random.default_rng([self.seed, 7919, stream, k]).random()
        return active[int(np.searchsorted(np.cumsum(weights), u, side="right").clip(max=len(active) - 1))]

    def _decode(self, url: str, key: str, fetch) -> TokenizedSample | None:
        if (cached := self.cache.get(url, key)) is not None:
            return cached
        members, error = fetch()
        if error is None:
            try:
                sample = decode_sample(members, f"{url}:{key}", self.cfg, self.tokenizer)
            except ShardFormatError as e:
                error = str(e)
            except Exception as e:  # noqa: BLE001 - any decode failure skips the sample, with its reason
                error = f"{type(e).__name__}: {e}"
            else:
                if len(sample) <= self.cfg.seq_len:
                    self.cache.put(url, key, sample)
                    return sample
                error = (f"{url}:{key}: sample has {len(sample)} tokens > data.seq_len={self.cfg.seq_len}; "
                         "raise data.seq_len or set data.overlong=skip")
                if self.cfg.overlong == "error":
                    raise ValueError(error)
        self.skip_log(url, key, error.removeprefix(f"{url}:{key}: "))
        return None

    def _run(self, worker: int, stream: int, num_streams: int, state: dict | None) -> Iterator[dict]:
        sources = [SourceStream(urls, i, seed=self.seed, shuffle=self.cfg.shuffle, stream=stream, num_streams=num_streams,
                                tasks=tasks) for i, (urls, tasks) in enumerate(zip(self.urls, self.tasks))]
        packer = Packer(self.cfg.seq_len, self.cfg.pack_pool)
        k, failures = 0, 0
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
                    sample = self._decode(url, key, fetch)
                    assert sample is not None, f"pooled sample {url}:{key} no longer decodes"
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
                    sample = self._decode(url, key, fetch)
                    if sample is None:
                        failures += 1
                        if failures >= self.cfg.max_consecutive_failures:
                            raise RuntimeError(f"{failures} samples in a row could not be used (last: {url}:{key}); "
                                               "see skipped.jsonl")
                        continue
                    failures = 0
                    packer.add(sample, address)
                sequence = packer.pop_sequence()
                if sequence:
                    sequences.append(sequence)
            if not sequences:
                return
            batch = collate_packed(sequences, self.cfg.seq_len, self.tokenizer.pad_id, self.cfg.audio)
            batch["_data_state"] = {"worker": worker, "state": {
                "k": k, "exhausted": sorted(exhausted),
                "sources": [[s.epoch, s.position] for s in sources],
                "pool": [list(a) for a in packer.addresses()]}}
            yield batch


# ---------------------------------------------------------------------------------------------
# The main-process view


class DataPipeline:
    """Iterate packed batches for one rank; `state_dict()` after any batch resumes exactly there.

    `epochs=None` streams forever (training); `epochs=1` reads each sample once (eval, inspection).
    """

    def __init__(self, cfg: DataConfig, sources: list[SourceConfig] | None = None, *, tokenizer: Tokenizer | None = None,
                 rank: int = 0, world_size: int = 1, seed: int = 0, skip_log: str | Path | None = None,
                 epochs: int | None = None):
        assert epochs in (None, 1), "a finite pipeline reads one epoch"
        sources = cfg.train if sources is None else sources
        if not sources:
            raise ValueError("data.train names no shards")
        self.cfg = cfg
        self.tokenizer = tokenizer if tokenizer is not None else Tokenizer.from_path(cfg.tokenizer)
        self.dataset = PackedStream(cfg, sources, self.tokenizer, rank=rank, world_size=world_size, seed=seed,
                                    skip_log=SkipLog(skip_log), infinite=epochs is None)
        self.num_batches = 0
        self.worker_states: dict[int, dict] = {}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.dataset.rotation = self.num_batches % self.dataset.num_workers
        self.dataset.restore = dict(self.worker_states)
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.cfg.num_workers,
                            prefetch_factor=2 if self.cfg.num_workers else None,
                            persistent_workers=False, multiprocessing_context="fork" if self.cfg.num_workers else None)
        for batch in loader:
            data_state = batch.pop("_data_state")
            self.worker_states[data_state["worker"]] = data_state["state"]
            self.num_batches += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"num_batches": self.num_batches, "num_workers": self.dataset.num_workers,
                "rank": self.dataset.rank, "world_size": self.dataset.world_size, "seed": self.dataset.seed,
                "worker_states": {str(w): s for w, s in self.worker_states.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("num_workers", "rank", "world_size", "seed"):
            if state[name] != getattr(self.dataset, name):
                raise ValueError(f"data state was saved with {name}={state[name]}, this run has "
                                 f"{getattr(self.dataset, name)}; resume with the same setting")
        self.num_batches = state["num_batches"]
        self.worker_states = {int(w): s for w, s in state["worker_states"].items()}
