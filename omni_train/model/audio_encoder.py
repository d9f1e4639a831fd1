"""The audio encoder: Whisper-style conv subsampling + bidirectional transformer over independent 30 s windows
(or Qwen3-Omni's Conv2d stem and 8 s attention runs across an item's windows).

    mel (W, num_mel_bins, T) + valid frames (W,)
      [-> cut into chunks of chunk_frames               (W * T / chunk_frames, num_mel_bins, chunk_frames)]
      -> conv1 (kernel 3, stride conv1_stride), conv2 (kernel 3, stride 2), padding 1, GELU
                                                    (W, T / (2 * conv1_stride), dim)
      -> + positions: embed_positions (learned, sinusoidal init) | fixed sinusoids
      -> pre-norm layers, attention within the valid positions of each window (or chunk)
      [-> chunks back in order into their windows       (W, T / (2 * conv1_stride), dim)]
      -> average pool by `pool` (optional, Qwen2-Audio), layer_norm
      -> the valid positions of every window in order   (num_audio_tokens_total, dim)

Two layouts give 25 tokens per second (Qwen2.5-Omni's 40 ms per token), the data layer's
`audio.downsample: 4`: ours (conv1_stride 2, pool 1: 750 positions per 30 s window) and
Whisper's (conv1_stride 1: 1500 positions, then pool 2 after the layers, as Qwen2-Audio,
arXiv:2407.10759, and Qwen2.5-Omni do). `cfg.downsample = conv1_stride * 2 * pool`.

Windows never see each other (a one-hour meeting costs 120 window-sized attentions, not one
huge one), and a window's valid outputs depend only on its valid frames: the padded frames are
zeros (as the convolutions' own padding), the conv1 outputs past the valid length are zeroed
before conv2, padded positions are masked out of attention, and the pool averages valid
positions only. So the input may be cut to the longest valid window of the batch, which saves
most of the work for short clips, and the number of outputs per window is exactly
`data.audio._tokens_in_window`, the function the chat template used to reserve placeholders:
every stage (a stride-2 conv or a pool by 2) turns n valid positions into ceil(n / 2).

Deliberate differences from Whisper (the loader is `hf_adapters.load_whisper_encoder`; on a
full 30 s window with pool 1 the outputs equal transformers' `WhisperEncoder`):
- A clip shorter than a window is cropped and its padding masked; Whisper attends over a
  zero-padded 30 s window, so its outputs for a short clip differ from ours.
- Audio longer than 30 s is cut into independent windows (data.audio.split_windows), never
  truncated: 70 s are 3 windows and 750 + 750 + 250 tokens.
- The pool keeps an odd last position (averaged alone); Qwen2-Audio's AvgPool1d(2) drops it
  (`pool_tail: drop` does too).

Qwen2.5-Omni's audio tower (transformers' `Qwen2_5OmniAudioEncoder`; the mapping is in
`qwen2_5_omni.py`) is Whisper's layout with three options set:
- `chunk_frames: 200` (its `n_window * 2`, 2 s): the convs, the positions and attention run
  within chunks of 200 frames, each a separate sequence; a chunk's convs see zeros past its
  edges, and its positions restart at 0.
- `positions: sinusoid`: Whisper's sinusoids, fixed. They are not a parameter or a buffer but
  computed in float32 on the CPU (cached) and moved to the input's device and dtype per
  forward, like the backbone's rotary frequencies: a buffer would stay uninitialized after
  meta-device construction (`hf_adapters.build_loaded`, ZeRO-3) and could never enter a state
  dict by mistake. transformers keeps them in a non-persistent buffer, cast to the hidden
  states' dtype before the sum, as here.
- `pool_tail: drop`: AvgPool1d(2) over the item's positions drops an odd last one.
Then its `ln_post` is our `layer_norm` and its `proj` the audio projector of kind `linear`
without input norm. transformers encodes each item whole, chunk after chunk; we encode 30 s
windows independently and the result is the same: window_frames is a multiple of chunk_frames,
so the chunks of a window are the item's chunks, and a full window has an even number of
positions (window_frames is a multiple of downsample), so the pool's pairs never straddle two
windows and only the item's last window can have an odd tail to drop.

Qwen3-Omni's audio tower (transformers' `Qwen3OmniMoeAudioEncoder`; the mapping is in
`qwen3_omni.py`) takes three more options:
- `stem: conv2d`: three Conv2d (kernel 3, stride 2, padding 1, GELU) over (mel, time) with
  `stem_channels`, flattened channel-major and mapped to `dim` by `conv_out` (no bias): 8 frames per
  position. It runs per `chunk_frames: 100` chunk, each zero-padded to 100 frames, with nothing
  masked between the convs (transformers pads each chunk to the batch's longest, so its outputs for a
  batch of clips all shorter than 1 s differ slightly at their last positions; ours never depend on
  the batch). A 100-frame chunk gives 13 positions, which do not tile a window, so the data layer
  counts tokens per chunk (`data.audio.chunk_frames: 100`).
- `attention_window_frames: 800`: the chunks' valid positions attend in runs of 8 chunks' positions
  (104) counted from each item's start, across our 30 s windows (390 positions each): the forward
  takes `windows_per_item` from the batch. The runs are the zero-padded rows of one batch, so no
  item-sized mask is ever built.
- `key_bias: true`. Then `ln_post` is our `layer_norm`, and `proj1 -> GELU -> proj2` the `mlp` audio
  projector (hidden width `dim`, no input norm).

Parameter names follow transformers' `WhisperEncoder` (`conv1`, `conv2`, `embed_positions`,
`layers.N.self_attn.{q,k,v,out}_proj`, `self_attn_layer_norm`, `fc1`, `fc2`,
`final_layer_norm`, `layer_norm`), so a Whisper checkpoint maps one to one.

`EncoderLayer` is the pre-norm bidirectional block that the vision encoder shares.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from omni_train.data.audio import POOL_TAILS, AudioConfig, _subsampled, _tokens_in_window
from omni_train.model.attention import attention, attention_backend, check_backend, document_ids_to_cu_seqlens
from omni_train.model.backbone import RMSNorm
from omni_train.model.rope import apply_rotary

# Activation names -> F.gelu's `approximate`: Whisper uses exact gelu, SigLIP the tanh approximation.
ACTIVATIONS = {"gelu": "none", "gelu_tanh": "tanh"}


def check_activation(activation: str, key: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"{key} must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")


AUDIO_POSITIONS = ("learned", "sinusoid")
AUDIO_STEMS = ("conv1d", "conv2d")
MEL_NORMS = ("none", "window")


@dataclass(kw_only=True)
class SpecAugmentConfig:
    """SpecAugment's time and frequency masks (Park et al. 2019, arXiv:1904.08779) on the log-mel input, in training
    only (module.training): each window gets num_time_masks spans of 0..max_time_frames frames (at most
    max_time_fraction of its valid frames: their adaptive masks) and num_freq_masks bands of 0..max_freq_bins mel bins,
    set to 0 (the value of padding). The draws come from torch's global CPU generator, which checkpoints save and
    restore (train/checkpoint.py), so a resumed run masks as the uninterrupted one. No masks: off (the default).
    `from_step`: masks only from that training step on (the loop tells the encoder its step, `AudioEncoder.step`),
    a curriculum like the data ops' `from_epoch`: a recognizer that must first leave its plateau learns it unmasked."""
    num_time_masks: int = 0
    max_time_frames: int = 0
    max_time_fraction: float = 0.2
    num_freq_masks: int = 0
    max_freq_bins: int = 0
    from_step: int = 0

    def check(self, num_mel_bins: int) -> None:
        for name in ("num_time_masks", "max_time_frames", "num_freq_masks", "max_freq_bins", "from_step"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"model.audio.spec_augment.{name} must be an integer >= 0, got {value!r}")
        if not isinstance(self.max_time_fraction, (int, float)) or not 0 < self.max_time_fraction <= 1:
            raise ValueError(f"model.audio.spec_augment.max_time_fraction must be in (0, 1], got {self.max_time_fraction!r}")
        if self.max_freq_bins > num_mel_bins:
            raise ValueError(f"model.audio.spec_augment.max_freq_bins must be <= model.audio.num_mel_bins "
                             f"({num_mel_bins}), got {self.max_freq_bins}")

    @property
    def enabled(self) -> bool:
        return bool(self.num_time_masks and self.max_time_frames) or bool(self.num_freq_masks and self.max_freq_bins)


@dataclass(kw_only=True)
class AudioEncoderConfig:
    dim: int
    num_layers: int
    num_heads: int
    ffn_dim: int
    num_mel_bins: int = 128        # must equal data.audio.num_mel_bins
    window_frames: int = 3000      # mel frames per window (data.audio.window_s / 10 ms): sizes embed_positions
    conv1_stride: int = 2          # 2: 25 positions per second; 1: Whisper's 50
    pool: int = 1                  # average pool after the layers (Qwen2-Audio: 2 behind a Whisper encoder)
    pool_tail: str = "keep"        # POOL_TAILS: keep an odd last position (averaged alone) | drop it; = data.audio.pool_tail
    chunk_frames: int | None = None  # None: one sequence per window; 200: convs, positions, attention per 2 s (Qwen2.5-Omni)
    positions: str = "learned"     # AUDIO_POSITIONS: learned (embed_positions, sinusoid init) | sinusoid (fixed)
    # AUDIO_STEMS: conv1d (conv1, conv2: Whisper) | conv2d (Qwen3-Omni: conv2d1..3, stride 2 over mel and time, GELU,
    # then conv_out, a Linear without bias from stem_channels x the mel bins left to dim; 8 frames per position)
    stem: str = "conv1d"
    stem_channels: int = 480       # conv2d: the convs' channels (Qwen3-Omni's downsample_hidden_size)
    # None: attention within each window (or chunk); frames: within runs of this many frames' positions of the whole
    # item, counted from its start across the data layer's windows (Qwen3-Omni's n_window_infer: 8 s); needs chunk_frames
    attention_window_frames: int | None = None
    key_bias: bool = False         # a bias on k_proj (Qwen3-Omni's; without rotary positions softmax cancels it)
    # 0: none (Whisper, Qwen); k (odd): each layer adds a convolution block after its attention (`EncoderLayer`)
    conv_kernel: int = 0
    # MEL_NORMS: none (Whisper, Qwen) | window: each mel bin of each window at zero mean and unit variance over its
    # valid frames (`normalize_windows`), before the stem
    mel_norm: str = "none"
    # 0: none (Whisper, Qwen) | k: each frame's log-mel keeps its first k DCT coefficients over the mel bins (its
    # spectral envelope; `lifter_mels`), after mel_norm: the harmonics of the voice's pitch, finer, are left out
    mel_lifter: int = 0
    layer_norm_eps: float = 1e-5   # Whisper's
    init_std: float = 0.02
    spec_augment: SpecAugmentConfig = field(default_factory=SpecAugmentConfig)  # training-time masks; default off

    def __post_init__(self):
        if isinstance(self.spec_augment, dict):  # built from a plain dict (a saved config)
            self.spec_augment = SpecAugmentConfig(**self.spec_augment)
        for name in ("dim", "num_layers", "num_heads", "ffn_dim", "num_mel_bins", "window_frames", "pool"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"model.audio.{name} must be a positive integer, got {value!r}")
        if self.dim % self.num_heads:
            raise ValueError(f"model.audio.dim ({self.dim}) must be a multiple of model.audio.num_heads ({self.num_heads})")
        if (not isinstance(self.conv_kernel, int) or isinstance(self.conv_kernel, bool) or self.conv_kernel < 0
                or (self.conv_kernel and self.conv_kernel % 2 == 0)):
            raise ValueError(f"model.audio.conv_kernel must be 0 (no convolution block) or an odd number of positions, "
                             f"got {self.conv_kernel!r}")
        if self.dim % 2:
            raise ValueError(f"model.audio.dim must be even (sinusoidal positions pair sin and cos), got {self.dim}")
        if self.stem not in AUDIO_STEMS:
            raise ValueError(f"model.audio.stem must be one of {', '.join(AUDIO_STEMS)}, got {self.stem!r}")
        if self.mel_norm not in MEL_NORMS:
            raise ValueError(f"model.audio.mel_norm must be one of {', '.join(MEL_NORMS)}, got {self.mel_norm!r}")
        if (not isinstance(self.mel_lifter, int) or isinstance(self.mel_lifter, bool)
                or not 0 <= self.mel_lifter <= self.num_mel_bins):
            raise ValueError(f"model.audio.mel_lifter must be 0 (off) or a number of DCT coefficients in 1.."
                             f"{self.num_mel_bins} (model.audio.num_mel_bins), got {self.mel_lifter!r}")
        if self.stem == "conv2d" and (not isinstance(self.stem_channels, int) or isinstance(self.stem_channels, bool)
                                      or self.stem_channels <= 0):
            raise ValueError(f"model.audio.stem_channels must be a positive integer, got {self.stem_channels!r}")
        if self.stem == "conv2d" and (self.chunk_frames is None or self.pool != 1):
            raise ValueError("model.audio.stem conv2d runs per chunk and has no pool: set model.audio.chunk_frames "
                             f"(100 for Qwen3-Omni) and leave pool at 1, got chunk_frames {self.chunk_frames!r} and pool {self.pool}")
        if self.stem == "conv2d" and self.conv1_stride != 2:
            raise ValueError("model.audio.conv1_stride is the conv1d stem's; the conv2d stem's convs all have stride 2 "
                             f"(leave conv1_stride at 2), got {self.conv1_stride!r}")
        if self.conv1_stride not in (1, 2):
            raise ValueError(f"model.audio.conv1_stride must be 1 (Whisper) or 2, got {self.conv1_stride!r}")
        if self.pool & (self.pool - 1):
            raise ValueError(f"model.audio.pool must be a power of 2 (1, 2, 4, ...), got {self.pool}")
        if self.pool_tail not in POOL_TAILS:
            raise ValueError(f"model.audio.pool_tail must be one of {', '.join(POOL_TAILS)}, got {self.pool_tail!r}")
        # Dropping per window is dropping per item only when a full window has an even number of positions.
        if self.pool_tail == "drop" and (self.pool != 2 or self.window_frames % self.downsample):
            raise ValueError(f"model.audio.pool_tail drop is AvgPool1d(2): it needs model.audio.pool 2 and "
                             f"model.audio.window_frames a multiple of {self.downsample}, got pool {self.pool} and "
                             f"window_frames {self.window_frames}")
        if self.chunk_frames is not None:
            # conv1d chunks lie end to end in their window, so a chunk must give whole positions; conv2d chunks are
            # gathered by their valid positions (a 100-frame chunk gives 13)
            conv_stride = self.conv1_stride * 2 if self.stem == "conv1d" else 1
            if (not isinstance(self.chunk_frames, int) or isinstance(self.chunk_frames, bool) or self.chunk_frames <= 0
                    or self.window_frames % self.chunk_frames or self.chunk_frames % conv_stride):
                raise ValueError(f"model.audio.chunk_frames must be null or a positive integer that divides "
                                 f"model.audio.window_frames ({self.window_frames})"
                                 + (f" and is a multiple of the convs' stride {conv_stride}" if conv_stride > 1 else "")
                                 + f", got {self.chunk_frames!r}")
        if self.attention_window_frames is not None and (
                self.chunk_frames is None or not isinstance(self.attention_window_frames, int)
                or isinstance(self.attention_window_frames, bool) or self.attention_window_frames <= 0
                or self.attention_window_frames % self.chunk_frames):
            raise ValueError(f"model.audio.attention_window_frames must be null or a positive multiple of "
                             f"model.audio.chunk_frames ({self.chunk_frames}), got {self.attention_window_frames!r}")
        if self.positions not in AUDIO_POSITIONS:
            raise ValueError(f"model.audio.positions must be one of {', '.join(AUDIO_POSITIONS)}, got {self.positions!r}")
        if self.layer_norm_eps <= 0 or self.init_std <= 0:
            raise ValueError(f"model.audio.layer_norm_eps and model.audio.init_std must be > 0, "
                             f"got {self.layer_norm_eps} and {self.init_std}")
        self.spec_augment.check(self.num_mel_bins)

    @property
    def downsample(self) -> int:
        """Mel frames per output token: must equal data.audio.downsample."""
        return (self.conv1_stride * 2 if self.stem == "conv1d" else 8) * self.pool

    @property
    def num_positions(self) -> int:
        """Positions of a full window (or chunk) after the convs, the size of embed_positions (750, Whisper's 1500, 100)."""
        span = self.window_frames if self.chunk_frames is None else self.chunk_frames
        return int(_subsampled(span, self.downsample // self.pool, "keep"))


def _token_layout(num_mel_bins: int, downsample: int, pool_tail: str = "keep") -> AudioConfig:
    """The data layer's AudioConfig whose token arithmetic is that of the stages down to `downsample` frames per position."""
    return AudioConfig(num_mel_bins=num_mel_bins, downsample=downsample, pool_tail=pool_tail)


@functools.lru_cache(maxsize=8)
def _fixed_sinusoids(num_positions: int, dim: int) -> torch.Tensor:
    """`sinusoids` computed once on the CPU, as transformers' buffer is: shared, treat as read-only."""
    return sinusoids(num_positions, dim)


def sinusoids(num_positions: int, dim: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """(num_positions, dim) float32: sines in the first half, cosines in the second, geometric timescales (Whisper)."""
    log_increment = math.log(max_timescale) / (dim // 2 - 1) if dim > 2 else 0.0
    inv_timescales = torch.exp(-log_increment * torch.arange(dim // 2, dtype=torch.float32))  # (dim / 2,)
    angles = torch.arange(num_positions, dtype=torch.float32)[:, None] * inv_timescales  # (N, dim / 2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class EncoderAttention(nn.Module):
    """Bidirectional multi-head attention within documents; optional rotary positions (vision)."""

    def __init__(self, dim: int, num_heads: int, *, key_bias: bool = False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q_proj = nn.Linear(dim, dim)
        # No key bias by default (Whisper): without rotary positions it adds q.b to every score of a query
        # row, which softmax cancels. Under rotary positions the rotated bias differs per key, so it
        # matters there (Qwen2.5-VL's vision tower has one): `key_bias`.
        self.k_proj = nn.Linear(dim, dim, bias=key_bias)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, *, document_ids: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None,
                backend: str, cu_seqlens: torch.Tensor | None, max_seqlen: int | None) -> torch.Tensor:
        batch, seq_len, dim = x.shape
        q, k, v = (proj(x).view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))  # (B, H, L, Dh) each
        if rotary is not None:
            q, k = apply_rotary(q, k, *rotary)
        out = attention(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, document_ids=document_ids,
                        causal=False, backend=backend)  # (B, H, L, Dh)
        return self.out_proj(out.transpose(1, 2).reshape(batch, seq_len, dim))


class EncoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)).

    norm "layer" (Whisper / SigLIP) | "rms" (Qwen2.5-VL's vision tower, `backbone.RMSNorm`);
    mlp "gelu": fc2(gelu(fc1(x))), `activation` picking exact or tanh GELU | "swiglu":
    down_proj(silu(gate_proj(x)) * up_proj(x)), all three with biases (Qwen2.5-VL's vision tower).
    The norms keep Whisper's names (`self_attn_layer_norm`, `final_layer_norm`) whatever their kind.

    `conv_kernel` k > 0 adds a convolution block between the attention and the mlp, a light form of Conformer's
    (Gulati et al. 2020, arXiv:2005.08100): x + conv_proj(gelu(conv_depthwise(conv_layer_norm(x)))), a depthwise
    convolution of k positions along each row. The attention relates every position to every other from the first step;
    the convolution gives each position its neighbours' (k positions: 600 ms at 25 per second for k 15), the local
    pattern a sound is. A row must hold one sequence (the audio encoder's rows do): the padding, document id -1, is
    zeroed before the convolution, so valid outputs never depend on it.
    """

    NORMS = ("layer", "rms")
    MLPS = ("gelu", "swiglu")

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, eps: float, activation: str = "gelu", *,
                 norm: str = "layer", mlp: str = "gelu", key_bias: bool = False, conv_kernel: int = 0):
        super().__init__()
        assert norm in self.NORMS and mlp in self.MLPS and (conv_kernel == 0 or conv_kernel % 2 == 1), (norm, mlp, conv_kernel)
        self.approximate = ACTIVATIONS[activation]
        self.mlp = mlp
        norm_cls = nn.LayerNorm if norm == "layer" else RMSNorm
        self.self_attn_layer_norm = norm_cls(dim, eps=eps)
        self.self_attn = EncoderAttention(dim, num_heads, key_bias=key_bias)
        self.conv_kernel = conv_kernel
        if conv_kernel:
            self.conv_layer_norm = norm_cls(dim, eps=eps)
            # a (1, k) Conv2d over (B, D, 1, L): oneDNN's depthwise Conv1d took 5.8 ms forward for the demo's
            # (44, 128, 80) on one CPU core, this 0.2 ms (12.7 against 5.0 ms with the backward); the same sums
            self.conv_depthwise = nn.Conv2d(dim, dim, (1, conv_kernel), padding=(0, conv_kernel // 2), groups=dim)
            self.conv_proj = nn.Linear(dim, dim)
        self.final_layer_norm = norm_cls(dim, eps=eps)
        if mlp == "gelu":
            self.fc1 = nn.Linear(dim, ffn_dim)
            self.fc2 = nn.Linear(ffn_dim, dim)
        else:
            self.gate_proj = nn.Linear(dim, ffn_dim)
            self.up_proj = nn.Linear(dim, ffn_dim)
            self.down_proj = nn.Linear(ffn_dim, dim)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None = None, *,
                document_ids: torch.Tensor, backend: str, cu_seqlens: torch.Tensor | None,
                max_seqlen: int | None) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), document_ids=document_ids, rotary=rotary, backend=backend,
                               cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        if self.conv_kernel:
            h = self.conv_layer_norm(x) * (document_ids >= 0).unsqueeze(-1).to(x.dtype)  # (B, L, D), padding zeroed
            h = self.conv_depthwise(h.transpose(1, 2).unsqueeze(2)).squeeze(2).transpose(1, 2)
            x = x + self.conv_proj(F.gelu(h, approximate=self.approximate))
        h = self.final_layer_norm(x)
        if self.mlp == "gelu":
            return x + self.fc2(F.gelu(self.fc1(h), approximate=self.approximate))
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


def run_layers(layers: nn.ModuleList, x: torch.Tensor, document_ids: torch.Tensor, *, backend: str,
               rotary: tuple[torch.Tensor, torch.Tensor] | None = None, activation_checkpointing: bool = False,
               window_ids: torch.Tensor | None = None, full_attention_layers: tuple[int, ...] = (),
               take_after: tuple[int, ...] = (), taken: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Apply encoder layers to x (B, L, D) with attention inside each document of document_ids (B, L), -1 = padding.

    With window_ids (B, L) (-1 = padding; a window is a run of one id, nested in a document), the
    layers whose index is not in full_attention_layers attend inside each window instead
    (Qwen2.5-VL's window attention). The varlen kernels' cu_seqlens are computed once per mask.
    The outputs of the layers in take_after are appended to `taken`, in layer order (deepstack).
    """
    if backend == "auto":
        backend = attention_backend(x.device, x.dtype)

    def layer_kwargs(ids: torch.Tensor) -> dict:
        cu_seqlens, max_seqlen = document_ids_to_cu_seqlens(ids) if backend != "sdpa" else (None, None)
        return dict(document_ids=ids, backend=backend, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)

    full = layer_kwargs(document_ids)
    windowed = full if window_ids is None else layer_kwargs(window_ids)
    for index, layer in enumerate(layers):
        kwargs = full if index in full_attention_layers else windowed
        if activation_checkpointing and torch.is_grad_enabled():
            x = checkpoint(layer, x, rotary, use_reentrant=False, **kwargs)
        else:
            x = layer(x, rotary, **kwargs)
        if index in take_after:
            taken.append(x)
    return x


@torch.no_grad()
def init_encoder_weights(module: nn.Module, std: float) -> None:
    """Normal(0, std) linear and conv weights, zero biases, unit LayerNorms and RMSNorms: the backbone's initializer."""
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            sub.weight.normal_(0.0, std)
            if sub.bias is not None:
                sub.bias.zero_()
        elif isinstance(sub, nn.LayerNorm):
            sub.weight.fill_(1.0)
            sub.bias.zero_()
        elif isinstance(sub, RMSNorm):
            sub.weight.fill_(1.0)


class AudioEncoder(nn.Module):
    """(W, num_mel_bins, T) windows + (W,) valid frames -> (sum of valid tokens, dim), windows in order."""

    def __init__(self, cfg: AudioEncoderConfig, *, activation_checkpointing: bool = False, attn_backend: str = "auto"):
        super().__init__()
        self.cfg = cfg
        self.step = 0  # the training step, set by the training loop: spec_augment masks from its from_step on
        self.activation_checkpointing = activation_checkpointing
        self.attn_backend = check_backend(attn_backend)
        # The data layer's token arithmetic after conv1, conv2 and the pool: one definition of the counts.
        self._layouts = [_token_layout(cfg.num_mel_bins, cfg.conv1_stride),
                         _token_layout(cfg.num_mel_bins, cfg.conv1_stride * 2),
                         _token_layout(cfg.num_mel_bins, cfg.downsample, cfg.pool_tail)]
        if cfg.stem == "conv1d":
            self.conv1 = nn.Conv1d(cfg.num_mel_bins, cfg.dim, kernel_size=3, stride=cfg.conv1_stride, padding=1)
            self.conv2 = nn.Conv1d(cfg.dim, cfg.dim, kernel_size=3, stride=2, padding=1)
        else:
            channels = cfg.stem_channels
            self.conv2d1 = nn.Conv2d(1, channels, kernel_size=3, stride=2, padding=1)
            self.conv2d2 = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1)
            self.conv2d3 = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1)
            self.conv_out = nn.Linear(channels * _subsampled(cfg.num_mel_bins, 8, "keep"), cfg.dim, bias=False)
        self.embed_positions = nn.Embedding(cfg.num_positions, cfg.dim) if cfg.positions == "learned" else None
        self.layers = nn.ModuleList(EncoderLayer(cfg.dim, cfg.num_heads, cfg.ffn_dim, cfg.layer_norm_eps,
                                                 key_bias=cfg.key_bias, conv_kernel=cfg.conv_kernel)
                                    for _ in range(cfg.num_layers))
        self.layer_norm = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        if cfg.mel_lifter:  # a constant of the config, not a weight: checkpoints stay as they are
            self.register_buffer("lifter_basis", dct_basis(cfg.num_mel_bins, cfg.mel_lifter), persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        init_encoder_weights(self, self.cfg.init_std)
        # He initialization for the stem: with std init_std the log-mel reaches the first layer ~40x smaller
        # than the sinusoidal positions (std 0.016 vs 0.66 on the demo's speech), which LayerNorm then hides.
        for conv in self._stem_convs():
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        if self.embed_positions is not None:
            self.embed_positions.weight.copy_(sinusoids(self.cfg.num_positions, self.cfg.dim))

    def _stem_convs(self) -> list[nn.Module]:
        return [self.conv1, self.conv2] if self.cfg.stem == "conv1d" else [self.conv2d1, self.conv2d2, self.conv2d3]

    def num_tokens(self, window_frames: torch.Tensor) -> torch.Tensor:
        """(W,) valid frames -> (W,) encoder positions per window: `data.audio._tokens_in_window`."""
        if self.cfg.stem == "conv2d":  # per chunk: full chunks' positions plus the rest's
            chunk = self.cfg.chunk_frames
            return window_frames // chunk * _subsampled(chunk, 8, "keep") + _subsampled(window_frames % chunk, 8, "keep")
        return _tokens_in_window(window_frames, self._layouts[-1])

    def dummy_input(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """One short window of zeros (2 tokens): runs the encoder when a batch has no audio."""
        num_frames = self.cfg.downsample * 2
        return (torch.zeros(1, self.cfg.num_mel_bins, num_frames, device=device),
                torch.full((1,), num_frames, dtype=torch.long, device=device))

    def forward(self, mel: torch.Tensor, window_frames: torch.Tensor,
                windows_per_item: torch.Tensor | None = None) -> torch.Tensor:
        """windows_per_item (items,): consecutive windows of one item (attention_window_frames counts from the item's
        start across them); None: every window is an item."""
        num_windows, num_mels, num_frames = mel.shape
        if num_mels != self.cfg.num_mel_bins:
            raise ValueError(f"audio windows have {num_mels} mel bins but model.audio.num_mel_bins is "
                             f"{self.cfg.num_mel_bins}: set it to data.audio.num_mel_bins")
        if num_frames > self.cfg.window_frames:
            raise ValueError(f"audio windows have {num_frames} frames, over model.audio.window_frames="
                             f"{self.cfg.window_frames}: set it to data.audio.window_s / 10 ms")
        window_frames = window_frames.to(mel.device)
        # Frames past the longest valid window are zeros in every window; dropping them changes no valid output.
        mel = mel[..., : max(int(window_frames.max()), 1)]  # (W, M, T)
        if self.cfg.mel_norm == "window":
            mel = normalize_windows(mel, window_frames)
        if self.cfg.mel_lifter:
            mel = lifter_mels(mel, self.lifter_basis)
        if self.training and self.cfg.spec_augment.enabled and self.step >= self.cfg.spec_augment.from_step:
            mel = spec_augment(mel, window_frames, self.cfg.spec_augment)
        mel = mel.to(self.layer_norm.weight.dtype)
        if self.cfg.stem == "conv2d":
            return self.layer_norm(self._encode_conv2d(mel, window_frames, windows_per_item))  # (num_tokens, D)
        if self.cfg.chunk_frames is None:
            x = self._encode_sequences(mel, window_frames)                   # (W, L, D), L = T / (2 * conv1_stride)
        else:
            x = self._encode_chunks(mel, window_frames)                                   # (W, L, D)
        is_valid = _prefix_mask(x.shape[1], _tokens_in_window(window_frames, self._layouts[1]))  # (W, L)
        if self.cfg.pool > 1:
            # Qwen2-Audio's order: pool, then layer_norm
            x = average_pool(x, is_valid, self.cfg.pool)                                  # (W, L / pool, D)
            is_valid = _prefix_mask(x.shape[1], self.num_tokens(window_frames))
        return self.layer_norm(x)[is_valid]                                               # (num_tokens, D)

    def _positions(self, length: int, like: torch.Tensor) -> torch.Tensor:
        """(length, D) positions of a sequence's first `length` positions, in like's device and dtype."""
        if self.embed_positions is not None:
            return self.embed_positions.weight[:length]
        return _fixed_sinusoids(self.cfg.num_positions, self.cfg.dim)[:length].to(like.device, like.dtype)

    def _encode_conv2d(self, mel: torch.Tensor, window_frames: torch.Tensor,
                       windows_per_item: torch.Tensor | None) -> torch.Tensor:
        """(W, M, T) windows -> (num_tokens, D) before the final norm: Qwen3-Omni's audio encoder.

        Each chunk of chunk_frames is zero-padded to chunk_frames and goes through the three stride-2 Conv2d over
        (mel, time) and conv_out; its positions restart at 0. Nothing past a chunk's valid frames is masked between
        the convs, as in transformers, whose chunks are padded to the batch's longest (a whole chunk whenever an
        item is 1 s or longer; a batch of only shorter clips there gives slightly different last positions). The
        valid positions of every chunk, in order, then attend in runs of attention_window_frames' positions counted
        from each item's start (across its 30 s windows), or within their chunk.
        """
        num_windows, num_mels, num_frames = mel.shape
        chunk = self.cfg.chunk_frames
        num_chunks = -(-num_frames // chunk)
        mel = F.pad(mel, (0, num_chunks * chunk - num_frames))                            # (W, M, n * c)
        chunks = mel.reshape(num_windows, num_mels, num_chunks, chunk).transpose(1, 2)    # (W, n, M, c)
        starts = torch.arange(num_chunks, device=mel.device) * chunk                      # (n,)
        chunk_frames = (window_frames[:, None] - starts).clamp(0, chunk).flatten()        # (W * n,)
        has_frames = chunk_frames > 0
        x = chunks.reshape(num_windows * num_chunks, 1, num_mels, chunk)[has_frames]      # (K, 1, M, c)
        for conv in self._stem_convs():
            x = F.gelu(conv(x))                                                           # (K, C, M / 8, c / 8)
        num_seqs, channels, mels, length = x.shape
        x = self.conv_out(x.permute(0, 3, 1, 2).reshape(num_seqs, length, channels * mels))  # (K, P, D)
        x = x + self._positions(length, x)
        per_chunk = _subsampled(chunk_frames[has_frames], 8, "keep")                      # (K,) valid positions
        tokens = x[_prefix_mask(length, per_chunk)]                                       # (N, D): windows, chunks in order
        if self.cfg.attention_window_frames is None:
            segments = torch.repeat_interleave(torch.arange(num_seqs, device=x.device), per_chunk)
        else:
            per_window = self.num_tokens(window_frames)                                   # (W,)
            if windows_per_item is None:
                windows_per_item = torch.ones(num_windows, dtype=torch.long)
            windows_per_item = windows_per_item.to(x.device)
            item_of_window = torch.repeat_interleave(torch.arange(len(windows_per_item), device=x.device), windows_per_item)
            item = torch.repeat_interleave(item_of_window, per_window)                    # (N,) each token's item
            per_item = torch.zeros(len(windows_per_item), dtype=torch.long, device=x.device).index_add_(0, item_of_window, per_window)
            index_in_item = torch.arange(tokens.shape[0], device=x.device) - (per_item.cumsum(0) - per_item)[item]
            window_tokens = self.cfg.attention_window_frames // chunk * int(_subsampled(chunk, 8, "keep"))
            segments = item * (tokens.shape[0] + 1) + index_in_item // window_tokens
        return self._attend_in_segments(tokens, segments)

    def _attend_in_segments(self, tokens: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
        """(N, D) tokens with (N,) segment keys, equal keys in consecutive runs -> the layers' (N, D), attention within
        each run. The runs become the zero-padded rows of a (runs, longest run, D) batch, so no N x N mask is built."""
        _, run, sizes = torch.unique_consecutive(segments, return_inverse=True, return_counts=True)
        width = int(sizes.max()) if sizes.numel() else 1
        offset = torch.arange(tokens.shape[0], device=tokens.device) - (sizes.cumsum(0) - sizes)[run]
        slot = run * width + offset                                                       # (N,) row in the padded batch
        rows = tokens.new_zeros(len(sizes) * width, tokens.shape[-1]).index_copy(0, slot, tokens)
        document_ids = torch.full((len(sizes) * width,), -1, dtype=torch.long, device=tokens.device).index_fill_(0, slot, 0)
        out = run_layers(self.layers, rows.view(len(sizes), width, -1), document_ids.view(len(sizes), width),
                         backend=self.attn_backend, activation_checkpointing=self.activation_checkpointing)
        return out.reshape(-1, tokens.shape[-1])[slot]

    def _encode_sequences(self, mel: torch.Tensor, num_frames: torch.Tensor) -> torch.Tensor:
        """(S, M, T) mel sequences + (S,) valid frames -> (S, T / (2 * conv1_stride), D): convs, positions, layers."""
        x = F.gelu(self.conv1(mel))                                                       # (S, D, T / conv1_stride)
        x = x * _prefix_mask(x.shape[-1], _tokens_in_window(num_frames, self._layouts[0]))[:, None].to(x.dtype)
        x = F.gelu(self.conv2(x)).transpose(1, 2)                            # (S, L, D), L = T / (2 * conv1_stride)
        x = x + self._positions(x.shape[1], x)
        is_valid = _prefix_mask(x.shape[1], _tokens_in_window(num_frames, self._layouts[1]))  # (S, L)
        document_ids = torch.where(is_valid, 0, -1)  # one document per row: each sequence attends only to itself
        return run_layers(self.layers, x, document_ids, backend=self.attn_backend,
                          activation_checkpointing=self.activation_checkpointing)

    def _encode_chunks(self, mel: torch.Tensor, window_frames: torch.Tensor) -> torch.Tensor:
        """(W, M, T) windows -> (W, L, D), each chunk of chunk_frames encoded as its own sequence (Qwen2.5-Omni).

        Chunks without a valid frame are skipped and their positions left zero (past every window's
        valid positions). A full chunk gives exactly chunk_frames / (2 * conv1_stride) positions, so
        the chunks' outputs laid end to end are the window's positions, its valid ones first.
        """
        num_windows, num_mels, num_frames = mel.shape
        chunk = self.cfg.chunk_frames
        num_chunks = -(-num_frames // chunk)
        mel = F.pad(mel, (0, num_chunks * chunk - num_frames))                            # (W, M, n * c)
        chunks = mel.reshape(num_windows, num_mels, num_chunks, chunk).transpose(1, 2)    # (W, n, M, c)
        chunks = chunks.reshape(num_windows * num_chunks, num_mels, chunk)                # (W * n, M, c)
        starts = torch.arange(num_chunks, device=mel.device) * chunk                      # (n,)
        chunk_frames = (window_frames[:, None] - starts).clamp(0, chunk).flatten()        # (W * n,)
        has_frames = chunk_frames > 0
        y = self._encode_sequences(chunks[has_frames], chunk_frames[has_frames])          # (K, c / (2 * conv1_stride), D)
        x = y.new_zeros(num_windows * num_chunks, y.shape[1], y.shape[2]).index_put((has_frames,), y)  # (W * n, P, D)
        return x.view(num_windows, num_chunks * y.shape[1], y.shape[2])                   # (W, L, D)


def spec_augment(mel: torch.Tensor, window_frames: torch.Tensor, cfg: SpecAugmentConfig) -> torch.Tensor:
    """(W, M, T) log-mel windows with (W,) valid frames -> the same with SpecAugment's masks set to 0 (a copy).

    Widths and starts are drawn on the CPU from torch's global generator (the same draws on any device), in a fixed
    count per window: W * 2 * (num_time_masks + num_freq_masks) uniforms."""
    num_windows, num_mels, num_frames = mel.shape
    valid = window_frames.cpu().to(torch.float64)                                      # (W,)

    def spans(count: int, max_width: torch.Tensor, length: torch.Tensor, size: int) -> torch.Tensor:
        """(W, size) bool: `count` spans per row, widths uniform in 0..max_width, starts uniform where they fit."""
        u = torch.rand(num_windows, count, 2, dtype=torch.float64)                     # (W, n, 2) on the CPU
        width = (u[..., 0] * (max_width[:, None] + 1)).floor()                         # (W, n)
        start = (u[..., 1] * (length[:, None] - width + 1).clamp(min=1)).floor()
        at = torch.arange(size, dtype=torch.float64)
        inside = (at >= start[..., None]) & (at < (start + width)[..., None])          # (W, n, size)
        return inside.any(dim=1).to(mel.device)

    mel = mel.clone()
    # products with float keep-masks: masked_fill with a broadcast boolean mask measured several times slower on CPU
    if cfg.num_time_masks and cfg.max_time_frames:
        max_width = torch.minimum(torch.full_like(valid, float(cfg.max_time_frames)),
                                  (valid * cfg.max_time_fraction).floor())
        mel.mul_((~spans(cfg.num_time_masks, max_width, valid, num_frames)).to(mel.dtype)[:, None, :])
    if cfg.num_freq_masks and cfg.max_freq_bins:
        mel.mul_((~spans(cfg.num_freq_masks, torch.full_like(valid, float(cfg.max_freq_bins)),
                         torch.full_like(valid, float(num_mels)), num_mels)).to(mel.dtype)[:, :, None])
    return mel


def normalize_windows(mel: torch.Tensor, window_frames: torch.Tensor, min_std: float = 0.1) -> torch.Tensor:
    """(W, M, T) log-mel -> each window's mel bins at zero mean and unit variance over its `window_frames` valid frames
    (cepstral mean and variance normalization, per window); the padding stays zero. The mean a voice or a channel
    puts on each bin is removed, and noise that lifts the quiet bins compresses them less. A bin whose standard
    deviation is under `min_std` (0.1: 4 dB in Whisper's scaling, a bin held at the floor) is divided by min_std."""
    valid = _prefix_mask(mel.shape[-1], window_frames).unsqueeze(1).to(mel.dtype)  # (W, 1, T)
    count = valid.sum(-1, keepdim=True).clamp(min=1)
    mean = (mel * valid).sum(-1, keepdim=True) / count                              # (W, M, 1)
    centered = (mel - mean) * valid
    std = (centered.square().sum(-1, keepdim=True) / count).sqrt().clamp(min=min_std)
    return centered / std


def dct_basis(num_mel_bins: int, k: int) -> torch.Tensor:
    """(k, num_mel_bins): the first k rows of the orthonormal DCT-II over the mel bins (row j: cos(pi j (m + 1/2) / M),
    scaled to unit norm), float32."""
    m = torch.arange(num_mel_bins, dtype=torch.float64)
    basis = torch.cos(math.pi * torch.arange(k, dtype=torch.float64)[:, None] * (m + 0.5) / num_mel_bins)
    return (basis / basis.norm(dim=1, keepdim=True)).float()


def lifter_mels(mel: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """(W, M, T) log-mel -> each frame projected onto the k cosines of `basis` (k, M): its first k DCT coefficients
    kept and the rest zeroed, transformed back to M bins (a low-quefrency lifter, as MFCCs keep the first 13 of 40).
    Over the demo's 128 Slaney bins a voice's harmonics are a ripple of 4-9 bins (F0 100-200 Hz, 23 Hz a bin under
    1 kHz), DCT index 30-60; k 24 keeps ripples of 11 bins and wider, the formants. A zero frame (padding) stays
    zero."""
    coefficients = torch.einsum("kn,wnt->wkt", basis, mel.to(basis.dtype))                  # (W, k, T)
    return torch.einsum("km,wkt->wmt", basis, coefficients)


def _prefix_mask(length: int, num_valid: torch.Tensor) -> torch.Tensor:
    """(W,) valid counts -> (W, length) bool, True on each row's first num_valid positions."""
    return torch.arange(length, device=num_valid.device) < num_valid[:, None]


def average_pool(x: torch.Tensor, is_valid: torch.Tensor, factor: int) -> torch.Tensor:
    """(W, L, D) -> (W, ceil(L / factor), D): the mean of the valid positions in each run of `factor`.

    A run with fewer valid positions (the last one of a window) averages only those, so a window
    of n valid positions gives ceil(n / factor) outputs that depend on its valid positions only.
    """
    num_windows, length, dim = x.shape
    pad = -length % factor
    x = F.pad(x * is_valid[..., None].to(x.dtype), (0, 0, 0, pad)).view(num_windows, -1, factor, dim)
    counts = F.pad(is_valid, (0, pad)).view(num_windows, -1, factor).sum(-1, keepdim=True)  # (W, L / factor, 1)
    return x.sum(2) / counts.clamp(min=1).to(x.dtype)
