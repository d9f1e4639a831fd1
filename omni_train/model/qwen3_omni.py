"""Qwen3-Omni's thinker (transformers' `qwen3_omni_moe`, read as the specification) <-> omni_train modules.

So far the audio tower; the text thinker is the `qwen3_omni_moe_text` family of `hf_adapters`.

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

import torch

from omni_train.model.audio_encoder import AudioEncoderConfig
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
