"""Where a run's model comes from, and how a run's checkpoint becomes a model again.

    init: {run: runs/pretrain, step: 700}     # start from an omni_train checkpoint (step: latest when left out)
    train: {lora: {r: 8, targets: [backbone.attention, backbone.mlp]}}

`build_run_model(cfg, tokenizer)` is the one recipe -> model path for training, probes and
export: `model.build_model` (which loads any pretrained components the recipe names), then the
weights of `init.run` at `init.step` (a LoRA run there is merged into its own base first), then
LoRA adapters (`train.lora`). The engine wraps what it returns.

A fine-tune inherits its base run's model, tokenizer and media settings (`config.load_recipe`
merges them under the recipe), so a recipe names `init.run` and only what it changes.

A LoRA run writes its frozen base once, as an export directory `runs/NAME/base/`, before the first
step; its checkpoints hold only what trains (the adapters). `load_run(run, step)` reads a run
directory back: its config.yaml, the model (for a LoRA run the base from `base/`, then the
adapters), the checkpoint's weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from omni_train.train.checkpoint import list_checkpoints, load_checkpoint_weights
from omni_train.train.lora import apply_lora, merge_lora

BASE_DIR = "base"  # in a LoRA run's directory: the frozen base model, in the export layout


@dataclass(kw_only=True)
class InitConfig:
    run: str | None = None    # an omni_train run directory (runs/NAME) whose checkpoint the model starts from
    step: int | None = None   # that run's checkpoint step; left out: its latest, fixed when the recipe is loaded

    def __post_init__(self):
        if self.run is None:
            if self.step is not None:
                raise ValueError("init.step is set but init.run is not")
            return
        config = Path(self.run) / "config.yaml"
        if not config.is_file():
            raise ValueError(f"init.run: {self.run} is not a run directory (no config.yaml)")
        steps = dict(list_checkpoints(Path(self.run) / "checkpoints"))
        if not steps:
            raise ValueError(f"init.run: {self.run}/checkpoints holds no step_XXXXXXXX checkpoint")
        if self.step is None:
            self.step = max(steps)  # recorded in config.yaml: resuming later starts from the same base
        elif self.step not in steps:
            raise ValueError(f"init.step: {self.run} has no checkpoint of step {self.step} "
                             f"(steps: {', '.join(map(str, sorted(steps)))})")


def checkpoint_path(run: str | Path, step: int | None = None) -> Path:
    """runs/NAME (+ step, default the latest) -> its checkpoints/step_XXXXXXXX folder, or FileNotFoundError."""
    run = Path(run)
    checkpoints = dict(list_checkpoints(run / "checkpoints"))
    if not checkpoints:
        raise FileNotFoundError(f"{run / 'checkpoints'} holds no step_XXXXXXXX checkpoint")
    step = max(checkpoints) if step is None else step
    if step not in checkpoints:
        raise FileNotFoundError(f"{run / 'checkpoints'} has no checkpoint of step {step} "
                                f"(steps: {', '.join(map(str, sorted(checkpoints)))})")
    return checkpoints[step]


def build_run_model(cfg: Any, tokenizer: Any, *, base_dir: Path | None = None, reuse_base: bool = True,
                    write_base: bool = False, load_init: bool = True) -> nn.Module:
    """The recipe's model with its base weights (pretrained components, init.run) and its LoRA adapters.

    `base_dir`: a LoRA run's `base/`, the frozen base as an export directory (`export.write_export`):
    read from there when it exists and `reuse_base` (a resumed or finished run), else built and, with
    `write_base` (rank 0 of a run that starts), written there. So the run's checkpoints need hold only
    the adapters, whatever becomes of init.run's checkpoints or the pretrained directories, and
    randomly initialized frozen modules come back as they were.
    `load_init=False` builds the same architecture without reading init.run (a replica to load weights into).
    """
    from omni_train.export import CONFIG_FILE, load_exported, write_export
    from omni_train.model.omni import build_model

    if base_dir is not None and reuse_base and (base_dir / CONFIG_FILE).is_file():
        model = load_exported(base_dir)[0].train()
    else:
        model = build_model(cfg.model, vocab_size=tokenizer.vocab_size)
        if cfg.init.run is not None and load_init:
            base, _, _, checkpoint = load_run(cfg.init.run, cfg.init.step, merge=True)
            try:
                missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
            except RuntimeError as e:  # shapes differ
                raise ValueError(f"init.run: {checkpoint} does not fit model.* ({_first_mismatch(str(e))})") from None
            if missing or unexpected:
                raise ValueError(f"init.run: {checkpoint} does not fit model.* (missing {missing[:3]}, unexpected {unexpected[:3]})")
            del base
        if base_dir is not None and write_base:
            pretrained = {f.name: getattr(cfg.model, f.name) for f in dataclasses.fields(cfg.model) if f.name.startswith("pretrained")}
            write_export(model, tokenizer, cfg.data, base_dir,
                         source={"init": dataclasses.asdict(cfg.init), "pretrained": pretrained, "lora": "none"})
    if cfg.train.lora is not None:
        torch.manual_seed(cfg.seed)  # the same adapter initialization on every rank, however the base was made
        apply_lora(model, cfg.train.lora)
    return model


def _first_mismatch(message: str) -> str:
    lines = [line.strip() for line in message.splitlines() if "size mismatch" in line]
    return lines[0] if lines else message.splitlines()[0]


def load_run(run: str | Path, step: int | None = None, *, merge: bool = False) -> tuple[nn.Module, Any, Any, Path]:
    """(model with the checkpoint's weights, the run's config, its tokenizer, the checkpoint folder).

    A LoRA run's model keeps its adapters separate unless `merge`, which folds them into the base
    weights (the result has the base model's parameter names). The model is on the CPU, in eval mode.
    """
    from omni_train.config import load_recipe
    from omni_train.data.text import Tokenizer

    run = Path(run)
    config = run / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"{config} does not exist: '{run}' is not a run directory")
    checkpoint = checkpoint_path(run, step)
    cfg = load_recipe(config)
    tokenizer = Tokenizer.from_path(cfg.data.tokenizer)
    lora = cfg.train.lora is not None
    model = build_run_model(cfg, tokenizer, base_dir=run / BASE_DIR if lora else None)
    load_checkpoint_weights(model, checkpoint, only=saved_parameter_names(model, cfg.train) if lora else None)
    if lora and merge:
        merge_lora(model)
    return model.eval(), cfg, tokenizer, checkpoint


def saved_parameter_names(model: nn.Module, train_cfg: Any) -> set[str]:
    """What a LoRA run's checkpoint holds: the parameters it trained (adapters and any full modules,
    less the modules `train.modules` freezes), as the engine saw them."""
    frozen = {name for name, options in train_cfg.modules.items() if options.freeze}
    return {name for name, param in model.named_parameters() if param.requires_grad and name.split(".")[0] not in frozen}
