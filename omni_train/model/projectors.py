"""Projectors: encoder features -> the backbone's embedding width (`model.projector`).

    mlp      [LayerNorm] -> Linear -> GELU -> Linear   (LLaVA-1.5's connector; with the input norm,
             Qwen2-VL's patch merger, applied to the concatenated 2x2 block)
    linear   [LayerNorm] -> Linear
    pool     average pool by `model.pool.factor` -> mlp: token compression (MM1, arXiv:2403.09611, finds the
             number of tokens matters more than the connector's kind). Groups of `factor` neighbouring
             encoder tokens, in encoder order (audio frames; a video's merged 2x2 blocks in raster order,
             frame after frame), the last group of an item partial and averaged over its own tokens.

A projector is called with the features of several items concatenated, `projector(x, num_tokens)`:
mlp and linear act on each token alone; pool groups within each item (`num_tokens`, the item's encoder
tokens, `batch[f"{m}_num_tokens"]`), never across two items, with the grouping of
`data.sequence_tokens.group_sizes`, by which the chat template reserved ceil(n / factor) placeholders.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from omni_train.data.sequence_tokens import SequenceTokens, group_sizes

PROJECTOR_KINDS = ("mlp", "linear", "pool")


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
    pool_factor: int = 2            # pool: encoder tokens averaged into one (model.pool.factor)

    def __post_init__(self):
        check_projector_kind(self.kind)
        if self.hidden_dim is None:
            self.hidden_dim = self.out_dim
        for name in ("in_dim", "out_dim", "hidden_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"projector {name} must be a positive integer, got {value!r}")
        check_pool_factor(self.pool_factor)


class Projector(nn.Sequential):
    """(N, in_dim) -> (N, out_dim), or (groups, out_dim) for pool; submodules `norm` (optional), `fc1`, `act`, `fc2`
    for mlp and pool, `fc` for linear (pool has no parameters of its own)."""

    def __init__(self, cfg: ProjectorConfig):
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        if cfg.input_norm:
            layers["norm"] = nn.LayerNorm(cfg.in_dim, eps=1e-6)
        if cfg.kind in ("mlp", "pool"):
            layers.update(fc1=nn.Linear(cfg.in_dim, cfg.hidden_dim), act=nn.GELU(), fc2=nn.Linear(cfg.hidden_dim, cfg.out_dim))
        else:
            layers["fc"] = nn.Linear(cfg.in_dim, cfg.out_dim)
        super().__init__(layers)
        self.cfg = cfg

    def forward(self, x: torch.Tensor, num_tokens: Sequence[int] | None = None) -> torch.Tensor:
        """x (N, in_dim): the tokens of items of `num_tokens` tokens each (needed by pool; None: one item)."""
        if self.cfg.kind == "pool":
            x = average_groups(x, self.group_sizes([x.shape[0]] if num_tokens is None else num_tokens))  # (groups, in_dim)
        for layer in self:
            x = layer(x)
        return x

    def group_sizes(self, num_tokens: Sequence[int]) -> list[int]:
        """Tokens per output of items of `num_tokens` tokens: 1 each for mlp / linear, pool's groups for pool."""
        cfg = SequenceTokens(kind="pool" if self.cfg.kind == "pool" else "encoder", factor=self.cfg.pool_factor)
        return [size for n in num_tokens for size in group_sizes("audio", int(n), cfg)]

    def num_outputs(self, num_tokens: Sequence[int]) -> list[int]:
        """Outputs per item of `num_tokens` encoder tokens each."""
        if self.cfg.kind != "pool":
            return [int(n) for n in num_tokens]
        return [len(self.group_sizes([n])) for n in num_tokens]


def average_groups(x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """(sum(sizes), D) consecutive groups of at most max(sizes) tokens -> (len(sizes), D), each group's mean.

    Each group is written into its own zero-padded slot of a (G, k, D) tensor and summed over k: a
    deterministic reduction (no atomics, unlike index_add on a GPU) that never mixes two groups.
    """
    assert sum(sizes) == x.shape[0], (sum(sizes), x.shape)
    if not sizes:
        return x.new_zeros(0, x.shape[-1])
    width = max(sizes)
    counts = torch.tensor(list(sizes), device=x.device)                                        # (G,)
    group = torch.repeat_interleave(torch.arange(len(sizes), device=x.device), counts)          # (N,) group of each token
    starts = counts.cumsum(0) - counts                                                         # (G,) first token of each group
    slot = group * width + torch.arange(x.shape[0], device=x.device) - starts[group]           # (N,) row in the padded slots
    padded = x.new_zeros(len(sizes) * width, x.shape[-1]).index_copy(0, slot, x)               # (G * k, D)
    return padded.view(len(sizes), width, -1).sum(dim=1) / counts[:, None].to(x.dtype)        # (G, D)


def check_pool_factor(factor: int) -> None:
    if not isinstance(factor, int) or isinstance(factor, bool) or factor < 1:
        raise ValueError(f"model.pool.factor must be an integer >= 1, got {factor!r}")


@dataclass(kw_only=True)
class PoolConfig:
    """`model.pool`: the pool projector's compression (used where a projector's kind is pool)."""

    factor: int = 2  # neighbouring encoder tokens averaged into one backbone position

    def __post_init__(self):
        check_pool_factor(self.factor)


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
                    options: ProjectorOptions | None = None, pool_factor: int = 2) -> Projector:
    """A projector of `kind` (PROJECTOR_KINDS), or of what `options` sets; ValueError naming model.projector for any other kind."""
    options = options or ProjectorOptions()
    return Projector(ProjectorConfig(kind=options.kind or kind, in_dim=in_dim, out_dim=out_dim, hidden_dim=options.hidden_dim,
                                     input_norm=input_norm if options.input_norm is None else options.input_norm,
                                     pool_factor=pool_factor))
