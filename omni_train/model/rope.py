"""Rotary position embeddings (RoPE, Su et al. 2021) for packed sequences, 1-D and 3-D.

Positions come per token (`position_ids`), so every document packed into a row restarts at 0.
The 1-D form is Qwen2/Qwen3's ("rotate half": the rotary dims are split into two halves, not
interleaved pairs), so checkpoints load unchanged.

The 3-D form is multimodal RoPE (M-RoPE, Qwen2-VL arXiv:2409.12191; TMRoPE, Qwen2.5-Omni
arXiv:2503.20215): `position_ids` is (3, B, L) holding time, height and width ids, and
`mrope_section = (t, h, w)` splits the head_dim // 2 rotary frequencies into three contiguous
bands, each rotated by its own position stream. Text tokens carry the same id in all three
streams, where 3-D RoPE equals 1-D RoPE.

Interleaved M-RoPE (Qwen3-Omni, Qwen3-VL: `interleaved=True`) spreads the height and width streams
over the whole frequency range instead: frequency j takes the height stream when j % 3 == 1 and
j < 3 * h, the width stream when j % 3 == 2 and j < 3 * w, and time otherwise (transformers'
`Qwen3OmniMoeThinkerTextRotaryEmbedding.recomposition_frequencies`).
"""

from __future__ import annotations

import torch


def rope_inv_freq(head_dim: int, theta: float, device: torch.device | str | None = None) -> torch.Tensor:
    """The head_dim // 2 inverse frequencies theta^(-2i/head_dim), float32."""
    assert head_dim % 2 == 0, head_dim
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).to(torch.float32) / head_dim
    return 1.0 / (theta ** exponents)  # (head_dim // 2,)


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor,
                 mrope_section: tuple[int, int, int] | list[int] | None = None, *,
                 interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for `apply_rotary`, float32, each (B, L, head_dim).

    position_ids: (B, L) for 1-D RoPE, or (3, B, L) (time, height, width) with `mrope_section`
    summing to head_dim // 2. inv_freq: (head_dim // 2,) from `rope_inv_freq`.
    """
    inv_freq = inv_freq.to(device=position_ids.device, dtype=torch.float32)
    # fp32 products: bf16 positions lose integer precision above 256
    freqs = position_ids.to(torch.float32)[..., None] * inv_freq  # (B, L, Dh/2) or (3, B, L, Dh/2)
    if position_ids.dim() == 3:
        if mrope_section is None:
            raise ValueError("position_ids of shape (3, B, L) need mrope_section (time, height, width)")
        if position_ids.shape[0] != 3 or len(mrope_section) != 3 or sum(mrope_section) != inv_freq.shape[0]:
            raise ValueError(f"mrope_section {list(mrope_section)} must be 3 sizes summing to head_dim // 2 = "
                             f"{inv_freq.shape[0]}, for position_ids (3, B, L); got position_ids {tuple(position_ids.shape)}")
        freqs = freqs.gather(0, mrope_streams(mrope_section, interleaved, position_ids.device)
                             .expand(1, *freqs.shape[1:])).squeeze(0)  # (B, L, Dh/2): each frequency's stream
    elif position_ids.dim() != 2:
        raise ValueError(f"position_ids must be (B, L) or (3, B, L), got shape {tuple(position_ids.shape)}")
    angles = torch.cat((freqs, freqs), dim=-1)  # (B, L, Dh): both halves of "rotate half" share a frequency
    return angles.cos(), angles.sin()


def mrope_streams(mrope_section: tuple[int, int, int] | list[int], interleaved: bool,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """(1, 1, 1, Dh/2) int64: the position stream (0 time, 1 height, 2 width) each rotary frequency turns with."""
    t, h, w = mrope_section
    if interleaved:
        stream = torch.zeros(t + h + w, dtype=torch.int64, device=device)
        stream[1:3 * h:3], stream[2:3 * w:3] = 1, 2
    else:
        stream = torch.repeat_interleave(torch.arange(3, device=device), torch.tensor([t, h, w], device=device))
    return stream.view(1, 1, 1, -1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B, H, L, Dh) and k (B, Hkv, L, Dh) by cos/sin (B, L, Dh); computed in fp32, returned in q/k's dtype."""
    cos = cos[:, None].to(torch.float32)  # (B, 1, L, Dh)
    sin = sin[:, None].to(torch.float32)
    q32, k32 = q.to(torch.float32), k.to(torch.float32)
    q_rot = q32 * cos + _rotate_half(q32) * sin
    k_rot = k32 * cos + _rotate_half(k32) * sin
    return q_rot.to(q.dtype), k_rot.to(k.dtype)
