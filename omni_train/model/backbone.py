"""The shared decoder-only transformer backbone: RMSNorm, SwiGLU, grouped-query attention, RoPE.

Parameter names are those of Qwen2/Qwen3 checkpoints without the `model.` prefix, so the state
dict maps one to one (`hf_adapters`):

    embed_tokens.weight
    layers.N.input_layernorm.weight
    layers.N.self_attn.{q,k,v,o}_proj.{weight,bias}   bias on q/k/v with qkv_bias, on o with o_bias
    layers.N.self_attn.{q,k}_norm.weight               with qk_norm (Qwen3)
    layers.N.post_attention_layernorm.weight
    layers.N.mlp.{gate,up,down}_proj.weight
    layers.N.mlp.gate.weight, layers.N.mlp.{gate_up,down}_proj           with model.backbone.moe, on its sparse layers
    norm.weight
    lm_head.weight                                     absent with tie_embeddings

Written for one device: every sequence is packed (`document_ids`, `position_ids` restarting at
0 per document) and attention never crosses a document (`attention`).

`model.backbone.moe` makes every `every`-th layer's MLP a sparse mixture of experts (`SparseMoE`: a router
`gate` with an fp32 softmax, top-k renormalised, dropless; experts stored fused as Qwen3-MoE's
`gate_up_proj` (E, 2I, D) and `down_proj` (E, D, I)). Tokens are sorted by expert and each expert runs one
matrix multiply over its tokens. After a forward, `moe_terms()` gives the router's load-balance loss
(Switch Transformer, arXiv:2101.03961, as transformers' `load_balancing_loss_func`), its z-loss (ST-MoE,
arXiv:2202.08906) and the busiest expert's load over the mean, over the non-padding tokens; the model adds
the weighted losses to its loss.

`forward(after_layer={i: f})` runs f on the hidden states after layer i: how model.fusion
cross_attn inserts its gated cross-attention blocks (`cross_attention.py`; their parameters live
in OmniModel.fusion, not here). Under activation checkpointing each f is a checkpointed unit of
its own. Without it (the default) the forward is exactly the plain stack of layers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from omni_train.model.attention import attention, attention_backend, check_backend, document_ids_to_cu_seqlens
from omni_train.model.rope import apply_rotary, rope_cos_sin, rope_inv_freq

__all__ = ["BackboneConfig", "Backbone", "MoEConfig", "SparseMoE", "document_ids_to_cu_seqlens"]


@dataclass(kw_only=True)
class BackboneConfig:
    vocab_size: int                       # 0 in a recipe: the tokenizer's size, filled in when the model is built
    dim: int                              # hidden_size
    num_layers: int
    num_heads: int
    num_kv_heads: int                     # grouped-query attention: divides num_heads
    ffn_dim: int                          # intermediate_size of the SwiGLU MLP
    head_dim: int | None = None           # None: dim // num_heads (Qwen3 checkpoints set it apart)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: list[int] | None = None  # (time, height, width) rotary bands for 3-D positions; sum = head_dim // 2
    qk_norm: bool = False                 # RMSNorm on q and k per head (Qwen3)
    qkv_bias: bool = False                # bias on q/k/v projections (Qwen2)
    o_bias: bool = False                  # bias on the output projection (Qwen3 with attention_bias)
    tie_embeddings: bool = False          # lm_head shares embed_tokens.weight
    max_position_embeddings: int = 32768  # recorded for export; RoPE itself has no table to size
    init_std: float = 0.02                # normal init of linear and embedding weights when not loading
    moe: MoEConfig | None = None          # sparse mixture-of-experts MLPs (module docstring)

    def __post_init__(self):
        if not isinstance(self.vocab_size, int) or self.vocab_size < 0:
            raise ValueError(f"model.backbone.vocab_size must be a positive integer, or 0 for the tokenizer's, got {self.vocab_size!r}")
        for name in ("dim", "num_layers", "num_heads", "num_kv_heads", "ffn_dim",
                     "max_position_embeddings"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"model.backbone.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model.backbone.num_kv_heads ({self.num_kv_heads}) must divide model.backbone.num_heads ({self.num_heads})")
        if self.head_dim is None:
            if self.dim % self.num_heads:
                raise ValueError(f"model.backbone.dim ({self.dim}) must be a multiple of model.backbone.num_heads ({self.num_heads}) "
                                 f"unless model.backbone.head_dim is set")
            self.head_dim = self.dim // self.num_heads
        if not isinstance(self.head_dim, int) or self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"model.backbone.head_dim must be a positive even integer (RoPE rotates pairs), got {self.head_dim!r}")
        if self.rms_norm_eps <= 0:
            raise ValueError(f"model.backbone.rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if self.rope_theta <= 0:
            raise ValueError(f"model.backbone.rope_theta must be > 0, got {self.rope_theta}")
        if self.init_std <= 0:
            raise ValueError(f"model.backbone.init_std must be > 0, got {self.init_std}")
        if self.mrope_section is not None:
            self.mrope_section = list(self.mrope_section)
            if len(self.mrope_section) != 3 or sum(self.mrope_section) != self.head_dim // 2 or min(self.mrope_section) < 0:
                raise ValueError(f"model.backbone.mrope_section must be 3 non-negative sizes (time, height, width) summing to "
                                 f"head_dim // 2 = {self.head_dim // 2}, got {self.mrope_section}")


@dataclass(kw_only=True)
class MoEConfig:
    """`model.backbone.moe`: sparse mixture-of-experts MLPs (None: every layer dense)."""
    experts: int                          # E
    intermediate: int                     # I, each expert's SwiGLU width
    top_k: int = 2                        # experts per token, their weights renormalised to sum to 1
    every: int = 1                        # layer i is sparse when (i + 1) % every == 0 (Qwen3-MoE decoder_sparse_step)
    aux_loss_weight: float = 0.001        # x the load-balance loss (E x sum_e f_e P_e; k when balanced)
    z_loss_weight: float = 0.0            # x the router z-loss (mean squared logsumexp of the router logits)

    def __post_init__(self):
        for name in ("experts", "intermediate", "top_k", "every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"model.backbone.moe.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.top_k > self.experts:
            raise ValueError(f"model.backbone.moe.top_k ({self.top_k}) must be at most model.backbone.moe.experts "
                             f"({self.experts})")
        for name in ("aux_loss_weight", "z_loss_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.backbone.moe.{name} must be >= 0, got {getattr(self, name)}")

    def sparse(self, layer: int) -> bool:
        return (layer + 1) % self.every == 0


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), statistics in fp32, weight applied in the input dtype (as Qwen)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.float32)
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) (Shazeer 2020)."""

    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, ffn_dim, bias=False)
        self.up_proj = nn.Linear(dim, ffn_dim, bias=False)
        self.down_proj = nn.Linear(ffn_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SparseMoE(nn.Module):
    """Top-k routed SwiGLU experts, dropless: every token reaches its k experts (module docstring)."""

    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = nn.Linear(dim, cfg.experts, bias=False)                                   # the router
        self.gate_up_proj = nn.Parameter(torch.empty(cfg.experts, 2 * cfg.intermediate, dim))  # (E, 2I, D)
        self.down_proj = nn.Parameter(torch.empty(cfg.experts, dim, cfg.intermediate))        # (E, D, I)
        self.terms: dict[str, torch.Tensor] = {}

    def route(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, D) -> router logits (N, E) fp32, the chosen experts (N, k) and their renormalised weights (N, k)."""
        logits = F.linear(tokens.float(), self.gate.weight.float())                # (N, E), fp32 as Qwen3-MoE
        weights, experts = torch.softmax(logits, dim=-1).topk(self.cfg.top_k, dim=-1)
        return logits, experts, weights / weights.sum(dim=-1, keepdim=True)

    @staticmethod
    def expert(gate_up_proj: torch.Tensor, down_proj: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, gate_up_proj).chunk(2, dim=-1)                     # (n, I) each
        return F.linear(F.silu(gate) * up, down_proj)                              # (n, D)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """x (B, L, D), valid (B, L) bool (not padding: the router's terms count these tokens only)."""
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])                                          # (N, D)
        logits, experts, weights = self.route(tokens)
        flat = experts.reshape(-1)                                                 # (N k,) token-major
        order = torch.argsort(flat, stable=True)                                   # slots sorted by expert
        counts = torch.bincount(flat, minlength=self.cfg.experts).tolist()
        source = order // self.cfg.top_k                                           # the token of each sorted slot
        slot_weights = weights.reshape(-1)[order].to(x.dtype)                      # (N k,)
        # unbound once: indexing the fused tensors per expert would give each expert's backward a whole-size gradient
        gate_up, down = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)
        out, start = torch.zeros_like(tokens), 0
        for e, n in enumerate(counts):  # one matrix multiply per expert over its tokens, a contiguous run of slots
            if n:
                chosen = source[start:start + n]
                out.index_add_(0, chosen, self.expert(gate_up[e], down[e], tokens[chosen]) * slot_weights[start:start + n, None])
            start += n
        self.terms = self._terms(logits, experts, valid.reshape(-1))
        return out.reshape(shape)

    def _terms(self, logits: torch.Tensor, experts: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
        logits, experts = logits[valid], experts[valid]
        num_experts = self.cfg.experts
        if not len(logits):
            zero = logits.sum()
            return {"load_balance": zero, "z_loss": zero, "max_load": zero.detach()}
        counts = torch.bincount(experts.reshape(-1), minlength=num_experts).float()    # assignments per expert
        fraction = counts / len(logits)                                                 # f_e (sums to k)
        mean_prob = torch.softmax(logits, dim=-1).mean(dim=0)                           # P_e
        return {"load_balance": num_experts * (fraction * mean_prob).sum(),
                "z_loss": torch.logsumexp(logits, dim=-1).pow(2).mean(),
                "max_load": (counts.max() / counts.mean()).detach()}


class SelfAttention(nn.Module):
    """Grouped-query self-attention with RoPE and optional per-head q/k RMSNorm, within documents."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.dim, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, document_ids: torch.Tensor,
                cu_seqlens: torch.Tensor | None, max_seqlen: int | None, backend: str) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        q = self.q_proj(x).view(batch, seq_len, self.num_heads, self.head_dim)  # (B, L, H, Dh)
        k = self.k_proj(x).view(batch, seq_len, self.num_kv_heads, self.head_dim)  # (B, L, Hkv, Dh)
        v = self.v_proj(x).view(batch, seq_len, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H or Hkv, L, Dh)
        q, k = apply_rotary(q, k, cos, sin)
        out = attention(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, document_ids=document_ids,
                        causal=True, backend=backend)  # (B, H, L, Dh)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq_len, self.num_heads * self.head_dim))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: BackboneConfig, index: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
        self.self_attn = SelfAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
        sparse = cfg.moe is not None and cfg.moe.sparse(index)
        self.mlp = SparseMoE(cfg.dim, cfg.moe) if sparse else SwiGLU(cfg.dim, cfg.ffn_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, document_ids: torch.Tensor,
                cu_seqlens: torch.Tensor | None, max_seqlen: int | None, backend: str) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, document_ids=document_ids, cu_seqlens=cu_seqlens,
                               max_seqlen=max_seqlen, backend=backend)
        normed = self.post_attention_layernorm(x)
        if isinstance(self.mlp, SparseMoE):
            return x + self.mlp(normed, document_ids >= 0)
        return x + self.mlp(normed)


class Backbone(nn.Module):
    """Decoder-only transformer over packed sequences; returns final-norm hidden states, `logits` maps them to the vocabulary.

    `activation_checkpointing` recomputes each layer in the backward pass (torch.utils.checkpoint,
    non-reentrant); `attn_backend` forces one of attention.BACKENDS ("auto" picks by device and
    dtype). Both are plain attributes the training engine may set after construction.
    """

    def __init__(self, cfg: BackboneConfig, *, activation_checkpointing: bool = False, attn_backend: str = "auto"):
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError("model.backbone.vocab_size is 0: build the model with the tokenizer's size (omni.build_model)")
        self.cfg = cfg
        self.activation_checkpointing = activation_checkpointing
        self.attn_backend = check_backend(attn_backend)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) linear and embedding weights, zero biases, unit norm weights (Qwen's initializer)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, self.cfg.init_std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, SparseMoE):
                module.gate_up_proj.normal_(0.0, self.cfg.init_std)
                module.down_proj.normal_(0.0, self.cfg.init_std)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)  # (B, L, D)

    def forward(self, input_ids: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None,
                position_ids: torch.Tensor, document_ids: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                max_seqlen: int | None = None,
                after_layer: Mapping[int, Callable[[torch.Tensor], torch.Tensor]] | None = None) -> torch.Tensor:
        """Hidden states (B, L, D) after the final norm.

        input_ids (B, L) or inputs_embeds (B, L, D) (fusion passes embeddings with modality
        features in place); position_ids (B, L), or (3, B, L) with cfg.mrope_section;
        document_ids (B, L), -1 = padding; cu_seqlens / max_seqlen as from
        `document_ids_to_cu_seqlens`, derived here when a varlen backend needs them;
        after_layer {layer index: hidden (B, L, D) -> hidden} runs after those layers (module docstring).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Backbone.forward takes exactly one of input_ids and inputs_embeds")
        hidden = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, L, D)
        backend = self.attn_backend
        if backend == "auto":
            backend = attention_backend(hidden.device, hidden.dtype)
        if backend != "sdpa" and (cu_seqlens is None or max_seqlen is None):
            cu_seqlens, max_seqlen = document_ids_to_cu_seqlens(document_ids)
        # inv_freq is rebuilt per call rather than kept as a buffer: a buffer would be cast by
        # model.to(bf16) and left uninitialized by meta-device (ZeRO-3 / FSDP) construction.
        # Once per forward, shared by all layers, it costs nothing.
        inv_freq = rope_inv_freq(self.cfg.head_dim, self.cfg.rope_theta, device=hidden.device)
        cos, sin = rope_cos_sin(position_ids, inv_freq, self.cfg.mrope_section)  # (B, L, Dh) fp32
        layer_kwargs = dict(document_ids=document_ids, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, backend=backend)
        checkpointing = self.activation_checkpointing and torch.is_grad_enabled()
        for index, layer in enumerate(self.layers):
            if checkpointing:
                hidden = checkpoint(layer, hidden, cos, sin, use_reentrant=False, **layer_kwargs)
            else:
                hidden = layer(hidden, cos, sin, **layer_kwargs)
            insert = after_layer.get(index) if after_layer else None
            if insert is not None:
                hidden = checkpoint(insert, hidden, use_reentrant=False) if checkpointing else insert(hidden)
        return self.norm(hidden)

    def moe_terms(self) -> dict[str, torch.Tensor]:
        """The last forward's router terms summed over the sparse layers (max_load: their mean); {} when dense."""
        terms = [layer.mlp.terms for layer in self.layers if isinstance(layer.mlp, SparseMoE) and layer.mlp.terms]
        if not terms:
            return {}
        return {"load_balance": sum(t["load_balance"] for t in terms), "z_loss": sum(t["z_loss"] for t in terms),
                "max_load": sum(t["max_load"] for t in terms) / len(terms)}

    def output_weight(self) -> torch.Tensor:
        """The (vocab_size, D) output projection: embed_tokens.weight when tied."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., D) hidden states -> (..., vocab_size) logits, in the hidden states' dtype."""
        if self.lm_head is not None:
            # through the module, not its weight: ZeRO-3 gathers a partitioned lm_head for its forward and backward
            return self.lm_head(hidden)
        return F.linear(hidden, self.embed_tokens.weight)
