"""The vision encoder for images and video: patch embedding, 2-D rotary positions, attention per frame group, 2x2 merge.

    patches (P, 3 * tp * p * p) + grid_thw (N, 3)      the data layer's layout (data/image.py)
      -> patch_embedding: one Linear, the same map as Qwen2-VL's Conv3d(kernel = stride = (tp, p, p))
         (a Conv3d weight (D, C, tp, p, p) reshaped to (D, C * tp * p * p) is this Linear's weight)
      -> positions "learned" only: + SigLIP's position table, resized bicubically to the grid
      -> pre-norm layers (audio_encoder.EncoderLayer), with 2-D rotary positions (row, column) for "rope2d"
      -> post_layernorm
      -> merge: each run of merge_size**2 consecutive patches concatenated   (P / m**2, m**2 * dim)

Attention stays inside one frame group: an image, or one temporal patch (tp frames) of a video,
as in Qwen2-VL. Groups are laid out as rows of a padded (G, longest group) batch so that the CPU
path (SDPA with a mask) costs G small attentions rather than one (P x P) mask; images of very
different sizes in one batch pay some padding in the linear layers for that.

Window attention (`window_size`, Qwen2.5-VL arXiv:2502.13923, the vision tower of Qwen2.5-Omni):
each frame group is cut into squares of window_size pixels (112 px = 4 x 4 merge blocks of 2 x 2
patches of 14 px; a window at the right or bottom edge is cut short), and every layer except those
in `full_attention_layers` attends within a window only. The patches of each group's row are put
in window order once, before the layers (windows in raster order, merge blocks in raster order
inside a window, a block's m**2 patches kept together), so that a window is a run of one id in the
row: the per-layer masks are document ids, for SDPA's mask and the varlen kernels' cu_seqlens
alike. Rotary positions follow the patches; the outputs go back to the data order after the layers.

The Qwen2.5-VL block is this encoder with options: norm=rms, mlp=swiglu, key_bias, patch_bias=False,
window_size=112 and full_attention_layers; its merger is post_layernorm (its `ln_q`, an RMSNorm)
followed by the `mlp` projector without input norm (`qwen2_5_omni.vision_tower_state_dict`).

Rotary positions follow Qwen2-VL (arXiv:2409.12191): half of each head's rotary frequencies turn
with the patch row, half with the patch column, so any resolution and aspect ratio works without
interpolating a position table. The data layer orders patches (t, h / m, w / m, m, m), which puts
each merge block in m**2 consecutive rows: the merge is a reshape.

`positions: learned_rope2d` is Qwen3-VL's (the vision tower of Qwen3-Omni, `qwen3_omni.py`): a learned
table resized bilinearly with align_corners=True, added to the patch embeddings, and the 2-D rotary in the
layers. `deepstack_layers` (Qwen3-VL's deepstack) makes forward(..., deepstack=True) also return the
merged patches after those layers, before post_layernorm, for OmniModel's `vision_deepstack` projectors.

`positions: learned` is SigLIP's layout (arXiv:2303.15343), for loading its weights
(`hf_adapters.load_siglip_vision`): one learned vector per patch of an `image_size` square,
resized bicubically for any other grid exactly as transformers' `interpolate_pos_encoding`
does, and gathered into the data layer's patch order. With it the pre-merge outputs equal
transformers' `SiglipVisionModel.last_hidden_state` permuted into that order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from omni_train.model.attention import check_backend
from omni_train.model.audio_encoder import EncoderLayer, check_activation, init_encoder_weights, run_layers
from omni_train.model.backbone import RMSNorm
from omni_train.model.rope import rope_inv_freq

POSITIONS = ("rope2d", "learned", "learned_rope2d")


@dataclass(kw_only=True)
class VisionEncoderConfig:
    dim: int
    num_layers: int
    num_heads: int
    ffn_dim: int
    patch_size: int = 14           # must equal data.image.patch_size
    temporal_patch_size: int = 2   # must equal data.image.temporal_patch_size
    merge_size: int = 2            # must equal data.image.merge_size
    num_channels: int = 3
    # POSITIONS: rope2d (Qwen2-VL, any grid) | learned (SigLIP's table, bicubic) | learned_rope2d (Qwen3-VL / Qwen3-Omni:
    # a table resized bilinearly with align_corners, plus 2-D rotary)
    positions: str = "rope2d"
    image_size: int | None = None  # learned, learned_rope2d: pixels per side of the square the table covers
    # deepstack (Qwen3-VL, arXiv:2406.04334): the layers after which the merged patches are also taken; each goes
    # through its own projector (OmniModel.vision_deepstack) and is added at the visual positions after backbone layer j
    deepstack_layers: list[int] = field(default_factory=list)
    activation: str = "gelu"       # mlp=gelu only: gelu (exact) | gelu_tanh (SigLIP)
    norm: str = "layer"            # EncoderLayer.NORMS, also post_layernorm's: layer | rms (Qwen2.5-VL)
    mlp: str = "gelu"              # EncoderLayer.MLPS: gelu (fc1, fc2) | swiglu (gate_proj, up_proj, down_proj; Qwen2.5-VL)
    key_bias: bool = False         # a bias on k_proj: it matters under rotary positions (Qwen2.5-VL has one)
    patch_bias: bool = True        # a bias on patch_embedding (Qwen2-VL's Conv3d has none)
    window_size: int | None = None  # pixels per side of an attention window (Qwen2.5-VL: 112); None: whole frame groups
    full_attention_layers: list[int] = field(default_factory=list)  # with window_size: layers attending whole groups
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-6   # SigLIP's, and Qwen2.5-VL's RMSNorm's
    init_std: float = 0.02

    def __post_init__(self):
        for name in ("dim", "num_layers", "num_heads", "ffn_dim", "patch_size", "temporal_patch_size", "merge_size",
                     "num_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"model.vision.{name} must be a positive integer, got {value!r}")
        if self.dim % self.num_heads:
            raise ValueError(f"model.vision.dim ({self.dim}) must be a multiple of model.vision.num_heads ({self.num_heads})")
        if self.positions not in POSITIONS:
            raise ValueError(f"model.vision.positions must be one of {', '.join(POSITIONS)}, got {self.positions!r}")
        if self.positions != "learned" and (self.dim // self.num_heads) % 4:
            raise ValueError(f"model.vision.dim / model.vision.num_heads must be a multiple of 4 (2-D rotary: "
                             f"row and column bands of pairs), got {self.dim} / {self.num_heads}")
        if self.positions != "rope2d" and (not isinstance(self.image_size, int) or self.image_size <= 0
                                           or self.image_size % self.patch_size):
            raise ValueError(f"model.vision.image_size must be a positive multiple of model.vision.patch_size="
                             f"{self.patch_size} with positions={self.positions}, got {self.image_size!r}")
        self.deepstack_layers = list(self.deepstack_layers)  # YAML / OmegaConf give list-likes
        if (any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < self.num_layers for i in self.deepstack_layers)
                or self.deepstack_layers != sorted(set(self.deepstack_layers))):
            raise ValueError(f"model.vision.deepstack_layers must hold ascending layer indices in [0, {self.num_layers}) "
                             f"(the j-th is added after backbone layer j), got {self.deepstack_layers!r}")
        check_activation(self.activation, "model.vision.activation")
        if self.norm not in EncoderLayer.NORMS:
            raise ValueError(f"model.vision.norm must be one of {', '.join(EncoderLayer.NORMS)}, got {self.norm!r}")
        if self.mlp not in EncoderLayer.MLPS:
            raise ValueError(f"model.vision.mlp must be one of {', '.join(EncoderLayer.MLPS)}, got {self.mlp!r}")
        for name in ("key_bias", "patch_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"model.vision.{name} must be true or false, got {getattr(self, name)!r}")
        block = self.patch_size * self.merge_size
        if self.window_size is not None and (not isinstance(self.window_size, int) or isinstance(self.window_size, bool)
                                             or self.window_size <= 0 or self.window_size % block):
            raise ValueError(f"model.vision.window_size must be null or a positive multiple of patch_size * merge_size = "
                             f"{block} pixels (windows hold whole merge blocks), got {self.window_size!r}")
        self.full_attention_layers = list(self.full_attention_layers)  # YAML / OmegaConf give list-likes
        if self.full_attention_layers and self.window_size is None:
            raise ValueError("model.vision.full_attention_layers needs model.vision.window_size (without windows "
                             "every layer attends whole frame groups)")
        if any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < self.num_layers
               for i in self.full_attention_layers):
            raise ValueError(f"model.vision.full_attention_layers must hold layer indices in [0, {self.num_layers}), "
                             f"got {self.full_attention_layers!r}")
        if self.rope_theta <= 0 or self.layer_norm_eps <= 0 or self.init_std <= 0:
            raise ValueError("model.vision.rope_theta, model.vision.layer_norm_eps and model.vision.init_std must be > 0")

    @property
    def patch_dim(self) -> int:
        return self.num_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def out_dim(self) -> int:
        return self.dim * self.merge_size ** 2

    @property
    def num_positions(self) -> int:
        """Rows of the learned position table: (image_size / patch_size)**2."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def window_blocks(self) -> int | None:
        """Merge blocks per side of an attention window (window_size / (patch_size * merge_size)), None without windows."""
        return None if self.window_size is None else self.window_size // (self.patch_size * self.merge_size)


def raster_index(h: int, w: int, merge_size: int) -> torch.Tensor:
    """(h * w,) for each patch in data order, (h / m, w / m, m, m) as in data/image.py, its raster index row * w + col."""
    m = merge_size
    return torch.arange(h * w).view(h // m, m, w // m, m).permute(0, 2, 1, 3).flatten()


def _group_layout(grid_thw: list[list[int]], merge_size: int) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Per frame group: sizes, then per patch (in data order) its row and column: (G,), (P,), (P,)."""
    sizes, rows, cols = [], [], []
    for t, h, w in grid_thw:
        index = raster_index(h, w, merge_size)
        sizes += [h * w] * t
        rows += [index // w] * t
        cols += [index % w] * t
    return sizes, torch.cat(rows), torch.cat(cols)


def window_order(h: int, w: int, merge_size: int, window_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Window order of one (h, w) frame group: (h * w,) data-order positions in window order, (h * w,) their window ids.

    Windows of window_blocks x window_blocks merge blocks tile the group from its top-left corner,
    in raster order; inside a window the blocks are in raster order (a stable sort of the raster
    order by window), and a block's m**2 patches stay together in their data order, as
    transformers' `get_vision_window_index`. Window ids are ascending: a window is a run of one id.
    """
    m, n = merge_size, window_blocks
    blocks_h, blocks_w = h // m, w // m
    block_row = torch.arange(blocks_h).repeat_interleave(blocks_w)  # merge blocks in data (= raster) order
    block_col = torch.arange(blocks_w).repeat(blocks_h)
    block_window = (block_row // n) * math.ceil(blocks_w / n) + block_col // n   # (blocks,)
    block_order = torch.argsort(block_window, stable=True)
    order = (block_order[:, None] * m * m + torch.arange(m * m)).flatten()       # (h * w,)
    return order, block_window[block_order].repeat_interleave(m * m)


def row_layout(grid_thw: list[list[int]], merge_size: int, window_blocks: int | None = None,
               device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Frame groups as rows of a padded (G, S) layout, S the largest group: index, is_valid, window_ids, each (G, S).

    index: the patch (in data order over all groups) each slot holds, 0 at padding; is_valid: the
    real slots. With window_blocks, each row is in `window_order` and window_ids holds the slots'
    window ids (-1 at padding); None without windows.
    """
    group_sizes = [h * w for t, h, w in grid_thw for _ in range(t)]
    sizes = torch.tensor(group_sizes, device=device)                             # (G,)
    slot = torch.arange(max(group_sizes), device=device)
    is_valid = slot < sizes[:, None]                                             # (G, S)
    starts = (torch.cumsum(sizes, 0) - sizes)[:, None]                           # (G, 1)
    index = torch.where(is_valid, starts + slot, 0)                              # (G, S), data order
    if window_blocks is None:
        return index, is_valid, None
    orders, ids = [], []                                  # per group, concatenated like the patches: (P,) each
    for t, h, w in grid_thw:
        order, window_ids = window_order(h, w, merge_size, window_blocks)
        orders += [order] * t
        ids += [window_ids] * t
    order, window_ids = torch.cat(orders).to(device), torch.cat(ids).to(device)
    # slot s of group g holds the patch at group-local position order[starts[g] + s]
    return torch.where(is_valid, starts + order[index], 0), is_valid, torch.where(is_valid, window_ids[index], -1)


class VisionEncoder(nn.Module):
    """(P, patch_dim) patches of N images or videos + (N, 3) grid_thw -> (P / merge_size**2, merge_size**2 * dim)."""

    def __init__(self, cfg: VisionEncoderConfig, *, activation_checkpointing: bool = False, attn_backend: str = "auto"):
        super().__init__()
        self.cfg = cfg
        self.activation_checkpointing = activation_checkpointing
        self.attn_backend = check_backend(attn_backend)
        self.patch_embedding = nn.Linear(cfg.patch_dim, cfg.dim, bias=cfg.patch_bias)
        self.position_embedding = nn.Embedding(cfg.num_positions, cfg.dim) if cfg.positions != "rope2d" else None
        self.layers = nn.ModuleList(EncoderLayer(cfg.dim, cfg.num_heads, cfg.ffn_dim, cfg.layer_norm_eps, cfg.activation,
                                                 norm=cfg.norm, mlp=cfg.mlp, key_bias=cfg.key_bias)
                                    for _ in range(cfg.num_layers))
        self.post_layernorm = (nn.LayerNorm if cfg.norm == "layer" else RMSNorm)(cfg.dim, eps=cfg.layer_norm_eps)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        init_encoder_weights(self, self.cfg.init_std)
        if self.position_embedding is not None:
            self.position_embedding.weight.normal_(0.0, self.cfg.init_std)

    def dummy_input(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """One merge block of zero patches (one token): runs the encoder when a batch has no image or video."""
        m = self.cfg.merge_size
        return (torch.zeros(m * m, self.cfg.patch_dim, device=device),
                torch.tensor([[1, m, m]], dtype=torch.long, device=device))

    def rotary(self, rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(..., L) patch rows and columns -> cos, sin (..., L, head_dim) float32: rows turn the first band, columns the second."""
        head_dim = self.cfg.dim // self.cfg.num_heads
        inv_freq = rope_inv_freq(head_dim // 2, self.cfg.rope_theta, device=rows.device)  # (head_dim / 4,)
        freqs = torch.cat([rows[..., None] * inv_freq, cols[..., None] * inv_freq], dim=-1)  # (..., L, head_dim / 2)
        angles = torch.cat([freqs, freqs], dim=-1)  # "rotate half" pairs dim i with i + head_dim / 2
        return angles.cos(), angles.sin()

    def learned_positions(self, grid_thw: list[list[int]]) -> torch.Tensor:
        """(P, dim): the position table resized to each group's (h, w) grid, in data order (positions=learned*).

        learned: transformers' `SiglipVisionEmbeddings.interpolate_pos_encoding`, the table as a square
        image, bicubic, align_corners=False; learned_rope2d: Qwen3-VL's `pos_embed` resize, bilinear,
        align_corners=True. The table itself for its own square grid.
        """
        mode, align_corners = ("bicubic", False) if self.cfg.positions == "learned" else ("bilinear", True)
        table = self.position_embedding.weight                                     # (side**2, D)
        side, dim = self.cfg.image_size // self.cfg.patch_size, table.shape[1]
        resized: dict[tuple[int, int], torch.Tensor] = {}
        parts = []
        for t, h, w in grid_thw:
            if (h, w) not in resized:
                grid = table
                if (h, w) != (side, side):
                    square = table.reshape(1, side, side, dim).permute(0, 3, 1, 2)    # (1, D, side, side)
                    grid = F.interpolate(square.float(), size=(h, w), mode=mode, align_corners=align_corners)
                    grid = grid.permute(0, 2, 3, 1).reshape(h * w, dim).to(table.dtype)  # (h * w, D), raster order
                resized[h, w] = grid[raster_index(h, w, self.cfg.merge_size).to(grid.device)]
            parts += [resized[h, w]] * t
        return torch.cat(parts)

    def forward(self, patches: torch.Tensor, grid_thw: torch.Tensor, *,
                deepstack: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """(P / m**2, m**2 * dim) merged outputs; with `deepstack`, also the merged outputs of each layer of
        cfg.deepstack_layers (before post_layernorm), in the data order too."""
        cfg = self.cfg
        if patches.shape[-1] != cfg.patch_dim:
            raise ValueError(f"patches have {patches.shape[-1]} values, model.vision expects num_channels * "
                             f"temporal_patch_size * patch_size**2 = {cfg.patch_dim}: match data.image")
        grid = grid_thw.tolist()
        if any(h % cfg.merge_size or w % cfg.merge_size for _, h, w in grid):
            raise ValueError(f"grid_thw {grid} has sides that are not multiples of model.vision.merge_size={cfg.merge_size}")
        sizes, rows, cols = _group_layout(grid, cfg.merge_size)
        num_patches = sum(sizes)
        if num_patches != patches.shape[0]:
            raise ValueError(f"grid_thw covers {num_patches} patches but {patches.shape[0]} were given")
        device = patches.device
        x = self.patch_embedding(patches.to(self.patch_embedding.weight.dtype))  # (P, D)
        if self.position_embedding is not None:
            x = x + self.learned_positions(grid)

        index, is_valid, window_ids = row_layout(grid, cfg.merge_size, cfg.window_blocks, device)  # (G, S) each
        rotary = None
        if cfg.positions != "learned":
            rotary = self.rotary(rows.to(device, torch.float32)[index], cols.to(device, torch.float32)[index])
        taken: list[torch.Tensor] = []
        x = run_layers(self.layers, x[index], torch.where(is_valid, 0, -1), backend=self.attn_backend, rotary=rotary,
                       activation_checkpointing=self.activation_checkpointing, window_ids=window_ids,
                       full_attention_layers=tuple(cfg.full_attention_layers),
                       take_after=tuple(cfg.deepstack_layers) if deepstack else (), taken=taken)  # (G, S, D)

        def merged(rows_out: torch.Tensor) -> torch.Tensor:
            """(G, S, D) layer outputs -> (P / m**2, m**2 * D) in data order."""
            out = rows_out[is_valid]                                                 # (P, D), row order
            if window_ids is not None:
                out = out.new_empty(out.shape).index_copy(0, index[is_valid], out)  # (P, D), back to data order
            return out.reshape(num_patches // cfg.merge_size ** 2, cfg.out_dim)      # (P / m**2, m**2 * D)

        out = merged(self.post_layernorm(x))
        return (out, [merged(t) for t in taken]) if deepstack else out
