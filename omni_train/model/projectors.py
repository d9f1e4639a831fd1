"""Projectors: encoder features -> the backbone's embedding width (`model.projector`).

    mlp      [LayerNorm] -> Linear -> GELU -> Linear   (LLaVA-1.5's connector; with the input norm,
             Qwen2-VL's patch merger, applied to the concatenated 2x2 block)
    linear   [LayerNorm] -> Linear
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from torch import nn

PROJECTOR_KINDS = ("mlp", "linear")


def check_projector_kind(kind: str) -> None:
    if kind not in PROJECTOR_KINDS:
        raise ValueError(f"model.projector must be one of {', '.join(PROJECTOR_KINDS)}, got {kind!r}")


@dataclass(kw_only=True)
class ProjectorConfig:
    kind: str = "mlp"
    in_dim: int
    out_dim: int
    hidden_dim: int | None = None   # mlp hidden width; None: out_dim
    input_norm: bool = False        # LayerNorm on the input (the vision merger's)

    def __post_init__(self):
        check_projector_kind(self.kind)
        if self.hidden_dim is None:
            self.hidden_dim = self.out_dim
        for name in ("in_dim", "out_dim", "hidden_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"projector {name} must be a positive integer, got {value!r}")


class Projector(nn.Sequential):
    """(..., in_dim) -> (..., out_dim); submodules `norm` (optional), `fc1`, `act`, `fc2` for mlp, `fc` for linear."""

    def __init__(self, cfg: ProjectorConfig):
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        if cfg.input_norm:
            layers["norm"] = nn.LayerNorm(cfg.in_dim, eps=1e-6)
        if cfg.kind == "mlp":
            layers.update(fc1=nn.Linear(cfg.in_dim, cfg.hidden_dim), act=nn.GELU(), fc2=nn.Linear(cfg.hidden_dim, cfg.out_dim))
        else:
            layers["fc"] = nn.Linear(cfg.in_dim, cfg.out_dim)
        super().__init__(layers)
        self.cfg = cfg


@dataclass(kw_only=True)
class ProjectorOptions:
    """One modality's projector (`model.audio_projector`, `model.vision_projector`); None keeps the model's default.

    The defaults are `model.projector`'s kind, hidden width = output width, and an input LayerNorm for
    vision only. Qwen2.5-Omni's thinker: audio `linear` without norm (its `proj`), vision `mlp` with
    hidden width m^2 D and no input norm (its merger, whose per-patch RMSNorm is the vision encoder's).
    """
    kind: str | None = None
    hidden_dim: int | None = None
    input_norm: bool | None = None

    def __post_init__(self):
        if self.kind is not None:
            check_projector_kind(self.kind)
        if self.hidden_dim is not None and (not isinstance(self.hidden_dim, int) or self.hidden_dim <= 0):
            raise ValueError(f"hidden_dim must be a positive integer or null, got {self.hidden_dim!r}")


def build_projector(kind: str, in_dim: int, out_dim: int, *, input_norm: bool = False,
                    options: ProjectorOptions | None = None) -> Projector:
    """A projector of `kind` (PROJECTOR_KINDS), or of what `options` sets; ValueError naming model.projector for any other kind."""
    options = options or ProjectorOptions()
    return Projector(ProjectorConfig(kind=options.kind or kind, in_dim=in_dim, out_dim=out_dim, hidden_dim=options.hidden_dim,
                                     input_norm=input_norm if options.input_norm is None else options.input_norm))
