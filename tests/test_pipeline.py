"""The data pipeline end to end: CLI-built shards -> decoded, tokenized, packed batches.

Checks decoded media against the generated sources, placeholder expansion against feature
shapes, exact resume (0 and 2 workers, 1 and 2 ranks), exactly-once epochs, corrupt-sample
skipping, refused members and remote URLs.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import tarfile
from pathlib import Path

import pytest
import torch

from omni_train.data import synth
from omni_train.data.audio import num_audio_tokens
from omni_train.data.format import ShardFormatError
from omni_train.data.pipeline import DataConfig, DataPipeline, SourceConfig, expand_shards, index_tar
from omni_train.data.sample import MODALITY_IDS
from omni_train.data.text import Tokenizer

from distributed import complete_epochs


def make_cfg(pattern: str, **overrides) -> DataConfig:
    fields = {"seq_len": 1024, "batch_size": 2, "num_workers": 0, "pack_pool": 8, "train": [SourceConfig(shards=pattern)]}
    fields.update(overrides)
    return DataConfig(**fields)


def read_all(pipeline, max_batches=None):
    batches = []
    for batch in pipeline:
        batches.append(batch)
        if max_batches is not None and len(batches) == max_batches:
            break
    return batches


def test_decoded_samples_match_sources(corpus):
    cfg = make_cfg(corpus["pattern"], seq_len=2048, shuffle=False)
    batches = read_all(DataPipeline(cfg, epochs=1))
    seen = {}
    for batch in batches:
        counts = {m: int((batch["modality_ids"] == MODALITY_IDS[m]).sum()) for m in ("audio", "image", "video")}
        # every placeholder position is backed by exactly one encoder position
        if "audio_mel" in batch:
            frames = batch["audio_window_frames"].split(batch["audio_windows_per_item"].tolist())
            implied = sum(sum(num_audio_tokens(int(f), cfg.audio) for f in item) for item in frames)
            assert implied == counts["audio"] == int(batch["audio_num_tokens"].sum())
        for m in ("image", "video"):
            if f"{m}_grid_thw" in batch:
                grid = batch[f"{m}_grid_thw"]
                assert int(grid.prod(dim=1).sum()) == batch[f"{m}_patches"].shape[0]
                assert int(grid.prod(dim=1).sum()) // cfg.image.merge_size ** 2 == counts[m]
            else:
                assert counts[m] == 0
        for s in batch["samples"]:
            seen[s["key"]] = s
    assert len(seen) == len(corpus["entries"])  # nothing lost

    # per-sample checks against the sources, one sample per batch for clarity
    cfg1 = make_cfg(corpus["pattern"], seq_len=2048, batch_size=1, pack_pool=1, shuffle=False)
    for batch, entry in zip(DataPipeline(cfg1, epochs=1), corpus["entries"]):
        meta = entry["meta"]
        if meta["task"] == "tone":
            num_frames = int(batch["audio_window_frames"].sum())
            assert abs(num_frames / 100 - meta["expect_duration_s"]) < 0.06  # mp3/opus priming stays under 60 ms
        if meta["task"] == "caption":
            w, h = meta["expect_size"]
            _, gh, gw = batch["image_grid_thw"][0].tolist()
            assert abs((gw / gh) / (w / h) - 1) < 0.35 or min(gh, gw) <= 2  # aspect kept within patch rounding
            assert (gh * 14) * (gw * 14) <= cfg.image.max_pixels and gh % 2 == 0 and gw % 2 == 0
        if meta["task"] == "video":
            stamps = batch["video_frame_timestamps_s"]
            expected = math.ceil(meta["expect_duration_s"] * cfg.video.fps - 1e-6)
            assert abs(len(stamps) - (expected + expected % 2)) <= 2
            assert float(stamps[0]) == pytest.approx(0.0, abs=0.11)
            assert float(stamps[-1]) <= meta["expect_duration_s"]
            steps = stamps[1:] - stamps[:-1]
            assert (steps >= 0).all() and float(steps[: len(steps) - 1].max()) <= 1 / cfg.video.fps + 0.11
            # every video position carries its temporal patch's timestamp
            video_pos = batch["modality_ids"][0] == MODALITY_IDS["video"]
            assert set(batch["timestamps_s"][0][video_pos].tolist()) <= set(stamps.tolist())
        labelled = batch["labels"][0] != -100
        answer = entry["messages"][-1]["content"]
        tokenizer = Tokenizer.byte_level()
        assert answer in tokenizer.decode(batch["labels"][0][labelled].tolist())


def assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        elif key == "audio_transcript_ids":  # a list of tensors, one per audio item
            assert len(a[key]) == len(b[key]) and all(torch.equal(x, y) for x, y in zip(a[key], b[key])), key
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("num_workers,world_size", [(0, 1), (2, 1), (0, 2), (2, 2)])
def test_resume_gives_identical_batches(corpus, num_workers, world_size):
    cfg = make_cfg(corpus["pattern"], num_workers=num_workers, seq_len=512)
    k, m = 3, 4
    for rank in range(world_size):
        reference = read_all(DataPipeline(cfg, rank=rank, world_size=world_size, seed=5), k + m)
        first = DataPipeline(cfg, rank=rank, world_size=world_size, seed=5)
        head = read_all(first, k)
        state = json.loads(json.dumps(first.state_dict()))  # a state survives a JSON round trip
        resumed = DataPipeline(cfg, rank=rank, world_size=world_size, seed=5)
        resumed.load_state_dict(state)
        tail = read_all(resumed, m)
        for got, want in zip(head + tail, reference):
            assert_batches_equal(got, want)
        # the stream crossed an epoch boundary for at least one config, which resume also handles
    other_seed = read_all(DataPipeline(cfg, seed=6), 2)
    assert not torch.equal(other_seed[0]["input_ids"], read_all(DataPipeline(cfg, seed=5), 1)[0]["input_ids"])


def test_decode_cache_gives_the_same_batches_across_epochs(corpus):
    cfg = make_cfg(corpus["pattern"], seq_len=512)
    per_epoch = len(read_all(DataPipeline(cfg, epochs=1)))
    reference = read_all(DataPipeline(cfg, seed=3), 3 * per_epoch)
    cached = DataPipeline(dataclasses.replace(cfg, decode_cache_mb=64), seed=3)
    got = read_all(cached, 3 * per_epoch)
    for a, b in zip(got, reference, strict=True):
        assert_batches_equal(a, b)
    cache = cached.dataset.cache
    assert cache.misses == len(corpus["entries"]) and cache.hits >= len(corpus["entries"])  # epochs 2 and 3 decode nothing
    assert 0 < cache.bytes <= 64 * 2**20


def test_decode_cache_stays_within_its_budget(corpus):
    from omni_train.data.pipeline import sample_nbytes

    pipeline = DataPipeline(make_cfg(corpus["pattern"], seq_len=2048, decode_cache_mb=1), epochs=1)
    batches = read_all(pipeline)
    cache = pipeline.dataset.cache  # num_workers=0: the pipeline's own stream filled it
    decoded = sum(len(b["samples"]) for b in batches)
    assert 0 < len(cache.samples) < decoded  # the corpus decodes to more than 1 MB: the oldest went
    assert cache.bytes == sum(sample_nbytes(sample) for sample, _ in cache.samples.values()) <= 2**20


@pytest.mark.parametrize("max_samples", [3, 12])  # 8 shards (split by shard) and 2 shards (split by sample)
def test_epoch_covers_every_sample_once(corpus, tmp_path, max_samples):
    from omni_train.cli import main

    out = tmp_path / "shards"
    assert main(["shards", "build", "--manifest", str(corpus["root"] / "manifest.jsonl"), "--media-root",
                 str(corpus["media"]), "--out", str(out), "--max-samples", str(max_samples)]) == 0
    cfg = make_cfg(str(out / "train-*.tar"), num_workers=2)
    keys = []
    for rank in range(2):
        for batch in DataPipeline(cfg, rank=rank, world_size=2, epochs=1):
            keys += [s["key"] for s in batch["samples"]]
    assert sorted(keys) == [f"{i:06d}" for i in range(len(corpus["entries"]))]


def _shards(corpus, out: Path, max_samples: int) -> str:
    from omni_train.cli import main

    assert main(["shards", "build", "--manifest", str(corpus["root"] / "manifest.jsonl"), "--media-root",
                 str(corpus["media"]), "--out", str(out), "--max-samples", str(max_samples)]) == 0
    return str(out / "train-*.tar")


# layouts (ranks, loader workers) in turn; 8 shards of 3 samples (read by shard) or 2 of 12 (read by sample)
@pytest.mark.parametrize("layouts,max_samples", [
    ([(1, 0), (2, 0)], 12), ([(2, 2), (1, 0), (2, 1)], 3),  # make test; 2 -> 1 also runs end to end (test_reliability)
    pytest.param([(2, 0), (1, 0)], 3, marks=pytest.mark.slow), pytest.param([(1, 2), (2, 0), (1, 0)], 12, marks=pytest.mark.slow)])
def test_resume_at_another_world_size_reads_each_sample_once(corpus, tmp_path, layouts, max_samples):
    """A run stopped at one layout resumes at another (issue 15): counted over the keys of every batch before and
    after each change, each sample of each finished epoch is read exactly once, and no epoch holds a key twice; a
    resume mid-carry at the same layout gives the uninterrupted batches."""
    pattern = _shards(corpus, tmp_path / "shards", max_samples)
    keys = sorted(f"{i:06d}" for i in range(len(corpus["entries"])))
    read: dict[int, list[str]] = {}
    states = None
    for stage, (world_size, num_workers) in enumerate(layouts):
        cfg = make_cfg(pattern, num_workers=num_workers, seq_len=512)
        last = stage == len(layouts) - 1
        new_states = []
        for rank in range(world_size):
            pipeline = DataPipeline(cfg, rank=rank, world_size=world_size, seed=5)
            if states is not None:
                line = pipeline.load_state_dicts(states)
                assert "read first, each once" in line
            # uneven: the streams stop at different positions (and epochs)
            batches = read_all(pipeline, (14 if last else 3) + 2 * rank)
            if last and rank == 0:  # a stop and resume at this layout, mid-carry, is exact
                again = DataPipeline(cfg, rank=rank, world_size=world_size, seed=5)
                again.load_state_dicts(states)
                head = read_all(again, 2)
                resumed = DataPipeline(cfg, rank=rank, world_size=world_size, seed=5)
                resumed.load_state_dict(json.loads(json.dumps(again.state_dict())))
                for got, want in zip(head + read_all(resumed, 4), batches[:6], strict=True):
                    assert_batches_equal(got, want)
            for batch in batches:
                for sample in batch["samples"]:
                    read.setdefault(sample["epoch"], []).append(sample["key"])
            new_states.append(json.loads(json.dumps(pipeline.state_dict())))
        states = new_states
    complete = complete_epochs(states)
    assert complete >= 2, f"the test should cover whole epochs across the changes: {complete}"
    for epoch, got in read.items():
        assert len(got) == len(set(got)), f"epoch {epoch}: a sample read twice"
        if epoch < complete:
            assert sorted(got) == keys, f"epoch {epoch}: samples lost"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _sample_json(kind: str, member: str) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": [{"type": kind, "member": member}]},
                                    {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}],
                       "meta": {"task": "t"}}).encode()


def test_corrupt_samples_are_skipped_and_logged(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    good_audio = synth.tone(media / "good.flac", 1.0).read_bytes()
    mp3 = synth.tone(media / "long.mp3", 3.0).read_bytes()
    big = synth.pattern_image(media / "big.png", 8000, 6000).read_bytes()  # 48 MP: over the 40 MP cap
    shard = tmp_path / "bad-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(4):
            _add(tar, f"good{i}.json", _sample_json("audio", "audio_0.flac"))
            _add(tar, f"good{i}.audio_0.flac", good_audio)
        _add(tar, "mp3.json", _sample_json("audio", "audio_0.mp3"))
        _add(tar, "mp3.audio_0.mp3", mp3[: len(mp3) // 3 // 7])  # truncated mp3
        _add(tar, "empty.json", _sample_json("video", "video_0.mp4"))
        _add(tar, "empty.video_0.mp4", b"")  # 0-byte mp4
        _add(tar, "badjson.json", b'{"messages": [')  # invalid JSON
        _add(tar, "big.json", _sample_json("image", "image_0.png"))
        _add(tar, "big.image_0.png", big)
    truncated = tmp_path / "bad-000001.tar"
    with tarfile.open(truncated, "w") as tar:
        _add(tar, "t0.json", _sample_json("audio", "audio_0.flac"))
        _add(tar, "t0.audio_0.flac", good_audio)
        _add(tar, "t1.json", _sample_json("audio", "audio_0.flac"))
        _add(tar, "t1.audio_0.flac", good_audio)
    with tarfile.open(truncated) as tar:
        member = tar.getmember("t1.audio_0.flac")
    truncated.write_bytes(truncated.read_bytes()[: member.offset_data + member.size // 2])  # cut inside t1's audio

    skip_log = tmp_path / "run" / "skipped.jsonl"
    cfg = make_cfg(str(tmp_path / "bad-{000000..000001}.tar"), num_workers=2, seq_len=512)
    keys = [s["key"] for batch in DataPipeline(cfg, epochs=1, skip_log=skip_log) for s in batch["samples"]]
    assert sorted(keys) == ["good0", "good1", "good2", "good3", "t0"]
    rows = [json.loads(line) for line in skip_log.read_text().splitlines()]
    reasons = {row["key"]: row["reason"] for row in rows}
    assert set(reasons) == {"mp3", "empty", "badjson", "big", "t1"}
    assert all(row["shard"].endswith((".tar")) for row in rows)
    assert "JSON" in reasons["badjson"] and "pixel" in reasons["big"].lower() and "truncated" in reasons["t1"]


def test_too_many_failures_in_a_row_stop(tmp_path):
    shard = tmp_path / "junk-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(10):
            _add(tar, f"{i:03d}.json", b"not json")
    cfg = make_cfg(str(shard), max_consecutive_failures=5)
    with pytest.raises(ValueError, match="5 samples in a row"):  # bad data is a user's error, not a bug
        read_all(DataPipeline(cfg, epochs=1))


@pytest.mark.parametrize("member", ["weights.pth", "state.pickle", "x.pkl"])
def test_refused_member_extensions(tmp_path, member):
    shard = tmp_path / "evil-000000.tar"
    with tarfile.open(shard, "w") as tar:
        _add(tar, "000.json", _sample_json("audio", "audio_0.flac"))
        _add(tar, f"000.{member}", b"\x80\x04K\x01.")
    with pytest.raises(ShardFormatError, match=r"refused extension.*" + member.rsplit(".", 1)[1]):
        index_tar(str(shard))
    with pytest.raises(ShardFormatError, match="refused"):
        read_all(DataPipeline(make_cfg(str(shard)), epochs=1))


def test_pipe_urls_need_opt_in(corpus):
    url = f"pipe:cat {corpus['shards'][0]}"
    with pytest.raises(ValueError, match="allow_remote"):
        expand_shards(url)
    cfg = make_cfg(url, allow_remote=True, shuffle=False)
    keys = [s["key"] for b in DataPipeline(cfg, epochs=1) for s in b["samples"]]
    with tarfile.open(corpus["shards"][0]) as tar:
        expected = sorted({m.name.split(".")[0] for m in tar.getmembers()})
    assert sorted(keys) == expected


def test_overlong_sample_is_an_error_unless_skipped(corpus, tmp_path):
    cfg = make_cfg(corpus["pattern"], seq_len=64)
    with pytest.raises(ValueError, match=r"tokens > data.seq_len=64"):
        read_all(DataPipeline(cfg, epochs=1))
    skip_log = tmp_path / "skipped.jsonl"
    cfg = make_cfg(corpus["pattern"], seq_len=64, overlong="skip", max_consecutive_failures=100)
    batches = read_all(DataPipeline(cfg, epochs=1, skip_log=skip_log))
    assert all(len(s) and s["num_tokens"] <= 64 for b in batches for s in b["samples"])
    assert "data.seq_len=64" in skip_log.read_text()


def test_sources_filtered_by_task_mix_one_shard_set(corpus):
    """`tasks:` takes a source's samples by meta.task, so one shard set can be mixed per task by weight."""
    sources = [SourceConfig(shards=corpus["pattern"], tasks=["asr"], weight=3.0),
               SourceConfig(shards=corpus["pattern"], tasks=["text2code", "tone"])]
    seen = [s["task"] for batch in read_all(DataPipeline(make_cfg(corpus["pattern"], train=sources), epochs=1))
            for s in batch["samples"]]
    expected = sorted(e["meta"]["task"] for e in corpus["entries"] if e["meta"]["task"] in ("asr", "text2code", "tone"))
    assert sorted(seen) == expected  # every listed sample exactly once, nothing of the other tasks
    with pytest.raises(ValueError, match="tasks must be a non-empty list"):
        SourceConfig(shards=corpus["pattern"], tasks=[])
