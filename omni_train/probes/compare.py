"""`omni-train compare`: runs side by side, or variants over seeds with intervals, paired differences and cost.

    omni-train compare runs/demo runs/demo-naive              # single runs: today's headline table
    omni-train compare runs/<sweep> [--baseline NAME] [--languages all] [--out table.md] [--png figure.png]
    omni-train compare runs/a-s0 runs/a-s1 runs/b-s0 runs/b-s1   # grouped by config: a and b

**Single runs** (no two runs share a config): one column per run (its transfer mechanism read from the run's
config.yaml), one line per headline number at each run's latest probe step: zero-shot speech -> code (exact,
execution), the two-step pipeline beside it, held-out transcripts and text -> code, speech/text retrieval.

**Variants over seeds.** A sweep directory (`omni-train sweep`, its sweep.json names each run's variant; a
directory of run folders without one is grouped as below), or run directories whose config.yaml differ only
in seed, name and output_dir: each group is one variant. `aggregate` reads every run's rows at its latest
step (every probe, task, language and metric of probes.jsonl, no group_by rows; plus the last logged training
loss and held-out loss of metrics.jsonl) and gives, per row and variant:
- mean and, for n >= 4 seeds, the 95% Student-t interval mean +- t(0.975, n-1) s / sqrt(n); for n < 4 the
  sample standard deviation s (ddof 1) instead, since an interval from 2-3 seeds is too wide to read (the
  table's header says which rule its cells follow);
- the paired difference to the baseline variant (`--baseline`, default the first): per seed both ran,
  variant minus baseline, summarised by the same rule; pairing removes what a seed does to both variants
  alike (data order, initialisation);
- the cost: parameters (the model built from the run's config.yaml on the meta device, counted per top-level
  module), backbone positions per sample (real tokens / samples seen, the last metrics.jsonl row), the median
  `step_s` and the peak `max_rss_mb` over the logged steps.
A probe whose items are all of one task shows only its task "all" rows (the per-task rows repeat them);
`--languages all` keeps only the rows over every language (and the training rows).

**Degradations** (a probe's `degrade:`, issue 14): rows of a degraded pass stay apart from the clean ones.
Single runs get a block under the headlines, per probe and metric (task and language "all"): the clean
value, then one line per degradation and severity. Aggregated, each degraded pass is a row of its own whose
probe column reads "<probe> · <op> <field>=<severity>" (`Aggregate.conditions` maps it back to the probe,
degradation and severity, for `plot.robustness_figure`); the clean rows keep their plain probe name, so a run
with degradations and one without line up on them.
Runs without metrics.jsonl or short of their `train.steps` are left out, and named under the table.
`format_markdown` prints it; `plot.sweep_figure` draws it (`--png`, or beside `--out`).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
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
PER_RUN_KEYS = ("seed", "name", "output_dir")  # what differs between the seeds of one variant
TRAIN = "train"        # the probe column of the rows read from metrics.jsonl
TRAIN_METRICS = ("loss", "eval_loss")  # their last logged value
WINDOW_FORMAT = "METRIC@FIRST:LAST"
MIN_INTERVAL_N = 4     # from this many seeds on, a 95% t-interval; below, mean +- std


def is_clean(row: dict) -> bool:
    """A row of undegraded items: a probe without `degrade:`, or the clean pass of one with it."""
    return row.get("degradation", "none") == "none"  # degrade.CLEAN, spelled out: reading rows never imports torch


def _latest_overall(run: Path) -> list[dict]:
    """The all-languages rows (no group_by) of each probe's latest step in run/probes.jsonl."""
    path = run / "probes.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the run has no probe results yet")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    latest: dict[str, int] = {}
    for r in rows:
        latest[r["probe"]] = max(latest.get(r["probe"], r["step"]), r["step"])
    return [r for r in rows if r["step"] == latest[r["probe"]] and r["language"] == "all" and "group_by" not in r]


def latest_rows(run: Path) -> dict[tuple[str, str, str], dict]:
    """(probe, task, metric) -> the all-languages clean row of the probe's latest step in run/probes.jsonl."""
    return {(r["probe"], r["task"], r["metric"]): r for r in _latest_overall(run) if is_clean(r)}


def degradation_rows(run: Path) -> dict[tuple[str, str, str, str], dict]:
    """(probe, metric, degradation, severity) -> the task-"all", all-languages row of the probe's latest step, for
    the probes run with degradations (their clean rows under degradation "none", severity None)."""
    rows = [r for r in _latest_overall(run) if r["task"] == "all" and "degradation" in r]
    return {(r["probe"], r["metric"], r["degradation"], r["severity"]): r for r in rows}


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
    lines += _degradation_lines(runs, width)
    return "\n".join(lines)


def _degradation_lines(runs: list[Path], width: int) -> list[str]:
    """Under the headlines: per probe and metric run with degradations, its clean value and each condition's."""
    degraded = [degradation_rows(run) for run in runs]
    keys = list(dict.fromkeys(k for table in degraded for k in table))
    if not keys:
        return []
    from omni_train.data.degrade import CLEAN, severity_label  # imports torch: only for runs with degradations

    lines = []
    for probe, metric in dict.fromkeys((k[0], k[1]) for k in keys):
        lines.append(f"{probe} {metric} (all tasks), degraded")
        for _, _, degradation, severity in [k for k in keys if k[:2] == (probe, metric)]:
            label = "  clean" if degradation == CLEAN else "  " + severity_label(degradation, severity)
            cells = ["-" if (row := table.get((probe, metric, degradation, severity))) is None
                     else f"{100 * row['value']:.1f} (n={row['n']})" for table in degraded]
            lines.append(f"{label:<40}" + "".join(f"{cell:>{width}}" for cell in cells))
    return lines


# ---------------------------------------------------------------------------------------------
# Statistics over seeds


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with df degrees of freedom (scipy): t_quantile(0.975, 3) = 3.1824463."""
    from scipy.stats import t

    return float(t.ppf(p, df))


@dataclass(frozen=True)
class Stat:
    """Values over seeds: mean, sample std (None for n = 1), and for n >= 4 the 95% t-interval."""
    n: int
    mean: float
    std: float | None
    lo: float | None = None
    hi: float | None = None

    @property
    def has_interval(self) -> bool:
        return self.lo is not None


def summarize(values: list[float]) -> Stat:
    n = len(values)
    mean = math.fsum(values) / n
    std = statistics.stdev(values) if n > 1 else None
    if n < MIN_INTERVAL_N:
        return Stat(n=n, mean=mean, std=std)
    half = t_quantile(0.975, n - 1) * std / math.sqrt(n)
    return Stat(n=n, mean=mean, std=std, lo=mean - half, hi=mean + half)


# ---------------------------------------------------------------------------------------------
# Runs -> variants


@dataclass(kw_only=True)
class Run:
    path: Path
    config: dict
    seed: int
    variant: str = ""


def _read_config(run: Path) -> dict:
    path = run / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {run} is not a run directory")
    return yaml.safe_load(path.read_text()) or {}


def is_collection(path: Path) -> bool:
    """A sweep directory (sweep.json), or a folder of run directories that is not a run itself."""
    if (path / "sweep.json").is_file():
        return True
    return (path.is_dir() and not (path / "config.yaml").exists() and not (path / "probes.jsonl").exists()
            and any((child / "config.yaml").is_file() for child in path.iterdir()))


def _flatten(config: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _variant_key(config: dict) -> str:
    return json.dumps({k: v for k, v in config.items() if k not in PER_RUN_KEYS}, sort_keys=True, default=str)


def _seedless_name(run: Run) -> str | None:
    name, _, seed = str(run.config.get("name", run.path.name)).rpartition("-s")
    return name if name and seed == str(run.seed) else None


def group_runs(runs: list[Run]) -> list[str]:
    """Set each run's variant by its config without PER_RUN_KEYS; returns the variants in first-seen order.

    A variant is named by its runs' common name without `-s<seed>` when they have one, else by the dotted
    keys where the variants' configs differ (`train.lr=0.001`)."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(_variant_key(run.config), []).append(run)
    flats = {key: _flatten({k: v for k, v in members[0].config.items() if k not in PER_RUN_KEYS})
             for key, members in groups.items()}
    differing = sorted({k for flat in flats.values() for k in flat
                        if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flats.values()}) > 1})
    names = []
    for key, members in groups.items():
        stems = {_seedless_name(r) for r in members}
        name = stems.pop() if len(stems) == 1 and None not in stems else None
        if name is None or name in names:
            name = ",".join(f"{k}={flats[key].get(k)}" for k in differing) or members[0].path.name
        for r in members:
            r.variant = name
        names.append(name)
    return names


def collect(paths: list[Path]) -> tuple[list[Run], list[str], dict | None, list[str]]:
    """(finished runs, variants in order, the sweep manifest or None, notes on the runs left out: those without
    results or short of their train.steps)."""
    from omni_train.plot import read_jsonl

    manifest, notes, runs = None, [], []
    if len(paths) == 1 and is_collection(paths[0]):
        root = paths[0]
        if (root / "sweep.json").is_file():
            manifest = json.loads((root / "sweep.json").read_text())
            candidates = [(root / r["dir"], r["variant"]) for r in manifest["runs"]]
        else:
            candidates = [(child, None) for child in sorted(root.iterdir()) if (child / "config.yaml").is_file()]
    else:
        for path in paths:
            if is_collection(path):
                raise ValueError(f"compare: {path} is a sweep directory; give it alone, or give run directories")
        candidates = [(path, None) for path in paths]
    for path, variant in candidates:
        if not (path / "config.yaml").is_file() or not (path / "metrics.jsonl").is_file():
            notes.append(f"{path.name}: no results yet")
            continue
        config = _read_config(path)
        steps = (config.get("train") or {}).get("steps")
        logged = [r["step"] for r in read_jsonl(path / "metrics.jsonl")]
        if steps and (not logged or logged[-1] < steps):  # its numbers would be from another step than the others'
            notes.append(f"{path.name}: unfinished (step {logged[-1] if logged else 0} of {steps})")
            continue
        runs.append(Run(path=path, config=config, seed=int(config.get("seed", 0)), variant=variant or ""))
    if not runs:
        raise FileNotFoundError(f"compare: no run with results in {', '.join(map(str, paths))}")
    if manifest is not None:
        variants = list(dict.fromkeys(r.variant for r in runs))
    else:
        variants = group_runs(runs)
    return runs, variants, manifest, notes


# ---------------------------------------------------------------------------------------------
# Aggregation


def degraded_probe(probe: str, degradation: str, severity) -> str:
    """The probe column of a degraded pass's aggregated rows: "speech2code · white_noise snr_db=10"."""
    from omni_train.data.degrade import severity_label

    return f"{probe} · {severity_label(degradation, severity)}"


@dataclass(frozen=True)
class TrainWindow:
    """A training metric's mean over the rows metrics.jsonl logged at steps first..last (`--train-window
    ctc_loss@450:650`): a number of the middle of a run, such as how far a recognizer is off its plateau, where
    the last logged value says how the run ended."""
    metric: str
    first: int
    last: int

    @classmethod
    def parse(cls, text: str) -> TrainWindow:
        metric, _, steps = text.partition("@")
        first, _, last = steps.partition(":")
        if not (metric and first.isdigit() and last.isdigit() and int(first) <= int(last)):
            raise ValueError(f"--train-window must be {WINDOW_FORMAT} with steps FIRST <= LAST "
                             f"(e.g. ctc_loss@450:650), got {text!r}")
        return cls(metric, int(first), int(last))

    @property
    def label(self) -> str:
        return f"{self.metric}, mean of steps {self.first}-{self.last}"

    def value(self, metrics: list[dict]) -> float | None:
        logged = [r[self.metric] for r in metrics
                  if self.first <= r.get("step", -1) <= self.last and r.get(self.metric) is not None]
        return statistics.fmean(logged) if logged else None


def run_values(run: Path, conditions: dict[str, tuple[str, str, object]] | None = None,
               windows: tuple[TrainWindow, ...] = ()) -> dict[tuple[str, str, str, str], float]:
    """(probe, task, language, metric) -> value: every probe row at the probe's latest step (no group_by rows),
    ("train", "", "", m) for the last logged value of each TRAIN_METRICS in metrics.jsonl, and ("train", "", "",
    window.label) for each of `windows` the run logged. A degraded pass's rows have `degraded_probe` as their probe;
    `conditions` (when given) gets label -> (probe, degradation, severity)."""
    from omni_train.plot import read_jsonl

    values: dict[tuple[str, str, str, str], float] = {}
    metrics = read_jsonl(run / "metrics.jsonl")
    for metric in TRAIN_METRICS:
        logged = [r[metric] for r in metrics if r.get(metric) is not None]
        if logged:
            values[(TRAIN, "", "", metric)] = logged[-1]
    for window in windows:
        if (mean := window.value(metrics)) is not None:
            values[(TRAIN, "", "", window.label)] = mean
    rows = [r for r in read_jsonl(run / "probes.jsonl") if "group_by" not in r]
    latest: dict[str, int] = {}
    for r in rows:
        latest[r["probe"]] = max(latest.get(r["probe"], r["step"]), r["step"])
    for r in rows:
        if r["step"] == latest[r["probe"]] and r.get("value") is not None:
            probe = r["probe"]
            if not is_clean(r):
                probe = degraded_probe(r["probe"], r["degradation"], r["severity"])
                if conditions is not None:
                    conditions[probe] = (r["probe"], r["degradation"], r["severity"])
            values[(probe, r["task"], r["language"], r["metric"])] = r["value"]
    return values


def parameter_counts(run: Path) -> dict[str, int] | None:
    """{'total': n, <top-level module>: n, ...} of the model the run's config.yaml builds, on the meta device (no
    memory, no weights read); None for models built from pretrained components' files."""
    import torch

    from omni_train.config import load_recipe
    from omni_train.data.text import Tokenizer
    from omni_train.model.omni import build_model

    cfg = load_recipe(run / "config.yaml")
    if any(getattr(cfg.model, name, None) for name in ("pretrained_backbone", "pretrained_audio", "pretrained_vision")):
        return None
    vocab_size = Tokenizer.from_path(cfg.data.tokenizer).vocab_size
    with torch.device("meta"):
        model = build_model(cfg.model, vocab_size=vocab_size, load_weights=False)
    counts = {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}
    counts = {name: n for name, n in counts.items() if n}
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def run_cost(run: Path) -> dict:
    """From metrics.jsonl: backbone positions per sample, median step_s, peak max_rss_mb (None where not logged)."""
    from omni_train.plot import read_jsonl

    metrics = read_jsonl(run / "metrics.jsonl")
    last = metrics[-1] if metrics else {}
    step_s = [r["step_s"] for r in metrics if r.get("step_s") is not None]
    rss = [r["max_rss_mb"] for r in metrics if r.get("max_rss_mb") is not None]
    per_sample = last["tokens_seen"] / last["samples_seen"] if last.get("samples_seen") and "tokens_seen" in last else None
    return {"positions_per_sample": per_sample, "step_s": step_s, "max_rss_mb": max(rss) if rss else None}


@dataclass(kw_only=True)
class Aggregate:
    """What `aggregate` returns: `rows` in table order, each {key, values: {variant: {seed: value}},
    stats: {variant: Stat}, diffs: {variant: Stat} (not the baseline's)}; `cost` and the loss `curves` per
    variant; `conditions`: the probe column of each degraded pass's rows -> (probe, degradation, severity)."""
    title: str
    variants: list[str]
    baseline: str
    seeds: dict[str, list[int]]
    rows: list[dict] = field(default_factory=list)
    cost: dict[str, dict] = field(default_factory=dict)
    curves: dict[str, dict[int, list[tuple[int, float]]]] = field(default_factory=dict)  # variant -> seed -> (step, loss)
    notes: list[str] = field(default_factory=list)
    conditions: dict[str, tuple[str, str, object]] = field(default_factory=dict)


def _row_order(key: tuple[str, str, str, str], first_seen: dict) -> tuple:
    probe, task, language, metric = key
    return (probe != TRAIN, first_seen[probe], task != "all", task, language != "all", language, first_seen[metric])


def _shown(keys: list[tuple[str, str, str, str]], languages: list[str] | None) -> list[tuple[str, str, str, str]]:
    """The rows worth a line: a probe whose items are all of one task has its per-task rows equal to its
    task-"all" rows, so only the latter stay; with `languages`, only the rows of those languages (and train)."""
    tasks: dict[str, set[str]] = defaultdict(set)
    for probe, task, _, _ in keys:
        if task not in ("all", ""):
            tasks[probe].add(task)
    return [k for k in keys if (k[1] in ("all", "") or len(tasks[k[0]]) > 1)
            and (languages is None or k[0] == TRAIN or k[2] in languages)]


def aggregate(paths: list[Path], *, baseline: str | None = None, with_parameters: bool = True,
              languages: list[str] | None = None, windows: tuple[TrainWindow, ...] = ()) -> Aggregate:
    """The runs under `paths` (a sweep directory, or run directories) grouped into variants and summarised;
    `with_parameters=False` skips the meta-device model builds (the plots do not show them); `languages`
    keeps only those languages' rows (e.g. ["all"]); `windows` adds a row per TrainWindow (one that no run
    logged is an error: a misspelt metric would otherwise be a row that silently is not there)."""
    from omni_train.plot import read_jsonl

    runs, variants, manifest, notes = collect(paths)
    if baseline is None:
        baseline = variants[0]
    elif baseline not in variants:
        raise ValueError(f"--baseline {baseline!r} is not one of the variants: {', '.join(variants)}")
    conditions: dict[str, tuple[str, str, object]] = {}
    values = {run.path: run_values(run.path, conditions, windows) for run in runs}
    for window in windows:
        if not any((TRAIN, "", "", window.label) in v for v in values.values()):
            raise ValueError(f"--train-window {window.metric}@{window.first}:{window.last}: no run logged "
                             f"{window.metric!r} at steps {window.first}-{window.last} in its metrics.jsonl")
    first_seen: dict[str, int] = {}
    for run in runs:
        for probe, _, _, metric in values[run.path]:
            first_seen.setdefault(probe, len(first_seen))
            first_seen.setdefault(metric, len(first_seen))
    keys = _shown(sorted({k for v in values.values() for k in v}, key=lambda k: _row_order(k, first_seen)), languages)
    by_variant = {v: [r for r in runs if r.variant == v] for v in variants}
    for v, members in by_variant.items():
        seeds = [r.seed for r in members]
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"compare: variant {v} has two runs of one seed ({', '.join(str(r.path) for r in members)})")
    title = (f"sweep {manifest['name']} (recipe {manifest['recipe']})" if manifest else
             f"{len(runs)} runs: {', '.join(r.path.name for r in runs)}")
    agg = Aggregate(title=title, variants=variants, baseline=baseline, notes=notes, conditions=conditions,
                    seeds={v: sorted(r.seed for r in by_variant[v]) for v in variants})
    for key in keys:
        per_seed = {v: {r.seed: values[r.path][key] for r in by_variant[v] if key in values[r.path]} for v in variants}
        stats = {v: summarize(list(s.values())) for v, s in per_seed.items() if s}
        diffs = {}
        for v in variants:
            paired = sorted(set(per_seed[v]) & set(per_seed[baseline]))
            if v != baseline and paired:
                diffs[v] = summarize([per_seed[v][s] - per_seed[baseline][s] for s in paired])
        agg.rows.append({"key": key, "values": per_seed, "stats": stats, "diffs": diffs})
    for v, members in by_variant.items():
        agg.curves[v] = {r.seed: [(m["step"], m["loss"]) for m in read_jsonl(r.path / "metrics.jsonl")
                                  if m.get("loss") is not None] for r in members}
        costs = [run_cost(r.path) for r in members]
        per_sample = [c["positions_per_sample"] for c in costs if c["positions_per_sample"] is not None]
        step_s = [s for c in costs for s in c["step_s"]]
        rss = [c["max_rss_mb"] for c in costs if c["max_rss_mb"] is not None]
        try:
            parameters = parameter_counts(members[0].path) if with_parameters else None
        except (ValueError, OSError) as e:  # a config this code cannot build (older or hand-written): no count
            parameters = None
            agg.notes.append(f"{v}: no parameter count ({str(e).splitlines()[0][:120]})")
        agg.cost[v] = {"parameters": parameters,
                       "positions_per_sample": statistics.fmean(per_sample) if per_sample else None,
                       "step_s_median": statistics.median(step_s) if step_s else None,
                       "max_rss_mb": max(rss) if rss else None}
    return agg


# ---------------------------------------------------------------------------------------------
# Output


def is_rate(key: tuple[str, str, str, str]) -> bool:
    """Probe values are rates in [0, 1] (printed in %); the training rows are losses."""
    return key[0] != TRAIN


def format_stat(stat: Stat | None, *, rate: bool, signed: bool = False) -> str:
    """'36.6 ± 2.1 (n=3)' below MIN_INTERVAL_N seeds, '36.6 [30.1, 43.1] (n=4)' from it on, '-' for no value."""
    if stat is None:
        return "-"
    scale, digits = (100.0, 1) if rate else (1.0, 4)
    number = lambda x: f"{scale * x:{'+' if signed else ''}.{digits}f}"  # noqa: E731
    if stat.has_interval:
        spread = f" [{number(stat.lo)}, {number(stat.hi)}]"
    else:
        spread = "" if stat.std is None else f" ± {scale * stat.std:.{digits}f}"
    return f"{number(stat.mean)}{spread} (n={stat.n})"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def _rule(agg: Aggregate) -> str:
    ns = {s.n for row in agg.rows for group in (row["stats"], row["diffs"]) for s in group.values()}
    if ns and min(ns) >= MIN_INTERVAL_N:
        return "mean [95% t-interval] over seeds"
    if ns and max(ns) < MIN_INTERVAL_N:
        return f"mean ± std over seeds (n < {MIN_INTERVAL_N}: std, not an interval)"
    return f"mean ± std over seeds where n < {MIN_INTERVAL_N}, mean [95% t-interval] where n >= {MIN_INTERVAL_N}"


def format_markdown(agg: Aggregate) -> str:
    """The aggregated rows and the cost per variant as two markdown tables."""
    others = [v for v in agg.variants if v != agg.baseline]
    seeds = "; ".join(f"{v}: {','.join(map(str, s))}" for v, s in agg.seeds.items())
    lines = [f"## {agg.title}", "",
             f"Cells: {_rule(agg)} (n = seeds; {seeds}). Probe values in % at each run's latest probe step, "
             f"differences in points; `train` rows: the last logged loss, or a metric's mean over the steps named; a probe of one task: its task `all` rows only. "
             f"Δ: paired difference to `{agg.baseline}` over the seeds both ran (variant minus baseline).", ""]
    header = ["probe", "task", "language", "metric", *agg.variants, *(f"Δ {v}" for v in others)]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in agg.rows:
        probe, task, language, metric = row["key"]
        rate = is_rate(row["key"])
        cells = [probe, task or "-", language or "-", metric,
                 *(format_stat(row["stats"].get(v), rate=rate) for v in agg.variants),
                 *(format_stat(row["diffs"].get(v), rate=rate, signed=True) for v in others)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Cost per variant: parameters of the model (meta-device build of its config), backbone positions "
                  "per sample (real tokens / samples seen), median step time, peak resident memory per process.", "",
              "| variant | parameters | per module | positions / sample | step s (median) | peak RSS MB |",
              "|---|---|---|---|---|---|"]
    for v in agg.variants:
        cost = agg.cost[v]
        params = cost["parameters"]
        modules = " · ".join(f"{name} {_count(n)}" for name, n in params.items() if name != "total") if params else "-"
        cells = [v, f"{params['total']:,}" if params else "-", modules,
                 "-" if cost["positions_per_sample"] is None else f"{cost['positions_per_sample']:.1f}",
                 "-" if cost["step_s_median"] is None else f"{cost['step_s_median']:.3f}",
                 "-" if cost["max_rss_mb"] is None else f"{cost['max_rss_mb']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if agg.notes:
        lines += ["", "Left out: " + "; ".join(agg.notes)]
    return "\n".join(lines)


def single_runs(paths: list[Path]) -> bool:
    """No sweep directory and no two runs of one variant: nothing to aggregate (today's side-by-side table)."""
    if any(is_collection(p) for p in paths):
        return False
    keys = [_variant_key(_read_config(p)) if (p / "config.yaml").is_file() else str(p) for p in paths]
    return len(set(keys)) == len(keys)


def compare_cli(args) -> int:
    paths = [Path(run) for run in args.runs]
    windows = tuple(TrainWindow.parse(text) for text in args.train_window or ())
    if single_runs(paths) and args.baseline is None and args.png is None and args.languages is None and not windows:
        text = compare_table(paths)
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
        return 0
    languages = args.languages.split(",") if args.languages else None
    agg = aggregate(paths, baseline=args.baseline, languages=languages, windows=windows)
    text = format_markdown(agg)
    print(text)
    written = []
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
        written.append(args.out)
    png = args.png or (str(Path(args.out).with_suffix(".png")) if args.out else None)
    if png:
        from omni_train.plot import save_sweep_figure

        written.append(str(save_sweep_figure(agg, Path(png))))
    if written:  # on stderr: `compare ... > table.md` keeps the table alone
        print(f"wrote {', '.join(written)}", file=sys.stderr)
    return 0
