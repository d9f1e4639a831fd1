"""Qwen3-Omni's thinker (transformers' `qwen3_omni_moe`, read as the specification) <-> omni_train modules.

The audio and vision towers, and the whole thinker for `model.pretrained` (read by `qwen2_5_omni.read_omni_checkpoint`,
family qwen3); the text model is the `qwen3_omni_moe_text` family of `hf_adapters`.

Audio tower: an AudioEncoder with `stem: conv2d` (three stride-2 Conv2d over mel x time, GELU, then
`conv_out`: 8 frames per position), `chunk_frames` = n_window * 2 (1 s: 100 frames -> 13 positions,
positions restarting at 0 per chunk, fixed sinusoids), attention in runs of n_window_infer frames' positions
counted from each item's start (`attention_window_frames`, 8 s in the release), a bias on k_proj, then
`ln_post` and `proj1 -> GELU -> proj2`, our `mlp` projector without input norm (hidden width d_model).

HF key under `prefix` (thinker.audio_tower. / audio_tower.)    ours
conv2d1.*, conv2d2.*, conv2d3.*, conv_out.weight               audio_encoder.<same>
layers.N.<...>                                                 audio_encoder.layers.N.<same> (Whisper's names)
ln_post.*                                                      audio_encoder.layer_norm.*
proj1.*, proj2.*                                               audio_projector.fc1.*, fc2.*  (kind mlp, no input norm)
positional_embedding.positional_embedding                      not in a state dict (a non-persistent buffer of
                                                               fixed sinusoids; positions: sinusoid computes them)

Data: WhisperFeatureExtractor's ceil(samples / 160) valid frames (QWEN3_OMNI_AUDIO_DATA), and tokens counted
per 1 s chunk, `_get_feat_extract_output_lengths`: (frames // 100) * 13 + the rest's ceil(ceil(ceil(r / 2) / 2) / 2).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

from omni_train.data.positions import QWEN3_POSITION_IDS_PER_SECOND
from omni_train.model.audio_encoder import AudioEncoderConfig
from omni_train.model.vision_encoder import VisionEncoderConfig
from omni_train.model.qwen2_5_omni import audio_tower_state_dict, check_audio_tower_fields

# transformers' Qwen3OmniMoeAudioEncoderConfig defaults (5.x): a config.json may leave them out.
QWEN3_OMNI_AUDIO_DEFAULTS = {"num_mel_bins": 128, "encoder_layers": 32, "encoder_attention_heads": 20,
                             "encoder_ffn_dim": 5120, "d_model": 1280, "dropout": 0.0, "attention_dropout": 0.0,
                             "activation_function": "gelu", "activation_dropout": 0.0, "initializer_range": 0.02,
                             "max_source_positions": 1500, "n_window": 50, "n_window_infer": 800,
                             "downsample_hidden_size": 480, "output_dim": 3584}
# data.audio fields the tower's processor implies: ceil(samples / 160) valid frames, 8 frames per token counted per
# chunk of 100 frames (the encoder's n_window * 2, set from the config by qwen3_audio_data)
QWEN3_OMNI_AUDIO_DATA = {"downsample": 8, "valid_frames": "ceil", "pool_tail": "keep", "chunk_frames": 100}
AUDIO_PROJECTOR_KEYS = {"proj1.": "fc1.", "proj2.": "fc2."}


def qwen3_audio_tower_config(hf_audio: dict, *, where: str) -> AudioEncoderConfig:
    """The thinker's `audio_config` (config.json) as an AudioEncoderConfig; its proj1 / proj2 are an `mlp` projector
    (hidden width d_model) to output_dim. One ValueError naming `where` and the key for anything not supported."""
    hf = {**QWEN3_OMNI_AUDIO_DEFAULTS, **hf_audio}
    check_audio_tower_fields(hf, ("n_window", "n_window_infer", "max_source_positions", "output_dim",
                                  "downsample_hidden_size"), where=where)
    chunk = 2 * hf["n_window"]
    # transformers attends in runs of (n_window_infer // chunk) chunks' positions: the ratio is floored
    if hf["n_window_infer"] < chunk:
        raise ValueError(f"{where}: n_window_infer={hf['n_window_infer']} is under a chunk (n_window * 2 = {chunk} "
                         "frames): its attention windows would hold no position")
    try:
        cfg = AudioEncoderConfig(
            dim=hf["d_model"], num_layers=hf["encoder_layers"], num_heads=hf["encoder_attention_heads"],
            ffn_dim=hf["encoder_ffn_dim"], num_mel_bins=hf["num_mel_bins"], stem="conv2d",
            stem_channels=hf["downsample_hidden_size"], chunk_frames=chunk,
            attention_window_frames=hf["n_window_infer"] // chunk * chunk, key_bias=True, positions="sinusoid",
            layer_norm_eps=1e-5,  # torch's LayerNorm default, which every norm of the tower uses
            init_std=float(hf["initializer_range"]))
    except ValueError as e:
        raise ValueError(f"{where}: n_window={hf['n_window']}: {e}") from None
    # transformers adds the first positions of its max_source_positions sinusoids to each chunk
    if cfg.num_positions > hf["max_source_positions"]:
        raise ValueError(f"{where}: a chunk of n_window * 2 = {chunk} frames has {cfg.num_positions} positions, over "
                         f"max_source_positions={hf['max_source_positions']}")
    return cfg


def qwen3_audio_data(cfg: AudioEncoderConfig) -> dict:
    """data.audio fields for a Qwen3-Omni audio tower config: QWEN3_OMNI_AUDIO_DATA with its chunk."""
    return {**QWEN3_OMNI_AUDIO_DATA, "chunk_frames": cfg.chunk_frames}


def qwen3_audio_tower_state_dict(hf_state: dict[str, torch.Tensor], prefix: str) -> tuple[dict[str, torch.Tensor],
                                                                                           dict[str, torch.Tensor]]:
    """(AudioEncoder state, audio projector state) from the keys under `prefix` ("thinker.audio_tower.", "audio_tower.")."""
    return audio_tower_state_dict(hf_state, prefix, projector_keys=AUDIO_PROJECTOR_KEYS)


# ------------------------------------------------------------------------------------ vision tower
# Qwen3-Omni's vision tower (Qwen3-VL's) is a VisionEncoder with positions learned_rope2d (a 48 x 48 table resized
# bilinearly with align_corners, plus 2-D rotary), a biased patch embedding, fused qkv with biases, LayerNorms and a
# tanh-GELU MLP; its merger is post_layernorm + the `mlp` projector (hidden m^2 D, no input norm), and its
# merger_list (deepstack) the model's `vision_deepstack` projectors (LayerNorm over the merged m^2 D, then the MLP):
#
# HF key under `prefix` (thinker.visual. / visual.)      ours
# patch_embed.proj.{weight (D, C, tp, p, p), bias}       encoder patch_embedding.{weight (D, C * tp * p * p), bias}
# pos_embed.weight                                       encoder position_embedding.weight
# blocks.N.norm1 / norm2                                 encoder layers.N.self_attn_layer_norm / final_layer_norm
# blocks.N.attn.qkv (3 D, D)                             encoder layers.N.self_attn.{q_proj, k_proj, v_proj} (split)
# blocks.N.attn.proj                                     encoder layers.N.self_attn.out_proj
# blocks.N.mlp.linear_fc1 / linear_fc2                   encoder layers.N.fc1 / fc2
# merger.ln_q / merger.mlp.0 / merger.mlp.2              encoder post_layernorm / projector fc1 / fc2
# merger_list.J.ln_q / mlp.0 / mlp.2                     vision_deepstack.J.norm / fc1 / fc2

# Qwen3OmniMoeVisionEncoderConfig's defaults (5.x).
QWEN3_OMNI_VISION_DEFAULTS = {
    "depth": 27, "hidden_size": 1152, "hidden_act": "gelu_pytorch_tanh", "intermediate_size": 4304, "num_heads": 16,
    "in_channels": 3, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 3584,
    "num_position_embeddings": 2304, "deepstack_visual_indexes": [8, 16, 24], "initializer_range": 0.02,
}
_VISION_LAYER_KEYS = {  # blocks.N.<HF> -> layers.N.<ours>; attn.qkv is split
    "norm1.": "self_attn_layer_norm.", "norm2.": "final_layer_norm.", "attn.proj.": "self_attn.out_proj.",
    "mlp.linear_fc1.": "fc1.", "mlp.linear_fc2.": "fc2.",
}
_MERGER_KEYS = {"ln_q.": "norm.", "mlp.0.": "fc1.", "mlp.2.": "fc2."}  # merger_list.J.<HF> -> vision_deepstack.J.<ours>


def qwen3_vision_tower_config(hf_vision: dict, *, where: str) -> VisionEncoderConfig:
    """The thinker's `vision_config` as a VisionEncoderConfig (deepstack_layers from deepstack_visual_indexes); one
    ValueError naming `where` and the key otherwise. out_hidden_size belongs to the projectors (the text width)."""
    hf = {**QWEN3_OMNI_VISION_DEFAULTS, **hf_vision}
    for key in ("depth", "hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size",
                "spatial_merge_size", "temporal_patch_size", "out_hidden_size", "num_position_embeddings"):
        if not isinstance(hf[key], int) or isinstance(hf[key], bool) or hf[key] <= 0:
            raise ValueError(f"{where}.{key} must be a positive integer, got {hf[key]!r}")
    if hf["hidden_act"] not in ("gelu_pytorch_tanh", "gelu"):
        raise ValueError(f"{where}.hidden_act {hf['hidden_act']!r} is not supported (gelu_pytorch_tanh, gelu)")
    side = math.isqrt(hf["num_position_embeddings"])
    if side * side != hf["num_position_embeddings"]:
        raise ValueError(f"{where}.num_position_embeddings must be a square (a side x side table), "
                         f"got {hf['num_position_embeddings']}")
    rope = hf.get("rope_parameters") or {}
    if not isinstance(rope, dict) or rope.get("rope_type", "axial") not in ("axial", "default"):
        raise ValueError(f"{where}.rope_parameters {rope!r} is not supported (axial 2-D rotary only)")
    try:
        return VisionEncoderConfig(
            dim=hf["hidden_size"], num_layers=hf["depth"], num_heads=hf["num_heads"], ffn_dim=hf["intermediate_size"],
            patch_size=hf["patch_size"], temporal_patch_size=hf["temporal_patch_size"],
            merge_size=hf["spatial_merge_size"], num_channels=hf["in_channels"], positions="learned_rope2d",
            image_size=side * hf["patch_size"], activation="gelu_tanh" if hf["hidden_act"] != "gelu" else "gelu",
            key_bias=True, patch_bias=True, deepstack_layers=list(hf["deepstack_visual_indexes"]),
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            layer_norm_eps=1e-6,  # fixed in Qwen3OmniMoeVisionBlock and its mergers, not a config key
            init_std=float(hf["initializer_range"]))
    except ValueError as e:
        message = str(e).replace("model.vision.deepstack_layers", "deepstack_visual_indexes")
        raise ValueError(f"{where}: {message}") from None


def qwen3_vision_tower_state_dict(hf_state: dict[str, torch.Tensor], prefix: str) -> tuple[
        dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(VisionEncoder state, vision projector state, vision_deepstack state) from the keys under `prefix`; other keys
    are ignored, unknown ones under it pass into the encoder state for the strict load to name."""
    encoder: dict[str, torch.Tensor] = {}
    projector: dict[str, torch.Tensor] = {}
    deepstack: dict[str, torch.Tensor] = {}
    for key, value in hf_state.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        parts = name.split(".", 2)
        if name.startswith("patch_embed.proj."):  # Conv3d, kernel = stride: a Linear on the (C, tp, p, p) patch rows
            encoder["patch_embedding." + parts[2]] = value.reshape(value.shape[0], -1) if value.ndim > 1 else value
        elif name == "pos_embed.weight":
            encoder["position_embedding.weight"] = value
        elif name.startswith("merger."):
            rest = name[len("merger."):]
            if rest.startswith("ln_q."):
                encoder["post_layernorm." + rest[len("ln_q."):]] = value
            else:
                projector[next((ours + rest[len(hf):] for hf, ours in _MERGER_KEYS.items() if rest.startswith(hf)), rest)] = value
        elif name.startswith("merger_list.") and len(parts) == 3:
            ours = next((o + parts[2][len(hf):] for hf, o in _MERGER_KEYS.items() if parts[2].startswith(hf)), parts[2])
            deepstack[f"{parts[1]}.{ours}"] = value
        elif name.startswith("blocks.") and len(parts) == 3:
            layer = f"layers.{parts[1]}."
            if parts[2].startswith("attn.qkv."):
                for proj, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    encoder[f"{layer}self_attn.{proj}.{parts[2][len('attn.qkv.'):]}"] = chunk
            else:
                encoder[layer + next((ours + parts[2][len(hf):] for hf, ours in _VISION_LAYER_KEYS.items()
                                      if parts[2].startswith(hf)), parts[2])] = value
        else:
            encoder[name] = value
    return encoder, projector, deepstack


# ------------------------------------------------------------------------------------------ thinker
# Qwen3-Omni HF key (release: under thinker.; the thinker's save_pretrained: no prefix)   OmniModel key
# audio_tower.<...>, audio_tower.proj1 / proj2                audio_encoder.<...>, audio_projector.fc1 / fc2
# visual.<...>, visual.merger, visual.merger_list.J           vision_encoder.<...>, vision_projector, vision_deepstack.J
# model.<...> (experts per key on disk, or fused)             backbone.<...> (experts fused: hf_adapters._fuse_experts)
# lm_head.weight                                              backbone.lm_head.weight
# talker.*, code2wav.* (release only)                         not read
RELEASE_MODEL_TYPE = "qwen3_omni_moe"
RELEASE_ARCHITECTURES = ["Qwen3OmniMoeForConditionalGeneration"]
THINKER_MODEL_TYPE = "qwen3_omni_moe_thinker"
# data fields the thinker's processor implies beyond data.audio: Qwen3-VL's 16-pixel patches and 0.5 normalization
QWEN3_OMNI_IMAGE_DATA = {"patch_size": 16, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}


def qwen3_thinker_model_fields(checkpoint) -> dict[str, Any]:
    """OmniConfig fields that reproduce a Qwen3-Omni thinker (`qwen2_5_omni.OmniCheckpoint` of family qwen3): the
    MoE backbone with interleaved M-RoPE, both towers, their projectors, deepstack, and positions tmrope_qwen3."""
    from omni_train.model.hf_adapters import backbone_config_from_hf
    from omni_train.model.projectors import ProjectorOptions
    from omni_train.model.qwen2_5_omni import check_tower_widths

    thinker, where = checkpoint.thinker, checkpoint.where
    prefix = "thinker_config." if checkpoint.prefix else ""
    for key in ("text_config", "audio_config", "vision_config"):
        if not isinstance(thinker.get(key), dict):
            raise ValueError(f"{where}: {prefix}{key} is missing (the thinker's {key.split('_')[0]} config)")
    text = {**thinker["text_config"], "model_type": "qwen3_omni_moe_text",
            "tie_word_embeddings": bool(thinker.get("tie_word_embeddings", False))}
    backbone = backbone_config_from_hf(text, where=f"{where}: {prefix}text_config")
    if backbone.mrope_section is None:
        raise ValueError(f"{where}: {prefix}text_config.rope_parameters has no mrope_section (TMRoPE needs its bands)")
    audio = qwen3_audio_tower_config(thinker["audio_config"], where=f"{where}: {prefix}audio_config")
    vision = qwen3_vision_tower_config(thinker["vision_config"], where=f"{where}: {prefix}vision_config")
    check_tower_widths(thinker, backbone, where=where, prefix=prefix)
    # the config class's default is 25, the released model's config.json and processor say 13: read what is there
    per_second = thinker.get("position_id_per_seconds", 25)
    if per_second != QWEN3_POSITION_IDS_PER_SECOND:
        raise ValueError(f"{where}: {prefix}position_id_per_seconds={per_second} is not supported (positions "
                         f"tmrope_qwen3 use {QWEN3_POSITION_IDS_PER_SECOND:g}, the released model's)")
    return {
        "backbone": backbone, "audio": audio, "vision": vision, "positions": "tmrope_qwen3",
        "audio_projector": ProjectorOptions(kind="mlp", hidden_dim=audio.dim, input_norm=False),
        "vision_projector": ProjectorOptions(kind="mlp", hidden_dim=vision.out_dim, input_norm=False),
    }


def qwen3_thinker_to_omni_state_dict(hf_state: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """Qwen3-Omni thinker keys (prefix removed) -> OmniModel keys; unknown keys pass through for the strict check."""
    from omni_train.model.hf_adapters import hf_to_backbone_state_dict

    audio = {k: v for k, v in hf_state.items() if k.startswith("audio_tower.")}
    vision = {k: v for k, v in hf_state.items() if k.startswith("visual.")}
    text = {k: v for k, v in hf_state.items() if k.startswith("model.") or k == "lm_head.weight"}
    state = {k: v for k, v in hf_state.items() if k not in audio and k not in vision and k not in text}
    encoder, projector = qwen3_audio_tower_state_dict(audio, "audio_tower.")
    state.update({f"audio_encoder.{k}": v for k, v in encoder.items()})
    state.update({f"audio_projector.{k}": v for k, v in projector.items()})
    for name, part in zip(("vision_encoder", "vision_projector", "vision_deepstack"),
                          qwen3_vision_tower_state_dict(vision, "visual.")):
        state.update({f"{name}.{k}": v for k, v in part.items()})
    state.update({f"backbone.{k}": v for k, v in hf_to_backbone_state_dict(text, cfg).items()})
    return state


def iter_qwen3_thinker_state(checkpoint, backbone) -> Iterator[tuple[str, torch.Tensor]]:
    """(OmniModel key, tensor) of a Qwen3-Omni checkpoint's thinker weights for `zero3.load_state_partitioned`.

    Every key maps alone (a fused qkv into three), but for the experts a layer keeps on disk one key per expert and
    projection: those are held until the layer's are all read, then fused, so at most one layer's experts are in
    memory at a time. An incomplete layer is passed on as it is, for the strict loader to name.
    """
    from omni_train.model.hf_adapters import EXPERT_ON_DISK
    from omni_train.model.qwen2_5_omni import iter_checkpoint_tensors

    per_layer = 3 * backbone.moe.experts if backbone.moe is not None else 0
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in iter_checkpoint_tensors(checkpoint):
        if (match := EXPERT_ON_DISK.fullmatch(key)) is None:
            yield from qwen3_thinker_to_omni_state_dict({key: tensor}, backbone).items()
            continue
        group = pending.setdefault(match[1], {})
        group[key] = tensor
        if len(group) == per_layer:
            yield from qwen3_thinker_to_omni_state_dict(pending.pop(match[1]), backbone).items()
    for group in pending.values():
        yield from qwen3_thinker_to_omni_state_dict(group, backbone).items()


def qwen3_omni_to_thinker_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OmniModel keys -> Qwen3-Omni thinker keys as a release stores them (prefix removed): the inverse of
    qwen3_thinker_to_omni_state_dict, with its own name tables inverted (q/k/v concatenated into qkv, the experts
    split one key per expert and projection). A tensor keeps our shape; the caller reshapes it to the source's
    (the patch embedding's Linear back into its Conv3d). A key this does not know raises, naming it."""
    from omni_train.model.hf_adapters import backbone_to_hf_state_dict, unfuse_experts

    audio = {f"audio_tower.{_invert(_AUDIO_NAMES, k[len('audio_encoder.'):])}": v
             for k, v in state.items() if k.startswith("audio_encoder.")}
    audio.update({f"audio_tower.{_invert(AUDIO_PROJECTOR_KEYS, k[len('audio_projector.'):])}": v
                  for k, v in state.items() if k.startswith("audio_projector.")})
    vision: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("vision_encoder."):
            name = key[len("vision_encoder."):]
            if name.startswith("layers."):
                index, rest = name[len("layers."):].split(".", 1)
                parts = rest.split(".")                                       # e.g. self_attn, q_proj, weight
                if parts[0] == "self_attn" and parts[1] in ("q_proj", "k_proj", "v_proj"):
                    if parts[1] == "q_proj":  # q, k and v back into the fused qkv, in that order
                        vision[f"blocks.{index}.attn.qkv.{parts[2]}"] = torch.cat(
                            [state[f"vision_encoder.layers.{index}.self_attn.{p}_proj.{parts[2]}"] for p in "qkv"])
                    continue
                vision[f"blocks.{index}.{_invert(_VISION_LAYER_KEYS, rest)}"] = value
            else:
                vision[_invert(_VISION_NAMES, name)] = value
        elif key.startswith("vision_projector."):
            vision["merger." + _invert(_MERGER_KEYS, key[len("vision_projector."):])] = value
        elif key.startswith("vision_deepstack."):
            index, rest = key[len("vision_deepstack."):].split(".", 1)
            vision[f"merger_list.{index}.{_invert(_MERGER_KEYS, rest)}"] = value
    text = unfuse_experts({k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")})
    out = {**audio, **{f"visual.{k}": v for k, v in vision.items()}, **backbone_to_hf_state_dict(text)}
    unknown = [k for k in state if not k.startswith(("audio_encoder.", "audio_projector.", "vision_encoder.",
                                                     "vision_projector.", "vision_deepstack.", "backbone."))]
    if unknown:
        raise ValueError(f"{len(unknown)} weights of the model have no place in Qwen3-Omni's layout: {', '.join(unknown[:5])}")
    return out


# our -> HF names outside the layers' tables (prefix renames; the rest keeps its name)
_AUDIO_NAMES = {"ln_post.": "layer_norm."}
_VISION_NAMES = {"pos_embed.weight": "position_embedding.weight", "patch_embed.proj.": "patch_embedding.",
                 "merger.ln_q.": "post_layernorm."}


def _invert(table: dict[str, str], ours: str) -> str:
    """Our name -> the HF name under `table` ({HF prefix: our prefix}): the first of our prefixes it starts with."""
    for hf, mine in table.items():
        if ours.startswith(mine):
            return hf + ours[len(mine):]
    return ours
