"""Shared fixtures: a small multimodal shard set built from generated media with the real CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from omni_train.data import synth

os.environ.setdefault("WANDB_MODE", "disabled")

VOICES = ["en-us", "de", "fr-fr", "es", "ru", "hi"]
WORDS = {"en-us": "three plus five", "de": "drei plus fünf", "fr-fr": "trois plus cinq", "es": "tres más cinco",
         "ru": "три плюс пять", "hi": "तीन जोड़ पाँच"}


def build_corpus(root: Path, *, num_shard_samples: int = 6) -> dict:
    """Generate media in several codecs, write a ShareGPT manifest, build shards with `omni-train shards build`.

    Returns the manifest entries (with the expected properties of each sample's media) and the shard paths.
    """
    from omni_train.cli import main

    media = root / "media"
    media.mkdir(parents=True)
    entries = []

    def add(messages, meta, **lists):
        entries.append({"messages": messages, "meta": meta, **lists})

    codecs = ["wav", "flac", "mp3", "ogg", "opus"]
    for i, ext in enumerate(codecs):  # tones of known length and pitch
        duration_s = 1.0 + 0.5 * i
        synth.tone(media / f"tone{i}.{ext}", duration_s, frequency_hz=300 + 100 * i, sample_rate_hz=22050 if i % 2 else 44100)
        add([{"role": "user", "content": "<audio>What pitch is this?"},
             {"role": "assistant", "content": f"{300 + 100 * i} Hz"}],
            {"task": "tone", "language": "en", "expect_duration_s": duration_s}, audios=[f"tone{i}.{ext}"])
    for i, voice in enumerate(VOICES):  # espeak speech
        synth.speech(media / f"speech{i}.flac", WORDS[voice], voice=voice)
        add([{"role": "user", "content": "<audio>"}, {"role": "assistant", "content": WORDS[voice]}],
            {"task": "asr", "language": voice.split("-")[0]}, audios=[f"speech{i}.flac"])
    for i, (w, h, ext) in enumerate([(64, 48, "png"), (500, 120, "jpg"), (300, 300, "webp"), (1200, 900, "png")]):
        synth.pattern_image(media / f"image{i}.{ext}", w, h, seed=i)
        add([{"role": "user", "content": "<image>Describe."}, {"role": "assistant", "content": f"bands {i}"}],
            {"task": "caption", "language": "en", "expect_size": [w, h]}, images=[f"image{i}.{ext}"])
    for i, (duration_s, ext) in enumerate([(2.0, "mp4"), (3.0, "webm"), (1.6, "mkv")]):
        synth.test_pattern_video(media / f"video{i}.{ext}", duration_s, fps=10, width=160, height=120)
        add([{"role": "user", "content": "<video>What happens?"}, {"role": "assistant", "content": "a test pattern"}],
            {"task": "video", "language": "en", "expect_duration_s": duration_s}, videos=[f"video{i}.{ext}"])
    add([{"role": "user", "content": "<audio> then <image>"}, {"role": "assistant", "content": "both"}],
        {"task": "mixed", "language": "en"}, audios=["speech0.flac"], images=["image0.png"])
    for i in range(5):
        add([{"role": "user", "content": f"print {i} plus {i}"}, {"role": "assistant", "content": f"print({i} + {i})"}],
            {"task": "text2code", "language": "en"})

    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries))
    out = root / "shards"
    code = main(["shards", "build", "--manifest", str(manifest), "--media-root", str(media), "--out", str(out),
                 "--max-samples", str(num_shard_samples)])
    assert code == 0
    shards = sorted(out.glob("train-*.tar"))
    return {"entries": entries, "shards": shards, "pattern": str(out / ("train-{%06d..%06d}.tar" % (0, len(shards) - 1))),
            "media": media, "root": root}


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict:
    return build_corpus(tmp_path_factory.mktemp("corpus"))


# `make test-reliability`'s table (tests/test_reliability.py): one row per test marked reliability, with what the
# test measured when it passed, FAILED (and the test's name) when it did not
_reliability: dict[str, dict] = {}


@pytest.fixture
def reliability_row(request):
    def record(scenario: str, checked: str, figure: str) -> None:
        _reliability[request.node.nodeid].update(scenario=scenario, checked=checked, figure=figure)
    return record


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if item.get_closest_marker("reliability") is not None:
        entry = _reliability.setdefault(item.nodeid, {})
        if report.when == "call" or report.failed:
            entry["result"] = "FAILED" if report.failed else ("skipped" if report.skipped else "passed")
    return report


def pytest_terminal_summary(terminalreporter):
    if not _reliability:
        return
    header = ("scenario", "checked", "result", "figure")
    table = [(e.get("scenario", nodeid.split("::")[-1]), e.get("checked", ""), e.get("result", "not run"), e.get("figure", ""))
             for nodeid, e in _reliability.items()]
    widths = [max(len(header[i]), *(len(row[i]) for row in table)) for i in range(3)]
    terminalreporter.section("reliability")
    for row in [header, *table]:
        terminalreporter.write_line("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3])
