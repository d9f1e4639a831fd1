"""Parameter groups per module, AdamW, and the learning-rate schedule (warmup, cosine, stages).

Groups are built per top-level module of the model (audio_encoder, vision_encoder, projectors,
backbone, and `fusion`: model.fusion cross_attn's or resampler's own modules) and per weight-decay
class, so a recipe can freeze a module, scale its learning rate, or train only some modules for a stage:

    train:
      modules: {audio_encoder: {lr_scale: 0.5}, vision_encoder: {freeze: true}}
      stages: [{until_step: 200, train: [audio_projector, vision_projector]}]  # then everything
      # stages: [{until_step: 200, train: [fusion]}]  # open the cross_attn blocks on a still backbone first

A stage holds the other modules still by giving their groups a learning-rate multiplier of 0
(AdamW's decoupled weight decay is scaled by the learning rate too), so every engine, DeepSpeed's
included, keeps one fixed set of parameter groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(kw_only=True)
class ModuleOptimConfig:
    freeze: bool = False    # requires_grad=False and left out of the optimizer
    lr_scale: float = 1.0   # multiplies train.lr for this module

    def __post_init__(self):
        if self.lr_scale < 0:
            raise ValueError(f"lr_scale must be >= 0, got {self.lr_scale}")


@dataclass(kw_only=True)
class StageConfig:
    until_step: int         # the stage covers steps [previous until_step, until_step)
    train: list[str]        # modules that learn during the stage; the others have a 0 multiplier

    def __post_init__(self):
        if self.until_step < 1 or not self.train:
            raise ValueError("a stage needs until_step >= 1 and a non-empty train list of modules")


def module_groups(model: nn.Module, modules: dict[str, ModuleOptimConfig], weight_decay: float) -> list[dict]:
    """AdamW parameter groups: one per (top-level module, decay or not); frozen modules are left out."""
    names = {name for name, _ in model.named_children()}
    unknown = set(modules) - names
    if unknown:
        raise ValueError(f"train.modules names {sorted(unknown)}, which the model does not have (it has {sorted(names)})")
    groups = []
    for name, child in model.named_children():
        options = modules.get(name, ModuleOptimConfig())
        if options.freeze:
            child.requires_grad_(False)
            continue
        ndim = lambda p: len(getattr(p, "ds_shape", p.shape))  # noqa: E731 - born partitioned (ZeRO-3): p itself is empty
        decay = [p for p in child.parameters() if p.requires_grad and ndim(p) >= 2]
        no_decay = [p for p in child.parameters() if p.requires_grad and ndim(p) < 2]  # norms and biases
        for params, wd, suffix in ((decay, weight_decay, ""), (no_decay, 0.0, ".no_decay")):
            if params:
                groups.append({"params": params, "weight_decay": wd, "name": name + suffix, "module": name,
                               "lr_scale": options.lr_scale})
    if not groups:
        raise ValueError("train.modules freezes every module: nothing would train")
    return groups


def schedule_multiplier(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float,
                        decay_steps: int = 0) -> float:
    """Linear warmup to 1, then cosine decay to min_lr_ratio at total_steps.

    decay_steps > 0 (warmup-stable-decay, MiniCPM arXiv:2404.06395): the multiplier stays at 1 after
    warmup and the cosine runs over the last decay_steps steps only, so a run keeps its full learning
    rate while a slow task (the demo's recognition) is still leaving its plateau and anneals at the end.
    """
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_start = max(warmup_steps, total_steps - decay_steps) if decay_steps else warmup_steps
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def stage_multiplier(module: str, step: int, stages: list[StageConfig]) -> float:
    for stage in stages:
        if step < stage.until_step:
            return 1.0 if module in stage.train else 0.0
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int, min_lr_ratio: float,
                    stages: list[StageConfig], decay_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    def for_group(group: dict):
        module, scale = group["module"], group["lr_scale"]
        return lambda step: scale * stage_multiplier(module, step, stages) * schedule_multiplier(
            step, warmup_steps=warmup_steps, total_steps=total_steps, min_lr_ratio=min_lr_ratio, decay_steps=decay_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [for_group(g) for g in optimizer.param_groups])


def check_stage_modules(model: nn.Module, stages: list[StageConfig]) -> None:
    names = {name for name, _ in model.named_children()}
    for i, stage in enumerate(stages):
        unknown = set(stage.train) - names
        if unknown:
            raise ValueError(f"train.stages[{i}].train names {sorted(unknown)}; the model's modules are {sorted(names)}")
    steps = [s.until_step for s in stages]
    if steps != sorted(steps):
        raise ValueError(f"train.stages must be in increasing until_step order, got {steps}")
