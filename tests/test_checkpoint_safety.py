"""A checkpoint from elsewhere never runs code: a pickle planted in any file a run reads is refused, naming the file.

One real run (2 ranks, DeepSpeed ZeRO-2 in bf16, 2 steps) is trained per module; each case copies it and
plants, in one file, a pickle whose unpickling would create a marker file (`os.system("touch ...")`),
added beside the file's real content as an attacker would. Then a real entry point reads the copy:
resume (`train.resume=` under torchrun), `omni-train probe --run`, `omni-train export --run` and
`init.run=` (launch/finetune.py). The marker never appears and stderr names the planted file.
The single-process engine's optimizer.pt / scheduler.pt, damaged files (truncated, garbage, a plain
pickle) and the legitimate load through the same protection are checked in this process.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distributed import REPO, free_port, torchrun
from omni_train.train.safe_load import FORCE_SAFE, CheckpointFileError, load_state

pytestmark = pytest.mark.multiproc

STEP = "checkpoints/step_00000002"
MODEL_STATES = f"{STEP}/engine/mp_rank_00_model_states.pt"
OPTIM_SHARD = f"{STEP}/engine/bf16_zero_pp_rank_{{rank}}_mp_rank_00_optim_states.pt"
DEEPSPEED = {"train.engine": "deepspeed", "train.zero_stage": 2, "train.precision": "bf16"}
CLI = "import sys; from omni_train.cli import main; sys.exit(main(sys.argv[1:]))"


class Payload:
    """Unpickling this runs a shell command: what a crafted checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(path: Path, marker: Path) -> None:
    """Keep the file's content and add the payload under one more key; a .json gets a bare pickle."""
    if path.suffix == ".json":
        path.write_bytes(pickle.dumps(Payload(marker)))
        return
    state = load_state(path, deepspeed=True)
    state["extra"] = Payload(marker)
    torch.save(state, path)


def run_args(corpus, run: Path, **extra) -> list[str]:
    base = {"name": run.name, "output_dir": str(run), "data.train.0.shards": corpus["pattern"],
            "data.eval.0.shards": str(corpus["shards"][-1]), "data.num_workers": 0, "train.steps": 2,
            "train.checkpoint_every": 2, "train.eval_every": 0, "train.log_every": 1, "train.precision": "fp32",
            "train.tracker": "none", "train.progress": False, "probes": "[]"}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def launch(*args: str, ranks: int = 1) -> subprocess.CompletedProcess:
    """An entry point that is expected to fail: its exit code and output, without raising."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    prefix = [sys.executable]
    if ranks > 1:
        prefix += ["-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_addr=127.0.0.1",
                   f"--master_port={free_port()}"]
    return subprocess.run([*prefix, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("safety") / "zero2"
    torchrun("launch/pretrain.py", "--recipe", "recipes/smoke.yaml",
             *run_args(corpus, run, **DEEPSPEED))
    assert (run / MODEL_STATES).is_file() and (run / OPTIM_SHARD.format(rank=1)).is_file()
    return run


def poisoned_copy(trained: Path, tmp_path: Path, target: str) -> tuple[Path, Path, Path]:
    """(the run's copy, the planted file, the marker its payload would create)."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    marker = tmp_path / "payload-ran"
    plant(run / target, marker)
    return run, run / target, marker


def assert_refused(result: subprocess.CompletedProcess, planted: Path, marker: Path) -> None:
    """Nothing ran; the entry point printed one line naming the file (under torchrun one per rank that read it,
    then torchrun's own summary) and no traceback of ours."""
    assert not marker.exists(), f"the planted pickle ran ({planted})"
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith(("pretrain: error", "finetune: error",
                                                                            "omni-train: error"))]
    refused = [line for line in ours if "another rank stopped" not in line]  # a peer's line, when it lost contact
    assert refused and all(str(planted) in line for line in refused), result.stderr[-3000:]
    print("".join(f"\n  exit {result.returncode}: {line}" for line in ours), end="")
    for code in ("omni_train", "launch"):
        assert f'File "{REPO / code}' not in result.stderr, result.stderr[-3000:]


@pytest.mark.parametrize("target", [MODEL_STATES, OPTIM_SHARD.format(rank=0), f"{STEP}/rng_rank1.pt",
                                    f"{STEP}/data_rank0.json"])
def test_resume_refuses_a_planted_pickle(corpus, trained, tmp_path, target):
    run, planted, marker = poisoned_copy(trained, tmp_path, target)
    result = launch("launch/pretrain.py", "--recipe", "recipes/smoke.yaml",
                    *run_args(corpus, tmp_path / "resumed", **DEEPSPEED, **{"train.steps": 3, "train.resume": str(run / STEP)}),
                    ranks=2)
    assert_refused(result, planted, marker)


@pytest.mark.parametrize("target", [MODEL_STATES, OPTIM_SHARD.format(rank=1)])
@pytest.mark.parametrize("path", ["probe", "export", "init.run"])
def test_reading_a_run_refuses_a_planted_pickle(corpus, trained, tmp_path, target, path):
    run, planted, marker = poisoned_copy(trained, tmp_path, target)
    if path == "probe":
        result = launch("-c", CLI, "probe", "--run", str(run), "--probe-shards", str(corpus["shards"][0]),
                        "--max-items", "1")
    elif path == "export":
        result = launch("-c", CLI, "export", "--run", str(run), "--out", str(tmp_path / "export"))
    else:
        result = launch("launch/finetune.py", "--recipe", "recipes/smoke.yaml", f"init.run={run}",
                        *run_args(corpus, tmp_path / "finetuned", **{"train.engine": "single", "train.steps": 1}))
    assert_refused(result, planted, marker)


# ------------------------------------------------------------------------------------------ in this process


def test_the_protected_load_reads_a_legitimate_checkpoint_and_leaves_no_trace(trained):
    """zero_to_fp32 through the protection gives the run's fp32 master weights: rounded to bf16, the module's."""
    from omni_train.config import load_recipe
    from omni_train.data.text import Tokenizer
    from omni_train.model.omni import build_model
    from omni_train.train.checkpoint import load_checkpoint_weights

    cfg = load_recipe(trained / "config.yaml")
    model = build_model(cfg.model, vocab_size=Tokenizer.from_path(cfg.data.tokenizer).vocab_size)
    load_checkpoint_weights(model, trained / STEP)
    assert FORCE_SAFE not in os.environ  # the forced weights-only load ends with the call
    saved = load_state(trained / MODEL_STATES, deepspeed=True)["module"]
    assert saved.keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor.to(torch.bfloat16), saved[name]), name


@pytest.mark.parametrize("damage,words", [
    ("planted", "refused to unpickle 'posix.system'"),
    ("plain pickle", "refused to unpickle 'posix.system'"),  # not torch's zip format: torch's legacy reader
    ("garbage", ""),                                         # the words depend on where the bytes stop the unpickler
    ("truncated", "unreadable, truncated or not a checkpoint file"),
    ("empty", "unreadable, truncated or not a checkpoint file"),
])
def test_damaged_engine_file_is_one_line_naming_it(trained, tmp_path, damage, words):
    from omni_train.config import load_recipe
    from omni_train.data.text import Tokenizer
    from omni_train.model.omni import build_model
    from omni_train.train.checkpoint import load_checkpoint_weights

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    target, marker = run / OPTIM_SHARD.format(rank=0), tmp_path / "payload-ran"
    if damage == "planted":
        plant(target, marker)
    else:
        content = target.read_bytes()
        target.write_bytes({"plain pickle": pickle.dumps(Payload(marker), protocol=2),
                            "garbage": b"not a checkpoint\n" * 200, "truncated": content[: len(content) // 2],
                            "empty": b""}[damage])
    cfg = load_recipe(run / "config.yaml")
    model = build_model(cfg.model, vocab_size=Tokenizer.from_path(cfg.data.tokenizer).vocab_size)
    with pytest.raises(CheckpointFileError) as refused:
        load_checkpoint_weights(model, run / STEP)
    message = str(refused.value)
    assert message.startswith(f"{target}: ") and words in message and "\n" not in message, message
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"\x80\x04garbage", b'{"epoch": 1,', "état".encode("latin-1")])
def test_damaged_data_state_is_one_line_naming_it(trained, tmp_path, content):
    from omni_train.train.checkpoint import read_rank_state, rng_state, set_rng_state

    directory = tmp_path / "step"
    shutil.copytree(trained / STEP, directory)
    (directory / "data_rank0.json").write_bytes(content)
    before = rng_state()
    try:
        with pytest.raises(CheckpointFileError) as refused:
            read_rank_state(directory, 0)
    finally:
        set_rng_state(*before)
    message = str(refused.value)
    assert message.startswith(f"{directory / 'data_rank0.json'}: not valid JSON") and "\n" not in message, message


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt"])
def test_single_engine_optimizer_and_scheduler_refuse_a_planted_pickle(tmp_path, name):
    from omni_train.config import load_recipe
    from omni_train.data.text import Tokenizer
    from omni_train.model.omni import build_model
    from omni_train.train.engine import Dist, Engine

    cfg = load_recipe("recipes/smoke.yaml", ["train.engine=single"])
    dist = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)
    make = lambda: Engine(build_model(cfg.model, vocab_size=Tokenizer.byte_level().vocab_size), cfg.train, dist,  # noqa: E731
                          micro_batch_size=1)
    make().save(tmp_path)
    marker = tmp_path / "payload-ran"
    plant(tmp_path / name, marker)
    with pytest.raises(CheckpointFileError) as refused:
        make().load(tmp_path)
    assert str(refused.value).startswith(f"{tmp_path / name}: refused to unpickle 'posix.system'"), refused.value
    assert not marker.exists()


def test_a_damaged_model_safetensors_is_one_line_naming_it(tmp_path):
    """Resume (the engine) and probe/export (`load_checkpoint_weights`) read model.safetensors through one reader."""
    from omni_train.config import load_recipe
    from omni_train.data.text import Tokenizer
    from omni_train.model.omni import build_model
    from omni_train.train.checkpoint import load_checkpoint_weights
    from omni_train.train.engine import Dist, Engine

    cfg = load_recipe("recipes/smoke.yaml", ["train.engine=single"])
    dist = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)
    model = lambda: build_model(cfg.model, vocab_size=Tokenizer.byte_level().vocab_size)  # noqa: E731
    Engine(model(), cfg.train, dist, micro_batch_size=1).save(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    for load in (lambda: Engine(model(), cfg.train, dist, micro_batch_size=1).load(tmp_path),
                 lambda: load_checkpoint_weights(model(), tmp_path)):
        with pytest.raises(CheckpointFileError) as refused:
            load()
        message = str(refused.value)
        assert message.startswith(f"{weights}: not a readable safetensors file (") and "\n" not in message, message
