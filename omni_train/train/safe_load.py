"""Reading checkpoint files without running code from them, and one line naming the file when one is refused.

    state = load_state(path, map_location="cpu")    # one .pt file: optimizer.pt, rng_rank0.pt, ...
    weights = read_safetensors(path)                 # model.safetensors, naming the file when it is damaged
    with only_plain_state(checkpoint):              # DeepSpeed's loads inside: resume, zero_to_fp32
        engine.load_checkpoint(...)
    data = read_json(path)                          # our .json state files

A checkpoint folder may come from anywhere (a colleague's run, a download), and unpickling runs
whatever the pickle names. Every `.pt` is therefore read by torch's weights-only unpickler: tensors,
containers and numbers, plus the few plain classes DeepSpeed puts in its optimizer states
(`DEEPSPEED_STATE_TYPES`); a file that names anything else is refused with `CheckpointFileError`.

Why an environment variable for DeepSpeed's loads: DeepSpeed 0.19.8 calls
`torch.load(weights_only=False)` in its checkpoint engine (resume), in `zero_to_fp32` (consolidation)
and in its ZeRO optimizers. torch 2.13 reads `TORCH_FORCE_WEIGHTS_ONLY_LOAD` inside every `torch.load`
call, and the variable overrides an explicit `weights_only=False` (torch/serialization.py), so
setting it around a DeepSpeed call covers every load inside, whichever code path DeepSpeed takes,
without patching DeepSpeed. The other options were worse: DeepSpeed picks its checkpoint engine from a
fixed list in its config (plugging ours in means replacing an attribute of its engine object, and
`zero_to_fp32` does not go through it); consolidating ZeRO shards ourselves means re-implementing
`zero_to_fp32`'s layouts (stage 1/2 flat groups, stage 3 partitions, padding, frozen and shared
parameters) and still leaves resume unprotected. The variable is process-wide while it is set; the
loads run in the main thread before training starts, and DataLoader workers are other processes.
`_check_forced` makes this fail closed should a torch release stop honouring the variable.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from omni_train.errors import one_line

FORCE_SAFE, FORCE_UNSAFE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
HINT = "only tensors and DeepSpeed's plain state types are loaded; was this checkpoint written by omni_train?"


class CheckpointFileError(ValueError):
    """A checkpoint file that is refused (it needs more than plain state to load) or cannot be read."""


def deepspeed_state_types() -> list[type]:
    """The non-tensor classes DeepSpeed 0.19 writes into ZeRO optimizer states (fp32, bf16, stages 0-3, fp16
    through a user's deepspeed_config). Each is plain data: an int enum, a two-int dataclass, and loss
    scalers whose constructors only set numbers and whose state is a dict of numbers."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _describe(error: Exception) -> str:
    """torch's multi-paragraph message -> what went wrong, in a few words."""
    message = str(error)
    if found := re.search(r"GLOBAL (\S+)", message):
        return f"refused to unpickle '{found.group(1)}' ({HINT})"
    if isinstance(error, pickle.UnpicklingError):
        detail = re.search(r"(Unsupported operand \S+|Trying to call reduce for unrecognized function \S+"
                           r"|Can only create new object for \S+ .*? but got \S+|Unsupported class \S+)", message)
        return f"refused to unpickle it ({detail.group(1) if detail else 'not plain state'}; {HINT})"
    first = next((line.strip() for line in message.splitlines() if line.strip()), "").split(". ")[0][:160]
    if not isinstance(error, RuntimeError):  # torch's RuntimeErrors say what failed; an EOFError says nothing
        first = f"{type(error).__name__}: {first}" if first else type(error).__name__
    return f"unreadable, truncated or not a checkpoint file ({first})"


def load_state(path: Path, map_location: Any = "cpu", *, deepspeed: bool = False, mmap: bool = False) -> Any:
    """torch.load(path) with weights_only=True (and, for a file DeepSpeed wrote, its plain types allowed);
    CheckpointFileError naming the file when it needs more or is damaged."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the checkpoint")
    try:
        with torch.serialization.safe_globals(deepspeed_state_types() if deepspeed else []):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except (torch.OutOfMemoryError, MemoryError):  # the machine's limit, not the file's fault
        raise
    except Exception as e:  # garbage can make the unpickler fail in any way; the file is what is wrong
        raise CheckpointFileError(f"{path}: {_describe(e)}") from None


def read_safetensors(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; CheckpointFileError naming it when it is missing, truncated or foreign."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=device)
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError ...: the file is what is wrong
        raise CheckpointFileError(f"{path}: not a readable safetensors file ({one_line(e)})") from None


def read_json(path: Path) -> Any:
    """One of our .json state files; CheckpointFileError naming it when it is not JSON."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the checkpoint")
    try:
        return json.loads(path.read_bytes())
    except json.JSONDecodeError as e:
        raise CheckpointFileError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except UnicodeDecodeError:
        raise CheckpointFileError(f"{path}: not valid JSON (not UTF-8 text)") from None


class _Probe:
    """Not on any allow-list: the weights-only unpickler refuses it; the full one makes a harmless instance."""


def _check_forced() -> None:
    buffer = io.BytesIO()
    torch.save(_Probe(), buffer)
    buffer.seek(0)
    try:
        torch.load(buffer, weights_only=False)
    except pickle.UnpicklingError:
        return
    raise RuntimeError(f"this torch ({torch.__version__}) ignores {FORCE_SAFE}; "
                       "omni_train cannot load DeepSpeed checkpoints safely with it")


def first_refused_file(directory: Path) -> CheckpointFileError | None:
    """The first .pt file under `directory` that `load_state` refuses (memory-mapped: no tensor data is read)."""
    for path in sorted(directory.rglob("*.pt")):
        try:
            load_state(path, deepspeed=True, mmap=zipfile.is_zipfile(path))
        except CheckpointFileError as e:
            return e
    return None


@contextlib.contextmanager
def only_plain_state(directory: Path) -> Iterator[None]:
    """Every torch.load inside, including a library's weights_only=False ones, runs with weights_only=True and
    DeepSpeed's plain types allowed. A failure inside that a file of `directory` explains becomes that file's
    CheckpointFileError (DeepSpeed's own messages do not name the file); other failures pass through."""
    saved = {name: os.environ.get(name) for name in (FORCE_SAFE, FORCE_UNSAFE)}
    os.environ[FORCE_SAFE] = "1"
    os.environ.pop(FORCE_UNSAFE, None)  # torch refuses to run with both set
    try:
        _check_forced()
        try:
            with torch.serialization.safe_globals(deepspeed_state_types()):
                yield
        except CheckpointFileError:
            raise
        except Exception:
            # outside the safe_globals block: torch's context removes its globals on exit, so nesting it would
            # strip them from the outer one
            refused = first_refused_file(directory)
            if refused is None:
                raise
            raise refused from None
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
