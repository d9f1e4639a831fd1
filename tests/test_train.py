"""Training runs end to end under torchrun: DDP and DeepSpeed ZeRO-2/3 on 2 CPU ranks, checkpoints, exact resume."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distributed import REPO, torchrun

pytestmark = pytest.mark.multiproc


def show(capsys, name: str, losses: list[float], eval_losses: list[float] = ()) -> None:
    """Print a run's measured losses beside the test's dots: `make test-cpus` compares them across CPU kernel sets."""
    import torch

    with capsys.disabled():
        print(f"\n{name} ({torch.backends.cpu.get_cpu_capability()} kernels): loss {' '.join(f'{v:.3f}' for v in losses)}"
              + (f"; eval loss {' '.join(f'{v:.4f}' for v in eval_losses)}" if eval_losses else ""))


def read_metrics(run: Path) -> dict[int, dict]:
    return {row["step"]: row for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def overrides(corpus, run: Path, **extra) -> list[str]:
    base = {"name": run.name, "output_dir": str(run), "data.train.0.shards": corpus["pattern"],
            "data.eval.0.shards": str(corpus["shards"][-1]), "train.steps": 8, "train.checkpoint_every": 4,
            "train.log_every": 1, "train.eval_every": 4, "train.precision": "fp32", "train.tracker": "none",
            "train.progress": False}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


# each engine with another fusion / projector (issue 13 point 2: resume is exact for every fusion), without more
# launches; plain interleave + mlp is what most other tests run
@pytest.mark.outcome
@pytest.mark.parametrize("engine,stage,model", [
    # DDP's exact resume is make test's in test_reliability.py (bitwise, after kill -9 and SIGTERM): pool moves to test-all
    pytest.param("ddp", 0, {"model.projector": "pool"}, marks=pytest.mark.slow),
    # make test's budget (issue 15's world-size tests): ZeRO-2 + cross_attn moves to test-all, ZeRO-3 stays
    pytest.param("deepspeed", 2, {"model.fusion": "cross_attn", "model.projector": "linear"}, marks=pytest.mark.slow),
    # ZeRO-3 with the mixture-of-experts backbone too (issue 16: MoE resume within 1e-6)
    ("deepspeed", 3, {"model.fusion": "resampler", "model.preset": "tiny-moe"}),
], ids=["ddp-pool", "zero2-cross_attn-linear", "zero3-resampler-moe"])
def test_train_checkpoint_and_exact_resume(corpus, tmp_path, engine, stage, model, capsys):
    full = tmp_path / f"full-{engine}{stage}"
    torchrun("launch/pretrain.py", "--recipe", "recipes/smoke.yaml",
             *overrides(corpus, full, **{"train.engine": engine, "train.zero_stage": stage, **model}))
    metrics = read_metrics(full)
    assert sorted(metrics) == list(range(1, 9))
    losses = [metrics[s]["loss"] for s in range(1, 9)]
    show(capsys, f"{engine} zero{stage} {' '.join(f'{k}={v}' for k, v in model.items())}", losses,
         [metrics[4]["eval_loss"], metrics[8]["eval_loss"]])
    # it learns: from a random start (about ln 266 = 5.58 per byte) the loss falls fast; interleave + mlp measured
    # 5.576 -> 3.718 (mean of steps 7-8) with every engine under AVX-512, AVX2 and default kernels alike (equal to 3
    # decimals); with AVX-512: pool 5.569 -> 3.676, cross_attn + linear 5.575 -> 3.971, resampler on tiny-moe 5.644 -> 3.719
    assert sum(losses[-2:]) / 2 < losses[0] - 0.5, losses
    assert "eval_loss" in metrics[4] and "eval_loss" in metrics[8]
    assert all(0 < metrics[s]["real_token_fraction"] <= 1 and metrics[s]["tokens_per_s"] > 0 for s in metrics)
    checkpoints = sorted(p.name for p in (full / "checkpoints").iterdir())
    assert checkpoints == ["step_00000004", "step_00000008"]
    assert (full / "config.yaml").is_file()

    resumed = tmp_path / f"resumed-{engine}{stage}"
    torchrun("launch/pretrain.py", "--recipe", "recipes/smoke.yaml",
             *overrides(corpus, resumed, **{"train.engine": engine, "train.zero_stage": stage, **model,
                                            "train.resume": str(full / "checkpoints" / "step_00000004")}))
    again = read_metrics(resumed)
    assert sorted(again) == [5, 6, 7, 8]  # continues at the saved step
    for step in again:
        assert abs(again[step]["loss"] - metrics[step]["loss"]) < 1e-6, (step, again[step]["loss"], metrics[step]["loss"])
    with capsys.disabled():
        print(f"resumed at step 4: max |loss - uninterrupted| = "
              f"{max(abs(again[s]['loss'] - metrics[s]['loss']) for s in again):.1e} over steps 5-8")

    if engine == "ddp":  # resume=auto: the same run directory, a longer schedule, continues from step 8
        result = torchrun("launch/pretrain.py", "--recipe", "recipes/smoke.yaml",
                          *overrides(corpus, full, **{"train.engine": engine, "train.steps": 10, **model}))
        assert "resumed from" in result.stdout + result.stderr
        assert sorted(read_metrics(full)) == list(range(1, 11))


@pytest.mark.outcome
def test_uneven_modalities_under_zero3_do_not_hang(tmp_path, capsys):
    """Every fusion and projector (issue 13 point 2), in one launch: dist_uneven_modalities.VARIANTS."""
    result = torchrun("tests/dist_uneven_modalities.py", str(tmp_path), timeout_s=300)
    lines = [line for line in result.stdout.splitlines() if line.startswith("consistent ")]
    assert [line.split()[1] for line in lines] == ["interleave+mlp", "interleave+linear", "interleave+pool",
                                                    "cross_attn", "resampler", "moe"], result.stdout[-3000:]
    with capsys.disabled():
        print("\n" + "\n".join(lines + [line for line in result.stdout.splitlines() if line.startswith("moe: ")]))


@pytest.mark.parametrize("override,key", [("train.stepz=3", "train.stepz"), ("train.zero_stage=7", "train.zero_stage"),
                                          ("model.fusion=concat", "model.fusion")])
def test_bad_recipe_stops_before_any_work(override, key, tmp_path):
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "launch/pretrain.py", "--recipe", "recipes/smoke.yaml", override,
                             f"output_dir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - start
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0], result.stderr
    # the error comes before train() starts: it would create the run directory first. The time is imports only
    # (about 3 s on a quiet machine, 9-11 s measured on a loaded one); the limit catches a run that trains first
    assert elapsed < 30.0, elapsed
    assert not (tmp_path / "run").exists()


@pytest.mark.outcome
def test_bf16_deepspeed_with_activation_checkpointing(corpus, tmp_path, capsys):
    run = tmp_path / "bf16"
    torchrun("launch/pretrain.py", "--recipe", "recipes/smoke.yaml",
             *overrides(corpus, run, **{"train.precision": "bf16", "model.activation_checkpointing": "true",
                                        "train.steps": 5, "train.checkpoint_every": 5, "train.eval_every": 0}))
    losses = [row["loss"] for _, row in sorted(read_metrics(run).items())]
    show(capsys, "bf16 zero2", losses)
    # measured 5.576 -> 4.202..4.204 over the three kernel sets: a fall of 1.37 against the 0.5 asked
    assert len(losses) == 5 and losses[-1] < losses[0] - 0.5, losses


def test_single_process_run_logs_to_offline_wandb(corpus, tmp_path):
    import os

    run = tmp_path / "single"
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    env.pop("WANDB_API_KEY", None)
    result = subprocess.run([sys.executable, "launch/pretrain.py", "--recipe", "recipes/smoke.yaml",
                             *overrides(corpus, run, **{"train.engine": "single", "train.steps": 3, "train.checkpoint_every": 3,
                                                        "train.eval_every": 0, "train.tracker": "wandb"})],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(read_metrics(run)) == [1, 2, 3]
    assert list(run.glob("wandb/offline-run-*")), sorted(p.name for p in run.rglob("*"))[:20]
    assert (run / "checkpoints" / "step_00000003" / "model.safetensors").is_file()
