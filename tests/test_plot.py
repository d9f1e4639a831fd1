"""`omni-train plot`: curves of several runs from their metrics.jsonl and probes.jsonl; new metrics grouped by
prefix, what was measured once in one table, the transfer figure. (The sweep figure: tests/test_sweep.py.)"""

from __future__ import annotations

import json

from PIL import Image

from omni_train.cli import main
from omni_train.plot import curve_panels, metric_series, probe_series


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


def test_plot_groups_new_metrics_by_prefix_and_tables_what_was_measured_once(tmp_path, capsys):
    run = tmp_path / "diag"
    run.mkdir()
    metrics = [{"step": s, "loss": 5.0 / s, "lr": 1e-3, "grad_norm": 1.0 / s, "grad_norm/backbone": 0.5 / s,
                "grad_norm/audio_encoder": 0.2 / s, "loss_share/asr": 0.6, "loss_share/text2code": 0.4,
                "tokens_seen": 100 * s, "samples_seen": 3 * s, "probe/zs/exact": 0.1, "note": "text",
                **({"reliance/audio": 0.3 / s} if s % 2 == 0 else {})} for s in range(1, 7)]
    metrics[-1]["cka/layer2"] = 0.5
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    probes = [{"step": s, "probe": "zs", "task": task, "language": lang, "metric": metric, "value": s / 10, "n": 4}
              for s in (2, 4, 6) for task, lang in (("all", "all"), ("speech2code", "de"), ("speech2code", "all"))
              for metric in ("exact", "execution")]
    probes += [{"step": 6, "probe": "pipe", "task": task, "language": lang, "metric": metric, "value": 0.7, "n": 4}
               for task, lang in (("all", "all"), ("speech2code", "all"), ("speech2code", "de"))
               for metric in ("exact", "transcript_cer")]
    (run / "probes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in probes))
    panels, once = curve_panels({"diag": {**metric_series(metrics), **probe_series(probes)}})
    assert panels == {"grad_norm": ["grad_norm", "grad_norm/audio_encoder", "grad_norm/backbone"],
                      "loss_share": ["loss_share/asr", "loss_share/text2code"], "lr": ["lr"],
                      "reliance": ["reliance/audio"], "zs": ["zs/exact", "zs/execution"]}
    assert once == ["cka/layer2", "pipe/exact", "pipe/transcript_cer"]  # one table, not a panel per dot
    assert main(["plot", str(run)]) == 0
    out = capsys.readouterr().out.split()
    assert out == ["wrote", str(run / "plots" / "curves.png"), "wrote", str(run / "plots" / "transfer-diag.png")]
    for png in (run / "plots" / "curves.png", run / "plots" / "transfer-diag.png"):
        with Image.open(png) as image:
            assert image.size[0] > 1000 and len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 100
