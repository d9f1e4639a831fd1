"""Gated cross-attention fusion (`model.fusion: cross_attn`): the media stay out of the sequence and the text reads them.

Flamingo (Alayrac et al. 2022) and Llama 3.2 Vision style: after every k-th backbone layer
(`model.cross_attn.every`; after layers k-1, 2k-1, ...) a gated block

    x = x + tanh(attn_gate) * xattn(norm(x), media)
    x = x + tanh(mlp_gate) * mlp(norm(x))

with both gates initialised at 0, so a freshly built model computes exactly the backbone alone
(a pretrained backbone starts undisturbed). The media are the projected features of every
modality (audio, image, video), held apart from the sequence in a `MediaMemory`:

    features      (B, M, D)  row b's media tokens: the items anchored in row b, in the order of their
                             anchors, then zeros up to the longest row's M
    document_ids  (B, M)     the document of each token's item (that of its anchor), -1 on padding
    anchors       (B, M)     the column of the item's anchor in the row; padding: a column past every row
    item_ids      (B, M)     the item's index in the batch (modalities in MEDIA order, each in batch
                             order, as the `{m}_num_tokens` lists them), -1 on padding: the item boundaries
    modality_ids  (B, M)     data.sample.MODALITY_IDS of the token's item, 0 on padding

Each media item keeps exactly one placeholder position in the sequence, its anchor (the data
layer renders it, `data/sequence_tokens.py` kind "anchor"; the pad token's own embedding stays
there). The k-th anchor of a modality, read row by row, is that modality's k-th item. A text
position at column t of document d reads the media of d anchored at columns <= t (Llama 3.2
Vision's mask: a turn never sees media that come after it, so training and generation from a
prefix agree); it never reads another document's media, which makes packing safe. A position
that reads no media (text before the first anchor, a document without media, padding) gets
exactly x back from the block: the attention and MLP outputs are zeroed there (where(), so no
softmax over an empty row can produce NaN), as Llama 3.2's `full_text_row_masked_out_mask`.

Under a batch without any media the blocks still run, on a one-token dummy memory that no
position reads: every rank makes the same calls (ZeRO-3) and every parameter gets a (zero)
gradient. Generation computes each block's media keys and values once (`CrossAttentionBlocks.cache`,
a `MediaCache`) and reuses them at every step.

The backbone runs the blocks through `Backbone.forward(after_layer=...)`: a mapping from layer
index to a callable on the hidden states (`CrossAttentionBlocks.after_layer`), checkpointed as
its own unit under activation checkpointing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from omni_train.data.sample import MODALITY_IDS
from omni_train.model.backbone import BackboneConfig, RMSNorm, SwiGLU

MEDIA = ("audio", "image", "video")


@dataclass(kw_only=True)
class CrossAttnConfig:
    every: int = 1                # a gated block after every `every`-th backbone layer (num_layers // every blocks)
    heads: int | None = None      # attention heads; None: the backbone's num_heads and head_dim
    kv_heads: int | None = None   # key/value heads (grouped-query attention when fewer); None: heads
    ffn_dim: int | None = None    # hidden size of the gated SwiGLU; None: the backbone's ffn_dim
    media_norm: bool = True       # RMSNorm on the media before the key/value projections (their own norm)
    qk_norm: bool = False         # per-head RMSNorm on queries and keys (Llama 3.2 Vision's cross-attention)

    def __post_init__(self):
        for name in ("every", "heads", "kv_heads", "ffn_dim"):
            value = getattr(self, name)
            if value is None and name != "every":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"model.cross_attn.{name} must be a positive integer"
                                 f"{'' if name == 'every' else ' or null'}, got {value!r}")
        if self.kv_heads is not None and self.heads is None:
            raise ValueError("model.cross_attn.kv_heads needs model.cross_attn.heads (null heads takes the backbone's)")
        if self.kv_heads is not None and self.heads % self.kv_heads:
            raise ValueError(f"model.cross_attn.kv_heads ({self.kv_heads}) must divide model.cross_attn.heads ({self.heads})")

    def check(self, backbone: BackboneConfig) -> None:
        """Against the backbone it is inserted into (OmniConfig's check with model.fusion: cross_attn)."""
        if self.every > backbone.num_layers:
            raise ValueError(f"model.cross_attn.every={self.every} is more than model.backbone.num_layers="
                             f"{backbone.num_layers}: no layer would get a cross-attention block")
        if self.heads is not None and backbone.dim % self.heads:
            raise ValueError(f"model.cross_attn.heads ({self.heads}) must divide model.backbone.dim ({backbone.dim})")

    def after_layers(self, num_layers: int) -> list[int]:
        """Indices of the backbone layers followed by a block: every-1, 2 * every - 1, ..."""
        return list(range(self.every - 1, num_layers, self.every))


@dataclass
class MediaMemory:
    """The media the text reads, one row per batch row; layout in the module docstring."""
    features: torch.Tensor      # (B, M, D)
    document_ids: torch.Tensor  # (B, M) int64, -1 on padding
    anchors: torch.Tensor       # (B, M) int64
    item_ids: torch.Tensor      # (B, M) int64, -1 on padding
    modality_ids: torch.Tensor  # (B, M) int8


@dataclass
class MediaCache:
    """Each block's media keys and values, computed once (generation); `CrossAttentionBlocks.cache`."""
    keys_values: list[tuple[torch.Tensor, torch.Tensor]]  # per block: (B, Hkv, M, Dh) each
    document_ids: torch.Tensor                            # (B, M)
    anchors: torch.Tensor                                 # (B, M)


def build_memory(features: dict[str, torch.Tensor], num_tokens: dict[str, list[int]], modality_ids: torch.Tensor,
                 document_ids: torch.Tensor, *, dim: int, dtype: torch.dtype) -> MediaMemory:
    """Media features {modality: (N_m, D)} split into items by num_tokens {modality: [tokens per item]} -> a MediaMemory.

    Each modality's k-th anchor (its placeholder positions in modality_ids (B, L), read row by row)
    is its k-th item; ValueError when a modality's anchors and items differ in number. Without any
    item the memory is one zero token per row that no position reads (the blocks still run).
    """
    num_rows, row_len = modality_ids.shape
    device = modality_ids.device
    flat, items = [], []  # items: (row, anchor column, modality, first flat token, size)
    offset = 0
    for modality in MEDIA:
        rows, cols = (modality_ids == MODALITY_IDS[modality]).nonzero(as_tuple=True)  # row-major
        sizes = list(num_tokens[modality]) if modality in features else []
        if rows.numel() != len(sizes):
            raise ValueError(f"fusion cross_attn: the batch has {rows.numel()} {modality} anchor positions but "
                             f"{len(sizes)} {modality} items (one anchor per item: the data layer's "
                             f"data.sequence_tokens kind must be anchor)")
        if not sizes:
            continue
        assert sum(sizes) == features[modality].shape[0], (modality, sum(sizes), features[modality].shape)
        flat.append(features[modality].to(dtype))
        for row, col, size in zip(rows.tolist(), cols.tolist(), sizes):
            items.append((row, col, modality, offset, size))
            offset += size
    if not items:  # a dummy that no position reads: anchors past every column, document -1
        zeros = torch.zeros(num_rows, 1, dtype=torch.long, device=device)
        return MediaMemory(features=torch.zeros(num_rows, 1, dim, dtype=dtype, device=device), document_ids=zeros - 1,
                           anchors=zeros + row_len, item_ids=zeros - 1, modality_ids=zeros.to(torch.int8))
    flat_features = torch.cat(flat + [flat[0].new_zeros(1, dim)])  # (N + 1, D): the last row pads
    pad = flat_features.shape[0] - 1
    per_row: list[list[tuple]] = [[] for _ in range(num_rows)]
    for index, item in enumerate(items):
        per_row[item[0]].append((item[1], index, item))
    width = max(sum(item[4] for _, _, item in row) for row in per_row)
    gather = torch.full((num_rows, width), pad, dtype=torch.long)
    item_ids = torch.full((num_rows, width), -1, dtype=torch.long)
    anchors = torch.full((num_rows, width), row_len, dtype=torch.long)
    kinds = torch.zeros((num_rows, width), dtype=torch.int8)
    for row, row_items in enumerate(per_row):
        at = 0
        for col, index, (_, _, modality, start, size) in sorted(row_items):  # in anchor order
            gather[row, at:at + size] = torch.arange(start, start + size)
            item_ids[row, at:at + size], anchors[row, at:at + size] = index, col
            kinds[row, at:at + size] = MODALITY_IDS[modality]
            at += size
    gather, item_ids, anchors = gather.to(device), item_ids.to(device), anchors.to(device)
    anchor_documents = document_ids.gather(1, anchors.clamp(max=row_len - 1))  # (B, M)
    return MediaMemory(features=flat_features[gather], document_ids=torch.where(item_ids >= 0, anchor_documents, -1),
                       anchors=anchors, item_ids=item_ids, modality_ids=kinds.to(device))


class GatedCrossAttentionBlock(nn.Module):
    """x + tanh(attn_gate) * xattn(norm(x), media), then x + tanh(mlp_gate) * mlp(norm(x)); see the module docstring."""

    def __init__(self, cfg: CrossAttnConfig, backbone: BackboneConfig):
        super().__init__()
        dim, eps = backbone.dim, backbone.rms_norm_eps
        self.num_heads = cfg.heads or backbone.num_heads
        self.num_kv_heads = cfg.kv_heads or self.num_heads
        self.head_dim = backbone.head_dim if cfg.heads is None else dim // cfg.heads
        self.input_layernorm = RMSNorm(dim, eps)
        self.media_norm = RMSNorm(dim, eps) if cfg.media_norm else None
        self.q_proj = nn.Linear(dim, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, dim, bias=False)
        if cfg.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(self.head_dim, eps), RMSNorm(self.head_dim, eps)
        else:
            self.q_norm = self.k_norm = None
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.post_attention_layernorm = RMSNorm(dim, eps)
        self.mlp = SwiGLU(dim, cfg.ffn_dim or backbone.ffn_dim)
        self.mlp_gate = nn.Parameter(torch.zeros(1))

    def media_keys_values(self, media: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, M, D) media features -> keys, values (B, Hkv, M, Dh)."""
        batch, num_media, _ = media.shape
        if self.media_norm is not None:
            media = self.media_norm(media)
        k = self.k_proj(media).view(batch, num_media, self.num_kv_heads, self.head_dim)
        v = self.v_proj(media).view(batch, num_media, self.num_kv_heads, self.head_dim)
        if self.k_norm is not None:
            k = self.k_norm(k)
        return k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: torch.Tensor, media: torch.Tensor | tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
                reads: torch.Tensor) -> torch.Tensor:
        """x (B, L, D); media (B, M, D) features or cached (keys, values); mask (B, 1, L, M) bool, True where
        position may read the media token (every row has one: rows that read nothing are all True);
        reads (B, L, 1) bool, the positions that read any media."""
        batch, seq_len, _ = x.shape
        k, v = self.media_keys_values(media) if isinstance(media, torch.Tensor) else media
        q = self.q_proj(self.input_layernorm(x)).view(batch, seq_len, self.num_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.num_kv_heads != self.num_heads:  # the memory is short: repeating it costs little, on every kernel
            k, v = (t.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1) for t in (k, v))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask)  # (B, H, L, Dh)
        out = self.o_proj(out.transpose(1, 2).reshape(batch, seq_len, self.num_heads * self.head_dim))
        x = x + torch.tanh(self.attn_gate).to(x.dtype) * torch.where(reads, out, 0.0)
        return x + torch.tanh(self.mlp_gate).to(x.dtype) * torch.where(reads, self.mlp(self.post_attention_layernorm(x)), 0.0)


class CrossAttentionBlocks(nn.Module):
    """OmniModel.fusion for model.fusion: cross_attn: one GatedCrossAttentionBlock per scheduled backbone layer."""

    def __init__(self, cfg: CrossAttnConfig, backbone: BackboneConfig):
        super().__init__()
        self.cfg = cfg
        self.layer_indices = cfg.after_layers(backbone.num_layers)
        self.layers = nn.ModuleList(GatedCrossAttentionBlock(cfg, backbone) for _ in self.layer_indices)
        with torch.no_grad():  # the backbone's initializer; the gates stay 0
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    module.weight.normal_(0.0, backbone.init_std)

    @torch.no_grad()
    def cache(self, memory: MediaMemory) -> MediaCache:
        """Every block's media keys and values, once (generation reuses them at every step)."""
        return MediaCache(keys_values=[block.media_keys_values(memory.features) for block in self.layers],
                          document_ids=memory.document_ids, anchors=memory.anchors)

    def after_layer(self, media: MediaMemory | MediaCache,
                    document_ids: torch.Tensor) -> dict[int, Callable[[torch.Tensor], torch.Tensor]]:
        """{backbone layer index: hidden (B, L, D) -> hidden} for Backbone.forward(after_layer=...).

        document_ids (B, L) are the sequence's (column t of a row is position t); the mask of what
        each position reads is built once here and shared by the blocks.
        """
        columns = torch.arange(document_ids.shape[1], device=document_ids.device)
        mask = ((document_ids[:, :, None] == media.document_ids[:, None, :]) & (document_ids >= 0)[:, :, None]
                & (media.anchors[:, None, :] <= columns[None, :, None]))            # (B, L, M)
        reads = mask.any(dim=-1, keepdim=True)                                        # (B, L, 1)
        mask = (mask | ~reads)[:, None]  # rows that read nothing attend to everything (finite), then are zeroed
        if isinstance(media, MediaCache):
            inputs = media.keys_values
        else:
            inputs = [media.features] * len(self.layers)
        return {index: _bind(block, block_media, mask, reads)
                for index, block, block_media in zip(self.layer_indices, self.layers, inputs)}


def _bind(block: GatedCrossAttentionBlock, media, mask: torch.Tensor, reads: torch.Tensor) -> Callable:
    """block(hidden, media, mask, reads) as a function of hidden alone (a unit of its own for checkpointing)."""
    return lambda hidden: block(hidden, media, mask, reads)
