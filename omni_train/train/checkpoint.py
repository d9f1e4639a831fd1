"""Checkpoints: atomic per-step folders holding the engine's state and the trainer's.

    runs/<name>/checkpoints/step_00000200/
        engine/ or model.safetensors + optimizer.pt + scheduler.pt   (the engine's own format)
        trainer_state.json     step, tokens seen, the resolved config
        data_rank{R}.json      rank R's data-pipeline state (exact resume; all ranks' at another world size)
        rng_rank{R}.pt         rank R's torch RNG states (tensors only)
        rng_rank{R}.json       rank R's Python and NumPy RNG states

Every rank writes into `step_XXXXXXXX.tmp`; after a barrier, rank 0 renames it to its final name,
so a folder named `step_*` is always complete. `resume: auto` picks the highest such step; a `.tmp`
folder that a crash left behind is removed, with one line, when the run starts again.

Reading never unpickles more than plain state, DeepSpeed's files included (`safe_load.py`): a
file that needs more, or a damaged one, stops the load with one line naming it.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omni_train.train.safe_load import load_state, only_plain_state, read_json, read_safetensors

STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return sorted(found)


def resolve_resume(resume: str, root: Path) -> Path | None:
    """train.resume -> the checkpoint folder to load, or None to start fresh."""
    if resume == "never":
        return None
    if resume == "auto":
        found = list_checkpoints(root)
        return found[-1][1] if found else None
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise ValueError(f"train.resume: {path} is not a checkpoint folder (no trainer_state.json)")
    return path


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, state, gauss = random.getstate()
    plain = {"numpy": [kind, keys.tolist(), pos, has_gauss, cached], "python": [version, list(state), gauss]}
    return tensors, plain


def set_rng_state(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, state, gauss = plain["python"]
    random.setstate((version, tuple(state), gauss))


def write_rank_state(directory: Path, rank: int, data_state: dict) -> None:
    (directory / f"data_rank{rank}.json").write_text(json.dumps(data_state))
    tensors, plain = rng_state()
    torch.save(tensors, directory / f"rng_rank{rank}.pt")
    (directory / f"rng_rank{rank}.json").write_text(json.dumps(plain))


def read_rank_state(directory: Path, rank: int, num_ranks: int = 1) -> list[dict]:
    """The data states of the `num_ranks` ranks that wrote the checkpoint (a resume at another world size reads
    them all), and rank `rank`'s RNG states restored; a rank the checkpoint has none for (a resume with more
    ranks) keeps the seeding it has."""
    states = []
    for saved_rank in range(num_ranks):
        data_path = directory / f"data_rank{saved_rank}.json"
        if not data_path.is_file():
            raise ValueError(f"{directory}: no data state for rank {saved_rank} of the {num_ranks} that wrote it")
        states.append(read_json(data_path))
    if rank < num_ranks:
        set_rng_state(load_state(directory / f"rng_rank{rank}.pt"), read_json(directory / f"rng_rank{rank}.json"))
    return states


def finalize(tmp: Path, final: Path, keep: int) -> None:
    """Rank 0, after every rank has written into `tmp`: make it visible atomically, drop the oldest.

    A folder on its way out is renamed first (`step_X.deleting`), so a crash while it is removed leaves no
    half-deleted `step_*` folder for `resume: auto` to choose."""
    if final.exists():
        _remove(final)
    tmp.rename(final)
    if keep > 0:
        for _, old in list_checkpoints(final.parent)[:-keep]:
            _remove(old)


def _remove(folder: Path) -> None:
    doomed = folder.with_name(folder.name + ".deleting")
    folder.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def remove_partial(root: Path) -> list[Path]:
    """Remove what an interrupted save or clean-up left in `root` (`step_*.tmp`, `step_*.deleting`); their names."""
    if not root.is_dir():
        return []
    partial = sorted(p for p in root.iterdir() if p.is_dir() and re.match(r"^step_\d{8}\.(tmp|deleting)$", p.name))
    for folder in partial:
        shutil.rmtree(folder, ignore_errors=True)
    return partial


def load_checkpoint_weights(model: torch.nn.Module, directory: Path, *, only: set[str] | None = None) -> None:
    """Load a checkpoint folder's weights into the single-device `model`, whatever engine wrote it:
    `model.safetensors` (single, DDP) or a DeepSpeed folder `engine/`: ZeRO 1-3 shards consolidated
    to fp32 by DeepSpeed's zero_to_fp32, stage 0's whole module from its model-states file.

    `only`: the checkpoint holds just these parameters (a LoRA run saves its trainable ones; the
    rest is the base model, already in `model`); every one of them must be there.
    """
    engine = directory / "engine"
    if (directory / "model.safetensors").is_file():
        state = read_safetensors(directory / "model.safetensors")
    elif any(engine.glob("*zero_pp_rank_*_optim_states.pt")):  # bf16 runs write bf16_zero_pp_rank_*
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with only_plain_state(directory):
            state = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag="engine",
                                                             exclude_frozen_parameters=only is not None)
    elif (engine / "mp_rank_00_model_states.pt").is_file():  # ZeRO stage 0: no shards to consolidate
        state = load_state(engine / "mp_rank_00_model_states.pt", deepspeed=True)["module"]
    else:
        raise FileNotFoundError(f"{directory} holds neither model.safetensors nor a DeepSpeed engine/ folder")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if only is not None:
        missing = [k for k in missing if k in only]
    if missing or unexpected:
        raise ValueError(f"{directory}: the checkpoint does not fit the run's model "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
