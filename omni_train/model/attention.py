"""Attention over packed sequences that never crosses a document boundary, with one dispatch function.

A packed batch is (B, L) tokens where each row holds several documents back to back, described
twice, equivalently: `document_ids` (B, L) (-1 = padding) and `cu_seqlens`, the cumulative
segment lengths over the flattened B * L tokens (the varlen kernels' form). A segment is a
maximal run of one document id within a row; a run of padding is one segment too, so the
varlen kernels see every token. Outputs at padding positions are unspecified (they differ by
backend) and must not be used.

Backends, chosen by `attention_backend` unless `backend=` names one:
  flash   flash-attn's `flash_attn_varlen_func` (CUDA, fp16/bf16, where flash-attn imports)
  varlen  torch's `torch.nn.attention.varlen.varlen_attn` (CUDA, fp16/bf16, torch >= 2.10)
  sdpa    `F.scaled_dot_product_attention` with a block-diagonal (causal) mask built from
          document_ids: the CPU path and the fallback everywhere else
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "flash", "varlen", "sdpa")
_HALF_DTYPES = (torch.float16, torch.bfloat16)


@functools.cache
def varlen_kernels() -> tuple[Any, Any, frozenset]:
    """(flash_attn_varlen_func or None, torch varlen_attn or None, varlen_attn's parameter names).

    Imported on first use only: torch.nn.attention.varlen pulls in torch._dynamo (about 2.5 s),
    which CPU runs and recipe validation never need.
    """
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:  # flash-attn is an optional extra (`.[gpu]`); a build against another torch fails here too
        flash_attn_varlen_func = None
    try:
        from torch.nn.attention.varlen import varlen_attn
        params = frozenset(inspect.signature(varlen_attn).parameters)
    except ImportError:  # torch < 2.10
        varlen_attn, params = None, frozenset()
    return flash_attn_varlen_func, varlen_attn, params


def check_backend(name: str) -> str:
    """Validate a module's `attn_backend` argument (one of BACKENDS)."""
    if name not in BACKENDS:
        raise ValueError(f"attn_backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    return name


def attention_backend(device: torch.device | str, dtype: torch.dtype) -> str:
    """The backend `attention(..., backend="auto")` uses for tensors on `device` of `dtype`."""
    if torch.device(device).type == "cuda" and dtype in _HALF_DTYPES:
        flash, varlen, _ = varlen_kernels()
        if flash is not None:
            return "flash"
        if varlen is not None:
            return "varlen"
    return "sdpa"


def document_ids_to_cu_seqlens(document_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(B, L) document ids -> (cu_seqlens int32 (num_segments + 1,), max_seqlen) over the B * L flattened tokens.

    A segment starts at each row's first token and wherever the id changes. max_seqlen needs one
    device-to-host copy: compute this once per batch (the data pipeline can), not per layer.
    """
    num_rows, row_len = document_ids.shape
    starts = torch.ones_like(document_ids, dtype=torch.bool)  # (B, L)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    start_index = starts.flatten().nonzero().flatten()  # (num_segments,)
    end = torch.full((1,), num_rows * row_len, dtype=start_index.dtype, device=start_index.device)
    cu_seqlens = torch.cat((start_index, end)).to(torch.int32)
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return cu_seqlens, max_seqlen


def document_mask(document_ids: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """(B, L) document ids -> (B, 1, L, L) bool, True where query i may attend to key j.

    Same document (and j <= i when causal); a padding position attends only to itself, so no
    softmax row is empty and nothing becomes NaN.
    """
    row_len = document_ids.shape[1]
    same_document = document_ids[:, :, None] == document_ids[:, None, :]  # (B, L, L)
    is_real = (document_ids >= 0)[:, :, None]  # (B, L, 1)
    diagonal = torch.eye(row_len, dtype=torch.bool, device=document_ids.device)
    allowed = (same_document & is_real) | diagonal
    if causal:
        allowed &= torch.ones(row_len, row_len, dtype=torch.bool, device=document_ids.device).tril()
    return allowed[:, None]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, cu_seqlens: torch.Tensor | None,
              max_seqlen: int | None, document_ids: torch.Tensor | None, causal: bool = True,
              backend: str = "auto") -> torch.Tensor:
    """Scaled dot-product attention within documents: q (B, H, L, Dh), k/v (B, Hkv, L, Dh) -> (B, H, L, Dh).

    Grouped-query attention when Hkv < H (Hkv must divide H). The varlen backends need
    cu_seqlens and max_seqlen (computed from document_ids when missing, at the cost of a host
    sync); sdpa needs document_ids.
    """
    batch, num_heads, seq_len, head_dim = q.shape
    num_kv_heads = k.shape[1]
    assert k.shape == v.shape == (batch, num_kv_heads, seq_len, head_dim), (q.shape, k.shape, v.shape)
    assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
    if backend == "auto":
        backend = attention_backend(q.device, q.dtype)
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {', '.join(BACKENDS)}")

    if backend == "sdpa":
        if document_ids is None:
            raise ValueError("attention backend 'sdpa' needs document_ids (B, L)")
        mask = document_mask(document_ids, causal)  # (B, 1, L, L)
        grouped = num_kv_heads != num_heads
        if grouped and q.device.type == "cuda":
            # CUDA's memory-efficient kernel (the one that takes a mask) has not always taken GQA
            # (torch 2.9 refuses it); enable_gqa would then fall to the math kernel's O(L^2) memory
            k, v = (x.repeat_interleave(num_heads // num_kv_heads, dim=1) for x in (k, v))
            grouped = False
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=grouped)

    if q.device.type != "cuda" or q.dtype not in _HALF_DTYPES:
        raise ValueError(f"attention backend {backend!r} needs CUDA fp16/bf16 tensors, got {q.device.type} {q.dtype}")
    if cu_seqlens is None or max_seqlen is None:
        if document_ids is None:
            raise ValueError(f"attention backend {backend!r} needs cu_seqlens and max_seqlen, or document_ids")
        cu_seqlens, max_seqlen = document_ids_to_cu_seqlens(document_ids)
    cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32)
    q_packed, k_packed, v_packed = (to_varlen_layout(x) for x in (q, k, v))

    if backend == "flash":
        flash_attn_varlen_func, _, _ = varlen_kernels()
        if flash_attn_varlen_func is None:
            raise ValueError("attention backend 'flash' needs flash-attn (pip install '.[gpu]'), which does not import here")
        out = flash_attn_varlen_func(q_packed, k_packed, v_packed, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                     causal=causal)  # flash-attn takes Hkv < H as is
    else:
        _, varlen_attn, _ = varlen_kernels()
        if varlen_attn is None:
            raise ValueError("attention backend 'varlen' needs torch >= 2.10 (torch.nn.attention.varlen)")
        out = varlen_attn(q_packed, *_varlen_kv(k_packed, v_packed, num_heads), cu_seqlens, cu_seqlens,
                          max_seqlen, max_seqlen, **_varlen_kwargs(causal, num_kv_heads != num_heads))
    return from_varlen_layout(out, batch)


def to_varlen_layout(x: torch.Tensor) -> torch.Tensor:
    """(B, H, L, Dh) -> (B * L, H, Dh): the varlen kernels' layout, B and L flattened into one token axis."""
    batch, num_heads, seq_len, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch * seq_len, num_heads, head_dim)


def from_varlen_layout(x: torch.Tensor, batch: int) -> torch.Tensor:
    """(B * L, H, Dh) -> (B, H, L, Dh), the inverse of to_varlen_layout."""
    num_tokens, num_heads, head_dim = x.shape
    return x.reshape(batch, num_tokens // batch, num_heads, head_dim).transpose(1, 2)


def _varlen_kv(k: torch.Tensor, v: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v as varlen_attn takes them: repeated to H heads where this torch's varlen_attn has no enable_gqa."""
    num_repeats = num_heads // k.shape[1]
    if num_repeats == 1 or "enable_gqa" in varlen_kernels()[2]:
        return k, v
    return k.repeat_interleave(num_repeats, dim=1), v.repeat_interleave(num_repeats, dim=1)


def _varlen_kwargs(causal: bool, grouped: bool) -> dict:
    """varlen_attn's causal switch changed: torch 2.10 has `is_causal`, later versions `window_size` ((-1, 0) = causal)."""
    kwargs = {}
    if "window_size" in varlen_kernels()[2]:
        kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
    else:
        kwargs["is_causal"] = causal
    if grouped and "enable_gqa" in varlen_kernels()[2]:
        kwargs["enable_gqa"] = True
    return kwargs
