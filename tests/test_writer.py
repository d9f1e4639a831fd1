"""`omni-train shards build`: manifests in, WebDataset shards out, read back with tarfile.

Media are real files made by `omni_train.data.synth` (tones, espeak speech, PIL images, an ffmpeg
test pattern video); every run goes through `omni_train.cli.main` as a user would call it.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from omni_train.cli import main
from omni_train.data import synth
from omni_train.data.format import EXTENSIONS, media_parts, parse_sample, split_member_name
from omni_train.data.writer import PreparedSample, ShardSink, build_shards, prepare_entry

TONE_DURATIONS_S = {"tone.wav": 0.5, "tone.mp3": 1.0, "tone.ogg": 1.5}
MP3_PADDING_S = 0.1  # an mp3 header's duration counts the encoder's padding frames (0.08 s for this tone)
VIDEO_DURATION_S, VIDEO_FPS = 2.0, 25


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict:
    """A media root with one file per kind, and the durations the tests expect from them."""
    from torchcodec.decoders import AudioDecoder

    root = tmp_path_factory.mktemp("media")
    for name, duration_s in TONE_DURATIONS_S.items():
        synth.tone(root / name, duration_s, sample_rate_hz=16000)
    (root / "speech").mkdir()
    synth.speech(root / "speech" / "hello.flac", "hello world, three plus five")
    synth.pattern_image(root / "pattern.png", 64, 48)
    synth.pattern_image(root / "pattern.jpg", 40, 30, seed=3)
    synth.test_pattern_video(root / "clip.mp4", VIDEO_DURATION_S, fps=VIDEO_FPS, width=160, height=120)
    # The speech length is whatever espeak made: measure it by a full decode, independent of the header read.
    decoded = AudioDecoder(str(root / "speech" / "hello.flac")).get_all_samples()
    durations = dict(TONE_DURATIONS_S, **{"speech/hello.flac": decoded.data.shape[-1] / decoded.sample_rate})
    return {"root": root, "durations_s": durations}


def write_jsonl(path: Path, entries: list) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return path


def run_build(manifest: Path, media_root: Path, out: Path, *extra: str) -> int:
    return main(["shards", "build", "--manifest", str(manifest), "--media-root", str(media_root), "--out", str(out), *extra])


def read_shard(path: Path) -> tuple[list[str], dict[str, bytes]]:
    with tarfile.open(path) as tar:
        names = tar.getnames()
        return names, {name: tar.extractfile(name).read() for name in names}


def samples_of(shards: list[Path]) -> dict[str, tuple[dict, dict[str, bytes]]]:
    """key -> (parsed sample JSON, {member suffix: bytes})."""
    grouped: dict[str, dict[str, bytes]] = {}
    for shard in shards:
        for name, data in read_shard(shard)[1].items():
            key, suffix = split_member_name(name)
            grouped.setdefault(key, {})[suffix] = data
    return {key: (parse_sample(members.pop("json"), key), members) for key, members in grouped.items()}


def shards_in(out: Path) -> list[Path]:
    return sorted(out.glob("*.tar")) if out.exists() else []


def mixed_entries(root: Path) -> list[dict]:
    return [
        {"id": "asr-1", "messages": [{"role": "user", "content": "<audio>Transcribe the audio."},
                                     {"role": "assistant", "content": "hello world, three plus five"}],
         "audios": ["speech/hello.flac"], "meta": {"task": "asr", "language": "en", "source": "espeak"}},
        {"messages": [{"role": "user", "content": "First <audio> then <audio>: which is longer?"},
                      {"role": "assistant", "content": "the second"}],
         "audios": ["tone.wav", "tone.mp3"], "meta": {"task": "compare"}},
        {"messages": [{"role": "system", "content": "You describe images."},
                      {"role": "user", "content": "<image><image>Describe both."},
                      {"role": "assistant", "content": "bands and a diagonal"}],
         "images": ["pattern.png", str(root / "pattern.jpg")]},  # an absolute path works too
        {"messages": [{"role": "user", "content": "<video><audio>\nWhat is shown and heard?"},
                      {"role": "assistant", "content": "a test pattern and a tone"}],
         "videos": ["clip.mp4"], "audios": ["tone.ogg"], "meta": {"language": "de"}},
        {"messages": [{"role": "user", "content": "print three plus five"},
                      {"role": "assistant", "content": "print(3 + 5)"}]},
    ]


def test_jsonl_manifest_round_trip(media, tmp_path, capsys):
    root = media["root"]
    manifest = write_jsonl(tmp_path / "train.jsonl", mixed_entries(root))
    out = tmp_path / "shards"
    assert run_build(manifest, root, out, "--task", "chat", "--language", "en") == 0
    assert shards_in(out) == [out / "train-000000.tar"]
    assert not list(out.glob("*.tmp"))

    names, _ = read_shard(out / "train-000000.tar")
    assert names == [
        "000000.json", "000000.audio_0.flac",
        "000001.json", "000001.audio_0.wav", "000001.audio_1.mp3",
        "000002.json", "000002.image_0.png", "000002.image_1.jpg",
        "000003.json", "000003.audio_0.ogg", "000003.video_0.mp4",
        "000004.json",
    ]
    samples = samples_of([out / "train-000000.tar"])

    sample, members = samples["000000"]
    assert sample["messages"] == [
        {"role": "user", "content": [{"type": "audio", "member": "audio_0.flac"}, {"type": "text", "text": "Transcribe the audio."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "hello world, three plus five"}]},
    ]
    # Entry meta wins over --task/--language; the id is kept for tracing a sample back to its entry.
    assert sample["meta"]["task"] == "asr" and sample["meta"]["language"] == "en"
    assert sample["meta"]["source"] == "espeak" and sample["meta"]["id"] == "asr-1"
    assert sample["meta"]["duration_s"] == pytest.approx(media["durations_s"]["speech/hello.flac"], abs=0.01)
    assert members["audio_0.flac"] == (root / "speech/hello.flac").read_bytes()

    sample, members = samples["000001"]
    assert sample["messages"][0]["content"] == [
        {"type": "text", "text": "First "}, {"type": "audio", "member": "audio_0.wav"},
        {"type": "text", "text": " then "}, {"type": "audio", "member": "audio_1.mp3"},
        {"type": "text", "text": ": which is longer?"}]
    assert sample["meta"]["task"] == "compare" and sample["meta"]["language"] == "en"  # language from the flag
    assert 0.5 + 1.0 <= sample["meta"]["duration_s"] <= 0.5 + 1.0 + MP3_PADDING_S
    assert members["audio_0.wav"] == (root / "tone.wav").read_bytes()
    assert members["audio_1.mp3"] == (root / "tone.mp3").read_bytes()

    sample, members = samples["000002"]
    assert [m["role"] for m in sample["messages"]] == ["system", "user", "assistant"]
    assert [p["member"] for p in media_parts(sample)] == ["image_0.png", "image_1.jpg"]
    assert sample["meta"] == {"task": "chat", "language": "en"}  # no media durations for images
    assert members == {"image_0.png": (root / "pattern.png").read_bytes(), "image_1.jpg": (root / "pattern.jpg").read_bytes()}

    sample, members = samples["000003"]
    assert sample["messages"][0]["content"] == [
        {"type": "video", "member": "video_0.mp4"}, {"type": "audio", "member": "audio_0.ogg"},
        {"type": "text", "text": "\nWhat is shown and heard?"}]
    assert sample["meta"]["language"] == "de"
    assert sample["meta"]["num_frames"] == VIDEO_DURATION_S * VIDEO_FPS
    assert sample["meta"]["video_duration_s"] == pytest.approx(VIDEO_DURATION_S, abs=0.05)
    assert sample["meta"]["duration_s"] == pytest.approx(1.5, abs=0.05)
    assert members["video_0.mp4"] == (root / "clip.mp4").read_bytes()

    sample, members = samples["000004"]
    assert members == {} and sample["messages"][1]["content"] == [{"type": "text", "text": "print(3 + 5)"}]

    printed = capsys.readouterr().out
    assert "samples: 5 in 1 shard(s)" in printed
    assert "videos: 1 (50 frames)" in printed
    assert "tasks: asr=1, chat=3, compare=1" in printed
    assert "languages: de=1, en=4" in printed


def test_build_summary_numbers(media, tmp_path):
    root = media["root"]
    manifest = write_jsonl(tmp_path / "train.jsonl", mixed_entries(root))
    summary = build_shards(manifest, root, tmp_path / "out", prefix="eval", max_samples=2)
    expected_audio_s = sum(media["durations_s"][name] for name in ("speech/hello.flac", "tone.wav", "tone.mp3", "tone.ogg"))
    assert summary.num_samples == 5 and summary.num_shards == 3
    assert summary.shards == [str(tmp_path / "out" / f"eval-00000{i}.tar") for i in range(3)]
    assert expected_audio_s - 0.01 <= summary.audio_hours * 3600 <= expected_audio_s + MP3_PADDING_S
    assert (summary.num_images, summary.num_videos, summary.num_video_frames) == (2, 1, 50)
    assert summary.num_bytes == sum(Path(p).stat().st_size for p in summary.shards)
    assert summary.samples_per_task == {"asr": 1, "compare": 1, "(unset)": 3}
    assert summary.samples_per_language == {"en": 1, "de": 1, "(unset)": 3}


def test_json_list_and_llama_factory_conversations(media, tmp_path):
    root = media["root"]
    entries = [
        {"messages": [{"role": "user", "content": "<image>What is this?"}, {"role": "assistant", "content": "a pattern"}],
         "images": ["pattern.png"]},
        # LLaMA-Factory sharegpt: conversations with from/value, the system prompt beside them, a single path as a string
        {"conversations": [{"from": "human", "value": "<audio>Transcribe."}, {"from": "gpt", "value": "hello"}],
         "system": "You transcribe speech.", "audios": "speech/hello.flac"},
    ]
    manifest = tmp_path / "train.json"
    manifest.write_text(json.dumps(entries, indent=2))
    out = tmp_path / "shards"
    assert run_build(manifest, root, out, "--task", "mixed") == 0
    samples = samples_of(shards_in(out))
    assert sorted(samples) == ["000000", "000001"]
    assert samples["000000"][0]["messages"][0]["content"] == [{"type": "image", "member": "image_0.png"}, {"type": "text", "text": "What is this?"}]
    sample, members = samples["000001"]
    assert sample["messages"] == [
        {"role": "system", "content": [{"type": "text", "text": "You transcribe speech."}]},
        {"role": "user", "content": [{"type": "audio", "member": "audio_0.flac"}, {"type": "text", "text": "Transcribe."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "hello"}]},
    ]
    assert sample["meta"]["task"] == "mixed" and "language" not in sample["meta"]
    assert members["audio_0.flac"] == (root / "speech/hello.flac").read_bytes()


def audio_entries(count: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"<audio>clip {i}"}, {"role": "assistant", "content": str(i)}],
             "audios": ["tone.wav"]} for i in range(count)]


def test_rollover_by_max_samples(media, tmp_path):
    manifest = write_jsonl(tmp_path / "m.jsonl", audio_entries(5))
    out = tmp_path / "shards"
    assert run_build(manifest, media["root"], out, "--max-samples", "2") == 0
    shards = shards_in(out)
    assert [p.name for p in shards] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    keys = [[split_member_name(n)[0] for n in read_shard(p)[0] if n.endswith(".json")] for p in shards]
    assert keys == [["000000", "000001"], ["000002", "000003"], ["000004"]]
    assert [s[0]["messages"][0]["content"][1]["text"] for s in samples_of(shards).values()] == [f"clip {i}" for i in range(5)]


def tar_file_size(member_sizes: list[int]) -> int:
    """A tar's size on disk: a 512-byte header per member, data padded to 512, two end blocks, padded to 10 kB records."""
    end = sum(512 + -(-size // 512) * 512 for size in member_sizes) + 1024
    return -(-end // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def test_rollover_by_max_bytes(media, tmp_path):
    wav_bytes = (media["root"] / "tone.wav").stat().st_size  # 0.5 s of 16 kHz 16-bit: about 16 kB
    manifest = write_jsonl(tmp_path / "m.jsonl", audio_entries(7))
    out = tmp_path / "shards"
    json_bytes = 400  # each sample JSON here is under 512 bytes, so it fills one tar block
    max_bytes = tar_file_size([json_bytes, wav_bytes] * 3)  # exactly three samples fit
    assert tar_file_size([json_bytes, wav_bytes] * 4) > max_bytes
    assert run_build(manifest, media["root"], out, "--max-bytes", str(max_bytes)) == 0
    shards = shards_in(out)
    assert all(p.stat().st_size <= max_bytes for p in shards)
    counts = [sum(n.endswith(".json") for n in read_shard(p)[0]) for p in shards]
    assert counts == [3, 3, 1]
    assert all(len(data) < 512 for p in shards for n, data in read_shard(p)[1].items() if n.endswith(".json"))
    assert sorted(samples_of(shards)) == [f"{i:06d}" for i in range(7)]

    # A sample larger than the limit still gets written, alone in its shard.
    out = tmp_path / "tiny"
    assert run_build(manifest, media["root"], out, "--max-bytes", "1000") == 0
    assert len(shards_in(out)) == 7


def test_refuses_to_overwrite_unless_asked(media, tmp_path, capsys):
    manifest = write_jsonl(tmp_path / "m.jsonl", audio_entries(3))
    out = tmp_path / "shards"
    assert run_build(manifest, media["root"], out, "--max-samples", "1") == 0
    first = [p.read_bytes() for p in shards_in(out)]
    assert len(first) == 3
    capsys.readouterr()

    assert run_build(manifest, media["root"], out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train-000000.tar already exists" in err and "--overwrite" in err
    assert [p.read_bytes() for p in shards_in(out)] == first
    # Another prefix in the same folder is fine.
    assert run_build(manifest, media["root"], out, "--prefix", "eval") == 0
    assert (out / "eval-000000.tar").exists()

    # Rebuilding is deterministic, and a shorter rebuild removes the stale shards of its prefix.
    assert run_build(manifest, media["root"], out, "--max-samples", "1", "--overwrite") == 0
    assert [p.read_bytes() for p in sorted(out.glob("train-*.tar"))] == first
    assert run_build(manifest, media["root"], out, "--overwrite") == 0
    assert [p.name for p in shards_in(out)] == ["eval-000000.tar", "train-000000.tar"]


GOOD_ENTRY = {"messages": [{"role": "user", "content": "<audio>hi"}, {"role": "assistant", "content": "hello"}],
              "audios": ["tone.wav"]}


def bad(**changes) -> dict:
    return dict(GOOD_ENTRY, id="bad-1", **changes)


@pytest.mark.parametrize("entry, expected", [
    (bad(audios=["missing/nope.flac"]), ["audios[0] 'missing/nope.flac' does not exist", "missing/nope.flac"]),
    (bad(messages=[{"role": "user", "content": "<audio><audio>"}, {"role": "assistant", "content": "x"}]),
     ["2 <audio> placeholder(s)", "1 path(s) in 'audios'"]),
    (bad(images=["pattern.png"]), ["0 <image> placeholder(s)", "1 path(s) in 'images'"]),
    (bad(messages=[{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "x"}], audios=[],
         images=["weights.pth"]), ["images[0] 'weights.pth'", "'.pth'", ", ".join(EXTENSIONS["image"])]),
    (bad(audios=["pattern.png"]), ["audios[0] 'pattern.png'", "'.png'", ", ".join(EXTENSIONS["audio"])]),
    (bad(messages=[{"role": "tool", "content": "<audio>"}]), ["messages[0].role 'tool'", "system, user, assistant"]),
    (bad(messages=None, conversations=[{"from": "observation", "value": "<audio>"}]), ["conversations[0].from 'observation'"]),
    (bad(audios=["garbage.flac"]), ["cannot read the audio header", "garbage.flac"]),
    (bad(messages=[{"role": "user", "content": "<video>"}], audios=[], videos=["garbage.mp4"]),
     ["cannot read the video header", "garbage.mp4"]),
], ids=["missing-file", "too-few-audios", "images-without-placeholder", "pth-image", "image-as-audio", "bad-role",
        "bad-from", "unreadable-audio", "unreadable-video"])
def test_bad_entry_stops_the_build(media, tmp_path, capsys, entry, expected):
    root = tmp_path / "media"
    root.mkdir()
    for name in ("tone.wav", "pattern.png"):
        (root / name).write_bytes((media["root"] / name).read_bytes())
    (root / "weights.pth").write_bytes(b"\x80\x04not really a pickle")
    (root / "garbage.flac").write_bytes(b"not audio at all")
    (root / "garbage.mp4").write_bytes(b"not video at all")
    if entry.get("messages") is None:
        entry = {k: v for k, v in entry.items() if k != "messages"}
    manifest = write_jsonl(tmp_path / "m.jsonl", [GOOD_ENTRY, entry, GOOD_ENTRY])
    out = tmp_path / "shards"
    assert run_build(manifest, root, out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("omni-train: error: ")
    assert f"{manifest}: entry 1 (line 2) (id 'bad-1')" in err
    for text in expected:
        assert text in err
    assert shards_in(out) == [] and not (out.exists() and any(out.iterdir()))


def test_invalid_json_names_the_line(media, tmp_path, capsys):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps(GOOD_ENTRY) + "\n\n" + '{"messages": [}\n')
    assert run_build(manifest, media["root"], tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{manifest}: invalid JSON on line 3" in err
    assert not (tmp_path / "out").exists()

    listed = tmp_path / "m.json"
    listed.write_text('[\n' + json.dumps(GOOD_ENTRY) + ',\n{"messages": oops}\n]')
    assert run_build(listed, media["root"], tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"{listed}: invalid JSON on line 3" in err
    assert not (tmp_path / "out").exists()


def test_bad_arguments(media, tmp_path, capsys):
    manifest = write_jsonl(tmp_path / "m.jsonl", [GOOD_ENTRY])
    for extra, expected in [(["--max-samples", "0"], "--max-samples must be at least 1"),
                            (["--max-bytes", "-1"], "--max-bytes must be a positive"),
                            (["--prefix", "a/b"], "--prefix must be a plain file name prefix")]:
        assert run_build(manifest, media["root"], tmp_path / "out", *extra) == 2
        assert expected in capsys.readouterr().err
    assert run_build(tmp_path / "absent.jsonl", media["root"], tmp_path / "out") == 2
    assert "absent.jsonl does not exist" in capsys.readouterr().err
    assert main(["shards", "build", "--out", str(tmp_path / "out")]) == 2
    assert "--manifest is required" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_interrupted_shard_never_gets_its_final_name(media, tmp_path):
    """A failure while a shard is open (here: a media file removed after validation) drops that shard only."""
    root, out = media["root"], tmp_path / "shards"
    out.mkdir()
    good = prepare_entry(GOOD_ENTRY, "entry 0", root)
    sink = ShardSink(out, "train", max_samples=2, max_bytes=10**9)
    for key in ("000000", "000001", "000002"):  # the third closes the first shard and opens the second
        sink.write(key, good)
    assert sorted(p.name for p in out.iterdir()) == ["train-000000.tar", "train-000001.tar.tmp"]
    vanished = PreparedSample(messages=good.messages, meta={}, media=[("audio_0.wav", root / "vanished.wav", 100)])
    with pytest.raises(FileNotFoundError):
        sink.write("000003", vanished)
    sink.abort()
    assert sorted(p.name for p in out.iterdir()) == ["train-000000.tar"]
    assert sink.shards == [out / "train-000000.tar"]
    assert sorted(samples_of(sink.shards)) == ["000000", "000001"]


# ------------------------------------------------------------------------ media root, audio of a video, nesting


def test_media_paths_must_stay_under_the_media_root(media, tmp_path, capsys):
    """`..`, an absolute path and a symbolic link leading out of --media-root are refused (one line, nothing
    written) unless --allow-outside-media-root; then the outside file is what the shard holds."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "tone.wav").write_bytes((media["root"] / "tone.wav").read_bytes())
    secret = tmp_path / "outside.wav"
    secret.write_bytes((media["root"] / "tone.wav").read_bytes())
    (root / "link.wav").symlink_to(secret)
    (root / "sub").mkdir()
    out = tmp_path / "shards"
    for path in ("../outside.wav", str(secret), "link.wav", "sub/../../outside.wav"):
        manifest = write_jsonl(tmp_path / "m.jsonl", [GOOD_ENTRY, dict(GOOD_ENTRY, audios=[path])])
        assert run_build(manifest, root, out) == 2, path
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "entry 1 (line 2): audios[0]" in err, err
        assert "is outside --media-root" in err and str(secret) in err and "--allow-outside-media-root" in err, err
        assert not out.exists()
    assert run_build(manifest, root, out, "--allow-outside-media-root") == 0
    assert samples_of(shards_in(out))["000001"][1]["audio_0.wav"] == secret.read_bytes()
    # inside the root, absolute paths and links that stay inside are fine
    (root / "inner.wav").symlink_to(root / "tone.wav")
    manifest = write_jsonl(tmp_path / "m.jsonl", [dict(GOOD_ENTRY, audios=[str(root / "tone.wav")]),
                                                  dict(GOOD_ENTRY, audios=["inner.wav"])])
    assert run_build(manifest, root, tmp_path / "inside") == 0


def test_audio_track_of_a_video_becomes_a_flac_member(tmp_path, capsys):
    """`"audios": ["call.mp4"]`: the shard holds the video's audio track as FLAC (no video bytes), decoded by
    the training path to the same samples as the mp4's own track; rebuilds are byte-identical; a video
    without sound is one line."""
    import torch
    from torchcodec.decoders import AudioDecoder

    from omni_train.data.audio import AudioConfig, encode_audio

    root = tmp_path / "media"
    root.mkdir()
    synth.test_pattern_video(root / "call.mp4", 2.0, fps=10, width=160, height=120, with_audio=True)
    synth.test_pattern_video(root / "call.webm", 1.0, fps=10, width=64, height=48, with_audio=True)
    synth.test_pattern_video(root / "silent.mp4", 1.0, fps=10, width=64, height=48)
    entry = {"messages": [{"role": "user", "content": "<audio>Transcribe."}, {"role": "assistant", "content": "a tone"}],
             "audios": ["call.mp4"]}
    manifest = write_jsonl(tmp_path / "m.jsonl", [entry, dict(entry, audios=["call.webm"])])
    assert run_build(manifest, root, tmp_path / "a") == 0
    assert "audio: 0.0008 h" in capsys.readouterr().out  # 2 s + 1 s
    samples = samples_of(shards_in(tmp_path / "a"))
    sample, members = samples["000000"]
    assert list(members) == ["audio_0.flac"] and media_parts(sample) == [{"type": "audio", "member": "audio_0.flac"}]
    assert abs(sample["meta"]["duration_s"] - 2.0) < 0.05, sample["meta"]
    assert members["audio_0.flac"][:4] == b"fLaC"  # a FLAC stream: the video's pictures are not in the shard
    assert list(samples["000001"][1]) == ["audio_0.flac"]

    cfg = AudioConfig()
    ours = AudioDecoder(members["audio_0.flac"], sample_rate=cfg.sample_rate_hz).get_all_samples().data.mean(0)
    theirs = AudioDecoder(str(root / "call.mp4"), sample_rate=cfg.sample_rate_hz).get_all_samples().data.mean(0)
    n = min(ours.numel(), theirs.numel())
    assert abs(ours.numel() - theirs.numel()) <= cfg.sample_rate_hz // 100
    assert torch.allclose(ours[:n], theirs[:n], atol=2e-4), (ours[:n] - theirs[:n]).abs().max()  # 16-bit FLAC
    encoded = encode_audio(members["audio_0.flac"], cfg, where="000000.audio_0.flac")
    assert encoded.num_tokens > 0 and abs(encoded.duration_s - 2.0) < 0.05

    assert run_build(manifest, root, tmp_path / "b") == 0  # deterministic: byte-identical shards
    assert [p.read_bytes() for p in shards_in(tmp_path / "a")] == [p.read_bytes() for p in shards_in(tmp_path / "b")]

    manifest = write_jsonl(tmp_path / "m.jsonl", [entry, dict(entry, audios=["silent.mp4"])])
    assert run_build(manifest, root, tmp_path / "c") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "entry 1 (line 2): audios[0]" in lines[0] and "silent.mp4 has no audio stream" in lines[0]
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("layout", ["jsonl", "json"])
def test_deeply_nested_manifest_is_one_line(media, tmp_path, capsys, layout):
    deep = '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}"
    manifest = tmp_path / f"m.{layout}"
    manifest.write_text(json.dumps(GOOD_ENTRY) + "\n" + deep + "\n" if layout == "jsonl" else f"[{deep}]")
    assert run_build(manifest, media["root"], tmp_path / "out") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "JSON nested more than 200 levels deep" in lines[0], lines
    assert (f"{manifest}: line 2" if layout == "jsonl" else f"{manifest}:") in lines[0]
    assert not (tmp_path / "out").exists()


def test_summary_warns_about_media_the_loader_would_skip(media, tmp_path):
    """A media file over the loader's default data.max_member_mb is built, with a warning line in the summary."""
    import wave

    from omni_train.data.pipeline import DataConfig

    big = tmp_path / "root" / "long.wav"
    big.parent.mkdir()
    frames = (DataConfig().max_member_mb * 2**20) // 2 + 16000  # 16-bit mono: just over the cap
    with wave.open(str(big), "wb") as f:
        f.setnchannels(1), f.setsampwidth(2), f.setframerate(16000)
        f.writeframes(bytes(2 * frames))
    manifest = write_jsonl(tmp_path / "m.jsonl", [dict(GOOD_ENTRY, audios=["long.wav"])])
    summary = build_shards(manifest, big.parent, tmp_path / "out")
    assert "warning: the largest media file is 64.0 MB" in summary.format() and "data.max_member_mb=64" in summary.format()
    assert "warning" not in build_shards(write_jsonl(tmp_path / "s.jsonl", [GOOD_ENTRY]), media["root"],
                                         tmp_path / "small").format()
