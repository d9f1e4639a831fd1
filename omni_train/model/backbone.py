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
`gate_up_proj` (E, 2I, D) and `down_proj` (E, D, I)). Tokens are sorted by expert, then torch's grouped GEMM
(`moe.kernel` grouped) or one matrix multiply per expert (loop) computes each expert over its run of tokens. After a forward, `moe_terms()` gives the router's load-balance loss
(Switch Transformer, arXiv:2101.03961, as transformers' `load_balancing_loss_func`), its z-loss (ST-MoE,
arXiv:2202.08906), each expert's load over the mean (`load`, (E,): 1 everywhere when balanced) and the share of
assignments that a router with capacity factor `capacity_factor` would have dropped (`capacity_drop`: a figure only,
routing is dropless), over the non-padding tokens, which are the only ones routed; the model adds the weighted
losses to its loss and logs the figures as `moe/*`.

`forward(after_layer={i: f})` runs f on the hidden states after layer i: how model.fusion
cross_attn inserts its gated cross-attention blocks (`cross_attention.py`; their parameters live
in OmniModel.fusion, not here). Under activation checkpointing each f is a checkpointed unit of
its own. Without it (the default) the forward is exactly the plain stack of layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

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
    mrope_interleaved: bool = False       # height and width frequencies interleaved with time (Qwen3-Omni; rope.py)
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
            if self.mrope_interleaved and 3 * max(self.mrope_section[1:]) > self.head_dim // 2:
                raise ValueError(f"model.backbone.mrope_section {self.mrope_section}: interleaved, the height and width "
                                 f"bands take every third of the first 3 x size frequencies, which must fit in head_dim // 2 "
                                 f"= {self.head_dim // 2}")
        elif self.mrope_interleaved:
            raise ValueError("model.backbone.mrope_interleaved needs model.backbone.mrope_section (time, height, width)")


MOE_KERNELS = ("auto", "grouped", "loop")  # auto: grouped where torch has F.grouped_mm, else loop


@dataclass(kw_only=True)
class MoEConfig:
    """`model.backbone.moe`: sparse mixture-of-experts MLPs (None: every layer dense)."""
    experts: int                          # E
    intermediate: int                     # I, each expert's SwiGLU width
    top_k: int = 2                        # experts per token, their weights renormalised to sum to 1
    every: int = 1                        # layer i is sparse when (i + 1) % every == 0 (Qwen3-MoE decoder_sparse_step)
    aux_loss_weight: float = 0.001        # x the load-balance loss (E x sum_e f_e P_e; k when balanced)
    z_loss_weight: float = 0.0            # x the router z-loss (mean squared logsumexp of the router logits)
    dense_layers: list[int] = field(default_factory=list)  # layers kept dense whatever `every` says (mlp_only_layers)
    normalize_top_k: bool = True          # the k chosen probabilities renormalised to sum to 1 (norm_topk_prob)
    capacity_factor: float = 1.25         # only for the moe/capacity_drop figure: routing never drops a token
    kernel: str = "auto"                  # MOE_KERNELS: grouped (torch's grouped GEMM), loop (a matmul per expert); auto

    def __post_init__(self):
        for name in ("experts", "intermediate", "top_k", "every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"model.backbone.moe.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.top_k > self.experts:
            raise ValueError(f"model.backbone.moe.top_k ({self.top_k}) must be at most model.backbone.moe.experts "
                             f"({self.experts})")
        self.dense_layers = list(self.dense_layers)
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in self.dense_layers):
            raise ValueError(f"model.backbone.moe.dense_layers must be layer indices >= 0, got {self.dense_layers!r}")
        if self.kernel not in MOE_KERNELS:
            raise ValueError(f"model.backbone.moe.kernel must be one of {', '.join(MOE_KERNELS)}, got {self.kernel!r}")
        if self.kernel == "grouped" and not hasattr(F, "grouped_mm"):
            raise ValueError(f"model.backbone.moe.kernel=grouped needs torch.nn.functional.grouped_mm (torch >= 2.10), "
                             f"this is torch {torch.__version__}: use kernel=loop or auto")
        if not self.capacity_factor > 0:
            raise ValueError(f"model.backbone.moe.capacity_factor must be > 0, got {self.capacity_factor!r}")
        for name in ("aux_loss_weight", "z_loss_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.backbone.moe.{name} must be >= 0, got {getattr(self, name)}")

    def sparse(self, layer: int) -> bool:
        return layer not in self.dense_layers and (layer + 1) % self.every == 0


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
        """(N, D) -> router logits (N, E) fp32, the chosen experts (N, k) and their weights (N, k), renormalised
        unless normalize_top_k is off.

        The logits in the model's dtype, their softmax in fp32, as Qwen3-MoE; through the module (LoRA on the router)."""
        logits = self.gate(tokens).float()                                         # (N, E)
        weights, experts = torch.softmax(logits, dim=-1).topk(self.cfg.top_k, dim=-1)
        if self.cfg.normalize_top_k:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, experts, weights

    @staticmethod
    def expert(gate_up_proj: torch.Tensor, down_proj: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, gate_up_proj).chunk(2, dim=-1)                     # (n, I) each
        return F.linear(F.silu(gate) * up, down_proj)                              # (n, D)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """x (B, L, D), valid (B, L) bool -> (B, L, D). Only valid (non-padding) tokens are routed; padding gets 0."""
        shape = x.shape
        at = valid.reshape(-1).nonzero().squeeze(1)                                # (N,) the valid tokens
        tokens = x.reshape(-1, shape[-1])[at]                                      # (N, D)
        logits, experts, weights = self.route(tokens)
        flat = experts.reshape(-1)                                                 # (N k,) token-major
        order = torch.argsort(flat, stable=True)                                   # slots sorted by expert
        counts = torch.bincount(flat, minlength=self.cfg.experts)
        source = order // self.cfg.top_k                                           # the token of each sorted slot
        slot_weights = weights.reshape(-1)[order].to(x.dtype)                      # (N k,)
        if not self._grouped(tokens):
            out = self._per_expert(tokens, source, slot_weights, counts)
        else:  # one grouped GEMM per projection over the sorted slots, each expert's run given by its end offset
            offsets = counts.cumsum(0).to(torch.int32)
            routed = tokens[source]                                                # (N k, D) sorted by expert
            gate, up = F.grouped_mm(routed, self.gate_up_proj.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
            slots = F.grouped_mm(F.silu(gate) * up, self.down_proj.transpose(1, 2), offs=offsets)  # (N k, D)
            out = torch.zeros_like(tokens).index_add_(0, source, slots * slot_weights[:, None])
        self.terms = self._terms(logits, counts)
        return x.new_zeros(shape[0] * shape[1], shape[-1]).index_copy(0, at, out).reshape(shape)

    def _grouped(self, tokens: torch.Tensor) -> bool:
        """Whether this forward takes the grouped GEMM: kernel=grouped, or auto where torch runs it (on the CPU in any
        dtype; on CUDA in bf16 from SM 8.0, as F.grouped_mm's documentation asks)."""
        if self.cfg.kernel != "auto":
            return self.cfg.kernel == "grouped"
        if not hasattr(F, "grouped_mm"):
            return False
        if tokens.device.type == "cpu":
            return True
        return (tokens.device.type == "cuda" and tokens.dtype == torch.bfloat16
                and torch.cuda.get_device_capability(tokens.device)[0] >= 8)

    def _per_expert(self, tokens: torch.Tensor, source: torch.Tensor, slot_weights: torch.Tensor,
                    counts: torch.Tensor) -> torch.Tensor:
        """The loop kernel: one matrix multiply per expert over its tokens, a contiguous run of the sorted slots."""
        # unbound once: indexing the fused tensors per expert would give each expert's backward a whole-size gradient;
        # an expert without tokens still gets its (zero) gradient slice, so every rank reduces the same tensors (ZeRO-3)
        gate_up, down = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)
        out, start = torch.zeros_like(tokens), 0
        for e, n in enumerate(counts.tolist()):
            if n:
                chosen = source[start:start + n]
                out.index_add_(0, chosen, self.expert(gate_up[e], down[e], tokens[chosen]) * slot_weights[start:start + n, None])
            start += n
        return out

    def _terms(self, logits: torch.Tensor, counts: torch.Tensor) -> dict[str, torch.Tensor]:
        """The router's terms over the routed tokens: logits (N, E), counts (E,) assignments per expert."""
        num_experts, assignments = self.cfg.experts, counts.sum()
        if not len(logits):
            zero = logits.sum()
            return {"load_balance": zero, "z_loss": zero, "max_load": zero.detach(),
                    "load": torch.zeros(num_experts), "capacity_drop": zero.detach()}
        counts = counts.float()
        fraction = counts / len(logits)                                                 # f_e (sums to k)
        mean_prob = torch.softmax(logits, dim=-1).mean(dim=0)                           # P_e
        capacity = math.ceil(self.cfg.capacity_factor * float(assignments) / num_experts)
        return {"load_balance": num_experts * (fraction * mean_prob).sum(),
                "z_loss": torch.logsumexp(logits, dim=-1).pow(2).mean(),
                "max_load": (counts.max() / counts.mean()).detach(),
                "load": (counts / counts.mean()).detach().cpu(),
                "capacity_drop": ((counts - capacity).clamp(min=0).sum() / assignments).detach()}


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
        # a flag, not isinstance: LoRA on the experts wraps the SparseMoE (train/lora.py)
        self.sparse = cfg.moe is not None and cfg.moe.sparse(index)
        self.mlp = SparseMoE(cfg.dim, cfg.moe) if self.sparse else SwiGLU(cfg.dim, cfg.ffn_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, document_ids: torch.Tensor,
                cu_seqlens: torch.Tensor | None, max_seqlen: int | None, backend: str) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, document_ids=document_ids, cu_seqlens=cu_seqlens,
                               max_seqlen=max_seqlen, backend=backend)
        normed = self.post_attention_layernorm(x)
        if self.sparse:
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
        cos, sin = rope_cos_sin(position_ids, inv_freq, self.cfg.mrope_section,
                                interleaved=self.cfg.mrope_interleaved)  # (B, L, Dh) fp32
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
        """The last forward's router terms, taken (a second call gives {}): the losses summed over the sparse layers,
        the figures (max_load, load, capacity_drop) their mean; {} when dense."""
        terms = []
        for m in self.modules():  # taken: the model keeps no graph between steps (a deepcopy of it would fail)
            if isinstance(m, SparseMoE) and m.terms:
                terms.append(m.terms)
                m.terms = {}
        if not terms:
            return {}
        summed = {name: sum(t[name] for t in terms) for name in terms[0]}
        return {name: value if name in ("load_balance", "z_loss") else value / len(terms) for name, value in summed.items()}

    def output_weight(self) -> torch.Tensor:
        """The (vocab_size, D) output projection: embed_tokens.weight when tied."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., D) hidden states -> (..., vocab_size) logits, in the hidden states' dtype."""
        if self.lm_head is not None:
            # through the module, not its weight: ZeRO-3 gathers a partitioned lm_head for its forward and backward
            return self.lm_head(hidden)
        return F.linear(hidden, self.embed_tokens.weight)
