"""`omni-train compare`: headline probe numbers of runs side by side, each at its latest step."""

from __future__ import annotations

import json

from omni_train.cli import main


def write_run(root, name, kind, rows):
    run = root / name
    run.mkdir()
    (run / "config.yaml").write_text(f"name: {name}\nmodel:\n  transfer:\n    kind: {kind}\n")
    (run / "probes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def row(step, probe, task, metric, value, language="all", n=40):
    return {"step": step, "probe": probe, "task": task, "language": language, "metric": metric, "value": value, "n": n}


def test_compare_prints_latest_headlines_per_run(tmp_path, capsys):
    mechanism = write_run(tmp_path, "demo", "token_rate", [
        row(750, "speech2code", "all", "exact", 0.01), row(1500, "speech2code", "all", "exact", 0.366),
        row(1500, "speech2code", "all", "exact", 0.9, language="de"),  # per-language rows are not headlines
        row(1500, "speech2code_pipeline", "all", "exact", 0.347)])
    naive = write_run(tmp_path, "demo-naive", "none", [row(1500, "speech2code", "all", "exact", 0.0)])
    assert main(["compare", str(mechanism), str(naive)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "demo (token_rate)" in lines[0] and "demo-naive (naive)" in lines[0]
    zero_shot = next(line for line in lines if line.startswith("zero-shot speech -> code, exact"))
    assert zero_shot.split()[-4:] == ["36.6", "(n=40)", "0.0", "(n=40)"], zero_shot
    pipeline = next(line for line in lines if line.startswith("pipeline speech -> text -> code, exact"))
    assert pipeline.split()[-3:] == ["34.7", "(n=40)", "-"], pipeline  # the naive run has no pipeline probe


def test_compare_names_a_run_without_probes(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["compare", str(tmp_path / "empty")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "empty/probes.jsonl does not exist" in error
