"""Faults a run survives (issue 15, train/faults.py): preemption signals, kill -9 mid-step and mid-save under torchrun
restarts, non-finite and spiking losses, a loader worker killed, a shard that vanishes. Two DDP ranks on CPU (gloo).

Each test records a row of the table `make test-reliability` prints (conftest.py): the scenario, what it checked,
and the figure it measured. The fast ones also run in `make test`; the rest are marked slow.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distributed import REPO, complete_epochs, torchrun, torchrun_command

pytestmark = [pytest.mark.multiproc, pytest.mark.reliability]

STEPS = 16


def args(corpus, run: Path, **extra) -> list[str]:
    """A deterministic 16-step DDP run of the smoke recipe, a checkpoint every 5 steps, all kept."""
    base = {"name": run.name, "output_dir": str(run), "data.train.0.shards": corpus["pattern"],
            "data.eval.0.shards": str(corpus["shards"][-1]), "data.num_workers": 0, "train.engine": "ddp",
            "train.steps": STEPS, "train.checkpoint_every": 5, "train.keep_checkpoints": 0, "train.log_every": 1,
            "train.eval_every": 0, "train.precision": "fp32", "train.deterministic": True, "train.tracker": "none",
            "train.progress": False}
    base.update(extra)
    return ["--recipe", "recipes/smoke.yaml", *(f"{k}={v}" for k, v in base.items())]


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path) -> dict[int, float]:
    found = rows(run)
    steps = [r["step"] for r in found]
    assert len(steps) == len(set(steps)), f"a step logged twice: {steps}"
    return {r["step"]: r["loss"] for r in found}


_references: dict[int, dict[int, float]] = {}


@pytest.fixture
def reference(corpus, tmp_path_factory):
    """The uninterrupted run's losses with 0 or 2 loader workers (each run once per session)."""
    def get(workers: int) -> dict[int, float]:
        if workers not in _references:
            run = tmp_path_factory.mktemp("reference") / f"reference-w{workers}"
            torchrun("launch/pretrain.py", *args(corpus, run, **{"data.num_workers": workers}))
            _references[workers] = losses(run)
            assert sorted(_references[workers]) == list(range(1, STEPS + 1))
        return _references[workers]
    return get


def checkpoints(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def max_difference(a: dict[int, float], b: dict[int, float], steps) -> float:
    return max(abs(a[s] - b[s]) for s in steps)


@pytest.mark.parametrize("workers", [2, pytest.param(0, marks=pytest.mark.slow)])
def test_kill9_mid_step_restarts_bitwise(corpus, tmp_path, reference, reliability_row, workers):
    """Rank 1 SIGKILLs itself inside step 13 (after the forward); torchrun --max-restarts=1 brings the job back, it
    resumes from step 10, and every loss equals the uninterrupted run's bit for bit."""
    run = tmp_path / "killed"
    result = torchrun("launch/pretrain.py", *args(corpus, run, **{"data.num_workers": workers}),
                      options=("--standalone", "--max-restarts=1"), env={"OMNI_TRAIN_FAULTS": "sigkill:rank=1:step=13"})
    output = result.stdout + result.stderr
    assert f"resumed from {run / 'checkpoints' / 'step_00000010'} at step 10" in output, output[-3000:]
    got, want = losses(run), reference(workers)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == want, max_difference(got, want, got)  # bitwise: == on the floats as logged (repr round-trips)
    reliability_row(f"kill -9 (rank 1, step 13), {workers} loader workers", "losses after the restart vs uninterrupted",
                    f"restart from step 10, steps 11-{STEPS}: max |loss difference| {max_difference(got, want, range(11, STEPS + 1))}")


@pytest.mark.slow
def test_kill9_during_save_resumes_the_previous_checkpoint(corpus, tmp_path, reference, reliability_row):
    """Rank 0 dies with step 10's checkpoint half written: the restart removes the partial folder with one line,
    resumes from step 5, and ends equal to the uninterrupted run."""
    run = tmp_path / "killed-saving"
    result = torchrun("launch/pretrain.py", *args(corpus, run), options=("--standalone", "--max-restarts=1"),
                      env={"OMNI_TRAIN_FAULTS": "sigkill:rank=0:step=10:at=save"})
    output = result.stdout + result.stderr
    partial = run / "checkpoints" / "step_00000010.tmp"
    assert f"removed {partial}: a checkpoint whose writing was interrupted" in output, output[-3000:]
    assert f"resumed from {run / 'checkpoints' / 'step_00000005'} at step 5" in output
    assert checkpoints(run) == ["step_00000005", "step_00000010", "step_00000015", "step_00000016"]
    got, want = losses(run), reference(0)
    assert got == want, max_difference(got, want, got)
    reliability_row("kill -9 while saving step 10 (rank 0)", "partial checkpoint removed, previous one resumed",
                    f"resumed at step 5; steps 6-{STEPS}: max |loss difference| {max_difference(got, want, range(6, STEPS + 1))}")


@pytest.mark.parametrize("sig,workers", [("sigterm", 2), pytest.param("sigusr1", 0, marks=pytest.mark.slow)])
def test_preemption_signal_checkpoints_and_exits_zero(corpus, tmp_path, reference, reliability_row, sig, workers):
    """SIGTERM / SIGUSR1 reach rank 1 during step 6 (its loader workers ignore them): every rank finishes step 6,
    writes its checkpoint and exits 0; train.resume=auto continues and ends equal to the uninterrupted run."""
    run = tmp_path / "preempted"
    start = time.perf_counter()
    result = torchrun("launch/pretrain.py", *args(corpus, run, **{"data.num_workers": workers}),
                      env={"OMNI_TRAIN_FAULTS": f"{sig}:rank=1:step=6"})
    assert result.returncode == 0
    assert "stopping on a preemption signal" in result.stdout + result.stderr
    assert checkpoints(run) == ["step_00000005", "step_00000006"]  # the step it was in, finished
    assert sorted(losses(run)) == list(range(1, 7))
    first = time.perf_counter() - start
    if sig == "sigterm":  # make test: the stop itself; the resume after it is the slow variant's (and kill -9's)
        reliability_row(f"SIGTERM (rank 1, step 6), {workers} loader workers", "checkpoint at the step it came in, exit 0",
                        f"step 6 saved, exit 0 after {first:.0f} s")
        return
    result = torchrun("launch/pretrain.py", *args(corpus, run, **{"data.num_workers": workers}))
    assert f"resumed from {run / 'checkpoints' / 'step_00000006'} at step 6" in result.stdout + result.stderr
    got, want = losses(run), reference(workers)
    assert got == want, max_difference(got, want, got)
    reliability_row(f"{sig.upper()} (rank 1, step 6), {workers} loader workers", "checkpoint at the step it came in, exit 0, resume=auto",
                    f"step 6 saved, exit 0 after {first:.0f} s; resumed, steps 7-{STEPS}: max |loss difference| "
                    f"{max_difference(got, want, range(7, STEPS + 1))}")


@pytest.mark.parametrize("before,after", [(2, 1), pytest.param(1, 2, marks=pytest.mark.slow)])
def test_world_size_change_reads_each_sample_of_an_epoch_once(corpus, tmp_path, reliability_row, before, after):
    """A DDP run checkpointed at step 3 on `before` ranks resumes on `after` for 3 more steps (2 loader workers per
    rank before, none after; a step reads about one epoch of the 24 samples): samples.jsonl (train.log_samples),
    over both runs, holds each sample of every finished epoch exactly once and no sample twice within any epoch."""
    run = tmp_path / f"world-{before}-{after}"
    extra = {"train.log_samples": True, "train.checkpoint_every": 3}
    torchrun("launch/pretrain.py", *args(corpus, run, **extra, **{"train.steps": 3, "data.num_workers": 2}), nproc=before)
    result = torchrun("launch/pretrain.py", *args(corpus, run, **extra, **{"train.steps": 6}), nproc=after)
    output = result.stdout + result.stderr
    assert f"data: {before} ranks x 2 loader workers before, {after} x 1 now" in output, output[-3000:]
    rows = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert sorted({(r["step"], r["rank"]) for r in rows}) == sorted(
        {(s, r) for s in range(1, 4) for r in range(before)} | {(s, r) for s in range(4, 7) for r in range(after)})
    read: dict[int, list[str]] = {}
    for row in rows:
        for sample, epoch in zip(row["samples"], row["epochs"], strict=True):
            read.setdefault(epoch, []).append(sample)
    last = run / "checkpoints" / "step_00000006"
    complete = complete_epochs([json.loads((last / f"data_rank{r}.json").read_text()) for r in range(after)])
    assert complete >= 2, f"the runs should finish epochs after the change: {complete}"
    everything = sorted(set(read[0]))
    assert len(everything) == len(corpus["entries"])
    for epoch, got in sorted(read.items()):
        assert len(got) == len(set(got)), f"epoch {epoch}: a sample read twice: {sorted(got)}"
        if epoch < complete:
            assert sorted(got) == everything, f"epoch {epoch}: samples lost"
    reliability_row(f"world size {before} -> {after} at step 3 (2 -> 0 loader workers)",
                    "samples.jsonl: each sample of each finished epoch once",
                    f"epochs 0-{complete - 1} ({len(everything)} samples each) read once, no repeat in epoch {max(read)}")


def read_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    state = load_file(checkpoint / "model.safetensors")
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    for i, entry in optimizer["state"].items():
        state.update({f"optimizer.{i}.{k}": v for k, v in entry.items() if isinstance(v, torch.Tensor)})
    return state


def test_nan_loss_skips_the_step_on_every_rank(corpus, tmp_path, reliability_row):
    """Rank 1's loss of step 3 is NaN: no rank updates (weights and optimizer state after step 3 equal those after
    step 2), bad_steps.jsonl names rank 1 and its samples, and training goes on. Without the guard the NaN spreads
    into the weights (checked, so the test fails if the guard does nothing)."""
    run = tmp_path / "nan"
    torchrun("launch/pretrain.py", *args(corpus, run, **{"train.steps": 5, "train.checkpoint_every": 1}),
             env={"OMNI_TRAIN_FAULTS": "nan:rank=1:step=3"})
    found = {r["step"]: r for r in rows(run)}
    assert found[3]["loss"] is None and found[3]["skipped_steps"] == 1 and found[2]["skipped_steps"] == 0
    assert all(math.isfinite(found[s]["loss"]) for s in (1, 2, 4, 5)) and found[5]["skipped_steps"] == 1
    before, after = read_state(run / "checkpoints" / "step_00000002"), read_state(run / "checkpoints" / "step_00000003")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    moved = read_state(run / "checkpoints" / "step_00000004")
    assert any(not torch.equal(after[k], moved[k]) for k in after)  # step 4 updates again
    (bad,) = [json.loads(line) for line in (run / "bad_steps.jsonl").read_text().splitlines()]
    assert bad["step"] == 3 and bad["rank"] == 1 and bad["reason"] == "non-finite loss on rank 1"
    assert bad["samples"] and all(".tar:" in s for s in bad["samples"])

    unguarded = tmp_path / "nan-unguarded"  # the protection removed: the same fault poisons the weights
    torchrun("launch/pretrain.py", *args(corpus, unguarded, **{"train.steps": 3, "train.checkpoint_every": 3,
                                                                "train.nan_guard": False}),
             env={"OMNI_TRAIN_FAULTS": "nan:rank=1:step=3"})
    poisoned = read_state(unguarded / "checkpoints" / "step_00000003")
    nan_tensors = sum(not torch.isfinite(v).all() for v in poisoned.values())
    assert nan_tensors > 0
    reliability_row("NaN loss (rank 1, step 3)", "no update on any rank; bad_steps.jsonl",
                    f"{len(after)} weight and optimizer tensors after step 3 equal step 2's; without the guard "
                    f"{nan_tensors} hold NaN")


@pytest.mark.slow
def test_bad_steps_in_a_row_stop_the_run(corpus, tmp_path, reliability_row):
    run = tmp_path / "diverged"
    result = torchrun("launch/pretrain.py", *args(corpus, run, **{"train.max_bad_steps": 2}), check=False,
                      env={"OMNI_TRAIN_FAULTS": "nan:rank=0:step=3;nan:rank=1:step=4"})
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("pretrain: error")]
    assert lines == ["pretrain: error: step 4: 2 bad steps in a row (train.max_bad_steps=2), the last: non-finite loss "
                     "on rank 1; see bad_steps.jsonl for their samples"], result.stderr[-3000:]
    assert [r["step"] for r in rows(run)][-1] == 4
    reliability_row("NaN on steps 3 and 4, max_bad_steps 2", "the run stops with one line", "stopped at step 4, exit "
                    f"{result.returncode}")


@pytest.mark.slow
def test_loss_spike_is_skipped(corpus, tmp_path, reliability_row):
    run = tmp_path / "spike"
    torchrun("launch/pretrain.py", *args(corpus, run, **{"train.steps": 12, "train.checkpoint_every": 1,
                                                          "train.spike_guard": 5, "train.spike_window": 8}),
             env={"OMNI_TRAIN_FAULTS": "spike:rank=0:step=10"})
    found = {r["step"]: r for r in rows(run)}
    assert found[10]["skipped_steps"] == 1 and found[9]["skipped_steps"] == 0 and found[10]["loss"] > 100
    before, after = read_state(run / "checkpoints" / "step_00000009"), read_state(run / "checkpoints" / "step_00000010")
    assert all(torch.equal(before[k], after[k]) for k in before)
    (bad,) = [json.loads(line) for line in (run / "bad_steps.jsonl").read_text().splitlines()]
    assert bad["reason"].startswith("loss spike:"), bad
    reliability_row("loss x1000 (rank 0, step 10), spike_guard 5", "no update; the median of the last steps judges",
                    f"step 10 loss {found[10]['loss']:.0f} skipped ({bad['reason']})")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_skips_a_nan_step(corpus, tmp_path, reliability_row, stage):
    """Under ZeRO the skip is DeepSpeed's own overflow check; the guard's verdict makes it fire on every rank."""
    from omni_train.train.checkpoint import load_checkpoint_weights

    run = tmp_path / f"nan-zero{stage}"
    torchrun("launch/pretrain.py", *args(corpus, run, **{"train.engine": "deepspeed", "train.zero_stage": stage,
                                                          "train.steps": 4, "train.checkpoint_every": 1}),
             env={"OMNI_TRAIN_FAULTS": "nan:rank=0:step=3"})
    found = {r["step"]: r for r in rows(run)}
    assert found[3]["skipped_steps"] == 1 and found[4]["skipped_steps"] == 1 and math.isfinite(found[4]["loss"])
    weights = []
    for step in (2, 3, 4):
        model = build_smoke_model()
        load_checkpoint_weights(model, run / "checkpoints" / f"step_{step:08d}")
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert any(not torch.equal(weights[1][k], weights[2][k]) for k in weights[0])
    reliability_row(f"NaN loss under ZeRO-{stage} (rank 0, step 3)", "DeepSpeed skips on every rank",
                    "weights after step 3 equal step 2's; step 4 updates")


def build_smoke_model():
    from omni_train.config import load_recipe
    from omni_train.data.text import Tokenizer
    from omni_train.model.omni import build_model

    cfg = load_recipe(str(REPO / "recipes" / "smoke.yaml"), [])
    return build_model(cfg.model, vocab_size=Tokenizer.from_path(cfg.data.tokenizer).vocab_size)


def children(pid: int) -> list[int]:
    """The processes `pid` started that run the training script (torchrun's ranks, a rank's loader workers)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return [c for c in found if b"launch/pretrain.py" in Path(f"/proc/{c}/cmdline").read_bytes()]


@pytest.mark.slow
def test_a_killed_loader_worker_stops_the_run_in_one_line(corpus, tmp_path, reliability_row):
    run = tmp_path / "oom"
    cmd, env = torchrun_command("launch/pretrain.py", *args(corpus, run, **{"data.num_workers": 2, "train.steps": 400}))
    start = time.perf_counter()
    process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not ((run / "metrics.jsonl").is_file() and len(rows(run)) >= 3):
            assert process.poll() is None and time.perf_counter() - start < 240, "the run ended before step 3"
            time.sleep(0.2)
        workers = [w for rank in children(process.pid) for w in children(rank)]
        assert len(workers) == 4, workers  # 2 ranks x 2 workers
        os.kill(workers[0], signal.SIGKILL)  # what the OOM killer does
        killed = time.perf_counter()
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    waited = time.perf_counter() - killed
    lines = [line for line in stderr.splitlines()  # torchrun's summary repeats it, indented
             if line.startswith("pretrain: error (rank") and "data loader worker died" in line]
    assert process.returncode != 0 and len(lines) == 1, stderr[-3000:]
    reliability_row("a loader worker SIGKILLed (OOM killer)", "one line, no hang", f"stopped {waited:.1f} s later: "
                    f"{lines[0][:90]}...")


@pytest.mark.slow
def test_a_shard_that_vanishes_mid_run_is_skipped_and_logged(corpus, tmp_path, reliability_row):
    import shutil

    shards = tmp_path / "shards"
    shards.mkdir()
    for path in corpus["shards"]:
        shutil.copy(path, shards / Path(path).name)
    pattern = str(shards / Path(corpus["pattern"]).name)
    run = tmp_path / "vanished"
    cmd, env = torchrun_command("launch/pretrain.py", *args(corpus, run, **{"data.train.0.shards": pattern,
                                                                             "train.steps": 40}))
    process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    gone = shards / Path(corpus["shards"][1]).name
    try:
        start = time.perf_counter()
        while not ((run / "metrics.jsonl").is_file() and len(rows(run)) >= 2):
            assert process.poll() is None and time.perf_counter() - start < 240
            time.sleep(0.2)
        gone.unlink()
        stdout, stderr = process.communicate(timeout=240)
    finally:
        process.kill()
    assert process.returncode == 0, stderr[-3000:]
    skipped = [json.loads(line) for line in (run / "skipped.jsonl").read_text().splitlines()]
    assert skipped and all(s["shard"] == str(gone) for s in skipped), skipped
    assert sorted(losses(run)) == list(range(1, 41))
    reliability_row("a shard deleted at step 2", "its samples skipped and logged, the run finishes",
                    f"{len(skipped)} samples of {gone.name} in skipped.jsonl; 40 steps done")
