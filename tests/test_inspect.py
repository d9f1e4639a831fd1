"""`omni-train shards inspect`: header-only estimates agree with the full training decode."""

from __future__ import annotations

import json
import shutil
import tarfile

from omni_train.cli import main


def run_inspect(capsys, *args) -> tuple[int, dict]:
    code = main(["shards", "inspect", *args, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_headers_and_decode_agree(corpus, capsys):
    code, headers = run_inspect(capsys, corpus["pattern"])
    assert code == 0
    code, decoded = run_inspect(capsys, corpus["pattern"], "--decode")
    assert code == 0
    entries = corpus["entries"]
    assert headers["samples"] == decoded["samples"] == len(entries)
    assert headers["shards"] == len(corpus["shards"])
    tasks = {}
    for e in entries:
        tasks[e["meta"]["task"]] = tasks.get(e["meta"]["task"], 0) + 1
    assert headers["tasks"] == tasks
    assert set(headers["languages"]) == {"en", "de", "fr", "es", "ru", "hi"}
    # header estimates use the pipeline's placeholder arithmetic; only compressed-audio header
    # durations (mp3/ogg padding) differ from the decoded length by a few tokens
    assert abs(headers["tokens"] - decoded["tokens"]) <= 0.01 * decoded["tokens"]
    assert headers["video_frames"] == decoded["video_frames"]
    assert headers["images"] == decoded["images"] == 5 and headers["videos"] == 3
    tone_s = sum(e["meta"]["expect_duration_s"] for e in entries if e["meta"]["task"] == "tone")
    assert decoded["audio_hours"] * 3600 > tone_s


def test_decode_lists_unusable_samples(corpus, tmp_path, capsys):
    bad = tmp_path / "bad-000000.tar"
    shutil.copy(corpus["shards"][0], bad)
    with tarfile.open(bad, "a") as tar:
        import io
        info = tarfile.TarInfo("zzz.json")
        payload = b'{"messages": ['
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    code, report = run_inspect(capsys, str(bad), "--decode")
    assert code == 1
    assert [u["key"] for u in report["unusable"]] == ["zzz"] and "JSON" in report["unusable"][0]["reason"]
    main(["shards", "inspect", str(bad)])
    text = capsys.readouterr().out
    assert "unusable samples: 1" in text and "zzz" in text
