"""`omni-train plot`: curves of one or more runs side by side, a sweep's figure, and the transfer view, as PNG.

    omni-train plot runs/A [runs/B ...] [--out FILE.png]   # -> runs/A/plots/curves.png (+ transfer-<run>.png)
    omni-train plot runs/<sweep> [--out FILE.png]          # -> runs/<sweep>/plots/sweep.png

**Runs** (`plot_runs`): a curve panel for the loss (training and held-out), one for every numeric
metrics.jsonl key logged at two or more steps (keys sharing the part before their first "/" share a panel:
`grad_norm` with `grad_norm/backbone`, every `loss_share/<task>`, `reliance/<modality>`, `cka/...`, so new
diagnostics are drawn without new code; counters such as tokens_seen and the `probe/...` copies are left
out), and one for every (probe, metric) overall value scored at two or more steps; one line per run. What was
measured at one step only (a probe run at the end) goes into one compact table under the panels (metric by
run) instead of a panel holding a single dot. A run whose probes score the zero-shot task (`speech2code`)
also gets its transfer figure beside the curves (`transfer-<run>.png`, `transfer_figure` below).

**A sweep directory** (`omni-train sweep`; see probes/compare.py): `sweep_figure` draws the training loss of
each variant over steps (mean over seeds, band from the lowest to the highest seed), then one panel per
probe metric (all tasks, all languages) with each variant's mean and its 95% t-interval (n >= 4 seeds) or
+- std (n < 4), and each seed's value as a dot.

**Degradations** (a probe's `degrade:`, issue 14): runs or a sweep with degraded probe rows also get
`robustness.png` (`robustness_figure`): a panel per (probe, metric, degradation) drawing the value (task and
language "all", latest step) against the severity, one line per run or variant (mean and its bar over seeds),
each one's clean value as a dashed line in its colour, so a run trained with augmentation and one without
compare at a glance. The curves above keep the clean rows only.

The transfer view of one run (notebooks/transfer.ipynb): `load_run` reads its metrics, probe
rows and the probes' kinds; `transfer_table` lays the probe rows out per language (zero-shot
speech -> code next to the two-step pipeline and the transcripts), `format_transfer_table`
prints it, `transfer_figure` draws the curves over steps.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

COUNTERS = ("step", "tokens_seen", "samples_seen")  # monotone counters: a straight line says nothing
LOSS_KEYS = ("loss", "eval_loss")                    # share the first panel


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def probe_series(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """{'probe/metric': [(step, value)]} for the overall clean rows (task and language 'all', no degradation)."""
    from omni_train.probes.compare import is_clean

    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for row in rows:
        if (row.get("language", "all") == "all" and row.get("task", "all") in ("all", None) and "group_by" not in row
                and is_clean(row)):
            series[f"{row['probe']}/{row['metric']}"].append((row["step"], row["value"]))
    return {k: sorted(v) for k, v in sorted(series.items())}


def metric_series(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """{key: [(step, value)]} for every numeric metrics.jsonl key except COUNTERS, LOSS_KEYS and probe/* (drawn
    from probes.jsonl)."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for row in rows:
        for key, value in row.items():
            if (key in COUNTERS or key in LOSS_KEYS or key.startswith("probe/") or isinstance(value, bool)
                    or not isinstance(value, (int, float)) or not math.isfinite(value)):
                continue
            series[key].append((row["step"], value))
    return dict(series)


def _panel(key: str) -> str:
    return key.split("/", 1)[0]


def curve_panels(series_by_run: dict[str, dict[str, list]]) -> tuple[dict[str, list[str]], list[str]]:
    """({panel: [keys]}, [keys measured at one step only in every run]) over runs' {key: [(step, value)]}."""
    keys = sorted({k for series in series_by_run.values() for k in series})
    curves = [k for k in keys if any(len({s for s, _ in series.get(k, [])}) > 1 for series in series_by_run.values())]
    panels: dict[str, list[str]] = {}
    for key in curves:
        panels.setdefault(_panel(key), []).append(key)
    return panels, [k for k in keys if k not in curves]


def _format_value(value: float) -> str:
    return f"{value:.4g}"


def plot_runs(runs: list[Path], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = {run: read_jsonl(run / "metrics.jsonl") for run in runs}
    missing = [str(run) for run in runs if not metrics[run]]
    if missing:
        raise FileNotFoundError(f"no metrics.jsonl in {', '.join(missing)}")
    series = {run: {**metric_series(metrics[run]), **probe_series(read_jsonl(run / "probes.jsonl"))} for run in runs}
    panels, once = curve_panels({str(run): s for run, s in series.items()})
    names = ["loss", *panels]
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    table_h = 0.5 + 0.28 * len(once) if once else 0.0
    fig = plt.figure(figsize=(max(5.2 * cols, 4.0 + 2.2 * len(runs)), 3.6 * rows + table_h))
    grid = fig.add_gridspec(rows + bool(once), cols, height_ratios=[3.6] * rows + ([table_h] if once else []))
    axes = [fig.add_subplot(grid[i // cols, i % cols]) for i in range(len(names))]
    ax = axes[0]
    for run in runs:
        steps = [r["step"] for r in metrics[run] if r.get("loss") is not None]
        line, = ax.plot(steps, [r["loss"] for r in metrics[run] if r.get("loss") is not None], label=f"{run.name} train")
        evals = [(r["step"], r["eval_loss"]) for r in metrics[run] if r.get("eval_loss") is not None]
        if evals:
            ax.plot(*zip(*evals), "o--", color=line.get_color(), label=f"{run.name} held-out")
    ax.set(title="loss", xlabel="step", yscale="log")
    ax.legend(fontsize=7)
    for ax, name in zip(axes[1:], panels):
        for run in runs:
            for key in panels[name]:
                if key in series[run]:
                    points = sorted(series[run][key])
                    label = run.name if len(panels[name]) == 1 else f"{run.name} {key}" if len(runs) > 1 else key
                    ax.plot(*zip(*points), "o-" if len(points) <= 20 else "-", label=label, markersize=3)
        ax.set(title=name if len(panels[name]) > 1 else panels[name][0], xlabel="step")
        ax.legend(fontsize=7)
    if once:  # one compact table instead of a panel per single dot
        table_ax = fig.add_subplot(grid[rows, :])
        table_ax.axis("off")
        cells = [[("-" if key not in series[run] else
                   f"{_format_value(series[run][key][-1][1])} (step {series[run][key][-1][0]})") for run in runs]
                 for key in once]
        table = table_ax.table(cellText=cells, rowLabels=once, colLabels=[run.name for run in runs], loc="center",
                               cellLoc="center")
        table.auto_set_font_size(False)
        table.set_fontsize(8)
        table_ax.set_title("measured once", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_transfer(run: Path, out: Path) -> Path | None:
    """The run's transfer figure at `out`, when its probes score the zero-shot task; else None."""
    data = load_run(run)
    if not any(r["task"] == ZERO_SHOT_TASK for r in data["probes"]):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = transfer_figure(data["metrics"], data["probes"], kinds=data["kinds"])
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_cli(args: argparse.Namespace) -> int:
    from omni_train.probes.compare import aggregate, is_collection

    runs = [Path(r) for r in args.runs]
    if any(is_collection(run) for run in runs):
        if len(runs) > 1:
            raise ValueError(f"plot: {next(r for r in runs if is_collection(r))} is a sweep directory; give it alone")
        out = Path(args.out) if args.out else runs[0] / "plots" / "sweep.png"
        agg = aggregate(runs, with_parameters=False)
        print(f"wrote {save_sweep_figure(agg, out)}")
        robustness = sweep_robustness(agg)
        if robustness:
            title = f"{agg.title}: degraded probes, mean over seeds ({_bar_rule(agg)})"
            print(f"wrote {save_robustness_figure(robustness, out.parent / 'robustness.png', title=title)}")
        return 0
    out = Path(args.out) if args.out else runs[0] / "plots" / "curves.png"
    print(f"wrote {plot_runs(runs, out)}")
    robustness = run_robustness(runs)
    if robustness:
        print(f"wrote {save_robustness_figure(robustness, out.parent / 'robustness.png', title='degraded probes')}")
    for run in runs:
        transfer = plot_transfer(run, out.parent / f"transfer-{run.name}.png")
        if transfer is not None:
            print(f"wrote {transfer}")
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
    """Each probe's clean rows of its latest step, per-language rows only (no group_by rows)."""
    from omni_train.probes.compare import is_clean

    latest: dict[str, int] = {}
    for r in rows:
        latest[r["probe"]] = max(latest.get(r["probe"], r["step"]), r["step"])
    return [r for r in rows if r["step"] == latest[r["probe"]] and "group_by" not in r and is_clean(r)]


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
    """{language: [(step, value)]} of one probe's clean `metric` on `task`, "all" first, then the languages sorted."""
    from omni_train.probes.compare import is_clean

    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in rows:
        if (r["probe"], r["task"], r["metric"]) == (probe, task, metric) and "group_by" not in r and is_clean(r):
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


# ---------------------------------------------------------------------------------------------
# The sweep figure (probes/compare.py aggregates)


def sweep_figure(agg):
    """The loss of each variant over steps (mean over seeds, band min-max), then one panel per probe metric over
    all tasks and languages: each variant's mean with its interval (n >= 4) or +- std (n < 4) as error bar, and
    each seed's value as a dot. Returns the matplotlib Figure."""
    import matplotlib.pyplot as plt

    from omni_train.probes.compare import TRAIN, TRAIN_METRICS, is_rate

    headline = [row for row in agg.rows if row["key"][0] != TRAIN and row["key"][1] in ("all", "")
                and row["key"][2] in ("all", "") and row["key"][0] not in agg.conditions]
    train_rows = [row for row in agg.rows if row["key"][0] == TRAIN]
    panels = [None, *train_rows, *headline]  # None: the loss curves
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    ax = axes.flat[0]
    for v in agg.variants:
        by_step: dict[int, list[float]] = defaultdict(list)
        for points in agg.curves.get(v, {}).values():
            for step, loss in points:
                by_step[step].append(loss)
        if by_step:
            steps = sorted(by_step)
            line, = ax.plot(steps, [sum(by_step[s]) / len(by_step[s]) for s in steps], label=v)
            ax.fill_between(steps, [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps],
                            color=line.get_color(), alpha=0.2)
    ax.set(title="training loss (mean over seeds, band: min-max)", xlabel="step", yscale="log")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    x = list(range(len(agg.variants)))
    for ax, row in zip(axes.flat[1:], panels[1:]):
        probe, _, _, metric = row["key"]
        scale = 100.0 if is_rate(row["key"]) else 1.0
        for i, v in enumerate(agg.variants):
            stat = row["stats"].get(v)
            if stat is None:
                continue
            if stat.has_interval:
                err = [[scale * (stat.mean - stat.lo)], [scale * (stat.hi - stat.mean)]]
            else:
                err = [[scale * (stat.std or 0.0)], [scale * (stat.std or 0.0)]]
            ax.errorbar([i], [scale * stat.mean], yerr=err, fmt="o", capsize=5, markersize=7, color=f"C{i}")
            seeds = list(row["values"][v].values())
            offsets = [0.12 * (j - (len(seeds) - 1) / 2) / max(1, len(seeds) - 1) for j in range(len(seeds))]
            ax.plot([i + 0.18 + o for o in offsets], [scale * s for s in seeds], ".", color="0.45", markersize=5)
        title = (f"final {metric}" if metric in TRAIN_METRICS else metric) if probe == TRAIN else f"{probe} {metric}"
        ax.set(title=title, xticks=x,
               ylabel="%" if scale == 100.0 else "")
        ax.set_xticklabels(agg.variants, rotation=20 if len(agg.variants) > 3 else 0, fontsize=8)
        ax.set_xlim(-0.5, len(agg.variants) - 0.5)
    fig.suptitle(f"{agg.title}: mean per variant, {_bar_rule(agg)}; dots: seeds", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98))  # room for the title above the top row
    return fig


def _bar_rule(agg) -> str:
    ns = {s.n for row in agg.rows for s in row["stats"].values()}
    return ("bars: 95% t-interval" if ns and min(ns) >= 4 else "bars: ± std (n < 4)" if ns and max(ns) < 4
            else "bars: 95% t-interval where n >= 4, ± std where n < 4")


def _error(stat) -> tuple[float, float]:
    """The error bar of a compare.Stat below and above its mean: its interval (n >= 4) or +- std."""
    if stat.has_interval:
        return stat.mean - stat.lo, stat.hi - stat.mean
    return stat.std or 0.0, stat.std or 0.0


def save_sweep_figure(agg, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = sweep_figure(agg)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------------------------
# Degraded probes: each metric against severity


# (probe, metric) -> {"clean": (value, (below, above)) or None, degradation: [(severity, value, (below, above))]}
Robustness = dict[tuple[str, str], dict]


def run_robustness(runs: list[Path]) -> dict[str, Robustness]:
    """Per run with degraded probe rows (its name -> Robustness), from probes.jsonl at each probe's latest step."""
    from omni_train.data.degrade import CLEAN
    from omni_train.probes.compare import degradation_rows

    out: dict[str, Robustness] = {}
    for run in runs:
        if not (run / "probes.jsonl").is_file():
            continue
        panels: Robustness = defaultdict(lambda: {"clean": None})
        for (probe, metric, degradation, severity), row in degradation_rows(run).items():
            if degradation == CLEAN:
                panels[(probe, metric)]["clean"] = (row["value"], (0.0, 0.0))
            else:
                panels[(probe, metric)].setdefault(degradation, []).append((severity, row["value"], (0.0, 0.0)))
        if any(len(panel) > 1 for panel in panels.values()):
            out[run.name] = dict(panels)
    return out


def sweep_robustness(agg) -> dict[str, Robustness]:
    """Per variant (-> Robustness) from an aggregate's task-"all", all-languages rows: means over seeds and bars."""
    clean = {(row["key"][0], row["key"][3]): row for row in agg.rows if row["key"][1:3] == ("all", "all")
             and row["key"][0] not in agg.conditions}
    out: dict[str, Robustness] = {}
    for v in agg.variants:
        panels: Robustness = {}
        for row in agg.rows:
            if row["key"][0] not in agg.conditions or row["key"][1:3] != ("all", "all") or v not in row["stats"]:
                continue
            probe, degradation, severity = agg.conditions[row["key"][0]]
            metric = row["key"][3]
            if (probe, metric) not in panels:
                reference = clean.get((probe, metric), {"stats": {}})["stats"].get(v)
                panels[(probe, metric)] = {"clean": None if reference is None else (reference.mean, _error(reference))}
            stat = row["stats"][v]
            panels[(probe, metric)].setdefault(degradation, []).append((severity, stat.mean, _error(stat)))
        if panels:
            out[v] = panels
    return out


def robustness_figure(lines: dict[str, Robustness], *, title: str = ""):
    """A panel per (probe, metric, degradation): the value against the severity, one line per key of `lines` (a
    run or a variant) with its error bars, and that line's clean value as a dashed line in its colour. Returns
    the matplotlib Figure."""
    import matplotlib.pyplot as plt

    from omni_train.data.degrade import OPS

    panels = list(dict.fromkeys((probe, metric, degradation) for robustness in lines.values()
                                for (probe, metric), panel in robustness.items() for degradation in panel
                                if degradation != "clean"))
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (probe, metric, degradation) in zip(axes.flat, panels):
        for i, (name, robustness) in enumerate(lines.items()):
            panel = robustness.get((probe, metric), {})
            points = sorted(panel.get(degradation, []), key=lambda p: p[0])
            if not points:
                continue
            x = [p[0] for p in points]
            y = [p[1] for p in points]
            err = [[p[2][0] for p in points], [p[2][1] for p in points]]
            ax.errorbar(x, y, yerr=err if any(map(any, err)) else None, fmt="o-", color=f"C{i}", capsize=4,
                        markersize=5, label=name)
            if panel.get("clean") is not None:
                ax.axhline(panel["clean"][0], color=f"C{i}", linestyle="--", linewidth=1, label=f"{name} clean")
        field_name = OPS[degradation].severity if degradation in OPS else "severity"
        ax.set(title=f"{probe} {metric}: {degradation}", xlabel=field_name)
        ax.set_ylim(0, max(1.0, ax.get_ylim()[1]))  # from 0: one point must not fill a panel with its own noise
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97) if title else (0, 0, 1, 1))
    return fig


def save_robustness_figure(lines: dict[str, Robustness], out: Path, *, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = robustness_figure(lines, title=title)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
