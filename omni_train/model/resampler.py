"""The resampler fusion (`model.fusion: resampler`): each media item, or each audio span, becomes Q learned-query tokens.

A Perceiver-resampler block (Flamingo, arXiv:2204.14198, sec. 2.1; the Q-Former of BLIP-2 plays the
same role) in front of interleaving: Q learned queries (`model.resampler.queries`) go through
`layers` blocks of pre-norm cross-attention + MLP, attending over one group of projected media
features and over themselves (Flamingo's keys are [media; latents]), and the Q outputs take the
item's Q placeholder positions (`omni.fuse_interleave`). A group is one media item, or with
`model.resampler.span_s` one span of that many seconds of an audio item (the last span partial):
a one-hour recording keeps a fixed number of positions per span instead of collapsing into Q.

Groups never see each other: they are padded into one (G, S_max, D) batch whose padded keys are
masked out of attention, so a group's outputs depend only on its own features (up to the float
rounding of the padded length). The grouping is `data.sequence_tokens.group_sizes`, the function
the chat template reserved the placeholders with.

OmniModel holds one resampler per encoder (`fusion.audio`, `fusion.vision`; images and videos share
the vision one, as they share the vision encoder and projector) under its top-level submodule
`fusion`, which the optimizer, freezing and LoRA (`fusion` group) treat as a module of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(kw_only=True)
class ResamplerConfig:
    """`model.resampler`: used when model.fusion is resampler."""

    queries: int = 16               # learned queries: positions per item (or per audio span)
    # audio only: resample every span of this many seconds separately (Q positions per span); None: whole items
    span_s: float | None = None
    # encoder tokens per span: the recipe loader derives it from span_s and data.audio (span_s x sample_rate_hz /
    # (hop_length x downsample)); set it directly only when building an OmniConfig in code
    span_tokens: int | None = None
    layers: int = 2                 # cross-attention + MLP blocks
    heads: int = 4                  # attention heads; must divide model.backbone.dim
    mlp_ratio: int = 4              # MLP hidden width = mlp_ratio x backbone dim

    def __post_init__(self):
        for name in ("queries", "layers", "heads", "mlp_ratio"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"model.resampler.{name} must be an integer >= 1, got {value!r}")
        if self.span_s is not None and (not isinstance(self.span_s, (int, float)) or not self.span_s > 0):
            raise ValueError(f"model.resampler.span_s must be a positive number of seconds or null, got {self.span_s!r}")
        if self.span_tokens is not None and (not isinstance(self.span_tokens, int) or self.span_tokens < 1):
            raise ValueError(f"model.resampler.span_tokens must be an integer >= 1 or null, got {self.span_tokens!r}")


def span_tokens_of(span_s: float, tokens_per_s: float) -> int:
    """Encoder tokens in `span_s` seconds of audio at `tokens_per_s`; ValueError unless it is a whole number >= 1."""
    tokens = span_s * tokens_per_s
    if tokens < 1 or abs(tokens - round(tokens)) > 1e-6:
        raise ValueError(f"model.resampler.span_s={span_s} must be a whole number of audio tokens (data.audio gives "
                         f"{tokens_per_s:g} per second, {1 / tokens_per_s:g} s each), got {tokens:g}")
    return round(tokens)


class ResamplerLayer(nn.Module):
    """Pre-norm cross-attention of the latents over [media; latents], then a pre-norm MLP; both residual."""

    def __init__(self, dim: int, heads: int, hidden_dim: int):
        super().__init__()
        self.heads = heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.norm_mlp = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, latents: torch.Tensor, media: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """latents (G, Q, D), media (G, S, D), valid (G, S) bool -> (G, Q, D)."""
        num_groups, num_queries, dim = latents.shape
        normed = self.norm_latents(latents)
        keys = torch.cat([self.norm_media(media), normed], dim=1)                          # (G, S + Q, D)
        keep = torch.cat([valid, valid.new_ones(num_groups, num_queries)], dim=1)         # (G, S + Q)

        def heads(x: torch.Tensor) -> torch.Tensor:                                        # (G, n, D) -> (G, H, n, D / H)
            return x.view(num_groups, x.shape[1], self.heads, dim // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q_proj(normed)), heads(self.k_proj(keys)),
                                             heads(self.v_proj(keys)), attn_mask=keep[:, None, None, :])  # (G, H, Q, D / H)
        latents = latents + self.o_proj(out.transpose(1, 2).reshape(num_groups, num_queries, dim))
        return latents + self.fc2(F.gelu(self.fc1(self.norm_mlp(latents))))


class Resampler(nn.Module):
    """Projected features of several groups (sum(group_sizes), D) -> Q latents per group (len(group_sizes) * Q, D)."""

    def __init__(self, cfg: ResamplerConfig, dim: int, *, init_std: float = 0.02):
        super().__init__()
        self.cfg = cfg
        self.queries = nn.Parameter(torch.randn(cfg.queries, dim) * init_std)  # (Q, D)
        self.layers = nn.ModuleList(ResamplerLayer(dim, cfg.heads, cfg.mlp_ratio * dim) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, features: torch.Tensor, group_sizes: list[int]) -> torch.Tensor:
        assert sum(group_sizes) == features.shape[0] and min(group_sizes, default=1) > 0, (group_sizes, features.shape)
        groups = list(features.split(group_sizes))
        media = nn.utils.rnn.pad_sequence(groups, batch_first=True)                        # (G, S_max, D)
        lengths = torch.tensor(group_sizes, device=features.device)
        valid = torch.arange(media.shape[1], device=features.device) < lengths[:, None]    # (G, S_max)
        latents = self.queries.to(features.dtype).expand(len(groups), -1, -1)              # (G, Q, D)
        for layer in self.layers:
            latents = layer(latents, media, valid)
        return self.norm(latents).flatten(0, 1)                                           # (G * Q, D)
