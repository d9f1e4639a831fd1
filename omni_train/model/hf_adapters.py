"""Qwen2 / Qwen3 checkpoints <-> `Backbone`: config mapping and explicit state-dict adapters.

A checkpoint is a local Hugging Face directory: `config.json` plus `model.safetensors` or shards
listed in `model.safetensors.index.json`. Tensors are read with safetensors only (never
torch.load, so nothing is unpickled). The family comes from the config's `model_type`; each
supported type has one function saying how its fields map onto `BackboneConfig`.

HF key                                  Backbone key
model.embed_tokens.weight               embed_tokens.weight
model.layers.N.<...>                    layers.N.<...>   (same names below the prefix)
model.norm.weight                       norm.weight
lm_head.weight                          lm_head.weight   (absent when tie_word_embeddings)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from omni_train.model.backbone import Backbone, BackboneConfig

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


FAMILIES = {"qwen2": _qwen2_fields, "qwen3": _qwen3_fields}


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
    """HF Qwen keys -> Backbone keys. Keys it does not know pass through unchanged for the strict check to report."""
    state = {}
    for key, tensor in hf_state.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue  # older checkpoints store the RoPE table; it is recomputed, not a weight
        if key == "lm_head.weight" and cfg.tie_embeddings:
            continue  # tied: the output projection is embed_tokens.weight (some checkpoints still store a copy)
        state[key.removeprefix("model.")] = tensor
    return state


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
        raise FileNotFoundError(f"{path}: no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE} (only safetensors checkpoints are read)")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        if not (path / name).is_file():
            raise FileNotFoundError(f"{index_file}: lists shard {name!r}, which is not in {path}")
        tensors.update(load_file(path / name, device=str(device)))
    return tensors


def load_backbone_state_strict(model: Backbone, state: dict[str, torch.Tensor], *, where: str) -> None:
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


def load_qwen_backbone(path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                       **backbone_kwargs) -> tuple[Backbone, BackboneConfig]:
    """Build a Backbone from a local Qwen2/Qwen3 HF directory; dtype None keeps the checkpoint's.

    backbone_kwargs go to Backbone (activation_checkpointing, attn_backend).
    """
    path = Path(path)
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: not found (a Qwen checkpoint directory holds config.json and safetensors)")
    cfg = backbone_config_from_hf(json.loads(config_file.read_text()), where=str(config_file))
    state = hf_to_backbone_state_dict(read_safetensors_dir(path, device), cfg)
    if dtype is not None:
        state = {key: tensor.to(dtype) if tensor.is_floating_point() else tensor for key, tensor in state.items()}
    with torch.device("meta"):  # no random init of weights about to be replaced
        model = Backbone(cfg, **backbone_kwargs)
    load_backbone_state_strict(model, state, where=str(path))
    return model, cfg


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
