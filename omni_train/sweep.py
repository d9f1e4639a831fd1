"""`omni-train sweep`: a grid of dotted overrides x seeds, each cell a normal training run, one after another.

    omni-train sweep --recipe recipes/ablate-fusion/interleave.yaml \
        --grid model.fusion=interleave,cross_attn,resampler --seeds 0,1,2 [--nproc 2] [-- train.steps=400]
    omni-train sweep --recipe recipes/smoke.yaml --grid train.lr=1e-3,2e-3 --seeds 0,1 --print [--slurm] > sweep.sh
    omni-train compare runs/<sweep>          # mean and interval per variant (probes/compare.py)

Each cell of the grid (the cartesian product of the `--grid` values) is a *variant*, named by its values
joined with "_" and made filesystem-safe (`model.fusion=cross_attn` -> `cross_attn`; `train.lr=1e-3
model.projector=pool` -> `1e-3_pool`; where two cells would get one name, as values holding "_" can, each
value is prefixed with its key's last part: `lr-1e-3_projector-pool`). Each (variant, seed) is the ordinary run

    torchrun --standalone --nproc_per_node=N launch/pretrain.py --recipe R [extra ...] key=value ... seed=S
        name=<variant>-s<S> output_dir=runs/<sweep>/<variant>-s<S>

with its stdout and stderr appended to `runs/<sweep>/<variant>-s<S>/sweep.log`, and one progress line per
run printed here. `runs/<sweep>/sweep.json` holds the recipe, grid, seeds, extra overrides and every run's
variant, seed, directory and status (pending, running, done, failed, interrupted), rewritten after each run.

- **Checked first.** Every cell's whole override list goes through `load_recipe`, and the shard patterns it
  trains and evaluates on are expanded, before anything runs or is written: a bad key or value stops the sweep
  with the one-line `RecipeError`. A run directory that exists with a config.yaml that differs from its cell's
  (another recipe or override under the same sweep name) stops it too, naming the first differing key.
- **Resumable.** A run is finished when torchrun exited 0 (the `SWEEP_DONE` marker written then) or its
  metrics.jsonl reached `train.steps`; finished runs are skipped, so running the same command again runs
  nothing. A run that stopped half way is started again and `train.resume: auto` continues it from its latest
  checkpoint. The grid or the seeds may grow between invocations (new cells run, old ones are skipped); the
  recipe and the extra overrides may not (another `--name`).
- **Failures.** A run that exits non-zero is reported with its log path and the error line in it, and the
  sweep goes on with the next run (one broken cell should not cost the others a night); `--fail-fast` stops
  at the first. The exit code is 1 when any run failed.
- **`--print`** writes the commands, one per line, and runs nothing; with `--slurm` an sbatch script instead:
  one array task per run (`#SBATCH --array=0-<N-1>`), the commands in a bash array, and
  `srun torchrun --rdzv_backend=c10d --rdzv_endpoint=<first node>:<port>` on the task's allocation.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DONE_MARKER = "SWEEP_DONE"   # written into a run directory when its torchrun exited 0
LOG_NAME = "sweep.log"
MANIFEST = "sweep.json"
SET_BY_SWEEP = ("seed", "name", "output_dir")  # per run; neither a grid key nor an extra override may set them
SCRIPT = Path(__file__).resolve().parents[1] / "launch" / "pretrain.py"


@dataclass(kw_only=True)
class SweepRun:
    variant: str
    seed: int
    cell: list[tuple[str, str]]  # the grid's (key, value) of this variant, in --grid order
    run_dir: Path                # runs/<sweep>/<variant>-s<seed>

    @property
    def name(self) -> str:
        return f"{self.variant}-s{self.seed}"

    def overrides(self, extra: list[str]) -> list[str]:
        """What follows `--recipe R` on this run's command line."""
        return [*extra, *(f"{k}={v}" for k, v in self.cell), f"seed={self.seed}", f"name={self.name}",
                f"output_dir={self.run_dir}"]


@dataclass(kw_only=True)
class Sweep:
    name: str
    recipe: str
    grid: list[tuple[str, list[str]]]  # (dotted key, values) in --grid order
    seeds: list[int]
    extra: list[str] = field(default_factory=list)
    out: Path
    nproc: int = 1
    runs: list[SweepRun] = field(default_factory=list)


def split_values(text: str) -> list[str]:
    """`a,b,[1, 2],{x: 1}` -> ['a', 'b', '[1, 2]', '{x: 1}']: commas inside brackets or braces belong to the value."""
    values, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "[{("
        depth -= ch in "]})"
        if ch == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += ch
    values.append(current.strip())
    return values


def parse_grid(texts: list[str]) -> list[tuple[str, list[str]]]:
    grid: list[tuple[str, list[str]]] = []
    for text in texts:
        key, sep, raw = text.partition("=")
        key = key.strip()
        if not sep or not key or not raw.strip():
            raise ValueError(f"--grid {text!r} is not key=value,value,... (for example model.fusion=interleave,cross_attn)")
        if key in SET_BY_SWEEP:
            raise ValueError(f"--grid {key}: the sweep sets {key} itself (seeds with --seeds)")
        if key in (k for k, _ in grid):
            raise ValueError(f"--grid {key} is given twice")
        values = split_values(raw)
        if any(not v for v in values) or len(set(values)) != len(values):
            raise ValueError(f"--grid {key}: values must be non-empty and distinct, got {raw!r}")
        grid.append((key, values))
    return grid


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers (0,1,2), got {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must be distinct, got {text!r}")
    return seeds


def _safe(text: str) -> str:
    """A value as part of a directory name: letters, digits and . _ + - only."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-.") or "x"


def variant_names(grid: list[tuple[str, list[str]]]) -> list[tuple[str, list[tuple[str, str]]]]:
    """(variant name, its cell) for every cell of the grid, in product order; one variant 'base' without a grid."""
    cells = [list(zip([k for k, _ in grid], values)) for values in itertools.product(*(v for _, v in grid))]
    for style in ("value", "key-value"):
        names = ["_".join(_safe(v) if style == "value" else f"{_safe(k.rpartition('.')[2])}-{_safe(v)}" for k, v in cell)
                 or "base" for cell in cells]
        if len(set(names)) == len(names):
            return list(zip(names, cells))
    raise ValueError(f"--grid values give the same directory name twice ({names}); use values that differ in "
                     "letters or digits")


def plan(*, recipe: str, grid_texts: list[str], seeds_text: str, extra: list[str], name: str | None,
         out: str | None, nproc: int) -> Sweep:
    """The sweep's runs, in order: variants in grid order, then seeds (one variant's seeds one after another)."""
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    grid = parse_grid(grid_texts)
    seeds = parse_seeds(seeds_text)
    for override in extra:
        key = override.partition("=")[0].strip()
        if key in SET_BY_SWEEP or key in (k for k, _ in grid):
            raise ValueError(f"override {override!r}: {key} is set per run by the sweep")
    if name is None:
        name = "-".join([Path(recipe).stem, *(_safe(k.rpartition(".")[2]) for k, _ in grid)])
    if not name or "/" in name:
        raise ValueError(f"--name must be a non-empty name without '/', got {name!r}")
    root = Path(out) if out else Path("runs") / name
    sweep = Sweep(name=name, recipe=recipe, grid=grid, seeds=seeds, extra=list(extra), out=root, nproc=nproc)
    sweep.runs = [SweepRun(variant=variant, seed=seed, cell=cell, run_dir=root / f"{variant}-s{seed}")
                  for variant, cell in variant_names(grid) for seed in seeds]
    return sweep


def _first_difference(old: Any, new: Any, where: str = "") -> str | None:
    """The first dotted key whose value differs; keys the old config lacks (fields added since) are ignored."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in old:
            if key not in new:
                return f"{where}{key}"
            found = _first_difference(old[key], new[key], f"{where}{key}.")
            if found:
                return found
        return None
    return None if old == new else where.rstrip(".")


def _lookup(config: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


def validate(sweep: Sweep) -> list[Any]:
    """Every run's resolved config (`load_recipe` of its whole command line), its shard patterns expanded, and
    its existing run directory's config.yaml equal to it. Raises the first problem as one line."""
    import yaml

    from omni_train.config import RecipeError, load_recipe, to_yaml
    from omni_train.data.pipeline import expand_shards

    configs, checked = [], set()
    for run in sweep.runs:
        try:
            cfg = load_recipe(sweep.recipe, run.overrides(sweep.extra))
        except RecipeError as e:
            raise RecipeError(f"{run.name}: {e}" if run.cell else str(e)) from None
        for key, sources in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval if cfg.train.eval_every else [])):
            for i, source in enumerate(sources):
                if (source.shards, cfg.data.allow_remote) not in checked:
                    try:
                        expand_shards(source.shards, allow_remote=cfg.data.allow_remote)
                    except (ValueError, OSError) as e:
                        raise ValueError(f"{run.name}: {key}[{i}].shards: {e}") from None
                    checked.add((source.shards, cfg.data.allow_remote))
        existing = run.run_dir / "config.yaml"
        if existing.is_file():
            old, new = yaml.safe_load(existing.read_text()), yaml.safe_load(to_yaml(cfg))
            key = _first_difference(old, new)
            if key is not None:
                raise ValueError(f"{run.run_dir}: its config.yaml differs from this sweep's at {key} "
                                 f"({_lookup(old, key)!r} there, {_lookup(new, key)!r} here); "
                                 "give the sweep another --name or remove that run")
        configs.append(cfg)
    return configs


def finished(run_dir: Path, steps: int) -> bool:
    """torchrun exited 0 for this run (marker), or its metrics.jsonl logged the last step."""
    if (run_dir / DONE_MARKER).is_file():
        return True
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return False
    lines = [line for line in metrics.read_text().splitlines() if line.strip()]
    try:
        return bool(lines) and json.loads(lines[-1]).get("step", 0) >= steps
    except json.JSONDecodeError:  # a line cut by a crash: not finished
        return False


def script_path() -> str:
    """launch/pretrain.py relative to the working directory where it is below it (printed commands stay short)."""
    rel = os.path.relpath(SCRIPT)
    return SCRIPT.as_posix() if rel.startswith("..") else rel


def torchrun_args(sweep: Sweep, run: SweepRun) -> list[str]:
    """What follows `torchrun <rendezvous flags>`: the script, the recipe and the run's overrides."""
    return [script_path(), "--recipe", sweep.recipe, *run.overrides(sweep.extra)]


def local_command(sweep: Sweep, run: SweepRun) -> list[str]:
    return ["torchrun", "--standalone", f"--nproc_per_node={sweep.nproc}", *torchrun_args(sweep, run)]


def slurm_script(sweep: Sweep) -> str:
    """An sbatch array script: task i runs sweep.runs[i] on one node with --nproc GPUs."""
    entries = "\n".join(f"  {shlex.quote(shlex.join(torchrun_args(sweep, run)))}" for run in sweep.runs)
    return f"""#!/bin/bash
# omni-train sweep {sweep.name}: {len(sweep.runs)} runs ({len(sweep.runs) // len(sweep.seeds)} variants x seeds \
{','.join(map(str, sweep.seeds))}), one array task each. From the repository root (SLURM opens
# --output before the script runs, so its folder must exist):
#   mkdir -p {shlex.quote(str(sweep.out))} && sbatch this-file.sh        then: omni-train compare {sweep.out}
# A task that is requeued or submitted again resumes from its latest checkpoint (train.resume: auto).
#SBATCH --job-name={sweep.name}
#SBATCH --array=0-{len(sweep.runs) - 1}
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={sweep.nproc}
#SBATCH --output={sweep.out}/slurm-%A_%a.log
set -euo pipefail
RUNS=(
{entries}
)
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
port=$((29500 + SLURM_ARRAY_TASK_ID % 1000))
eval "srun torchrun --nnodes=1 --nproc_per_node={sweep.nproc} --rdzv_backend=c10d \\
  --rdzv_endpoint=$head_node:$port --rdzv_id=$SLURM_ARRAY_JOB_ID-$SLURM_ARRAY_TASK_ID ${{RUNS[$SLURM_ARRAY_TASK_ID]}}"
"""


def _read_manifest(sweep: Sweep) -> dict | None:
    path = sweep.out / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None


def _merge_manifest(sweep: Sweep, old: dict | None) -> dict:
    """sweep.json for this invocation; runs and grid values of earlier invocations of the same sweep are kept."""
    if old is not None:
        if old.get("recipe") != sweep.recipe or old.get("overrides") != sweep.extra:
            raise ValueError(f"{sweep.out / MANIFEST}: this sweep was made with --recipe {old.get('recipe')} and "
                             f"overrides {old.get('overrides')}; this command has {sweep.recipe} and {sweep.extra}: "
                             "give it another --name")
        if list(old.get("grid", {})) != [k for k, _ in sweep.grid]:
            raise ValueError(f"{sweep.out / MANIFEST}: this sweep's grid keys are {list(old.get('grid', {}))}, this "
                             f"command has {[k for k, _ in sweep.grid]}: give it another --name")
    old = old or {}
    grid = {key: list(dict.fromkeys([*old.get("grid", {}).get(key, []), *values])) for key, values in sweep.grid}
    seeds = list(dict.fromkeys([*old.get("seeds", []), *sweep.seeds]))
    runs = {r["name"]: r for r in old.get("runs", [])}
    for run in sweep.runs:
        runs.setdefault(run.name, {})
        runs[run.name].update({"name": run.name, "variant": run.variant, "seed": run.seed, "dir": run.run_dir.name,
                               "grid": dict(run.cell)})
        runs[run.name].setdefault("status", "pending")
    return {"name": sweep.name, "recipe": sweep.recipe, "overrides": sweep.extra, "grid": grid, "seeds": seeds,
            "nproc": sweep.nproc, "runs": list(runs.values())}


def _write_manifest(sweep: Sweep, manifest: dict) -> None:
    from omni_train.train.loop import write_atomically

    write_atomically(sweep.out / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def _reason(log: Path) -> str:
    """Why a run failed, from its log: the last one-line user error (`pretrain: error: ...`, errors.py), else the
    last exception line of a traceback, else the last line; torchrun's own failure summary follows them."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    for pattern in (r"^[\w.-]+: error( \(rank \d+\))?: ", r"^(?!.*ChildFailedError)[\w.]*(Error|Exception)\b.*: "):
        found = [line for line in lines if re.match(pattern, line)]
        if found:
            return found[-1][:240]
    return lines[-1][:240] if lines else "(empty log)"


def _final_loss(run_dir: Path) -> str:
    lines = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()] \
        if (run_dir / "metrics.jsonl").is_file() else []
    return f", loss {json.loads(lines[-1])['loss']:.4f}" if lines else ""


def run_sweep(sweep: Sweep, configs: list[Any], *, fail_fast: bool = False) -> int:
    """Run every unfinished run in order; returns the number of failed runs."""
    manifest = _merge_manifest(sweep, _read_manifest(sweep))
    entries = {r["name"]: r for r in manifest["runs"]}
    sweep.out.mkdir(parents=True, exist_ok=True)
    for run, cfg in zip(sweep.runs, configs):
        if finished(run.run_dir, cfg.train.steps):
            entries[run.name]["status"] = "done"
    _write_manifest(sweep, manifest)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    failed = 0
    for i, (run, cfg) in enumerate(zip(sweep.runs, configs), 1):
        prefix = f"[{i}/{len(sweep.runs)}] {run.name}"
        if finished(run.run_dir, cfg.train.steps):
            print(f"{prefix}: skipped, finished ({run.run_dir})", flush=True)
            continue
        run.run_dir.mkdir(parents=True, exist_ok=True)
        resumed = (run.run_dir / "checkpoints").is_dir()
        log = run.run_dir / LOG_NAME
        # torchrun of this interpreter's environment, whatever is on PATH
        command = [sys.executable, "-m", "torch.distributed.run", *local_command(sweep, run)[1:]]
        print(f"{prefix}: {'resuming' if resumed else 'running'} ...", end="", flush=True)
        entries[run.name]["status"] = "running"
        _write_manifest(sweep, manifest)
        start = time.perf_counter()
        with open(log, "a", encoding="utf-8") as out:
            out.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(local_command(sweep, run))}\n")
            out.flush()
            try:
                code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
            except KeyboardInterrupt:  # Ctrl-C reached torchrun too; the same command resumes this run later
                entries[run.name]["status"] = "interrupted"
                _write_manifest(sweep, manifest)
                print(" interrupted", flush=True)
                raise
        wall_s = time.perf_counter() - start
        entries[run.name].update({"exit_code": code, "wall_s": round(wall_s, 1), "log": str(log)})
        if code == 0:
            (run.run_dir / DONE_MARKER).write_text(json.dumps({"steps": cfg.train.steps, "wall_s": round(wall_s, 1)}) + "\n")
            entries[run.name]["status"] = "done"
            print(f" done in {wall_s:.1f} s{_final_loss(run.run_dir)}", flush=True)
        else:
            failed += 1
            entries[run.name]["status"] = "failed"
            print(f" FAILED (exit {code}) after {wall_s:.1f} s; log {log}: {_reason(log)}", flush=True)
        _write_manifest(sweep, manifest)
        if code != 0 and fail_fast:
            break
    return failed


def sweep_cli(args: argparse.Namespace) -> int:
    if args.slurm and not args.print:
        raise ValueError("--slurm writes a script instead of running: give it with --print")
    sweep = plan(recipe=args.recipe, grid_texts=args.grid or [], seeds_text=args.seeds, extra=args.overrides,
                 name=args.name, out=args.out, nproc=args.nproc)
    configs = validate(sweep)
    if args.print:
        print(slurm_script(sweep) if args.slurm else
              "\n".join(shlex.join(local_command(sweep, run)) for run in sweep.runs), end="" if args.slurm else "\n")
        return 0
    failed = run_sweep(sweep, configs, fail_fast=args.fail_fast)
    done = sum(finished(run.run_dir, cfg.train.steps) for run, cfg in zip(sweep.runs, configs))
    print(f"sweep {sweep.name}: {done}/{len(sweep.runs)} runs finished, {failed} failed; "
          f"omni-train compare {sweep.out}", flush=True)
    return 1 if failed else 0
