"""`omni-train plot runs/A [runs/B ...]`: loss and probe curves of one or more runs, side by side, as PNG.

Writes `<first run>/plots/curves.png` (or `--out`): training loss, held-out loss and each
(probe, metric) overall value against step, one line per run, so recipes can be compared.

The transfer view of one run (notebooks/transfer.ipynb): `load_run` reads its metrics, probe
rows and the probes' kinds; `transfer_table` lays the probe rows out per language (zero-shot
speech -> code next to the two-step pipeline and the transcripts), `format_transfer_table`
prints it, `transfer_figure` draws the curves over steps.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def probe_series(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """{'probe/metric': [(step, value)]} for the overall rows (task and language 'all')."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for row in rows:
        if row.get("language", "all") == "all" and row.get("task", "all") in ("all", None):
            series[f"{row['probe']}/{row['metric']}"].append((row["step"], row["value"]))
    return {k: sorted(v) for k, v in sorted(series.items())}


def plot_runs(runs: list[Path], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = {run: read_jsonl(run / "metrics.jsonl") for run in runs}
    probes = {run: probe_series(read_jsonl(run / "probes.jsonl")) for run in runs}
    missing = [str(run) for run in runs if not metrics[run]]
    if missing:
        raise FileNotFoundError(f"no metrics.jsonl in {', '.join(missing)}")
    probe_keys = sorted({key for series in probes.values() for key in series})
    panels = ["loss", *probe_keys]
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    ax = axes.flat[0]
    for run in runs:
        steps = [r["step"] for r in metrics[run]]
        ax.plot(steps, [r["loss"] for r in metrics[run]], label=f"{run.name} train")
        evals = [(r["step"], r["eval_loss"]) for r in metrics[run] if r.get("eval_loss") is not None]
        if evals:
            ax.plot(*zip(*evals), "o--", label=f"{run.name} held-out")
    ax.set(title="loss", xlabel="step", yscale="log")
    ax.legend(fontsize=7)
    for ax, key in zip(axes.flat[1:], probe_keys):
        for run in runs:
            if key in probes[run]:
                ax.plot(*zip(*probes[run][key]), "o-", label=run.name)
        ax.set(title=key, xlabel="step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_cli(args: argparse.Namespace) -> int:
    runs = [Path(r) for r in args.runs]
    out = Path(args.out) if args.out else runs[0] / "plots" / "curves.png"
    print(f"wrote {plot_runs(runs, out)}")
    return 0


# ---------------------------------------------------------------------------------------------
# The transfer view of one run

ALL = "all"  # probes.runner's label for a row over every task or language
ZERO_SHOT_TASK = "speech2code"  # spoken instruction -> code: never trained, scored by generative and pipeline probes
TRANSCRIPT_TASK = "asr"         # speech -> transcript: trained, scored per language by a generative probe
TRANSFER_COLUMNS = (  # (key, header): rates in [0, 1], printed as percentages; gap in points
    ("zero_shot_exact", "zero-shot exact"), ("zero_shot_execution", "zero-shot exec"),
    ("pipeline_exact", "pipeline exact"), ("pipeline_execution", "pipeline exec"),
    ("gap_exact", "gap (points)"), ("asr_exact", "transcript exact"), ("asr_cer", "transcript CER"),
    ("pipeline_transcript_cer", "pipeline CER"))


def probe_kinds(rows: list[dict], config: dict | None = None) -> dict[str, str]:
    """Probe name -> kind (generative, pipeline, retrieval): from the run's config (its `probes` list) where it
    names the probe, else from the metrics the probe's rows carry (transcript_* only from pipelines, recall@k only
    from retrieval)."""
    named = {p["name"]: p.get("kind", "generative") for p in (config or {}).get("probes") or []}
    inferred: dict[str, str] = {}
    for row in rows:
        metric = row["metric"]
        kind = "pipeline" if metric.startswith("transcript_") else "retrieval" if metric.startswith("recall@") else None
        if kind or row["probe"] not in inferred:
            inferred[row["probe"]] = kind or inferred.get(row["probe"], "generative")
    return {**inferred, **named}


def load_run(run: str | Path) -> dict:
    """A run directory's metrics.jsonl, probes.jsonl, probe_examples.jsonl and probe kinds (config.yaml)."""
    import yaml

    run = Path(run)
    if not (run / "probes.jsonl").is_file() and not (run / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"{run} holds neither metrics.jsonl nor probes.jsonl: not a run directory")
    config = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else None
    probes = read_jsonl(run / "probes.jsonl")
    return {"run": run, "metrics": read_jsonl(run / "metrics.jsonl"), "probes": probes,
            "examples": read_jsonl(run / "probe_examples.jsonl"), "kinds": probe_kinds(probes, config)}


def _latest_rows(rows: list[dict]) -> list[dict]:
    """Each probe's rows of its latest step, per-language rows only (no group_by rows)."""
    latest: dict[str, int] = {}
    for r in rows:
        latest[r["probe"]] = max(latest.get(r["probe"], r["step"]), r["step"])
    return [r for r in rows if r["step"] == latest[r["probe"]] and "group_by" not in r]


def transfer_table(rows: list[dict], *, kinds: dict[str, str] | None = None, task: str = ZERO_SHOT_TASK,
                   transcript_task: str = TRANSCRIPT_TASK) -> list[dict]:
    """Probe rows -> one dict per spoken language (sorted), then "all": `language`, `n` (zero-shot items), `steps`
    (probe -> the step its values come from) and the TRANSFER_COLUMNS keys, None where no probe scored them.

    zero_shot_*: generative probes on `task`; pipeline_*: pipeline probes on `task` (its code, and the CER of its
    intermediate transcripts); asr_*: generative probes on `transcript_task`; gap_exact: pipeline minus zero-shot
    exact match, in points. Each probe at its latest step; where several probes score the same cell, the last wins.
    """
    kinds = kinds if kinds is not None else probe_kinds(rows)
    cells: dict[str, dict] = defaultdict(dict)
    steps: dict[str, int] = {}
    wanted = {("generative", task, "exact"): "zero_shot_exact", ("generative", task, "execution"): "zero_shot_execution",
              ("pipeline", task, "exact"): "pipeline_exact", ("pipeline", task, "execution"): "pipeline_execution",
              ("pipeline", task, "transcript_cer"): "pipeline_transcript_cer",
              ("generative", transcript_task, "exact"): "asr_exact", ("generative", transcript_task, "cer"): "asr_cer"}
    for r in _latest_rows(rows):
        key = wanted.get((kinds.get(r["probe"], "generative"), r["task"], r["metric"]))
        if key is None:
            continue
        cells[r["language"]][key] = r["value"]
        if key == "zero_shot_exact":
            cells[r["language"]]["n"] = r["n"]
        steps[r["probe"]] = r["step"]
    table = []
    for language in sorted(cells, key=lambda lang: (lang == ALL, lang)):
        row = {"language": language, "n": cells[language].get("n"), "steps": steps}
        row.update({key: cells[language].get(key) for key, _ in TRANSFER_COLUMNS})
        if row["pipeline_exact"] is not None and row["zero_shot_exact"] is not None:
            row["gap_exact"] = 100 * (row["pipeline_exact"] - row["zero_shot_exact"])
        table.append(row)
    return table


def format_transfer_table(table: list[dict]) -> str:
    """The transfer table as text: one line per language, rates in %, the gap in points, "-" where not scored."""
    if not table:
        return "(no zero-shot, pipeline or transcript probe rows)"
    widths = [max(len(header), 6) for _, header in TRANSFER_COLUMNS]
    lines = [f"values in %, each probe at its latest step ({', '.join(f'{p} {s}' for p, s in table[0]['steps'].items())})",
             f"{'language':<16}{'n':>5}" + "".join(f"{header:>{w + 2}}" for (_, header), w in zip(TRANSFER_COLUMNS, widths))]
    for row in table:
        cells = []
        for (key, _), w in zip(TRANSFER_COLUMNS, widths):
            value = row[key]
            text = "-" if value is None else f"{value:+.1f}" if key == "gap_exact" else f"{100 * value:.1f}"
            cells.append(f"{text:>{w + 2}}")
        lines.append(f"{row['language']:<16}{row['n'] if row['n'] is not None else '-':>5}" + "".join(cells))
    return "\n".join(lines)


def language_series(rows: list[dict], *, probe: str, task: str, metric: str) -> dict[str, list[tuple[int, float]]]:
    """{language: [(step, value)]} of one probe's `metric` on `task`, "all" first, then the languages sorted."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in rows:
        if r["probe"] == probe and r["task"] == task and r["metric"] == metric and "group_by" not in r:
            series[r["language"]].append((r["step"], r["value"]))
    return {lang: sorted(series[lang]) for lang in sorted(series, key=lambda lang: (lang != ALL, lang))}


def transfer_figure(metrics: list[dict], rows: list[dict], *, kinds: dict[str, str] | None = None,
                    task: str = ZERO_SHOT_TASK):
    """Three panels: training and held-out loss; zero-shot against pipeline (exact, execution; all languages)
    over steps; zero-shot execution match per language over steps. Returns the matplotlib Figure."""
    import matplotlib.pyplot as plt

    kinds = kinds if kinds is not None else probe_kinds(rows)
    fig, (loss_ax, overall_ax, language_ax) = plt.subplots(1, 3, figsize=(16, 4.2))
    if metrics:
        loss_ax.plot([r["step"] for r in metrics], [r["loss"] for r in metrics], label="train")
        evals = [(r["step"], r["eval_loss"]) for r in metrics if r.get("eval_loss") is not None]
        if evals:
            loss_ax.plot(*zip(*evals), "o--", label="held-out")
        loss_ax.set(yscale="log")
    loss_ax.set(title="loss", xlabel="step")
    for kind, style in (("generative", "o-"), ("pipeline", "s--")):
        for probe in [p for p, k in kinds.items() if k == kind]:
            for metric in ("exact", "execution"):
                points = language_series(rows, probe=probe, task=task, metric=metric).get(ALL)
                if points:
                    overall_ax.plot(*zip(*points), style, label=f"{probe} {metric}")
    overall_ax.set(title=f"{task}: zero-shot vs pipeline, all languages", xlabel="step", ylim=(-0.03, 1.03))
    for probe in [p for p, k in kinds.items() if k == "generative"]:
        for language, points in language_series(rows, probe=probe, task=task, metric="execution").items():
            if language != ALL:
                language_ax.plot(*zip(*points), "o-", label=language)
    language_ax.set(title=f"{task} zero-shot execution match per language", xlabel="step", ylim=(-0.03, 1.03))
    for ax in (loss_ax, overall_ax, language_ax):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
