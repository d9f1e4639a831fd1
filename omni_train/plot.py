"""`omni-train plot runs/A [runs/B ...]`: loss and probe curves of one or more runs, side by side, as PNG.

Writes `<first run>/plots/curves.png` (or `--out`): training loss, held-out loss and each
(probe, metric) overall value against step, one line per run, so recipes can be compared.
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
