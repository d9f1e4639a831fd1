"""Run a command under torchrun from tests, on free local ports, with cached DeepSpeed extensions; read what the ranks
left in a checkpoint."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(script: str, *args: str, nproc: int = 2, options: tuple[str, ...] = (),
                     env: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """The torchrun command line (with its own `options`, e.g. --max-restarts=1) and its environment."""
    full_env = dict(os.environ)
    full_env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    full_env.update({"OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", **(env or {})})
    # --standalone (c10d rendezvous on a free port): each restart rendezvouses anew; the fixed-port static one keeps
    # the first attempt's addresses in its store, and a restarted job's process group then connects to dead ranks
    rendezvous = [] if "--standalone" in options else ["--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *rendezvous, *options, script, *args]
    return cmd, full_env


def torchrun(script: str, *args: str, nproc: int = 2, timeout_s: int = 300, options: tuple[str, ...] = (),
             env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd, env = torchrun_command(script, *args, nproc=nproc, options=options, env=env)
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n"
                             f"--- stderr\n{result.stderr[-8000:]}")
    return result


def complete_epochs(states: list[dict]) -> int:
    """How many epochs from 0 every stream of these data states (one per rank, one source) has finished reading
    and packing: the samples of those epochs have all been in batches."""
    done = []
    for state in states:
        for worker in range(state["num_workers"]):
            stream = state["worker_states"].get(str(worker))
            if stream is None:
                return 0
            ((epoch, position),) = stream["sources"]
            done.append(min([epoch if position >= 0 else 0] + [e for _, e, _ in stream["pool"]]))
    return min(done)
