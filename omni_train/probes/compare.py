"""`omni-train compare RUN [RUN ...]`: the transfer question of several runs, side by side.

One column per run (its transfer mechanism read from the run's config.yaml), one line per
headline number at each run's latest probe step: zero-shot speech -> code (exact, execution),
the two-step pipeline beside it, held-out transcripts and text -> code, speech/text retrieval.
Runs trained on the same corpus and budget with `model.transfer.kind` overridden make the
comparison the issue asks for: the naive baseline's zero-shot number beside each mechanism's.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

# (label, probe, task, metric): the rows, in order; a run without that probe shows "-"
HEADLINES = (
    ("zero-shot speech -> code, exact", "speech2code", "all", "exact"),
    ("zero-shot speech -> code, execution", "speech2code", "all", "execution"),
    ("pipeline speech -> text -> code, exact", "speech2code_pipeline", "all", "exact"),
    ("pipeline, execution", "speech2code_pipeline", "all", "execution"),
    ("held-out transcripts, exact", "heldout_trained", "asr", "exact"),
    ("held-out transcripts, WER", "heldout_trained", "asr", "wer"),
    ("held-out text -> code, exact", "heldout_trained", "text2code", "exact"),
    ("speech -> text recall@5", "speech_text_retrieval", "all", "recall@5_speech2text"),
)


def latest_rows(run: Path) -> dict[tuple[str, str, str], dict]:
    """(probe, task, metric) -> the all-languages row of the probe's latest step in run/probes.jsonl."""
    path = run / "probes.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the run has no probe results yet")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    latest: dict[str, int] = {}
    for r in rows:
        latest[r["probe"]] = max(latest.get(r["probe"], r["step"]), r["step"])
    return {(r["probe"], r["task"], r["metric"]): r for r in rows
            if r["step"] == latest[r["probe"]] and r["language"] == "all" and "group_by" not in r}


def run_label(run: Path) -> str:
    """The run's name and transfer mechanism, from its config.yaml."""
    try:
        config = yaml.safe_load((run / "config.yaml").read_text()) or {}
    except OSError:
        return run.name
    kind = ((config.get("model") or {}).get("transfer") or {}).get("kind", "none")
    return f"{config.get('name', run.name)} ({'naive' if kind == 'none' else kind})"


def compare_table(runs: list[Path]) -> str:
    tables = [latest_rows(run) for run in runs]
    labels = [run_label(run) for run in runs]
    width = max(12, *(len(label) + 2 for label in labels))
    steps = [max((r["step"] for r in table.values()), default=0) for table in tables]
    lines = [f"{'values in %':<40}" + "".join(f"{label:>{width}}" for label in labels),
             f"{'step':<40}" + "".join(f"{step:>{width}}" for step in steps)]
    for label, probe, task, metric in HEADLINES:
        cells = []
        for table in tables:
            row = table.get((probe, task, metric))
            cells.append("-" if row is None else f"{100 * row['value']:.1f} (n={row['n']})")
        if any(cell != "-" for cell in cells):
            lines.append(f"{label:<40}" + "".join(f"{cell:>{width}}" for cell in cells))
    return "\n".join(lines)


def compare_cli(args) -> int:
    print(compare_table([Path(run) for run in args.runs]))
    return 0
