"""notebooks/transfer.ipynb on a tiny training run, and the transfer table it prints (omni_train.plot);
notebooks/ablation.ipynb on a tiny sweep.

The run: the demo recipe on a `--size tiny` demo corpus, one process, 4 steps, with a zero-shot
speech -> code probe and the held-out transcripts every 2 steps and the pipeline at the end.
The notebook is executed by nbclient with OMNI_RUN pointing at it. The sweep: tests/sweeps.py's
(2 learning rates x 2 seeds through `omni-train sweep`, built once per session), with OMNI_SWEEP.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from omni_train.plot import format_transfer_table, language_series, probe_kinds, transfer_table

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "transfer.ipynb"
ABLATION = REPO / "notebooks" / "ablation.ipynb"


def execute(path: Path):
    import nbclient
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    return notebook


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, list[str]]:
    """(run dir, the spoken languages of its speech -> code probe items)."""
    from omni_train.cli import main
    from omni_train.probes.runner import ProbeConfig, list_items

    root = tmp_path_factory.mktemp("notebook")
    corpus = root / "tiny"
    assert main(["shards", "demo", "--out", str(corpus), "--size", "tiny"]) == 0
    probe_shard, eval_shard = corpus / "probe-000000.tar", corpus / "eval-000000.tar"
    probes = (f"[{{name: zero_shot, kind: generative, shards: {probe_shard}, tasks: [speech2code], every: 2, max_new_tokens: 8}},"
              f" {{name: pipeline, kind: pipeline, shards: {probe_shard}, tasks: [speech2code], max_new_tokens: 8}},"
              f" {{name: transcripts, kind: generative, shards: {eval_shard}, tasks: [asr], every: 2, max_new_tokens: 8}}]")
    run = root / "run"
    overrides = {"name": "notebook-test", "output_dir": run, "data.train": f"[{{shards: {corpus / 'train-*.tar'}}}]",
                 "data.tokenizer": corpus / "tokenizer.model",
                 "data.eval.0.shards": eval_shard, "data.num_workers": 0, "train.engine": "single", "train.steps": 4,
                 "train.warmup_steps": 0, "train.log_every": 1, "train.eval_every": 2, "train.eval_batches": 1,
                 "train.checkpoint_every": 4, "train.tracker": "none", "train.progress": "false", "probes": probes}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    result = subprocess.run([sys.executable, "launch/pretrain.py", "--recipe", "recipes/demo.yaml",
                             *(f"{k}={v}" for k, v in overrides.items())], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    items = list_items(ProbeConfig(name="languages", shards=str(probe_shard), tasks=["speech2code"]))
    return run, sorted({item.language for item in items})


def test_notebook_shows_the_per_language_transfer_table(tiny_run, monkeypatch):
    run, languages = tiny_run
    assert len(languages) >= 3, languages
    monkeypatch.setenv("OMNI_RUN", str(run))
    notebook = execute(NOTEBOOK)
    text = "".join(out.get("text", "") for cell in notebook.cells for out in cell.get("outputs", [])
                   if out["output_type"] == "stream")
    assert "zero-shot exact" in text and "pipeline exact" in text and "transcript exact" in text, text
    table_lines = {line.split()[0]: line for line in text.splitlines() if line.strip()}
    for language in [*languages, "all"]:
        assert language in table_lines, (language, text)
        assert len(table_lines[language].split()) == 10, table_lines[language]  # language, n and 8 columns
    assert any("image/png" in out.get("data", {}) for cell in notebook.cells for out in cell.get("outputs", [])), \
        "no curves"
    assert not [out for cell in notebook.cells for out in cell.get("outputs", []) if out["output_type"] == "error"]


def test_tiny_run_rows_give_a_row_per_language(tiny_run):
    run, languages = tiny_run
    rows = [json.loads(line) for line in (run / "probes.jsonl").read_text().splitlines()]
    table = transfer_table(rows, kinds=probe_kinds(rows))
    assert [row["language"] for row in table] == [*languages, "all"]  # the tiny corpus's eval voices are its probe voices
    assert all(None not in (r["zero_shot_exact"], r["pipeline_exact"], r["asr_exact"], r["pipeline_transcript_cer"])
               for r in table)
    assert table[-1]["steps"] == {"zero_shot": 4, "pipeline": 4, "transcripts": 4}
    curves = language_series(rows, probe="zero_shot", task="speech2code", metric="exact")
    assert [step for step, _ in curves["all"]] == [2, 4]


def row(step, probe, task, language, metric, value, n=10):
    return {"step": step, "probe": probe, "task": task, "language": language, "metric": metric, "value": value, "n": n}


def test_transfer_table_values_latest_step_and_gaps():
    rows = [row(5, "zs", "speech2code", "de", "exact", 0.1), row(5, "zs", "speech2code", "de", "execution", 0.2),
            row(10, "zs", "speech2code", "de", "exact", 0.5), row(10, "zs", "speech2code", "de", "execution", 0.6),
            row(10, "zs", "speech2code", "all", "exact", 0.4, n=20), row(10, "zs", "text2code", "de", "exact", 0.9),
            row(10, "pipe", "speech2code", "de", "exact", 0.7), row(10, "pipe", "speech2code", "de", "transcript_cer", 0.05),
            row(10, "pipe", "speech2code", "all", "exact", 0.6, n=20),
            row(10, "held", "asr", "de", "exact", 0.8), row(10, "held", "asr", "de", "cer", 0.02),
            row(10, "held", "asr", "sw", "exact", 0.3),
            {**row(10, "zs", "speech2code", "all", "exact", 0.0), "group_by": "num_speakers", "group": "2"}]
    kinds = probe_kinds(rows)
    assert kinds == {"zs": "generative", "pipe": "pipeline", "held": "generative"}
    assert probe_kinds(rows, {"probes": [{"name": "held", "kind": "pipeline"}]})["held"] == "pipeline"
    table = {r["language"]: r for r in transfer_table(rows, kinds=kinds)}
    assert list(table) == ["de", "sw", "all"]
    de = table["de"]
    assert (de["zero_shot_exact"], de["zero_shot_execution"], de["pipeline_exact"]) == (0.5, 0.6, 0.7)
    assert de["gap_exact"] == pytest.approx(20.0) and de["n"] == 10
    assert (de["asr_exact"], de["asr_cer"], de["pipeline_transcript_cer"], de["pipeline_execution"]) == (0.8, 0.02, 0.05, None)
    assert table["sw"]["zero_shot_exact"] is None and table["sw"]["asr_exact"] == 0.3
    assert table["all"]["zero_shot_exact"] == 0.4 and table["all"]["n"] == 20  # the group_by row is left out
    text = format_transfer_table(list(table.values()))
    assert "zs 10" in text and "pipe 10" in text
    de_line = next(line for line in text.splitlines() if line.startswith("de "))
    assert de_line.split() == ["de", "10", "50.0", "60.0", "70.0", "-", "+20.0", "80.0", "2.0", "5.0"]
    assert format_transfer_table([]).startswith("(no ")


@pytest.mark.slow
def test_ablation_notebook_shows_the_sweep_table_and_figure(corpus, tmp_path_factory, monkeypatch):
    from omni_train.probes.compare import aggregate, format_markdown
    from sweeps import SEEDS, VARIANTS, tiny_sweep

    sweep, _ = tiny_sweep(corpus, tmp_path_factory)
    monkeypatch.setenv("OMNI_SWEEP", str(sweep))
    notebook = execute(ABLATION)
    outputs = [out for cell in notebook.cells for out in cell.get("outputs", [])]
    assert not [out for out in outputs if out["output_type"] == "error"]
    tables = [out["data"]["text/markdown"] for out in outputs if "text/markdown" in out.get("data", {})]
    assert tables == [format_markdown(aggregate([sweep]))]  # what `omni-train compare runs/<sweep>` prints
    assert "| probe | task | language | metric | 1e-3 | 2e-3 | Δ 2e-3 |" in tables[0]
    assert any("image/png" in out.get("data", {}) for out in outputs), "no sweep figure"
    text = "".join(out.get("text", "") for out in outputs if out["output_type"] == "stream")
    assert f"variants {', '.join(VARIANTS)} (baseline {VARIANTS[0]})" in text, text
    per_seed = [line.split() for line in text.splitlines() if line.startswith("  ")]
    assert per_seed and all(line[0] in VARIANTS and line[1::2] == [f"s{s}" for s in SEEDS] for line in per_seed), text
