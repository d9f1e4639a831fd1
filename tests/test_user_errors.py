"""Every user error at every entry point is one line and exit code 2, and a failed launch changes nothing.

Each case runs a real command (`launch/pretrain.py`, `omni-train ...`) in a subprocess, as a user would,
on the shared test corpus. The line must start with the program's name, name what is wrong, and come
without a traceback; `OMNI_DEBUG=1` brings the traceback back. A launch that fails leaves its run
directory byte for byte as it was (config.yaml included). The table of cases is the one in the issue
that asked for this (#11): shards, URLs, over-long samples, resume targets, checkpoints, exports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distributed import REPO, free_port

ENV = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def pretrain(corpus, run: Path, *overrides: str, debug: bool = False, path: str | None = None) -> subprocess.CompletedProcess:
    base = [f"name={run.name}", f"output_dir={run}", f"data.train.0.shards={corpus['pattern']}",
            f"data.eval.0.shards={corpus['shards'][-1]}", "train.engine=single", "train.steps=2", "train.eval_every=0",
            "train.precision=fp32", "train.tracker=none", "train.progress=false", "data.num_workers=1", "probes=[]"]
    env = {**ENV, "OMNI_DEBUG": "1"} if debug else dict(ENV)
    if path is not None:
        env["PATH"] = path
    return subprocess.run([sys.executable, "launch/pretrain.py", "--recipe", "recipes/smoke.yaml", *base, *overrides],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def omni_train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "omni_train.cli", *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=300)


def listing(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_one_line(result: subprocess.CompletedProcess, prog: str, *expected: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    # the skip log's warnings ("skipped SHARD:KEY: reason") may come first: they report skips, not the error
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("skipped ")]
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    for text in expected:
        assert text in lines[0], (text, lines[0])
    print(f"\n  exit {result.returncode}: {lines[0]}", end="")
    return lines[0]


@pytest.fixture()
def run_dir(tmp_path) -> Path:
    """An existing run directory whose contents a failed launch must not touch."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("name: run  # the previous launch's resolved recipe\n")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    return run


def bad_shards(tmp_path: Path) -> dict[str, str]:
    not_a_tar = tmp_path / "not-a-tar.tar"
    not_a_tar.write_bytes(b"\x00garbage, not a tar archive" * 100)
    unreadable = tmp_path / "unreadable.tar"
    unreadable.write_bytes(b"")
    return {"nothing": str(tmp_path / "nothing-*.tar"), "missing": str(tmp_path / "absent-{000000..000001}.tar"),
            "remote": "https://example.invalid/shard-000000.tar", "pipe": f"pipe:cat {tmp_path}/a b.tar",
            "not_a_tar": str(not_a_tar)}


@pytest.mark.parametrize("case", ["nothing", "missing", "remote", "pipe", "resume-missing", "resume-corrupt",
                                  "resume-engine", "resume-world", "bad-key", "no-sandbox"])
def test_launch_errors_are_one_line_and_leave_the_run_directory_alone(corpus, run_dir, tmp_path, case):
    shards = bad_shards(tmp_path)
    corrupt = tmp_path / "ckpt"
    corrupt.mkdir()
    (corrupt / "trainer_state.json").write_text("{not json")
    engine_mismatch = tmp_path / "ds-ckpt"
    (engine_mismatch / "engine").mkdir(parents=True)
    (engine_mismatch / "trainer_state.json").write_text(json.dumps({"step": 4, "tokens_seen": 1, "samples_seen": 1,
                                                                     "world_size": 1}))
    ds_two_ranks = tmp_path / "ds-ckpt-2"
    (ds_two_ranks / "engine").mkdir(parents=True)
    (ds_two_ranks / "trainer_state.json").write_text(json.dumps({"step": 4, "tokens_seen": 1, "samples_seen": 1,
                                                                 "world_size": 2}))
    override, expected = {
        "nothing": (f"data.train.0.shards={shards['nothing']}", ["data.train[0].shards", "matches no file"]),
        "missing": (f"data.train.0.shards={shards['missing']}", ["absent-000000.tar does not exist"]),
        "remote": (f"data.train.0.shards={shards['remote']}", ["https://example.invalid", "data.allow_remote=true"]),
        "pipe": (f"data.train.0.shards={shards['pipe']}", [shards["pipe"], "data.allow_remote=true"]),
        "resume-missing": (f"train.resume={tmp_path / 'nope'}", ["train.resume", "nope is not a checkpoint folder"]),
        "resume-corrupt": (f"train.resume={corrupt}", ["train.resume", "trainer_state.json is not a trainer state"]),
        "resume-engine": (f"train.resume={engine_mismatch}", ["train.engine=deepspeed", "train.engine=single"]),
        # single / ddp checkpoints resume at any world size; ZeRO's optimizer partitions do not regroup
        "resume-world": ((f"train.resume={ds_two_ranks}", "train.engine=deepspeed"),
                         ["written by 2 ranks under DeepSpeed", "this run has 1: resume it with 2"]),
        "bad-key": ("train.stepz=3", ["train.stepz"]),
        # a probe that would run generated code (text2code items) on a machine without bubblewrap
        "no-sandbox": (f"probes=[{{name: code, shards: '{corpus['pattern']}'}}]",
                       ["probes[0] (code): execution match needs bubblewrap", "refusing to run generated code unconfined"]),
    }[case]
    path = str(Path(sys.executable).parent) if case == "no-sandbox" else None  # no bwrap on this PATH
    overrides = override if isinstance(override, tuple) else (override,)
    before = listing(run_dir)
    assert_one_line(pretrain(corpus, run_dir, *overrides, path=path), "pretrain", *expected)
    assert listing(run_dir) == before  # config.yaml is written only once everything is checked

    debug = pretrain(corpus, run_dir, *overrides, debug=True, path=path)
    assert debug.returncode == 2 and "Traceback (most recent call last)" in debug.stderr


@pytest.mark.parametrize("case", ["overlong", "not-a-tar"])
def test_errors_met_while_training_are_one_line(corpus, tmp_path, case):
    """Found by a DataLoader worker, after the checks: still one line (not DataLoader's re-raised traceback)."""
    shards = bad_shards(tmp_path)
    run = tmp_path / "run"
    override, expected = {
        "overlong": ("data.seq_len=64", ["sample has", "tokens > data.seq_len=64", "data.overlong=skip"]),
        "not-a-tar": (f"data.train.0.shards={shards['not_a_tar']}", ["could not be used", "not-a-tar.tar",
                                                                        "cannot be read as a tar"]),
    }[case]
    assert_one_line(pretrain(corpus, run, override, "data.overlong=error"), "pretrain", *expected)
    if case == "not-a-tar":  # the damage is in the skip log, with the shard's name
        (row,) = [json.loads(line) for line in (run / "skipped.jsonl").read_text().splitlines()]
        assert row["shard"] == shards["not_a_tar"] and "cannot be read as a tar" in row["reason"]


def test_a_foreign_data_state_in_a_checkpoint_is_one_line_naming_it(corpus, tmp_path):
    """Valid JSON that is not a pipeline state: refused before any worker reads it, naming the file."""
    import shutil

    run = tmp_path / "run"
    result = pretrain(corpus, run, "train.checkpoint_every=2", "data.num_workers=0")
    assert result.returncode == 0, result.stderr[-3000:]
    step = run / "checkpoints" / "step_00000002"
    for content in ({"epoch": 1}, {"num_batches": 2, "num_workers": 1, "rank": 0, "world_size": 1, "seed": 0,
                                   "worker_states": {"0": {"k": "x"}}}):
        resumed = tmp_path / "resumed"
        shutil.rmtree(resumed, ignore_errors=True)
        (step / "data_rank0.json").write_text(json.dumps(content))
        assert_one_line(pretrain(corpus, resumed, f"train.resume={step}", "train.steps=4", "data.num_workers=0"),
                        "pretrain", f"{step / 'data_rank0.json'}: not a data pipeline state")


def test_under_torchrun_the_line_is_printed_once_and_is_torchruns_root_cause(corpus, run_dir, tmp_path):
    shards = bad_shards(tmp_path)
    before = listing(run_dir)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
         f"--master_port={free_port()}", "launch/pretrain.py", "--recipe", "recipes/smoke.yaml", f"name={run_dir.name}",
         f"output_dir={run_dir}", f"data.train.0.shards={shards['nothing']}", "train.engine=ddp", "train.tracker=none"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("pretrain: error:")]
    assert len(ours) == 1 and "matches no file" in ours[0], result.stderr[-3000:]
    assert f"traceback : {ours[0]}" in result.stderr  # torchrun's failure summary names it as the root cause
    assert 'File "' + str(REPO / "omni_train") not in result.stderr  # no traceback from our code
    assert listing(run_dir) == before


def test_cli_errors_are_one_line(corpus, tmp_path):
    shards = bad_shards(tmp_path)
    assert_one_line(omni_train("probe", "--run", str(tmp_path / "nope")), "omni-train", "not a run directory")
    assert_one_line(omni_train("export", "--run", str(tmp_path / "nope"), "--out", str(tmp_path / "x")),
                    "omni-train", "not a run directory")
    assert_one_line(omni_train("shards", "inspect", shards["nothing"]), "omni-train", "matches no file")
    assert_one_line(omni_train("shards", "inspect", shards["remote"]), "omni-train", "data.allow_remote")
    assert_one_line(omni_train("shards", "build", "--manifest", str(tmp_path / "absent.jsonl"), "--out",
                               str(tmp_path / "out")), "omni-train", "absent.jsonl does not exist")

