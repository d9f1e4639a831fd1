"""Qwen2.5-Omni's thinker <-> omni_train: config mapping and explicit state-dict adapters.

The specification is transformers' `models/qwen2_5_omni` (modeling and configuration files, 5.x).
The thinker is not a second model: its audio tower, vision tower and text model are options of
our `AudioEncoder`, `VisionEncoder` (+ projectors) and `Backbone`, and this module says how the
release's `config.json` fields and `thinker.*` weights map onto them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from omni_train.model.audio_encoder import AudioEncoderConfig
from omni_train.model.backbone import BackboneConfig
from omni_train.model.hf_adapters import (CONFIG_FILE, WEIGHTS_FILE, WEIGHTS_INDEX_FILE, backbone_config_from_hf,
                                          hf_to_backbone_state_dict, load_state_strict, read_hf_config, weights_label)
from omni_train.model.projectors import ProjectorOptions
from omni_train.model.vision_encoder import VisionEncoderConfig
from omni_train.train.safe_load import read_json

# ------------------------------------------------------------------------------------- audio tower
# Qwen2.5-Omni audio tower key (under thinker.audio_tower.)   ours
# conv1.*, conv2.*, layers.N.<...>                             audio_encoder.<same>   (Whisper's names)
# ln_post.*                                                    audio_encoder.layer_norm.*
# proj.*                                                       audio_projector.fc.*   (kind linear, no input norm)
# positional_embedding.positional_embedding                    skipped: a non-persistent buffer of fixed sinusoids
#                                                              (positions: sinusoid computes them)
# audio_bos_eos_token.weight                                   skipped: never used by the thinker's forward

# transformers' Qwen2_5OmniAudioEncoderConfig defaults (5.x): a config.json may leave them out.
QWEN_OMNI_AUDIO_DEFAULTS = {"num_mel_bins": 128, "encoder_layers": 32, "encoder_attention_heads": 20,
                            "encoder_ffn_dim": 5120, "d_model": 1280, "dropout": 0.0, "attention_dropout": 0.0,
                            "activation_function": "gelu", "activation_dropout": 0.0, "initializer_range": 0.02,
                            "max_source_positions": 1500, "n_window": 100, "output_dim": 3584}
# data.audio fields the tower's processor implies: WhisperFeatureExtractor's ceil(samples / 160) valid
# frames, and 4 frames per token whose AvgPool1d(2) drops an odd last position.
QWEN_OMNI_AUDIO_DATA = {"downsample": 4, "valid_frames": "ceil", "pool_tail": "drop"}
# data.image fields: Qwen2-VL's image processor (Qwen2.5-Omni's) normalizes with OpenAI CLIP's mean and std
QWEN_OMNI_IMAGE_DATA = {"mean": (0.48145466, 0.4578275, 0.40821073), "std": (0.26862954, 0.26130258, 0.27577711)}
AUDIO_SKIPPED_KEYS = ("positional_embedding.positional_embedding", "audio_bos_eos_token.weight")


def check_audio_tower_fields(hf: dict, positive_ints: tuple[str, ...], *, where: str) -> None:
    """An Omni audio tower's config (defaults filled in): exact GELU, no dropout, `positive_ints` positive integers."""
    if hf["activation_function"] != "gelu":
        raise ValueError(f"{where}: activation_function {hf['activation_function']!r} is not supported (supported: gelu)")
    for key in ("dropout", "attention_dropout", "activation_dropout"):
        if hf[key] != 0:
            raise ValueError(f"{where}: {key}={hf[key]} is not supported (the audio encoder has no dropout: 0)")
    for key in positive_ints:
        if not isinstance(hf[key], int) or isinstance(hf[key], bool) or hf[key] <= 0:
            raise ValueError(f"{where}: {key} must be a positive integer, got {hf[key]!r}")


def audio_tower_config(hf_audio: dict, *, where: str) -> AudioEncoderConfig:
    """The thinker's `audio_config` (config.json) as an AudioEncoderConfig; its `proj` is a `linear` projector to output_dim.

    Whisper's layout (conv1 stride 1, pool 2 after the layers: 4 frames per token) with convs,
    positions and attention per chunk of n_window * 2 frames, fixed sinusoid positions, and a pool
    that drops an odd last position. One ValueError naming `where` and the key for anything else.
    """
    hf = {**QWEN_OMNI_AUDIO_DEFAULTS, **hf_audio}
    check_audio_tower_fields(hf, ("n_window", "max_source_positions", "output_dim"), where=where)
    # transformers adds the first n_window rows of its max_source_positions sinusoids to each chunk
    if hf["n_window"] > hf["max_source_positions"]:
        raise ValueError(f"{where}: n_window={hf['n_window']} is over max_source_positions={hf['max_source_positions']} "
                         f"(a chunk's positions would run past transformers' table)")
    # scale_embedding is read by transformers' __init__ but never applied in its forward: any value gives the same outputs
    try:
        return AudioEncoderConfig(
            dim=hf["d_model"], num_layers=hf["encoder_layers"], num_heads=hf["encoder_attention_heads"],
            ffn_dim=hf["encoder_ffn_dim"], num_mel_bins=hf["num_mel_bins"],
            conv1_stride=1, pool=2, pool_tail="drop", chunk_frames=2 * hf["n_window"], positions="sinusoid",
            layer_norm_eps=1e-5,  # torch's LayerNorm default, which every norm of the tower uses
            init_std=float(hf["initializer_range"]))
    except ValueError as e:
        message = str(e)
        if message.startswith("model.audio.chunk_frames"):
            message = f"n_window={hf['n_window']}: {message}"
        raise ValueError(f"{where}: {message}") from None


def audio_tower_state_dict(hf_state: dict[str, torch.Tensor], prefix: str, *,
                           projector_keys: dict[str, str] | None = None) -> tuple[dict[str, torch.Tensor],
                                                                                  dict[str, torch.Tensor]]:
    """(AudioEncoder state, audio projector state) from the keys under `prefix` ("thinker.audio_tower.", "audio_tower.").

    projector_keys: the tower's projection key prefixes -> the projector's (Qwen2.5-Omni's `proj.` -> `fc.`;
    Qwen3-Omni's `proj1.` / `proj2.` -> `fc1.` / `fc2.`). Keys outside the prefix are ignored; the ones it
    does not know pass through to the encoder's state unchanged, for the strict loader
    (`hf_adapters.load_state_strict`) to name.
    """
    projector_keys = {"proj.": "fc."} if projector_keys is None else projector_keys
    encoder: dict[str, torch.Tensor] = {}
    projector: dict[str, torch.Tensor] = {}
    for key, tensor in hf_state.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name in AUDIO_SKIPPED_KEYS:
            continue
        hf_projector = next((p for p in projector_keys if name.startswith(p)), None)
        if hf_projector is not None:
            projector[projector_keys[hf_projector] + name[len(hf_projector):]] = tensor
        elif name.startswith("ln_post."):
            encoder["layer_norm." + name[len("ln_post."):]] = tensor
        else:
            encoder[name] = tensor
    return encoder, projector


# ------------------------------------------------------------------------------------ vision tower
# Qwen2.5-Omni's vision tower (Qwen2.5-VL's) is a VisionEncoder with norm=rms, mlp=swiglu, key_bias,
# patch_bias=False and window attention, followed by the mlp projector (hidden m^2 D, no input norm):
#
# HF key under `prefix` (thinker.visual. / visual.)      ours
# patch_embed.proj.weight (D, C, tp, p, p)               encoder patch_embedding.weight (D, C * tp * p * p)
# blocks.N.norm1 / norm2                                 encoder layers.N.self_attn_layer_norm / final_layer_norm
# blocks.N.attn.{q, k, v, proj}                          encoder layers.N.self_attn.{q_proj, k_proj, v_proj, out_proj}
# blocks.N.mlp.{gate_proj, up_proj, down_proj}           encoder layers.N.{gate_proj, up_proj, down_proj}
# merger.ln_q (RMSNorm per patch)                        encoder post_layernorm
# merger.mlp.0 / merger.mlp.2                            projector fc1 / fc2


# Qwen2_5OmniVisionEncoderConfig's defaults: what transformers reads for a key config.json leaves out.
HF_VISION_DEFAULTS = {
    "depth": 32, "hidden_size": 3584, "hidden_act": "silu", "intermediate_size": 3420, "num_heads": 16,
    "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
    "out_hidden_size": 3584, "fullatt_block_indexes": [7, 15, 23, 31], "initializer_range": 0.02,
}
_VISION_LAYER_KEYS = {  # blocks.N.<HF> -> layers.N.<ours>
    "norm1.": "self_attn_layer_norm.", "norm2.": "final_layer_norm.",
    "attn.q.": "self_attn.q_proj.", "attn.k.": "self_attn.k_proj.", "attn.v.": "self_attn.v_proj.",
    "attn.proj.": "self_attn.out_proj.",
    "mlp.gate_proj.": "gate_proj.", "mlp.up_proj.": "up_proj.", "mlp.down_proj.": "down_proj.",
}
_VISION_MERGER_KEYS = {"merger.ln_q.": (0, "post_layernorm."), "merger.mlp.0.": (1, "fc1."), "merger.mlp.2.": (1, "fc2.")}


def vision_tower_config(hf_vision: dict, *, where: str) -> VisionEncoderConfig:
    """The thinker's `vision_config` as a VisionEncoderConfig; one ValueError naming `where` and the key otherwise.

    `out_hidden_size` (the merger's output width) is checked here but belongs to the projector:
    it must equal the text model's hidden size.
    """
    hf = {**HF_VISION_DEFAULTS, **hf_vision}

    def positive_int(key: str) -> int:
        value = hf[key]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{where}.{key} must be a positive integer, got {value!r}")
        return value

    size = {key: positive_int(key) for key in ("depth", "hidden_size", "intermediate_size", "num_heads", "in_channels",
                                               "patch_size", "spatial_merge_size", "temporal_patch_size",
                                               "window_size", "out_hidden_size")}
    if hf["hidden_act"] != "silu":
        raise ValueError(f"{where}.hidden_act {hf['hidden_act']!r} is not supported (the SwiGLU block uses silu)")
    if "embed_dim" in hf and hf["embed_dim"] != size["hidden_size"]:  # older configs carry both; 5.x reads hidden_size
        raise ValueError(f"{where}.embed_dim ({hf['embed_dim']}) must equal hidden_size ({size['hidden_size']})")
    rope = hf.get("rope_parameters") or {}
    if not isinstance(rope, dict) or rope.get("rope_type", "axial") not in ("axial", "default"):
        raise ValueError(f"{where}.rope_parameters {rope!r} is not supported (axial 2-D rotary only)")
    block = size["patch_size"] * size["spatial_merge_size"]
    if size["window_size"] % block:  # transformers floors window_size / block: a window would not be window_size wide
        raise ValueError(f"{where}.window_size ({size['window_size']}) must be a multiple of patch_size * "
                         f"spatial_merge_size = {block} pixels")
    fullatt = hf["fullatt_block_indexes"]
    if not isinstance(fullatt, (list, tuple)) or any(
            not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < size["depth"] for i in fullatt):
        raise ValueError(f"{where}.fullatt_block_indexes must be a list of layer indices in [0, depth={size['depth']}), "
                         f"got {fullatt!r}")
    try:
        return VisionEncoderConfig(
            dim=size["hidden_size"], num_layers=size["depth"], num_heads=size["num_heads"],
            ffn_dim=size["intermediate_size"], patch_size=size["patch_size"],
            temporal_patch_size=size["temporal_patch_size"], merge_size=size["spatial_merge_size"],
            num_channels=size["in_channels"], positions="rope2d", norm="rms", mlp="swiglu", key_bias=True,
            patch_bias=False, window_size=size["window_size"], full_attention_layers=list(fullatt),
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            layer_norm_eps=1e-6,  # fixed in Qwen2_5OmniVisionBlock and its merger, not a config key
            init_std=float(hf["initializer_range"]))
    except ValueError as e:  # hidden_size / num_heads: the config's own check names our key
        raise ValueError(f"{where}: {e}") from None


def vision_tower_state_dict(hf_state: dict[str, torch.Tensor], prefix: str) -> tuple[dict[str, torch.Tensor],
                                                                                         dict[str, torch.Tensor]]:
    """(VisionEncoder state, vision projector state) from the keys under `prefix`; other keys are ignored.

    Unknown keys under the prefix pass through into the encoder state, for the strict load to name.
    """
    states: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] = ({}, {})  # encoder, projector
    for key, value in hf_state.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        merger = next((hf for hf in _VISION_MERGER_KEYS if name.startswith(hf)), None)
        if name == "patch_embed.proj.weight":  # Conv3d, kernel = stride: a Linear on the (C, tp, p, p) patch rows
            states[0]["patch_embedding.weight"] = value.reshape(value.shape[0], -1)
        elif merger is not None:
            part, ours = _VISION_MERGER_KEYS[merger]
            states[part][ours + name[len(merger):]] = value
        elif name.startswith("blocks.") and len(parts := name.split(".", 2)) == 3:
            layer_key = next((ours + parts[2][len(hf):] for hf, ours in _VISION_LAYER_KEYS.items()
                              if parts[2].startswith(hf)), parts[2])
            states[0][f"layers.{parts[1]}.{layer_key}"] = value
        else:
            states[0][name] = value
    return states


# ------------------------------------------------------------------------------------------ thinker
# Qwen2.5-Omni HF key (release: under thinker.; the thinker's save_pretrained: no prefix)   OmniModel key
# audio_tower.<...>, audio_tower.proj                          audio_encoder.<...>, audio_projector.fc (audio section)
# audio_tower.audio_bos_eos_token.weight                       unused by the thinker's forward: kept for export
# visual.<...>, visual.merger.{ln_q, mlp.0, mlp.2}             vision_encoder.<...>, post_layernorm, vision_projector.fc1/fc2
# model.<...>                                                  backbone.<...>
# lm_head.weight                                               backbone.lm_head.weight (absent when the thinker ties)
# talker.*, token2wav.* (release only)                         not read

RELEASE_MODEL_TYPE = "qwen2_5_omni"
THINKER_MODEL_TYPE = "qwen2_5_omni_thinker"
UNUSED_KEYS = ("audio_tower.audio_bos_eos_token.weight",)  # in the checkpoint, never used by the thinker's forward


@dataclass(frozen=True)
class OmniCheckpoint:
    """A local Qwen2.5-Omni directory: its whole config.json, the thinker's part of it, and where its weights sit."""

    path: Path
    config: dict      # config.json as read
    thinker: dict     # the thinker's config: config["thinker_config"] (release) or config itself
    prefix: str       # "thinker." (release layout) or "" (the thinker's own save_pretrained)
    family: str = "qwen2_5"  # "qwen2_5" (Qwen2.5-Omni) | "qwen3" (Qwen3-Omni: qwen3_omni.py maps it)

    @property
    def where(self) -> str:
        return str(self.path / CONFIG_FILE)


def read_omni_checkpoint(path: str | Path) -> OmniCheckpoint:
    """The config of a Qwen2.5-Omni or Qwen3-Omni release directory or of a saved thinker; one error naming the file
    otherwise."""
    from omni_train.model import qwen3_omni

    path = Path(path)
    config = read_hf_config(path, "Qwen2.5-Omni / Qwen3-Omni")
    where = str(path / CONFIG_FILE)
    model_type = config.get("model_type")
    releases = {RELEASE_MODEL_TYPE: "qwen2_5", qwen3_omni.RELEASE_MODEL_TYPE: "qwen3"}
    thinkers = {THINKER_MODEL_TYPE: "qwen2_5", qwen3_omni.THINKER_MODEL_TYPE: "qwen3"}
    if model_type in releases:
        thinker = config.get("thinker_config")
        if not isinstance(thinker, dict):
            raise ValueError(f"{where}: model_type {model_type} needs a 'thinker_config' object")
        return OmniCheckpoint(path=path, config=config, thinker=thinker, prefix="thinker.", family=releases[model_type])
    if model_type in thinkers:
        return OmniCheckpoint(path=path, config=config, thinker=config, prefix="", family=thinkers[model_type])
    raise ValueError(f"{where}: model_type {model_type!r} is not a Qwen2.5-Omni or Qwen3-Omni checkpoint "
                     f"(supported: {', '.join([*releases, *thinkers])})")


def pretrained_data_fields(path: str | Path) -> dict[str, dict[str, Any]]:
    """{data section: fields} the checkpoint's processor implies (model.pretrained), replacing the recipe's: Qwen2.5-Omni's
    audio counts and CLIP's pixel normalization, or Qwen3-Omni's audio counts, 16-pixel patches and 0.5 normalization.
    The recipe has read the checkpoint already (OmniConfig)."""
    checkpoint = read_omni_checkpoint(path)
    if checkpoint.family == "qwen3":
        from omni_train.model.qwen3_omni import QWEN3_OMNI_IMAGE_DATA, qwen3_audio_data, qwen3_audio_tower_config

        audio = qwen3_audio_tower_config(checkpoint.thinker.get("audio_config") or {}, where=checkpoint.where)
        return {"audio": qwen3_audio_data(audio), "image": QWEN3_OMNI_IMAGE_DATA}
    return {"audio": QWEN_OMNI_AUDIO_DATA, "image": QWEN_OMNI_IMAGE_DATA}


def thinker_backbone_config(checkpoint: OmniCheckpoint) -> BackboneConfig:
    """The text model as a BackboneConfig: Qwen2 (q/k/v bias), 3-D RoPE bands, the thinker-level tie_word_embeddings."""
    text = checkpoint.thinker.get("text_config")
    where = f"{checkpoint.where}: {'thinker_config.' if checkpoint.prefix else ''}text_config"
    if not isinstance(text, dict):
        raise ValueError(f"{where}: missing (the thinker's text model config)")
    # the thinker's own flag decides: transformers ties lm_head to the embeddings only when it is true
    text = {**text, "model_type": "qwen2", "tie_word_embeddings": bool(checkpoint.thinker.get("tie_word_embeddings", False))}
    return backbone_config_from_hf(text, where=where)


def check_tower_widths(thinker: dict, backbone: BackboneConfig, *, where: str, prefix: str = "") -> None:
    """The towers' output widths (audio_config.output_dim, vision_config.out_hidden_size) must be the text model's."""
    for key, out_dim in (("audio_config.output_dim", thinker["audio_config"].get("output_dim")),
                         ("vision_config.out_hidden_size", thinker["vision_config"].get("out_hidden_size"))):
        if out_dim is not None and out_dim != backbone.dim:
            raise ValueError(f"{where}: {prefix}{key}={out_dim} differs from text_config.hidden_size={backbone.dim}")


def thinker_model_fields(checkpoint: OmniCheckpoint) -> dict[str, Any]:
    """OmniConfig fields that reproduce the thinker: backbone, encoders, projectors, positions."""
    if checkpoint.family == "qwen3":
        from omni_train.model.qwen3_omni import qwen3_thinker_model_fields

        return qwen3_thinker_model_fields(checkpoint)
    thinker, where = checkpoint.thinker, checkpoint.where
    for key in ("audio_config", "vision_config"):
        if not isinstance(thinker.get(key), dict):
            raise ValueError(f"{where}: the thinker's {key} is missing")
    backbone = thinker_backbone_config(checkpoint)
    if backbone.mrope_section is None:
        raise ValueError(f"{where}: text_config.rope_parameters has no mrope_section (TMRoPE needs its three bands)")
    audio = audio_tower_config(thinker["audio_config"], where=f"{where}: audio_config")
    vision = vision_tower_config(thinker["vision_config"], where=f"{where}: vision_config")
    check_tower_widths(thinker, backbone, where=where)
    for key, expected in (("position_id_per_seconds", 25), ("seconds_per_chunk", 2)):
        if thinker.get(key, expected) != expected:
            raise ValueError(f"{where}: {key}={thinker[key]} is not supported (the data layer's TMRoPE uses {expected})")
    return {
        "backbone": backbone, "audio": audio, "vision": vision, "positions": "tmrope",
        "audio_projector": ProjectorOptions(kind="linear", input_norm=False),
        # the merger: Linear(m^2 D, m^2 D), GELU, Linear(m^2 D, text dim) after the per-patch ln_q (vision post norm)
        "vision_projector": ProjectorOptions(kind="mlp", hidden_dim=vision.out_dim, input_norm=False),
    }


def iter_checkpoint_tensors(checkpoint: OmniCheckpoint) -> Iterator[tuple[str, torch.Tensor]]:
    """(key without the thinker prefix, tensor) of every thinker weight, one tensor in memory at a time.

    Talker and token2wav tensors are never read. Nothing is unpickled: safetensors only.
    """
    from omni_train.train.zero3 import iter_safetensors

    for key, tensor in iter_safetensors(checkpoint.path / name for name in _weight_files(checkpoint)):
        if key.startswith(checkpoint.prefix):
            yield key[len(checkpoint.prefix):], tensor


def thinker_to_omni_state_dict(hf_state: dict[str, torch.Tensor], cfg: BackboneConfig) -> dict[str, torch.Tensor]:
    """Thinker keys (prefix removed) -> OmniModel keys; unknown keys pass through for the strict check to name."""
    audio = {k: v for k, v in hf_state.items() if k.startswith("audio_tower.") and k not in UNUSED_KEYS}
    vision = {k: v for k, v in hf_state.items() if k.startswith("visual.")}
    text = {k: v for k, v in hf_state.items() if k.startswith("model.") or k == "lm_head.weight"}
    rest = {k: v for k, v in hf_state.items()
            if k not in audio and k not in vision and k not in text and k not in UNUSED_KEYS}
    state: dict[str, torch.Tensor] = dict(rest)
    for prefix, part in (("audio", audio_tower_state_dict(audio, "audio_tower.")),
                         ("vision", vision_tower_state_dict(vision, "visual."))):
        encoder, projector = part
        state.update({f"{prefix}_encoder.{k}": v for k, v in encoder.items()})
        state.update({f"{prefix}_projector.{k}": v for k, v in projector.items()})
    state.update({f"backbone.{k}": v for k, v in hf_to_backbone_state_dict(text, cfg).items()})
    return state


def load_thinker(model: nn.Module, path: str | Path) -> None:
    """Load a Qwen2.5-Omni checkpoint's thinker weights into `model` (an OmniModel built from its config), strictly.

    Every key is mapped; a missing, unexpected or mis-shaped one is named in one error with the weights file.
    """
    checkpoint = read_omni_checkpoint(path)
    if checkpoint.family == "qwen3":
        from omni_train.model.qwen3_omni import qwen3_thinker_to_omni_state_dict as to_omni
    else:
        to_omni = thinker_to_omni_state_dict
    state = to_omni(dict(iter_checkpoint_tensors(checkpoint)), model.cfg.backbone)
    dtype = next(model.parameters()).dtype
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    load_state_strict(model, state, where=weights_label(checkpoint.path))


# --------------------------------------------------------------------------------------- export (release layout)
RELEASE_ARCHITECTURES = ["Qwen2_5OmniModel"]
# Files of a release directory an export carries over unchanged: tokenizer, chat template, processor settings.
CARRIED_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                 "added_tokens.json", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
                 "processor_config.json", "generation_config.json")
SPEAKERS_FILE = "spk_dict.pt"


def checkpoint_shapes(checkpoint: OmniCheckpoint) -> dict[str, tuple[int, ...]]:
    """Every thinker key's shape (prefix removed), from the safetensors headers alone."""
    from safetensors import safe_open

    shapes = {}
    for file in sorted({checkpoint.path / name for name in _weight_files(checkpoint)}):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                if key.startswith(checkpoint.prefix):
                    shapes[key[len(checkpoint.prefix):]] = tuple(f.get_slice(key).get_shape())
    return shapes


def _weight_files(checkpoint: OmniCheckpoint) -> list[str]:
    """The safetensors files of a checkpoint: the shards its index lists, or model.safetensors."""
    path = checkpoint.path
    index_file = path / WEIGHTS_INDEX_FILE
    if index_file.is_file():
        weight_map = read_json(index_file).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_file}: needs a non-empty 'weight_map' object")
        files = sorted(set(weight_map.values()))
        for name in files:
            if not (path / name).is_file():
                raise FileNotFoundError(f"{index_file}: lists shard {name!r}, which is not in {path}")
        return files
    if (path / WEIGHTS_FILE).is_file():
        return [WEIGHTS_FILE]
    raise FileNotFoundError(f"{path}: no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE} (only safetensors checkpoints are read)")


def omni_to_thinker_state_dict(state: dict[str, torch.Tensor], checkpoint: OmniCheckpoint,
                               backbone: BackboneConfig) -> dict[str, torch.Tensor]:
    """OmniModel keys -> the source checkpoint's thinker keys (prefix removed), the inverse of thinker_to_omni_state_dict.

    The inverse is derived rather than written a second time: each source key i is given as a
    zero-memory constant tensor of value i (expanded), mapped forward, and every mapped tensor
    names the source key it came from. The forward maps only rename and reshape, which the check
    that each mapped tensor is one constant confirms. Keys the forward map skips (UNUSED_KEYS) are
    the caller's to carry over from the source.
    """
    shapes = checkpoint_shapes(checkpoint)
    keys = sorted(shapes)
    assert len(keys) < 2 ** 24, "ids must be exact in float32"
    probe = {key: torch.tensor(float(i)).expand(shapes[key]) for i, key in enumerate(keys)}
    mapped = thinker_to_omni_state_dict(probe, backbone)
    out: dict[str, torch.Tensor] = {}
    missing = sorted(set(mapped) - set(state))
    if missing:
        raise ValueError(f"the model lacks {len(missing)} weights of {checkpoint.path}: {', '.join(missing[:5])}")
    for our_key, tagged in mapped.items():
        index = int(tagged.reshape(-1)[0])
        assert bool((tagged == index).all()), f"{our_key}: the forward map is not a rename/reshape"
        source_key = keys[index]
        out[source_key] = state[our_key].detach().reshape(shapes[source_key])
    unmapped = sorted(set(state) - set(mapped))
    if unmapped:
        raise ValueError(f"{len(unmapped)} weights of the model have no place in {checkpoint.path}'s layout: "
                         f"{', '.join(unmapped[:5])}")
    return out


def _fit_to_source(mapped: dict[str, torch.Tensor], checkpoint: OmniCheckpoint) -> dict[str, torch.Tensor]:
    """Thinker tensors named as the source names them -> each in the source's shape; one error naming the keys the
    model lacks or the source has no place for (Qwen3-Omni: its explicit inverse map, checked against the source)."""
    shapes = checkpoint_shapes(checkpoint)
    missing, extra = sorted(set(shapes) - set(mapped)), sorted(set(mapped) - set(shapes))
    if missing:
        raise ValueError(f"the model lacks {len(missing)} weights of {checkpoint.path}: {', '.join(missing[:5])}")
    if extra:
        raise ValueError(f"{len(extra)} weights of the model have no place in {checkpoint.path}'s layout: "
                         f"{', '.join(extra[:5])}")
    return {key: tensor.detach().reshape(shapes[key]) for key, tensor in mapped.items()}


def save_release(state: dict[str, torch.Tensor], source: str | Path, out: Path, *, backbone: BackboneConfig,
                 max_shard_bytes: int = 5 * 1024**3) -> None:
    """Write `state` (an OmniModel's full state dict, LoRA merged) into `out` in the source's release layout
    (Qwen2.5-Omni's, or Qwen3-Omni's: experts one key each, qkv fused, `Qwen3OmniMoeForConditionalGeneration`).

    config.json is the source's, with `architectures` set and, for a source that was a bare thinker,
    wrapped as the release's `thinker_config` (without talker: `enable_audio_output: false`); weights
    go under `thinker.*` in the source's dtype, in shards with an index; tensors of the source that
    the thinker's forward does not use (UNUSED_KEYS, and a release's talker / token2wav) are copied
    through unchanged; tokenizer, chat template and processor files are copied.
    """
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    checkpoint = read_omni_checkpoint(source)
    release_type, architectures = RELEASE_MODEL_TYPE, RELEASE_ARCHITECTURES
    if checkpoint.family == "qwen3":
        from omni_train.model import qwen3_omni

        thinker_state = _fit_to_source(qwen3_omni.qwen3_omni_to_thinker_state_dict(state), checkpoint)
        release_type, architectures = qwen3_omni.RELEASE_MODEL_TYPE, qwen3_omni.RELEASE_ARCHITECTURES
    else:
        thinker_state = omni_to_thinker_state_dict(state, checkpoint, backbone)
    dtype_name = checkpoint.thinker.get("dtype") or checkpoint.thinker.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(dtype_name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{checkpoint.where}: unknown dtype {dtype_name!r}")
    tensors = {f"thinker.{key}": value.to("cpu", dtype).contiguous() for key, value in thinker_state.items()}
    for file in sorted({checkpoint.path / name for name in _weight_files(checkpoint)}):  # carried through unchanged
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                inner = key[len(checkpoint.prefix):] if key.startswith(checkpoint.prefix) else None
                if inner in UNUSED_KEYS or (checkpoint.prefix and inner is None):
                    tensors[f"thinker.{inner}" if inner is not None else key] = f.get_tensor(key)
    if checkpoint.prefix:
        config = dict(checkpoint.config)
    else:
        thinker = {k: v for k, v in checkpoint.config.items() if k not in ("architectures", "transformers_version")}
        config = {"model_type": release_type, "thinker_config": thinker, "enable_audio_output": False}
    config["architectures"] = list(architectures)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[list[str]] = [[]]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    weight_map = {}
    for i, keys in enumerate(shards):
        name = WEIGHTS_FILE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: tensors[k] for k in keys}, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (out / WEIGHTS_INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False))
    for name in CARRIED_FILES:
        if (checkpoint.path / name).is_file():
            shutil.copyfile(checkpoint.path / name, out / name)
    # transformers' Qwen2_5OmniForConditionalGeneration.from_pretrained requires the talker's voices file (it reads
    # it weights-only). The source's is copied byte for byte, never read here; a bare thinker had none: an empty one.
    if checkpoint.family == "qwen3":  # Qwen3-Omni's talker needs no voices file
        return
    if (checkpoint.path / SPEAKERS_FILE).is_file():
        shutil.copyfile(checkpoint.path / SPEAKERS_FILE, out / SPEAKERS_FILE)
    else:
        torch.save({}, out / SPEAKERS_FILE)


def iter_thinker_state(path: str | Path, backbone: BackboneConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(OmniModel key, tensor) of a checkpoint's thinker weights, one tensor in memory at a time.

    For `train.zero3.load_state_partitioned`: a ZeRO-3 run writes them into its partitions without
    any rank holding the whole model. The maps are per key (renames and reshapes), so each tensor is
    mapped alone.
    """
    checkpoint = read_omni_checkpoint(path)
    if checkpoint.family == "qwen3":
        from omni_train.model.qwen3_omni import iter_qwen3_thinker_state

        yield from iter_qwen3_thinker_state(checkpoint, backbone)
        return
    for key, tensor in iter_checkpoint_tensors(checkpoint):
        if key not in UNUSED_KEYS:
            yield from thinker_to_omni_state_dict({key: tensor}, backbone).items()
