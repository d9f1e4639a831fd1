"""`omni-train shards build --audio-dir`: meetings made by `synth.synth_meeting`, transcripts in every format.

Each recording's samples are checked against the meeting's known turns: the text of consecutive
samples reassembles the transcript, offsets are turn starts, and every audio member equals that
range of the recording decoded directly. Broken files each give one line naming them while the
rest of the folder is still built, and the summary's hours add up.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from omni_train.cli import main
from omni_train.data import synth
from omni_train.data.folder import (REASONS, FolderConfig, build_folder, parse_json, parse_srt, parse_txt, parse_vtt,
                                    plan_segments, plan_windows, Cue)
from omni_train.data.format import parse_sample, split_member_name

BUILD_FLAGS = ("--eval-fraction", "0.3", "--action-items-max-s", "120")  # standup (with action items) lasts over 60 s
META_KEYS = {"task", "source", "recording", "offset_s", "duration_s", "speakers", "num_speakers", "alignment"}


def read_samples(out: Path) -> dict[str, list[tuple[dict, bytes]]]:
    """split -> [(sample JSON, FLAC bytes)] in shard order."""
    samples: dict[str, list[tuple[dict, bytes]]] = {"train": [], "eval": []}
    for split in samples:
        for shard in sorted(out.glob(f"{split}-*.tar")):
            with tarfile.open(shard) as tar:
                members: dict[str, dict[str, bytes]] = {}
                for name in tar.getnames():
                    key, suffix = split_member_name(name)
                    members.setdefault(key, {})[suffix] = tar.extractfile(name).read()
            for key, parts in members.items():
                assert set(parts) == {"json", "audio_0.flac"}, parts.keys()
                samples[split].append((parse_sample(parts["json"], key), parts["audio_0.flac"]))
    return samples


def by_recording(samples: dict[str, list[tuple[dict, bytes]]], task: str = "transcribe") -> dict[str, list[tuple[dict, bytes]]]:
    grouped: dict[str, list[tuple[dict, bytes]]] = {}
    for split_samples in samples.values():
        for sample, audio in split_samples:
            if sample["meta"]["task"] == task:
                grouped.setdefault(sample["meta"]["recording"], []).append((sample, audio))
    return {rec: sorted(items, key=lambda item: item[0]["meta"]["offset_s"]) for rec, items in grouped.items()}


def target(sample: dict) -> str:
    return sample["messages"][1]["content"][0]["text"]


def decode(source) -> tuple[np.ndarray, int]:
    """(samples, sample rate): all of it, mono, at its own rate."""
    from torchcodec.decoders import AudioDecoder

    samples = AudioDecoder(source).get_all_samples()
    return samples.data.numpy().mean(axis=0), samples.sample_rate


def build(audio_dir: Path, out: Path, *extra: str) -> int:
    return main(["shards", "build", "--audio-dir", str(audio_dir), "--out", str(out), *extra])


@pytest.fixture(scope="module")
def meetings(tmp_path_factory) -> dict:
    """A folder with one meeting per transcript format (an mp4 call among them), built once with the CLI."""
    root = tmp_path_factory.mktemp("meetings")
    made = {
        "standup.flac": synth.synth_meeting(root, 1.0, seed=1, name="standup", ext="flac", transcript="srt",
                                            num_action_items=2),
        "calls/review.mp4": synth.synth_meeting(root / "calls", 0.5, num_speakers=2, seed=2, name="review", ext="mp4",
                                                transcript="vtt"),
        "planning.wav": synth.synth_meeting(root, 0.5, num_speakers=4, seed=3, name="planning", ext="wav",
                                            transcript="json", num_action_items=1),
        "retro.wav": synth.synth_meeting(root, 0.5, seed=4, name="retro", ext="wav", transcript="txt"),
    }
    # A WebM written to a pipe has no duration in its header: the build counts the samples.
    piped = synth.synth_meeting(root / "calls", 0.3, num_speakers=2, seed=5, name="sync", ext="wav", transcript="srt")
    with open(root / "calls" / "sync.webm", "wb") as webm:
        subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(piped.recording), "-c:a", "libopus", "-f", "webm", "pipe:1"],
                       stdout=webm, check=True)
    piped.recording.unlink()
    piped.recording = root / "calls" / "sync.webm"
    made["calls/sync.webm"] = piped
    (root / "README.md").write_text("not a recording\n")
    out = tmp_path_factory.mktemp("shards")
    assert build(root, out, *BUILD_FLAGS) == 0
    return {"root": root, "out": out, "made": made, "samples": read_samples(out)}


def test_timestamped_formats_reassemble_the_transcript(meetings):
    """srt, vtt (mp4 audio track) and json segments: cues grouped up to 30 s, never cut, offsets at turn starts."""
    grouped = by_recording(meetings["samples"])
    assert sorted(grouped) == ["calls/review.mp4", "calls/sync.webm", "planning.wav", "retro.wav", "standup.flac"]
    for recording in ("standup.flac", "calls/review.mp4", "calls/sync.webm", "planning.wav"):
        meeting = meetings["made"][recording]
        samples = grouped[recording]
        assert " ".join(target(s) for s, _ in samples) == " ".join(t.text for t in meeting.turns)
        turn_starts = {t.start_s: i for i, t in enumerate(meeting.turns)}
        for sample, _ in samples:
            meta = sample["meta"]
            assert set(meta) == META_KEYS
            assert meta["source"] == "folder" and meta["alignment"] == "timestamps"
            assert meta["offset_s"] in turn_starts  # every sample starts where a turn starts
            assert 0 < meta["duration_s"] <= 30.0
            first = turn_starts[meta["offset_s"]]
            inside = [t for t in meeting.turns[first:] if t.end_s <= meta["offset_s"] + meta["duration_s"] + 1e-3]
            assert target(sample) == " ".join(t.text for t in inside)
            assert meta["speakers"] == list(dict.fromkeys(t.speaker for t in inside))
            assert meta["num_speakers"] == len(meta["speakers"])
            assert sample["messages"] == [
                {"role": "user", "content": [{"type": "audio", "member": "audio_0.flac"},
                                             {"type": "text", "text": "\nTranscribe."}]},
                {"role": "assistant", "content": [{"type": "text", "text": target(sample)}]}]


def test_audio_members_are_the_decoded_ranges(meetings):
    """Each member is that range of the recording, mono at its own rate, as 16-bit FLAC (also from an mp4)."""
    grouped = by_recording(meetings["samples"])
    for recording in ("standup.flac", "calls/review.mp4", "retro.wav"):
        full, rate = decode(str(meetings["root"] / recording))
        full = np.clip(np.round(full * 32768), -32768, 32767) / 32768
        for sample, audio in grouped[recording]:
            meta = sample["meta"]
            member, member_rate = decode(audio)
            assert member_rate == rate == 22050 and abs(member.size - meta["duration_s"] * rate) <= 1
            np.testing.assert_array_equal(member, full[round(meta["offset_s"] * rate):][: member.size])


def test_plain_text_windows_overlap(meetings):
    """txt: 30 s windows every 28 s, words placed by character position; overlapping words go to both windows."""
    meeting = meetings["made"]["retro.wav"]
    samples = by_recording(meetings["samples"])["retro.wav"]
    words = " ".join(t.text for t in meeting.turns).split()
    offsets = [s["meta"]["offset_s"] for s, _ in samples]
    assert offsets == [28.0 * i for i in range(len(samples))]
    assert all(s["meta"]["duration_s"] == 30.0 for s, _ in samples[:-1])
    assert samples[-1][0]["meta"]["offset_s"] + samples[-1][0]["meta"]["duration_s"] == pytest.approx(meeting.duration_s, abs=0.002)
    position = 0
    for sample, _ in samples:
        assert sample["meta"]["alignment"] == "proportional" and sample["meta"]["speakers"] == []
        window = target(sample).split()
        start = next(i for i in range(max(0, position - len(window)), len(words)) if words[i: i + len(window)] == window)
        assert start <= position  # no word falls between windows
        position = start + len(window)
    assert position == len(words)


def test_action_items_sample(meetings):
    """From a .json notes file beside an .srt, and from the JSON transcript itself: the whole recording, '- item' lines."""
    action = by_recording(meetings["samples"], task="action_items")
    assert sorted(action) == ["planning.wav", "standup.flac"]
    for recording, [(sample, audio)] in action.items():
        meeting = meetings["made"][recording]
        assert sample["messages"][0]["content"][1] == {"type": "text", "text": "\nList the action items."}
        assert target(sample) == "\n".join(f"- {item}" for item in meeting.action_items)
        assert sample["meta"]["offset_s"] == 0.0
        assert sample["meta"]["duration_s"] == pytest.approx(meeting.duration_s, abs=0.002)
        assert sample["meta"]["speakers"] == sorted(set(sample["meta"]["speakers"]), key=sample["meta"]["speakers"].index)
        member, rate = decode(audio)
        assert abs(member.size - sample["meta"]["duration_s"] * rate) <= 1


def test_summary_hours_add_up(meetings, tmp_path):
    summary = build_folder(meetings["root"], tmp_path / "out", FolderConfig(eval_fraction=0.3, action_items_max_s=120), say=lambda line: None)
    total_s = sum(m.duration_s for m in meetings["made"].values())
    assert summary.num_recordings == 5 and not summary.errors and not summary.unknown_length
    assert summary.input_s == pytest.approx(total_s, abs=0.05)  # the opus in sync.webm adds its padding
    not_in_s = sum(v["seconds"] for v in summary.not_in.values())
    assert summary.covered_s + not_in_s == pytest.approx(summary.input_s, abs=1e-6)
    # Untranscribed: what lies between the timestamped meetings' samples (the txt windows cover everything).
    grouped = by_recording(meetings["samples"])
    outside_s = sum(m.duration_s - sum(s["meta"]["duration_s"] for s, _ in grouped[name])
                    for name, m in meetings["made"].items() if name != "retro.wav")
    assert summary.not_in["untranscribed"]["seconds"] == pytest.approx(outside_s, abs=0.05)
    assert summary.covered_s == pytest.approx(sum(
        s["meta"]["duration_s"] for name, items in grouped.items() if name != "retro.wav" for s, _ in items)
        + meetings["made"]["retro.wav"].duration_s, abs=0.01)
    assert sorted(summary.not_in["untranscribed"]["files"]) == sorted(
        str(meetings["root"] / name) for name in ("standup.flac", "calls/review.mp4", "calls/sync.webm", "planning.wav"))
    written = meetings["samples"]
    for split, stats in summary.splits.items():
        assert stats.num_samples == len(written[split])
        assert stats.audio_s == pytest.approx(sum(s["meta"]["duration_s"] for s, _ in written[split]), abs=0.01)
    assert summary.ignored == [str(meetings["root"] / "README.md")]
    text = summary.format()
    assert f"recordings: 5 in {meetings['root']}, {summary.input_s / 3600:.4f} h" in text
    assert "check: " in text and f"of {summary.input_s / 3600:.4f} h" in text


def test_action_items_cap(meetings, tmp_path):
    """Past --action-items-max-s (default 60 s) a recording gets no action_items sample, and the summary says so."""
    summary = build_folder(meetings["root"], tmp_path / "out", say=lambda line: None)
    longer = [str(meetings["root"] / name) for name in ("planning.wav", "standup.flac")
              if meetings["made"][name].duration_s > 60.0]
    assert longer and sorted(summary.action_items_skipped) == longer
    assert summary.splits["train"].tasks["action_items"] + summary.splits["eval"].tasks["action_items"] == 2 - len(longer)
    assert f"no action_items sample (recording longer than --action-items-max-s): {len(longer)}: " in summary.format()


def test_deterministic_and_eval_split(meetings, tmp_path):
    """The same folder and seed give byte-identical shards; --eval-by recording keeps each recording in one split."""
    again = tmp_path / "again"
    assert build(meetings["root"], again, *BUILD_FLAGS) == 0
    first = sorted(p.name for p in meetings["out"].glob("*.tar"))
    assert first == sorted(p.name for p in again.glob("*.tar")) and "eval-000000.tar" in first
    for name in first:
        assert (again / name).read_bytes() == (meetings["out"] / name).read_bytes(), name

    held = tmp_path / "held"
    assert build(meetings["root"], held, "--eval-fraction", "0.5", "--eval-by", "recording", "--seed", "3") == 0
    samples = read_samples(held)
    splits = {split: {s["meta"]["recording"] for s, _ in items} for split, items in samples.items()}
    assert splits["train"] and splits["eval"] and not splits["train"] & splits["eval"]


def test_synth_meeting_is_deterministic(tmp_path):
    a = synth.synth_meeting(tmp_path / "a", 0.3, seed=5, num_action_items=1, workers=1)
    b = synth.synth_meeting(tmp_path / "b", 0.3, seed=5, num_action_items=1, workers=3)
    assert a.duration_s >= 18.0 and a.turns == b.turns and a.action_items == b.action_items
    for name in ("meeting.flac", "meeting.srt", "meeting.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert a.turns[-1].text == a.action_items[0] and a.turns[-2].text == "let us go over the action items"
    assert all(t2.start_s > t1.end_s for t1, t2 in zip(a.turns, a.turns[1:]))


def test_broken_files_give_one_line_each_and_the_rest_is_built(tmp_path, capsys):
    """Past-the-end timestamps, no transcript, unreadable, truncated, unparsable, orphan transcript."""
    root = tmp_path / "meetings"
    good = synth.synth_meeting(root, 0.4, seed=7, name="good", ext="wav")
    wav, srt = good.recording.read_bytes(), good.transcript.read_text()
    # A transcript running 12.5 s past its audio (a cue beyond the end, as from a longer recording).
    end = good.duration_s + 12.5
    (root / "past.wav").write_bytes(wav)
    (root / "past.srt").write_text(srt + f"99\n{synth._srt_time(end - 2)} --> {synth._srt_time(end)}\nAlice: the end\n")
    (root / "lonely.wav").write_bytes(wav)                                      # no transcript
    (root / "garbage.wav").write_bytes(b"RIFF\x00\x00\x00\x00not audio at all" * 50)  # unreadable
    (root / "garbage.srt").write_text(srt)
    flac = synth.synth_meeting(tmp_path / "src", 0.4, seed=8, name="cut", ext="flac")
    (root / "cut.flac").write_bytes(flac.recording.read_bytes()[: flac.recording.stat().st_size // 2])  # truncated
    (root / "cut.srt").write_text(flac.transcript.read_text())
    (root / "bad.wav").write_bytes(wav)
    (root / "bad.srt").write_text("1\n00:00:01,000 -> 00:00:02,000\nAlice: hello\n")  # '->' is not an srt arrow
    (root / "orphan.vtt").write_text("WEBVTT\n\n00:01.000 --> 00:02.000\nhello\n")
    out = tmp_path / "out"
    capsys.readouterr()

    assert build(root, out) == 1
    captured = capsys.readouterr()
    errors = captured.err.strip().splitlines()
    expected = {"past.srt": "timestamps run 12.50 s past the end of the audio", "lonely.wav": "no transcript beside it",
                "garbage.wav": "cannot read the audio", "cut.flac": "truncated or corrupt",
                "bad.srt": "line 2: expected 'start --> end' times", "orphan.vtt": "no recording beside it"}
    assert len(errors) == len(expected), errors
    for name, message in expected.items():
        [line] = [e for e in errors if f"{root / name}:" in e]
        assert message in line, line
    # The good recording is built, alone.
    samples = read_samples(out)
    recordings = {s["meta"]["recording"] for items in samples.values() for s, _ in items}
    assert recordings == {"good.wav"}
    assert " ".join(target(s) for s, _ in by_recording(samples)["good.wav"]) == " ".join(t.text for t in good.turns)
    assert not [p for p in out.iterdir() if p.name.startswith(".") or p.suffix != ".tar"]  # no spool or .tmp left
    text = captured.out
    assert f"timestamps past the end of the audio: {good.duration_s / 3600:.4f} h in 1 file(s): {root / 'past.wav'}" in text
    assert f"{REASONS['unreadable']}: " in text and "1 of unknown length" in text

    summary = build_folder(root, tmp_path / "again", warn=lambda line: None, say=lambda line: None)
    assert len(summary.errors) == 6
    assert summary.not_in["past_end"]["files"] == [str(root / "past.wav")]
    assert summary.not_in["unreadable"]["files"] == [str(root / "cut.flac"), str(root / "garbage.wav")]
    assert summary.unknown_length == [str(root / "garbage.wav")]
    assert summary.covered_s + sum(v["seconds"] for v in summary.not_in.values()) == pytest.approx(summary.input_s, abs=1e-6)
    assert summary.input_s == pytest.approx(4 * good.duration_s + flac.duration_s, abs=0.05)


def test_nothing_built_and_bad_arguments(tmp_path, capsys):
    root = tmp_path / "meetings"
    root.mkdir()
    assert build(root, tmp_path / "out") == 2
    assert "holds no recordings" in capsys.readouterr().err
    synth.tone(root / "beep.wav", 1.0)
    assert build(root, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "beep.wav: no transcript beside it" in err and "nothing was built" in err
    (root / "beep.txt").write_text("beep\n")
    for extra, expected in [(["--overlap-s", "30"], "--overlap-s must be in [0, --segment-s=30)"),
                            (["--eval-fraction", "1.5"], "--eval-fraction must be in [0, 1]"),
                            (["--prefix", "x"], "--prefix and --task do not apply"),
                            (["--manifest", "m.jsonl"], "give --manifest or --audio-dir, not both")]:
        assert build(root, tmp_path / "out", *extra) == 2
        assert expected in capsys.readouterr().err
    assert main(["shards", "build", "--manifest", "m.jsonl", "--out", str(tmp_path / "o"), "--segment-s", "10"]) == 2
    assert "--segment-s only apply with --audio-dir" in capsys.readouterr().err
    assert build(root, tmp_path / "out") == 0
    assert build(root, tmp_path / "out") == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert build(root, tmp_path / "out", "--overwrite", "--eval-fraction", "0") == 0
    assert [p.name for p in (tmp_path / "out").glob("*.tar")] == ["train-000000.tar"]


def test_plan_segments_groups_merges_and_splits():
    def cue(start_s, end_s, text, speaker=None):
        return Cue(start_ms=round(start_s * 1000), end_ms=round(end_s * 1000), text=text,
                   speakers=(speaker,) if speaker else ())

    cues = [cue(0, 5, "a b", "A"), cue(6, 12, "c", "B"), cue(12.5, 20, "d", "A"), cue(25, 31, "e", "C"),
            cue(44, 50, "g h", "B"), cue(40, 45, "f", "A"),                 # overlapping: one unit, in start order
            cue(60, 130, " ".join(f"w{i}" for i in range(30)), "D")]        # 70 s: three parts of 23.33 s
    cuts = plan_segments(cues, 30_000)
    assert [(c.start_ms, c.end_ms) for c in cuts] == [(0, 20_000), (25_000, 50_000), (60_000, 83_333),
                                                      (83_333, 106_667), (106_667, 130_000)]
    assert [c.text for c in cuts[:2]] == ["a b c d", "e f g h"]
    assert [c.speakers for c in cuts[:2]] == [["A", "B"], ["C", "A", "B"]]
    assert [c.alignment for c in cuts] == ["timestamps"] * 2 + ["proportional"] * 3
    parts = [c.text.split() for c in cuts[2:]]
    assert sum(parts, []) == [f"w{i}" for i in range(30)] and all(8 <= len(p) <= 12 for p in parts)


def test_plan_windows_overlap():
    cues = parse_txt("Alice: one two three four\nfive six seven eight nine ten\n")
    cuts = plan_windows(cues, 65_000, 30_000, 5_000)
    assert [(c.start_ms, c.end_ms) for c in cuts] == [(0, 30_000), (25_000, 55_000), (50_000, 65_000)]
    # Word times by character position over 65 s: five at 28.5 s (in both overlapping windows), eight at 49.1 s.
    assert [c.text for c in cuts] == ["one two three four five", "five six seven eight", "nine ten"]
    assert cuts[0].speakers == ["Alice"] and cuts[2].speakers == []


def test_transcript_parsers():
    srt = textwrap.dedent("""\
        1
        00:00:01,000 --> 00:00:02,500
        SPEAKER_1: <i>hello</i> there

        00:00:03,000 --> 00:00:04,000 X1:40
        [Dr. Who]: fine &amp; you
        Bob: good
        """)
    first, second = parse_srt(srt, "m.srt")
    assert (first.start_ms, first.end_ms, first.text, first.speakers) == (1000, 2500, "hello there", ("SPEAKER_1",))
    assert (second.start_ms, second.text, second.speakers) == (3000, "fine & you good", ("Dr. Who", "Bob"))

    vtt = textwrap.dedent("""\
        WEBVTT - a meeting

        NOTE exported by a tool

        intro
        00:01.000 --> 00:02.000 align:start
        <v.loud Alice Smith>hi <c.x>all</c></v>

        01:00:00.000 --> 01:00:01.5
        Carol: bye
        """)
    first, second = parse_vtt(vtt, "m.vtt")
    assert (first.start_ms, first.end_ms, first.text, first.speakers) == (1000, 2000, "hi all", ("Alice Smith",))
    assert (second.start_ms, second.end_ms, second.text, second.speakers) == (3_600_000, 3_601_500, "bye", ("Carol",))

    cues, items = parse_json(json.dumps({"segments": [{"start": 0.5, "end": 1.25, "speaker": "A", "text": "x"}],
                                         "action_items": ["do it"]}), "m.json")
    assert (cues[0].start_ms, cues[0].end_ms, cues[0].speakers, items) == (500, 1250, ("A",), ["do it"])
    assert parse_json('{"action_items": ["a"]}', "m.json") == (None, ["a"])
    for bad, message in [('{"segments": [{"start": "0:01", "end": 2, "text": "x"}]}', "segments[0].start must be a number"),
                         ('{"segments": [{"start": 3, "end": 2, "text": "x"}]}', "segments[0] ends (2) before"),
                         ('{"transcript": 3}', "'transcript' must be a string"),
                         ('{"transcript": "a",\n "x": }', "invalid JSON on line 2"),
                         ('{"title": "a"}', "holds none of")]:
        with pytest.raises(ValueError, match=None) as error:
            parse_json(bad, "m.json")
        assert str(error.value).startswith("m.json: ") and message in str(error.value), str(error.value)
    with pytest.raises(ValueError, match="line 1: a WebVTT file starts with 'WEBVTT'"):
        parse_vtt("00:01.000 --> 00:02.000\nhi\n", "m.vtt")


def test_samples_go_through_the_training_decode(meetings):
    from omni_train.data.audio import AudioConfig, encode_audio

    sample, audio = meetings["samples"]["train"][0]
    encoded = encode_audio(audio, AudioConfig(), where="folder")
    assert encoded.duration_s == pytest.approx(sample["meta"]["duration_s"], abs=1e-3)


MEASURE = """
import json, resource, sys, time
from omni_train.data.folder import build_folder
start = time.perf_counter()
summary = build_folder(sys.argv[1], sys.argv[2], say=lambda line: None)
print(json.dumps({"seconds": time.perf_counter() - start, "input_s": summary.input_s, "covered_s": summary.covered_s,
                  "not_in_s": sum(v["seconds"] for v in summary.not_in.values()), "samples": summary.num_samples,
                  "errors": summary.errors, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


@pytest.mark.slow
def test_long_meetings_bounded_memory(tmp_path):
    """A 30-minute meeting builds with the same peak RSS as a 10-minute one (each build in its own process)."""
    results = {}
    for minutes in (10, 30):
        start = time.perf_counter()
        meeting = synth.synth_meeting(tmp_path / f"m{minutes}", minutes, seed=minutes)
        synth_s = time.perf_counter() - start
        run = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / f"m{minutes}"), str(tmp_path / f"out{minutes}")],
                             capture_output=True, text=True, check=True)
        result = json.loads(run.stdout.strip().splitlines()[-1])
        assert not result["errors"]
        assert result["input_s"] == pytest.approx(meeting.duration_s, abs=0.01) and meeting.duration_s >= minutes * 60
        assert result["covered_s"] + result["not_in_s"] == pytest.approx(result["input_s"], abs=1e-6)
        assert result["covered_s"] >= 0.9 * sum(t.end_s - t.start_s for t in meeting.turns)
        results[minutes] = result
        print(f"{minutes} min meeting: synth {synth_s:.1f} s; build {result['seconds']:.1f} s, {result['samples']} samples, "
              f"{result['input_s'] / 3600:.3f} h in, {result['covered_s'] / 3600:.3f} h in samples, "
              f"peak RSS {result['peak_rss_mb']:.0f} MB")
        shutil.rmtree(tmp_path / f"m{minutes}")
    # Holding the 30-minute recording decoded would add ~115 MB (float32 at 16 kHz) over the 10-minute one.
    assert results[30]["peak_rss_mb"] < results[10]["peak_rss_mb"] + 25, results
