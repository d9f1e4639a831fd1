"""LoRA on chosen module groups of the single-device model, through peft, applied in one place.

    train:
      lora: {r: 8, alpha: 16, dropout: 0.0, targets: [backbone.attention, backbone.mlp, projectors, audio_encoder]}

`apply_lora(model, cfg)` runs once, after the base weights are in place and before the engine
wraps the model (`train.runs.build_run_model`). It maps each target group to the `nn.Linear`
layers it names (TARGET_GROUPS), has peft inject adapters into exactly those layers in place
(`peft.inject_adapter_in_model`: no wrapper class, so the model keeps its own `forward`, `fuse`
and submodule names), and leaves only the adapters trainable, plus any `full_modules` trained
whole beside them. peft's `lora_B` starts at zero, so the adapted model computes what the base
computes until the first step.

The adapted layers' base weights move to `<layer>.base_layer.weight`; adapters are
`<layer>.lora_A.default.weight` (r, in) and `<layer>.lora_B.default.weight` (out, r).
`merge_lora` folds the adapters into the base weights (W + B A alpha / r) and puts the plain
layers back, so the merged model has the base model's parameter names again; `remove_lora(...,
merge=False)` drops them instead (the base model, for an export that keeps the adapters apart).

A fusion's own modules (`OmniModel.fusion`: model.fusion cross_attn's gated blocks, resampler's
query blocks) are no adapter target: they are new, randomly initialised, and hold what no adapter
reaches (cross_attn's tanh gates start at 0 and are not nn.Linear, so adapters on its linear layers
would leave the blocks closed for ever). A LoRA run trains them whole: the recipe loader refuses
`fusion` in lora.targets, and a cross_attn / resampler fusion without `fusion` in lora.full_modules,
each in one line (`check_lora_fusion`); a fusion that init.run already trained may instead be kept
as it is with train.modules.fusion.freeze.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

ADAPTER_NAME = "default"

# target group -> full-match pattern over `model.named_modules()` names; only nn.Linear layers are taken
TARGET_GROUPS: dict[str, str] = {
    "backbone.attention": r"backbone\.layers\.\d+\.self_attn\.(q|k|v|o)_proj",
    "backbone.mlp": r"backbone\.layers\.\d+\.mlp\.(gate|up|down)_proj",
    "backbone.router": r"backbone\.layers\.\d+\.mlp\.gate",   # model.backbone.moe's routers
    "projectors": r"((audio|vision)_projector|vision_deepstack\.\d+)\..+",
    "audio_projector": r"audio_projector\..+",
    "vision_projector": r"vision_projector\..+",
    "audio_encoder": r"audio_encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|fc1|fc2)",
    "vision_encoder": r"vision_encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|fc1|fc2|(gate|up|down)_proj)",
}  # not `fusion`: a fusion's modules train whole (lora.full_modules; module docstring)
# target group -> full-match pattern over `model.named_parameters()` names: parameters that are no nn.Linear's weight,
# adapted through peft's `target_parameters` (lora.ParamWrapper: one low-rank pair per expert of a fused (E, out, in)
# tensor, W_e + B_e A_e alpha / r)
PARAMETER_GROUPS: dict[str, str] = {
    "backbone.experts": r"backbone\.layers\.\d+\.mlp\.(gate_up|down)_proj",  # model.backbone.moe's experts
}
TOP_LEVEL_MODULES = ("audio_encoder", "audio_projector", "vision_encoder", "vision_projector", "vision_deepstack",
                     "backbone", "transfer", "fusion")


@dataclass(kw_only=True)
class LoraConfig:
    r: int = 8                          # adapter rank
    alpha: float = 16.0                 # scaling alpha / r
    dropout: float = 0.0                # on the adapter's input
    targets: list[str] = field(default_factory=lambda: ["backbone.attention", "backbone.mlp"])  # TARGET_GROUPS keys
    full_modules: list[str] = field(default_factory=list)  # top-level modules trained whole beside the adapters

    def __post_init__(self):
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"lora.r must be an integer >= 1, got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        self.targets, self.full_modules = list(self.targets), list(self.full_modules)
        if not self.targets:
            raise ValueError(f"lora.targets must name at least one of {', '.join(TARGET_GROUPS)}")
        if "fusion" in self.targets:
            raise ValueError("lora.targets: fusion cannot take adapters (its modules are new and randomly initialised, "
                             "cross_attn's gates are no linear layer): list it in lora.full_modules to train it whole")
        unknown = [t for t in self.targets if t not in TARGET_GROUPS and t not in PARAMETER_GROUPS]
        if unknown:
            raise ValueError(f"lora.targets: unknown group {unknown[0]!r} "
                             f"(allowed: {', '.join([*TARGET_GROUPS, *PARAMETER_GROUPS])})")
        if self.dropout and any(t in PARAMETER_GROUPS for t in self.targets):
            raise ValueError(f"lora.dropout must be 0 with lora.targets {', '.join(PARAMETER_GROUPS)}: an expert's "
                             f"adapter is added to its weight, where there is no input to drop out")
        unknown = [m for m in self.full_modules if m not in TOP_LEVEL_MODULES]
        if unknown:
            raise ValueError(f"lora.full_modules: unknown module {unknown[0]!r} (allowed: {', '.join(TOP_LEVEL_MODULES)})")


def check_lora_fusion(lora: LoraConfig | None, fusion: str, modules: dict) -> None:
    """A LoRA run trains a fusion's own modules whole (module docstring); ValueError naming the keys otherwise.

    `fusion`: model.fusion; `modules`: train.modules (a fusion frozen there, trained by init.run, is kept as is).
    """
    if lora is None:
        return
    if fusion == "interleave":  # OmniModel.fusion is None
        if "fusion" in lora.full_modules:
            raise ValueError("train.lora.full_modules: model.fusion=interleave has no fusion module (cross_attn and "
                             "resampler have one)")
        return
    frozen = getattr(modules.get("fusion"), "freeze", False)
    if "fusion" not in lora.full_modules and not frozen:
        raise ValueError(f"train.lora.full_modules must list fusion with model.fusion={fusion}: its modules are new "
                         "and randomly initialised and adapters do not train them (or set "
                         "train.modules.fusion.freeze=true to keep the ones init.run trained)")


def lora_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """Names of the nn.Linear layers and the parameters (PARAMETER_GROUPS) that the target groups cover, in model
    order; ValueError for a group that covers none."""
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    parameters = [name for name, _ in model.named_parameters()]
    chosen: set[str] = set()
    for group in targets:
        pattern = re.compile(TARGET_GROUPS.get(group) or PARAMETER_GROUPS[group])
        found = [name for name in (linear if group in TARGET_GROUPS else parameters) if pattern.fullmatch(name)]
        if not found:
            kind = "linear layer" if group in TARGET_GROUPS else "parameter"
            raise ValueError(f"train.lora.targets: {group} covers no {kind} of this model "
                             f"(is the module part of model.*?)")
        chosen.update(found)
    return [name for name in linear + parameters if name in chosen]


def peft_config(cfg: LoraConfig, targets: list[str]):
    """peft's LoraConfig for `targets` (lora_targets' names: layers, and parameters of PARAMETER_GROUPS)."""
    import peft

    parameter = re.compile("|".join(PARAMETER_GROUPS.values()))
    modules = [t for t in targets if not parameter.fullmatch(t)]
    parameters = [t for t in targets if parameter.fullmatch(t)]
    return peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=modules or None,
                           target_parameters=parameters or None, bias="none")


def apply_lora(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Inject adapters in place into the layers of `cfg.targets`; only they (and `cfg.full_modules`) stay trainable.

    Returns the adapted layers' (and parameters') names.
    """
    import peft

    targets = lora_targets(model, cfg.targets)
    for name in cfg.full_modules:
        if getattr(model, name, None) is None:
            raise ValueError(f"train.lora.full_modules: the model has no {name}")
    peft.inject_adapter_in_model(peft_config(cfg, targets), model, adapter_name=ADAPTER_NAME)
    for name, param in model.named_parameters():  # peft leaves only the adapters trainable; add the full modules
        param.requires_grad = is_adapter_parameter(name) or name.split(".")[0] in cfg.full_modules
    return targets


def is_adapter_parameter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def adapted_targets(model: nn.Module) -> list[str]:
    """What `apply_lora` adapted, as lora_targets names it (peft_config's input): the adapted linear layers, and
    `<module>.<parameter>` for each adapted parameter (a ParamWrapper: nested ones are one module's parameters)."""
    from peft.tuners.lora import LoraLayer, ParamWrapper

    targets = []
    for name, module in model.named_modules():
        plain = re.sub(r"\.base_layer(?=\.|$)", "", name)  # the name without the wrappers around it
        if isinstance(module, ParamWrapper):
            targets.append(f"{plain}.{module.parameter_name}")
        elif isinstance(module, LoraLayer):
            targets.append(plain)
    return targets


def has_lora(model: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return any(isinstance(module, LoraLayer) for module in model.modules())


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters in peft's file layout (`<layer>.lora_A.weight`, no adapter name), detached on CPU."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME).items()}


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Inverse of `adapter_state_dict` on a model with the same adapters injected; ValueError when they do not fit."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER_NAME)
    missing = [k for k in result.missing_keys if is_adapter_parameter(k)]
    if missing or result.unexpected_keys:
        raise ValueError(f"the adapter weights do not fit the model (missing {missing[:3]}, "
                         f"unexpected {list(result.unexpected_keys)[:3]})")


@torch.no_grad()
def remove_lora(model: nn.Module, *, merge: bool) -> nn.Module:
    """Put the plain layers back (in place; returns `model`), with the adapters folded into their weights
    when `merge` (W + B A alpha / r), else dropped (the base model as it was before `apply_lora`)."""
    from peft.tuners.lora import LoraLayer

    adapted = [name for name, module in model.named_modules() if isinstance(module, LoraLayer)]
    # innermost first: adapters on two parameters of one module (an MoE's experts) are wrappers nested in each other
    for name in sorted(adapted, key=lambda n: -n.count(".")):
        layer = model.get_submodule(name)
        if merge:
            layer.merge(adapter_names=[ADAPTER_NAME])
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.base_layer)
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    return remove_lora(model, merge=True)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """total, trainable, and adapter parameters (numbers of elements)."""
    counts = {"total": 0, "trainable": 0, "adapter": 0}
    for name, param in model.named_parameters():
        numel = getattr(param, "ds_numel", param.numel())  # ZeRO-3 leaves an empty partition in param
        counts["total"] += numel
        counts["trainable"] += numel if param.requires_grad else 0
        counts["adapter"] += numel if is_adapter_parameter(name) else 0
    return counts
