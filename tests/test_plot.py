"""`omni-train plot`: curves of several runs from their metrics.jsonl and probes.jsonl."""

from __future__ import annotations

import json

from PIL import Image

from omni_train.cli import main


def write_run(path, offset):
    path.mkdir()
    (path / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 5.0 / s + offset, **({"eval_loss": 5.5 / s} if s % 5 == 0 else {})}) + "\n"
        for s in range(1, 21)))
    (path / "probes.jsonl").write_text("".join(
        json.dumps({"step": s, "probe": "speech2code", "task": task, "language": lang, "metric": "exact", "value": s / 40, "n": 10}) + "\n"
        for s in (10, 20) for task, lang in (("all", "all"), ("speech2code", "de"))))


def test_plot_two_runs(tmp_path, capsys):
    write_run(tmp_path / "a", 0.0)
    write_run(tmp_path / "b", 0.3)
    assert main(["plot", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    png = tmp_path / "a" / "plots" / "curves.png"
    assert str(png) in capsys.readouterr().out
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > 500  # a loss panel beside a probe panel
    assert main(["plot", str(tmp_path / "missing")]) == 2
