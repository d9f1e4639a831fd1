"""`omni-train sweep` and `omni-train compare` over seeds: a tiny real sweep through the CLI (tests/sweeps.py),
skipped on a second invocation, aggregated to numbers recomputed here from the runs' files; the printed
commands and SLURM script; a bad grid stops before anything exists; the statistics on hand-written rows."""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
from pathlib import Path

import pytest
import yaml
from PIL import Image

from distributed import REPO
from omni_train.cli import main
from omni_train.probes.compare import aggregate, format_markdown, summarize, t_quantile
from omni_train.sweep import DONE_MARKER, _first_difference, finished, plan, split_values
from sweeps import SEEDS, VARIANTS, sweep_args, tiny_sweep

# Student's t 0.975 quantiles from printed tables (df: value)
T975 = {1: 12.706204736174707, 3: 3.182446305284263, 9: 2.2621571627409915, 29: 2.045229642132703}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def table_rows(markdown: str) -> dict[tuple[str, ...], list[str]]:
    """The markdown tables' rows: {(probe, task, language, metric): cells} and {(variant,): cells} (cost table)."""
    rows = {}
    for line in markdown.splitlines():
        if line.startswith("| ") and not line.startswith(("| probe |", "| variant |")):
            row = cells(line)
            rows[tuple(row[:4]) if len(row) != 6 else (row[0],)] = row
    return rows


# ---------------------------------------------------------------------------------------------
# Planning, printing and refusing (no training)


def test_variant_names_follow_the_grid_values():
    sweep = plan(recipe="recipes/smoke.yaml", grid_texts=["model.fusion=interleave,cross_attn", "model.projector=mlp,pool"],
                 seeds_text="0,1", extra=[], name=None, out=None, nproc=2)
    assert sweep.name == "smoke-fusion-projector" and sweep.out == Path("runs/smoke-fusion-projector")
    assert [r.name for r in sweep.runs] == [f"{v}-s{s}" for v in ("interleave_mlp", "interleave_pool", "cross_attn_mlp",
                                                                   "cross_attn_pool") for s in (0, 1)]
    assert sweep.runs[3].overrides(["train.steps=4"]) == [
        "train.steps=4", "model.fusion=interleave", "model.projector=pool", "seed=1", "name=interleave_pool-s1",
        "output_dir=runs/smoke-fusion-projector/interleave_pool-s1"]
    # values joined by "_" would collide (a_b + c, a + b_c): the key's last part is prefixed
    ambiguous = plan(recipe="r.yaml", grid_texts=["x.k=a_b,a", "y.j=c,b_c"], seeds_text="0", extra=[], name="s", out=None, nproc=1)
    assert [r.variant for r in ambiguous.runs] == ["k-a_b_j-c", "k-a_b_j-b_c", "k-a_j-c", "k-a_j-b_c"]
    assert [r.variant for r in plan(recipe="r.yaml", grid_texts=["data.x=[1, 2],a/b"], seeds_text="3", extra=[],
                                    name="s", out=None, nproc=1).runs] == ["1-2", "a-b"]
    assert split_values("a,[1, 2],{x: 1, y: 2}") == ["a", "[1, 2]", "{x: 1, y: 2}"]
    for grid, seeds, extra, message in ((["seed=1,2"], "0", [], "sets seed itself"), (["a=1,1"], "0", [], "distinct"),
                                        (["a"], "0", [], "not key=value"), (["a=1"], "0,x", [], "--seeds"),
                                        (["a=1"], "0", ["a=2"], "set per run"), (["a=1"], "0", ["name=x"], "set per run")):
        with pytest.raises(ValueError, match=message):
            plan(recipe="r.yaml", grid_texts=grid, seeds_text=seeds, extra=extra, name=None, out=None, nproc=1)


def test_finished_reads_the_marker_or_the_last_step(tmp_path):
    run = tmp_path / "run"
    assert not finished(run, 4)
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n{"step": 3, "loss": 4.0}\n')
    assert not finished(run, 4)  # half done: the sweep starts it again and it resumes from its checkpoint
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n{"step": 4, "loss": 4.0}\n')
    assert finished(run, 4)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n{"step": 4, "lo')  # cut by a crash
    assert not finished(run, 4)
    (run / DONE_MARKER).write_text("{}\n")
    assert finished(run, 4)
    assert _first_difference({"a": {"b": 1, "c": 2}, "d": 3}, {"a": {"b": 1, "c": 5}, "d": 3}) == "a.c"
    assert _first_difference({"a": {"b": 1}}, {"a": {"b": 1, "new_field": 0}}) is None  # fields added since


def test_print_and_slurm_write_the_commands(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "sw"
    args = sweep_args(corpus, out)
    dash = args.index("--")
    assert main([*args[:dash], "--nproc", "2", "--print", *args[dash:]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(VARIANTS) * len(SEEDS)
    extra = args[dash + 1:]
    for line, (variant, seed) in zip(lines, [(v, s) for v in VARIANTS for s in SEEDS]):
        assert shlex.split(line) == ["torchrun", "--standalone", "--nproc_per_node=2", "launch/pretrain.py", "--recipe",
                                     "recipes/smoke.yaml", *extra, f"train.lr={variant}", f"seed={seed}",
                                     f"name={variant}-s{seed}", f"output_dir={out / f'{variant}-s{seed}'}"]
    assert main([*args[:dash], "--nproc", "2", "--print", "--slurm", *args[dash:]]) == 0
    script = capsys.readouterr().out
    assert "#SBATCH --array=0-3\n" in script and "#SBATCH --gpus-per-node=2\n" in script
    assert "srun torchrun --nnodes=1 --nproc_per_node=2 --rdzv_backend=c10d" in script
    assert not out.exists()  # --print runs and writes nothing
    # run the script as SLURM would, with srun and scontrol standing in: task 2 starts run 2's command
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_JOB_ID": "77", "SLURM_JOB_NODELIST": "node[7-8]"}
    stub = 'srun() { printf "%s\\n" "$@"; }; scontrol() { echo node7; }; export -f srun scontrol; bash "$0"'
    script_file = tmp_path / "sweep.sh"
    script_file.write_text(script)
    argv = subprocess.run(["bash", "-c", stub, str(script_file)], env=env, capture_output=True, text=True, check=True,
                          cwd=tmp_path).stdout.splitlines()
    assert argv == ["torchrun", "--nnodes=1", "--nproc_per_node=2", "--rdzv_backend=c10d", "--rdzv_endpoint=node7:29502",
                    "--rdzv_id=77-2", *shlex.split(lines[2])[3:]]


def test_a_bad_grid_or_run_directory_stops_before_anything_exists(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "sw"
    args = sweep_args(corpus, out)
    grid = args.index("--grid") + 1
    for bad, named in (("train.lrr=1e-3,2e-3", "train.lrr"), ("train.engine=single,ddpp", "train.engine")):
        assert main([*args[:grid], bad, *args[grid + 1:]]) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and named in error, error
        assert not out.exists()
    # the recipe's own shards do not exist here: named before anything runs
    assert main(["sweep", "--recipe", "recipes/smoke.yaml", "--grid", "train.lr=1e-3", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "data.train[0].shards" in error and not out.exists(), error
    # a run directory of this sweep with another config (train.steps 3, here 2) is not resumed into
    run = out / "2e-3-s1"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"train": {"steps": 3, "lr": 2e-3}, "seed": 1}))
    assert main(args) == 2
    error = capsys.readouterr().err
    assert "2e-3-s1" in error and "train.steps (3 there, 2 here)" in error, error
    assert sorted(p.name for p in out.iterdir()) == ["2e-3-s1"]


# ---------------------------------------------------------------------------------------------
# The tiny real sweep


@pytest.fixture(scope="module")
def sweep(corpus, tmp_path_factory):
    return tiny_sweep(corpus, tmp_path_factory)


@pytest.mark.slow
def test_sweep_runs_every_cell_and_skips_them_on_a_second_invocation(sweep, corpus, capsys, monkeypatch):
    out, progress = sweep
    names = [f"{v}-s{s}" for v in VARIANTS for s in SEEDS]
    assert [line.split()[1].rstrip(":") for line in progress[:4]] == names and all(" done in " in p for p in progress[:4])
    manifest = json.loads((out / "sweep.json").read_text())
    assert manifest["grid"] == {"train.lr": list(VARIANTS)} and manifest["seeds"] == list(SEEDS)
    assert [(r["variant"], r["seed"], r["status"], r["exit_code"]) for r in manifest["runs"]] == \
        [(v, s, "done", 0) for v in VARIANTS for s in SEEDS]
    for name in names:
        run = out / name
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert (config["name"], config["output_dir"], config["train"]["lr"]) == (name, str(run), float(name.split("-s")[0]))
        assert read_jsonl(run / "metrics.jsonl")[-1]["step"] == 2 and (run / DONE_MARKER).is_file()
        assert (run / "checkpoints" / "step_00000002").is_dir() and "--standalone" in (run / "sweep.log").read_text()
    before = {name: ((out / name / "metrics.jsonl").stat().st_mtime_ns, (out / name / "sweep.log").stat().st_size)
              for name in names}
    monkeypatch.chdir(REPO)
    assert main(sweep_args(corpus, out)) == 0
    again = capsys.readouterr().out.splitlines()
    assert [line for line in again if line.startswith("[")] == \
        [f"[{i}/4] {name}: skipped, finished ({out / name})" for i, name in enumerate(names, 1)]
    assert before == {name: ((out / name / "metrics.jsonl").stat().st_mtime_ns, (out / name / "sweep.log").stat().st_size)
                      for name in names}


@pytest.mark.slow
def test_compare_aggregates_the_sweep_as_computed_by_hand(sweep, tmp_path, capsys):
    out, _ = sweep
    md = tmp_path / "table.md"
    assert main(["compare", str(out), "--out", str(md)]) == 0
    text = capsys.readouterr().out
    assert md.read_text().strip() == text.strip()
    assert "mean ± std over seeds (n < 4" in text
    rows = table_rows(text)
    runs = {(v, s): out / f"{v}-s{s}" for v in VARIANTS for s in SEEDS}
    last = {key: read_jsonl(run / "metrics.jsonl")[-1] for key, run in runs.items()}

    def cell(values, scale=1.0, digits=4, signed=False):
        mean, std = statistics.fmean(values), statistics.stdev(values)
        return f"{scale * mean:{'+' if signed else ''}.{digits}f} ± {scale * std:.{digits}f} (n={len(values)})"

    for metric in ("loss", "eval_loss"):
        by_variant = {v: [last[(v, s)][metric] for s in SEEDS] for v in VARIANTS}
        diffs = [last[("2e-3", s)][metric] - last[("1e-3", s)][metric] for s in SEEDS]
        assert rows[("train", "-", "-", metric)][4:] == [cell(by_variant["1e-3"]), cell(by_variant["2e-3"]),
                                                         cell(diffs, signed=True)]
    probes = {key: {(r["task"], r["language"], r["metric"]): r["value"] for r in read_jsonl(run / "probes.jsonl")}
              for key, run in runs.items()}
    one_task = len({task for task, _, _ in probes[("1e-3", 0)] if task != "all"}) == 1
    for task, language, metric in [k for k in probes[("1e-3", 0)]]:
        if one_task and task != "all":  # the per-task rows of a one-task probe repeat its "all" rows
            assert ("asr", task, language, metric) not in rows
            continue
        values = {v: [probes[(v, s)][(task, language, metric)] for s in SEEDS] for v in VARIANTS}
        diffs = [probes[("2e-3", s)][(task, language, metric)] - probes[("1e-3", s)][(task, language, metric)] for s in SEEDS]
        assert rows[("asr", task, language, metric)][4:] == [cell(values["1e-3"], 100, 1), cell(values["2e-3"], 100, 1),
                                                             cell(diffs, 100, 1, signed=True)]
    # cost: the parameters the runs printed themselves, positions per sample, median step time, peak memory
    for v in VARIANTS:
        printed = {line.split()[1] for s in SEEDS for line in (out / f"{v}-s{s}" / "sweep.log").read_text().splitlines()
                   if line.startswith("parameters: ")}
        metrics = [r for s in SEEDS for r in read_jsonl(runs[(v, s)] / "metrics.jsonl")]
        per_sample = statistics.fmean(last[(v, s)]["tokens_seen"] / last[(v, s)]["samples_seen"] for s in SEEDS)
        cells = rows[(v,)]
        assert [cells[1], cells[3], cells[4], cells[5]] == [
            printed.pop(), f"{per_sample:.1f}", f"{statistics.median(r['step_s'] for r in metrics):.3f}",
            f"{max(r['max_rss_mb'] for r in metrics):.0f}"]
        assert "backbone" in cells[2] and "audio_encoder" in cells[2]
    check_png(md.with_suffix(".png"))
    assert main(["plot", str(out)]) == 0
    check_png(out / "plots" / "sweep.png")
    assert main(["plot", str(runs[("1e-3", 0)]), str(runs[("2e-3", 1)]), "--out", str(tmp_path / "curves.png")]) == 0
    check_png(tmp_path / "curves.png")


def check_png(path: Path) -> None:
    """A real figure: a sizeable PNG with many colours (lines, text, error bars), not a blank canvas."""
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] >= 1000 and image.size[1] >= 400, image.size
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert len(colours) > 100, len(colours)


# ---------------------------------------------------------------------------------------------
# The statistics on hand-written runs


def test_t_quantiles_match_the_printed_tables():
    for df, value in T975.items():
        assert t_quantile(0.975, df) == pytest.approx(value, abs=1e-9)
    assert summarize([2.0]).std is None and not summarize([1.0, 2.0, 3.0]).has_interval


def write_run(root: Path, name: str, seed: int, lr: float, values: dict[str, float], losses: list[float]) -> Path:
    run = root / f"{name}-s{seed}"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"name": f"{name}-s{seed}", "output_dir": str(run), "seed": seed,
                                                     "train": {"lr": lr, "steps": 20}}))
    rows = [{"step": 10, "probe": "zs", "task": "all", "language": "all", "metric": "exact", "value": 0.99, "n": 8}]
    rows += [{"step": 20, "probe": "zs", "task": "all", "language": lang, "metric": "exact", "value": value, "n": 8}
             for lang, value in values.items()]
    rows.append({"step": 20, "probe": "zs", "task": "all", "language": "all", "metric": "exact", "value": 0.0, "n": 8,
                 "group_by": "noise", "group": "white"})  # grouped rows are not aggregated
    (run / "probes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "metrics.jsonl").write_text("".join(json.dumps(
        {"step": 10 * (i + 1), "loss": loss, "step_s": 0.5 + seed / 10 + i, "max_rss_mb": 100.0 + 10 * seed + i,
         "tokens_seen": 1000 * (i + 1), "samples_seen": 10 * (i + 1) + seed}) + "\n" for i, loss in enumerate(losses)))
    return run


def test_aggregate_by_hand_on_written_rows(tmp_path, capsys):
    exact = {"a": [0.30, 0.35, 0.40, 0.33], "b": [0.38, 0.36, 0.50, 0.41], "c": [0.20, 0.45]}
    german = {"a": [0.1, 0.2, 0.1, 0.2], "b": [0.3, 0.2, 0.4, 0.2], "c": [0.0, 0.5]}
    runs = [write_run(tmp_path, name, seed, lr, {"all": exact[name][seed], "de": german[name][seed]},
                      [5.0, 4.0 - seed / 10 - lr * 100])
            for name, lr in (("a", 1e-3), ("b", 2e-3), ("c", 3e-3)) for seed in range(len(exact[name]))]
    agg = aggregate(runs, with_parameters=False)
    assert agg.variants == ["a", "b", "c"] and agg.baseline == "a" and agg.seeds["c"] == [0, 1]
    short = write_run(tmp_path, "a", 4, 1e-3, {"all": 0.9}, [5.0])  # logged step 10 of 20: left out, named
    collected = aggregate([tmp_path], with_parameters=False)  # the folder of runs, without sweep.json
    assert collected.rows == agg.rows and collected.notes == ["a-s4: unfinished (step 10 of 20)"]
    shutil.rmtree(short)
    rows = {row["key"]: row for row in agg.rows}
    assert list(rows) == [("train", "", "", "loss"), ("zs", "all", "all", "exact"), ("zs", "all", "de", "exact")]
    a = rows[("zs", "all", "all", "exact")]["stats"]["a"]
    mean, sd = sum(exact["a"]) / 4, math.sqrt(sum((x - sum(exact["a"]) / 4) ** 2 for x in exact["a"]) / 3)
    half = T975[3] * sd / 2
    assert (a.n, a.mean, a.std) == (4, pytest.approx(mean, abs=1e-12), pytest.approx(sd, abs=1e-12))
    assert (a.lo, a.hi) == (pytest.approx(mean - half, abs=1e-9), pytest.approx(mean + half, abs=1e-9))
    d = rows[("zs", "all", "all", "exact")]["diffs"]["b"]  # paired by seed: b - a
    diffs = [b - a for a, b in zip(exact["a"], exact["b"])]
    dmean, dsd = sum(diffs) / 4, statistics.stdev(diffs)
    assert (d.mean, d.lo, d.hi) == (pytest.approx(dmean, abs=1e-12), pytest.approx(dmean - T975[3] * dsd / 2, abs=1e-9),
                                    pytest.approx(dmean + T975[3] * dsd / 2, abs=1e-9))
    c = rows[("zs", "all", "all", "exact")]["diffs"]["c"]  # seeds 0 and 1 only: mean +- std
    assert (c.n, c.mean, c.std, c.lo) == (2, pytest.approx((0.20 - 0.30 + 0.45 - 0.35) / 2, abs=1e-12),
                                          pytest.approx(statistics.stdev([-0.10, 0.10]), abs=1e-12), None)
    cost = agg.cost["a"]
    assert cost["positions_per_sample"] == pytest.approx(statistics.fmean(2000 / (20 + s) for s in range(4)))
    assert cost["step_s_median"] == pytest.approx(statistics.median([0.5 + s / 10 + i for s in range(4) for i in range(2)]))
    assert cost["max_rss_mb"] == 131.0
    text = format_markdown(agg)
    assert "mean ± std over seeds where n < 4, mean [95% t-interval] where n >= 4" in text
    b = rows[("zs", "all", "all", "exact")]["stats"]["b"]
    line = next(line for line in text.splitlines() if line.startswith("| zs | all | all | exact |"))
    assert cells(line)[4:] == [f"{100 * mean:.1f} [{100 * (mean - half):.1f}, {100 * (mean + half):.1f}] (n=4)",
                               f"{100 * b.mean:.1f} [{100 * b.lo:.1f}, {100 * b.hi:.1f}] (n=4)",
                               f"{100 * 0.325:.1f} ± {100 * statistics.stdev([0.20, 0.45]):.1f} (n=2)",
                               f"{100 * dmean:+.1f} [{100 * (dmean - T975[3] * dsd / 2):+.1f}, "
                               f"{100 * (dmean + T975[3] * dsd / 2):+.1f}] (n=4)",
                               f"{100 * c.mean:+.1f} ± {100 * c.std:.1f} (n=2)"]
    # the CLI: --baseline, the markdown file and the figure beside it; a wrong baseline is one line
    md = tmp_path / "out" / "table.md"
    assert main(["compare", *map(str, runs), "--baseline", "b", "--out", str(md)]) == 0
    assert "Δ a" in capsys.readouterr().out and md.is_file()
    check_png(md.with_suffix(".png"))
    assert main(["compare", *map(str, runs), "--languages", "all"]) == 0
    shown = {cells(line)[2] for line in capsys.readouterr().out.splitlines() if line.startswith("| zs |")}
    assert shown == {"all"}
    assert main(["compare", *map(str, runs), "--baseline", "z"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "'z' is not one of the variants: a, b, c" in error


def test_train_window_rows_are_the_mean_over_the_steps_named(tmp_path, capsys):
    """`--train-window ctc_loss@20:40`: per run, the mean of the rows logged at steps 20..40 (both ends in, the
    rows outside and those without the key left out), summarised per variant and paired like every row."""
    logged = {("a", 0): [9.0, 3.0, 2.0, 1.0, 0.5], ("a", 1): [9.0, 4.0, 3.0, 2.0, 0.5],
              ("b", 0): [9.0, 2.0, 1.0, 1.0, 0.5], ("b", 1): [9.0, 2.5, 2.0, 1.5, 0.5]}
    runs = []
    for (name, seed), ctc in logged.items():
        run = write_run(tmp_path, name, seed, 1e-3 if name == "a" else 2e-3, {"all": 0.5}, [5.0, 4.0])
        rows = [{"step": 10 * (i + 1), "loss": 1.0, "ctc_loss": value} for i, value in enumerate(ctc)]
        rows.insert(2, {"step": 25, "loss": 1.0})  # a row without the key: not a zero
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs.append(run)
    assert main(["compare", *map(str, runs), "--train-window", "ctc_loss@20:40"]) == 0
    text = capsys.readouterr().out
    window = {key: statistics.fmean(values[1:4]) for key, values in logged.items()}  # steps 20, 30, 40
    a, b = [window[("a", s)] for s in (0, 1)], [window[("b", s)] for s in (0, 1)]
    line = next(line for line in text.splitlines() if "ctc_loss, mean of steps 20-40" in line)
    diffs = [y - x for x, y in zip(a, b)]
    assert cells(line)[4:] == [f"{statistics.fmean(a):.4f} ± {statistics.stdev(a):.4f} (n=2)",
                               f"{statistics.fmean(b):.4f} ± {statistics.stdev(b):.4f} (n=2)",
                               f"{statistics.fmean(diffs):+.4f} ± {statistics.stdev(diffs):.4f} (n=2)"]
    # a metric no run logged there, or a window that is not one: one line, exit 2, nothing printed
    for bad, message in (("ctc_los@20:40", "no run logged 'ctc_los' at steps 20-40"),
                         ("ctc_loss@60:70", "no run logged 'ctc_loss' at steps 60-70"),
                         ("ctc_loss@40:20", "--train-window must be METRIC@FIRST:LAST"),
                         ("ctc_loss", "--train-window must be METRIC@FIRST:LAST")):
        assert main(["compare", *map(str, runs), "--train-window", bad]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1 and message in captured.err, (bad, captured.err)


@pytest.mark.slow
@pytest.mark.multiproc
def test_a_failed_run_is_reported_and_the_sweep_goes_on(corpus, tmp_path, capsys, monkeypatch):
    """Two cells whose probe shards do not exist (the runs' own preflight refuses them): both are tried, each
    reported with its log, exit code 1; with --fail-fast the second is not tried."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "sw"
    args = sweep_args(corpus, out)
    grid = args.index("--grid") + 1
    args[grid] = "probes.0.shards=missing/a.tar,missing/b.tar"
    args[args.index("--seeds") + 1] = "0"
    assert main(args) == 1
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert len(lines) == 2, lines
    for line, name in zip(lines, ("missing-a.tar-s0", "missing-b.tar-s0")):
        log = out / name / "sweep.log"
        # torchrun exits 1 when its worker failed; the worker's one-line error is quoted from the log
        assert "FAILED (exit 1)" in line and str(log) in line and "pretrain: error: probes[0] (asr)" in line, line
    manifest = json.loads((out / "sweep.json").read_text())
    assert [(r["status"], r["exit_code"]) for r in manifest["runs"]] == [("failed", 1), ("failed", 1)]
    sizes = [(out / name / "sweep.log").stat().st_size for name in ("missing-a.tar-s0", "missing-b.tar-s0")]
    assert main([*args[:grid - 1], "--fail-fast", *args[grid - 1:]]) == 1  # a failed run is tried again
    assert len([line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]) == 1
    assert (out / "missing-a.tar-s0" / "sweep.log").stat().st_size > sizes[0]
    assert (out / "missing-b.tar-s0" / "sweep.log").stat().st_size == sizes[1]
