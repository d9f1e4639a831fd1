"""Hugging Face checkpoints <-> omni_train modules: config mapping and explicit state-dict adapters.

Qwen2/Qwen3 -> `Backbone` (and back, for export), the Whisper encoder -> `AudioEncoder`, SigLIP's
vision tower -> `VisionEncoder`. A checkpoint is a local Hugging Face directory: `config.json`
plus `model.safetensors` or shards listed in `model.safetensors.index.json`. Tensors are read
with safetensors only (never torch.load, so nothing is unpickled) and nothing is downloaded.
Each family has one function saying how its config fields map onto ours, and one saying how
its keys map; the strict loader then refuses any missing, unexpected or mis-shaped key.

Qwen HF key                             Backbone key
model.embed_tokens.weight               embed_tokens.weight
model.layers.N.<...>                    layers.N.<...>   (same names below the prefix)
model.layers.N.mlp.experts.E.gate_proj  layers.N.mlp.gate_up_proj[E, :I]  (Qwen3-MoE, Qwen3-Omni text: per expert on
model.layers.N.mlp.experts.E.up_proj    layers.N.mlp.gate_up_proj[E, I:]   disk; transformers' fused
model.layers.N.mlp.experts.E.down_proj  layers.N.mlp.down_proj[E]          mlp.experts.{gate_up,down}_proj too)
model.norm.weight                       norm.weight
lm_head.weight                          lm_head.weight   (absent when tie_word_embeddings)

Whisper HF key (WhisperEncoder: no prefix; WhisperModel: encoder.; ...ForConditionalGeneration: model.encoder.)
<prefix><...>                           <...>   (AudioEncoder keeps WhisperEncoder's names; the decoder is skipped)

SigLIP HF key (SiglipVisionModel: none or vision_model.; SiglipModel: vision_model.)
embeddings.patch_embedding.weight       patch_embedding.weight   Conv2d (D, C, p, p) -> Linear (D, C * tp * p * p)
embeddings.position_embedding.weight    position_embedding.weight
encoder.layers.N.layer_norm1            layers.N.self_attn_layer_norm
encoder.layers.N.layer_norm2            layers.N.final_layer_norm
encoder.layers.N.mlp.fc{1,2}            layers.N.fc{1,2}
encoder.layers.N.self_attn.<...>        layers.N.self_attn.<...>   (k_proj.bias dropped: softmax cancels it)
post_layernorm                          post_layernorm
head.*, text_model.*, logit_*           skipped (the pooling head and the text tower are not used)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from omni_train.model.audio_encoder import AudioEncoder, AudioEncoderConfig
from omni_train.model.backbone import Backbone, BackboneConfig, MoEConfig
from omni_train.model.vision_encoder import VisionEncoder, VisionEncoderConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def _qwen2_fields(hf: dict) -> dict:
    # Qwen2 (and Qwen2.5): bias on q/k/v only, no q/k norm
    return {"qkv_bias": True, "o_bias": False, "qk_norm": False,
            "head_dim": hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]}


def _qwen3_fields(hf: dict) -> dict:
    # Qwen3: per-head RMSNorm on q and k; attention_bias puts a bias on all four projections
    bias = bool(hf.get("attention_bias", False))
    return {"qkv_bias": bias, "o_bias": bias, "qk_norm": True, "head_dim": hf.get("head_dim", 128)}


def _qwen3_moe_fields(hf: dict) -> dict:
    # Qwen3-MoE: Qwen3's attention, a routed mixture of experts in every decoder_sparse_step-th layer but mlp_only_layers
    moe = None
    experts = hf.get("num_experts") or hf.get("num_local_experts") or 0  # transformers 5 writes num_local_experts
    if experts > 0:
        moe = MoEConfig(experts=experts, intermediate=hf["moe_intermediate_size"],
                        top_k=hf.get("num_experts_per_tok", 8), every=hf.get("decoder_sparse_step", 1),
                        dense_layers=list(hf.get("mlp_only_layers") or []),
                        normalize_top_k=bool(hf.get("norm_topk_prob", False)),
                        aux_loss_weight=float(hf.get("router_aux_loss_coef", 0.001)))
    return {**_qwen3_fields(hf), "moe": moe}


def _qwen3_omni_text_fields(hf: dict) -> dict:
    # Qwen3-Omni's thinker text model: Qwen3-MoE (norm_topk_prob defaults to true here) with interleaved M-RoPE,
    # which transformers' rotary embedding applies whatever rope_parameters says
    return {**_qwen3_moe_fields({"norm_topk_prob": True, **hf}), "mrope_interleaved": True}


FAMILIES = {"qwen2": _qwen2_fields, "qwen3": _qwen3_fields, "qwen3_moe": _qwen3_moe_fields,
            "qwen3_omni_moe_text": _qwen3_omni_text_fields}
# a routed expert's tensors as transformers writes them to disk (per expert) and holds them in memory (fused)
EXPERT_ON_DISK = re.compile(r"(.*\.mlp)\.experts\.(\d+)\.(gate|up|down)_proj\.weight")
EXPERT_FUSED = re.compile(r"(.*\.mlp)\.experts\.(gate_up_proj|down_proj)")


def _rope_settings(hf: dict, where: str) -> tuple[float, list[int] | None]:
    """(theta, mrope_section) from transformers 5 `rope_parameters` or 4.x `rope_theta` + `rope_scaling`."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "mrope"):
        raise ValueError(f"{where}: rope type {rope_type!r} is not supported (supported: default, mrope)")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))  # 10000: transformers' default when unset
    return float(theta), rope.get("mrope_section")


def backbone_config_from_hf(hf: dict, *, where: str = CONFIG_FILE) -> BackboneConfig:
    """Map a Qwen2/Qwen3 `config.json` dict onto BackboneConfig; `where` names the file in errors."""
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"{where}: model_type {model_type!r} is not supported (supported: {', '.join(FAMILIES)})")
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if key not in hf:
            raise ValueError(f"{where}: required key {key!r} is missing")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (supported: silu)")
    if hf.get("use_sliding_window", False):
        raise ValueError(f"{where}: use_sliding_window=true is not supported (attention is full within each document)")
    rope_theta, mrope_section = _rope_settings(hf, where)
    try:
        return BackboneConfig(
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            ffn_dim=hf["intermediate_size"],
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            mrope_section=mrope_section,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
            init_std=float(hf.get("initializer_range", 0.02)),
            **FAMILIES[model_type](hf),
        )
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def qwen_model_type(cfg: BackboneConfig) -> str:
    """The Qwen family whose modules match cfg's attention layout, for export."""
    if cfg.qk_norm and cfg.qkv_bias == cfg.o_bias:
        return "qwen3"
    if not cfg.qk_norm and cfg.qkv_bias and not cfg.o_bias:
        return "qwen2"
    raise ValueError(f"model: qk_norm={cfg.qk_norm}, qkv_bias={cfg.qkv_bias}, o_bias={cfg.o_bias} matches no Qwen "
                     f"checkpoint layout (qwen3: qk_norm and qkv_bias == o_bias; qwen2: qkv_bias only)")


def hf_config_from_backbone(cfg: BackboneConfig, *, dtype: torch.dtype = torch.float32) -> dict:
    """The `config.json` dict transformers' Qwen2/Qwen3ForCausalLM loads for cfg (the reverse of backbone_config_from_hf)."""
    if cfg.moe is not None:  # issue 16: the Qwen3-MoE / Qwen3-Omni layouts are not written yet
        raise ValueError("model.backbone.moe: a mixture-of-experts backbone has no Hugging Face export yet; "
                         "export a dense backbone, or keep the run's own checkpoint")
    model_type = qwen_model_type(cfg)
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.mrope_section is not None:
        rope["mrope_section"] = list(cfg.mrope_section)
    hf = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        # both spellings: transformers 5 reads rope_parameters, 4.x reads rope_theta
        "rope_theta": cfg.rope_theta,
        "rope_parameters": rope,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "use_sliding_window": False,
        "attention_dropout": 0.0,
        "dtype": str(dtype).removeprefix("torch."),
    }
    if model_type == "qwen3":
        hf["attention_bias"] = cfg.qkv_bias
    return hf


def hf_to_backbone_state_dict(hf_state: dict[str, torch.Tensor], cfg: BackboneConfig) -> dict[str, torch.Tensor]:
    """HF Qwen keys -> Backbone keys. Keys it does not know pass through unchanged for the strict check to report.

    Routed experts (Qwen3-MoE, Qwen3-Omni) come per expert as on disk (`mlp.experts.E.{gate,up,down}_proj.weight`,
    fused here into `mlp.gate_up_proj` (E, 2I, D) and `mlp.down_proj` (E, D, I)) or fused as transformers holds them
    in memory (`mlp.experts.gate_up_proj`); a layer with an expert missing keeps the ones it has, unfused, for the
    strict check to name."""
    hf_state = _fuse_experts(hf_state)
    state = {}
    for key, tensor in hf_state.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue  # older checkpoints store the RoPE table; it is recomputed, not a weight
        if key == "lm_head.weight" and cfg.tie_embeddings:
            continue  # tied: the output projection is embed_tokens.weight (some checkpoints still store a copy)
        state[key.removeprefix("model.")] = tensor
    return state


def _fuse_experts(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert and transformers' fused expert keys -> SparseMoE's fused ones (hf_to_backbone_state_dict)."""
    per_expert: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    out = {}
    for key, tensor in hf_state.items():
        if match := EXPERT_ON_DISK.fullmatch(key):
            per_expert.setdefault(match[1], {}).setdefault(int(match[2]), {})[match[3]] = tensor
        elif match := EXPERT_FUSED.fullmatch(key):
            out[f"{match[1]}.{match[2]}"] = tensor
        else:
            out[key] = tensor
    for mlp, experts in per_expert.items():
        complete = sorted(experts) == list(range(len(experts))) and all(len(e) == 3 for e in experts.values())
        if not complete:  # left as they were: the strict loader names them
            out.update({f"{mlp}.experts.{i}.{name}_proj.weight": t for i, e in experts.items() for name, t in e.items()})
            continue
        ordered = [experts[i] for i in range(len(experts))]
        out[f"{mlp}.gate_up_proj"] = torch.stack([torch.cat([e["gate"], e["up"]]) for e in ordered])  # (E, 2I, D)
        out[f"{mlp}.down_proj"] = torch.stack([e["down"] for e in ordered])                           # (E, D, I)
    return out


def unfuse_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SparseMoE's fused experts -> one key per expert and projection, as Qwen3-MoE checkpoints store them on disk
    (the inverse of _fuse_experts for per-expert keys); other keys unchanged."""
    out = {}
    for key, tensor in state.items():
        if key.endswith(".mlp.gate_up_proj"):
            mlp, inter = key[: -len(".gate_up_proj")], tensor.shape[1] // 2
            for e, expert in enumerate(tensor):                                   # (2I, D) each
                out[f"{mlp}.experts.{e}.gate_proj.weight"] = expert[:inter]
                out[f"{mlp}.experts.{e}.up_proj.weight"] = expert[inter:]
        elif key.endswith(".mlp.down_proj") and tensor.dim() == 3:
            mlp = key[: -len(".down_proj")]
            out.update({f"{mlp}.experts.{e}.down_proj.weight": expert for e, expert in enumerate(tensor)})  # (D, I)
        else:
            out[key] = tensor
    return out


def backbone_to_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Backbone keys -> HF Qwen keys (the reverse of hf_to_backbone_state_dict)."""
    return {(key if key == "lm_head.weight" else f"model.{key}"): tensor for key, tensor in state.items()}


def read_safetensors_dir(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory: `model.safetensors`, or the shards its index lists."""
    path = Path(path)
    index_file = path / WEIGHTS_INDEX_FILE
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_file}: needs a non-empty 'weight_map' object")
        files = sorted(set(weight_map.values()))
    elif (path / WEIGHTS_FILE).is_file():
        files = [WEIGHTS_FILE]
    else:
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")) if path.is_dir() else []
        found = f"; {', '.join(pickled)} is never read (pickle): convert it to safetensors" if pickled else ""
        raise FileNotFoundError(f"{path}: no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE} "
                                f"(only safetensors checkpoints are read){found}")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        if not (path / name).is_file():
            raise FileNotFoundError(f"{index_file}: lists shard {name!r}, which is not in {path}")
        tensors.update(load_file(path / name, device=str(device)))
    return tensors


def weights_label(path: str | Path) -> str:
    """The weights file of a checkpoint directory, for error messages: its index when sharded."""
    path = Path(path)
    return str(path / (WEIGHTS_INDEX_FILE if (path / WEIGHTS_INDEX_FILE).is_file() else WEIGHTS_FILE))


def read_hf_config(path: str | Path, what: str) -> dict:
    """`config.json` of a local `what` checkpoint directory; FileNotFoundError naming the directory or the file."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such directory (a local {what} checkpoint: config.json + safetensors)")
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: not found (a {what} checkpoint directory holds config.json and safetensors)")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file}: invalid JSON ({e})") from None


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], *, where: str) -> None:
    """Load state into model, refusing any missing, unexpected or mis-shaped key with one error listing them all."""
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    mismatched = sorted(f"{key} {tuple(state[key].shape)} vs {tuple(expected[key].shape)}"
                        for key in expected.keys() & state.keys() if state[key].shape != expected[key].shape)
    if missing or unexpected or mismatched:
        problems = [f"{label} ({len(keys)}): {', '.join(keys)}" for label, keys in
                    (("missing", missing), ("unexpected", unexpected), ("shape checkpoint vs config", mismatched)) if keys]
        raise ValueError(f"{where}: checkpoint does not match its config: {'; '.join(problems)}")
    model.load_state_dict(state, strict=True, assign=True)


def build_loaded(cls: type[nn.Module], cfg, state: dict[str, torch.Tensor], *, dtype: torch.dtype | None, where: str,
                 **module_kwargs) -> nn.Module:
    """`cls(cfg, **module_kwargs)` holding exactly `state` (cast to dtype unless None), without a random init first."""
    if dtype is not None:
        state = {key: tensor.to(dtype) if tensor.is_floating_point() else tensor for key, tensor in state.items()}
    with torch.device("meta"):  # no random init of weights about to be replaced
        model = cls(cfg, **module_kwargs)
    load_state_strict(model, state, where=where)
    return model


def load_qwen_backbone(path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                       **backbone_kwargs) -> tuple[Backbone, BackboneConfig]:
    """Build a Backbone from a local Qwen2/Qwen3 HF directory; dtype None keeps the checkpoint's.

    backbone_kwargs go to Backbone (activation_checkpointing, attn_backend).
    """
    path = Path(path)
    cfg = backbone_config_from_hf(read_hf_config(path, "Qwen"), where=str(path / CONFIG_FILE))
    state = hf_to_backbone_state_dict(read_safetensors_dir(path, device), cfg)
    return build_loaded(Backbone, cfg, state, dtype=dtype, where=weights_label(path), **backbone_kwargs), cfg


def save_qwen_backbone(model: Backbone, cfg: BackboneConfig, path: str | Path, *,
                       max_shard_bytes: int = 5 * 1024**3) -> Path:
    """Write model as a Qwen2/Qwen3 HF directory (config.json + safetensors, sharded with an index above max_shard_bytes).

    The model's full (unsharded) weights must be on this process: gather ZeRO-3 / FSDP shards first.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = hf_config_from_backbone(cfg, dtype=model.embed_tokens.weight.dtype)
    state = backbone_to_hf_state_dict({key: tensor.detach().to("cpu").contiguous()
                                       for key, tensor in model.state_dict().items()})
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for key, tensor in state.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][key] = tensor
        shard_bytes += size
    metadata = {"format": "pt"}  # transformers refuses safetensors files without it
    if len(shards) == 1:
        save_file(shards[0], path / WEIGHTS_FILE, metadata=metadata)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, path / name, metadata=metadata)
            weight_map.update(dict.fromkeys(shard, name))
        total_size = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        (path / WEIGHTS_INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# Whisper encoder -> AudioEncoder
# ---------------------------------------------------------------------------------------------

WHISPER_REQUIRED = ("d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim", "num_mel_bins")
# Where the encoder's keys live, and the other parts of such a checkpoint, which are skipped.
WHISPER_PREFIXES = {"model.encoder.": ("model.decoder.", "proj_out."), "encoder.": ("decoder.",), "": ()}


def whisper_encoder_config(path: str | Path, *, downsample: int = 4) -> AudioEncoderConfig:
    """AudioEncoderConfig of a local Whisper directory: Whisper's conv1 stride 1, then a pool to `downsample` frames per token.

    `downsample` is data.audio.downsample (4: 25 tokens per second, pool 2 as in Qwen2-Audio; 2: Whisper's own 50).
    """
    hf = read_hf_config(path, "Whisper")
    where = str(Path(path) / CONFIG_FILE)
    if hf.get("model_type") != "whisper":
        raise ValueError(f"{where}: model_type {hf.get('model_type')!r} is not supported (supported: whisper)")
    for key in WHISPER_REQUIRED:
        if key not in hf:
            raise ValueError(f"{where}: required key {key!r} is missing")
    if hf.get("activation_function", "gelu") != "gelu":
        raise ValueError(f"{where}: activation_function {hf['activation_function']!r} is not supported (supported: gelu)")
    if not isinstance(downsample, int) or downsample < 2 or downsample & (downsample - 1):
        raise ValueError(f"{where}: a Whisper encoder gives one position per 2 mel frames before pooling, so "
                         f"data.audio.downsample must be a power of 2 >= 2, got {downsample!r}")
    try:
        return AudioEncoderConfig(
            dim=hf["d_model"],
            num_layers=hf["encoder_layers"],
            num_heads=hf["encoder_attention_heads"],
            ffn_dim=hf["encoder_ffn_dim"],
            num_mel_bins=hf["num_mel_bins"],
            window_frames=2 * hf.get("max_source_positions", 1500),  # conv2 halves: 1500 positions = 3000 frames = 30 s
            conv1_stride=1,
            pool=downsample // 2,
            layer_norm_eps=1e-5,  # Whisper's LayerNorms use torch's default
            init_std=float(hf.get("init_std", 0.02)),
        )
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def whisper_to_audio_encoder_state_dict(hf_state: dict[str, torch.Tensor], *, where: str) -> dict[str, torch.Tensor]:
    """Whisper keys -> AudioEncoder keys: the encoder's, without their prefix; the decoder and output head are skipped.

    Keys it does not know pass through unchanged for the strict check to report.
    """
    for prefix, others in WHISPER_PREFIXES.items():
        if f"{prefix}conv1.weight" in hf_state:
            break
    else:
        raise ValueError(f"{where}: no Whisper encoder weights (conv1.weight under model.encoder., encoder. or no prefix)")
    return {key.removeprefix(prefix): tensor for key, tensor in hf_state.items() if not key.startswith(others)}


def load_whisper_encoder(path: str | Path, *, downsample: int = 4, dtype: torch.dtype | None = None,
                         device: str | torch.device = "cpu", **encoder_kwargs) -> tuple[AudioEncoder, AudioEncoderConfig]:
    """An AudioEncoder holding the encoder of a local WhisperEncoder / WhisperModel / WhisperForConditionalGeneration directory.

    dtype None keeps the checkpoint's; encoder_kwargs go to AudioEncoder (activation_checkpointing, attn_backend).
    """
    cfg = whisper_encoder_config(path, downsample=downsample)
    where = weights_label(path)
    state = whisper_to_audio_encoder_state_dict(read_safetensors_dir(path, device), where=where)
    return build_loaded(AudioEncoder, cfg, state, dtype=dtype, where=where, **encoder_kwargs), cfg


# ---------------------------------------------------------------------------------------------
# SigLIP vision tower -> VisionEncoder
# ---------------------------------------------------------------------------------------------

# transformers' SiglipVisionConfig defaults: a config.json leaves out the fields that have them.
SIGLIP_VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                          "num_channels": 3, "image_size": 224, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh",
                          "layer_norm_eps": 1e-6}
SIGLIP_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
SIGLIP_LAYER_RENAMES = ((".layer_norm1.", ".self_attn_layer_norm."), (".layer_norm2.", ".final_layer_norm."),
                        (".mlp.fc", ".fc"))


def siglip_vision_config(path: str | Path, *, temporal_patch_size: int = 2, merge_size: int = 2) -> VisionEncoderConfig:
    """VisionEncoderConfig of a local SiglipVisionModel / SiglipModel directory: learned positions, the data layout given.

    temporal_patch_size and merge_size are the data layer's (data.image); SigLIP has neither.
    """
    hf = read_hf_config(path, "SigLIP")
    where = str(Path(path) / CONFIG_FILE)
    model_type = hf.get("model_type")
    if model_type == "siglip":
        hf = hf.get("vision_config") or {}
    elif model_type != "siglip_vision_model":
        raise ValueError(f"{where}: model_type {model_type!r} is not supported (supported: siglip, siglip_vision_model)")
    hf = {**SIGLIP_VISION_DEFAULTS, **hf}
    if hf["hidden_act"] not in SIGLIP_ACTIVATIONS:
        raise ValueError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported "
                         f"(supported: {', '.join(SIGLIP_ACTIVATIONS)})")
    try:
        return VisionEncoderConfig(
            dim=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            ffn_dim=hf["intermediate_size"],
            patch_size=hf["patch_size"],
            temporal_patch_size=temporal_patch_size,
            merge_size=merge_size,
            num_channels=hf["num_channels"],
            positions="learned",
            image_size=hf["image_size"],
            activation=SIGLIP_ACTIVATIONS[hf["hidden_act"]],
            layer_norm_eps=float(hf["layer_norm_eps"]),
        )
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def siglip_to_vision_encoder_state_dict(hf_state: dict[str, torch.Tensor], cfg: VisionEncoderConfig) -> dict[str, torch.Tensor]:
    """SigLIP vision keys -> VisionEncoder keys (the module docstring's table); unknown keys pass through for the strict check."""
    prefix = "vision_model." if any(key.startswith("vision_model.") for key in hf_state) else ""
    skipped = ("text_model.", "logit_scale", "logit_bias", f"{prefix}head.")  # text tower, contrastive scale, pooling head
    state = {}
    for key, tensor in hf_state.items():
        if key.startswith(skipped) or key.endswith("position_ids"):  # position_ids: a buffer older checkpoints store
            continue
        name = key.removeprefix(prefix).removeprefix("embeddings.").removeprefix("encoder.")
        for old, new in SIGLIP_LAYER_RENAMES:
            name = name.replace(old, new)
        if name.endswith(".self_attn.k_proj.bias"):
            continue  # adds q . b_k to all scores of a query row, which softmax cancels: EncoderAttention has no key bias
        if name == "patch_embedding.weight" and tensor.shape == (cfg.dim, cfg.num_channels, cfg.patch_size, cfg.patch_size):
            # Conv2d(C, D, p, stride p) -> Linear over (C, tp, p, p) patches. An image is tp equal frames
            # (data/image.py), so each frame's weights are the conv's / tp; a video patch gets the mean of its frames'.
            tp = cfg.temporal_patch_size
            tensor = (tensor[:, :, None] / tp).expand(-1, -1, tp, -1, -1).reshape(cfg.dim, cfg.patch_dim)
        state[name] = tensor
    return state


def load_siglip_vision(path: str | Path, *, temporal_patch_size: int = 2, merge_size: int = 2,
                       dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                       **encoder_kwargs) -> tuple[VisionEncoder, VisionEncoderConfig]:
    """A VisionEncoder holding the vision tower of a local SiglipVisionModel / SiglipModel directory.

    dtype None keeps the checkpoint's; encoder_kwargs go to VisionEncoder (activation_checkpointing, attn_backend).
    """
    cfg = siglip_vision_config(path, temporal_patch_size=temporal_patch_size, merge_size=merge_size)
    state = siglip_to_vision_encoder_state_dict(read_safetensors_dir(path, device), cfg)
    return build_loaded(VisionEncoder, cfg, state, dtype=dtype, where=weights_label(path), **encoder_kwargs), cfg
