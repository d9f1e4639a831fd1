"""Qwen3-Omni's vision tower and deepstack (issue 16) against transformers' own classes, built tiny and random.

- `Qwen3OmniMoeVisionEncoder` (every parameter perturbed) mapped by `qwen3_omni.qwen3_vision_tower_state_dict`
  and loaded strictly into VisionEncoder (positions learned_rope2d, fused qkv split) + the mlp projector + the
  `vision_deepstack` projectors: the merged outputs and each deepstack feature equal its `pooler_output` and
  `deepstack_features` on real images (PIL) and a video (ffmpeg) decoded by the data layer;
- an OmniModel holding that tower and a `Qwen3OmniMoeThinkerTextModel`'s weights: its logits equal the text
  model's, fed the same visual embeddings with `visual_pos_masks` and `deepstack_visual_embeds`, so the additions
  after the first backbone layers are transformers' `_deepstack_process`.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_qwen3_omni import positions_3d, text_config

from omni_train.data import synth
from omni_train.data.image import ImageConfig, encode_image
from omni_train.data.sample import MODALITY_IDS
from omni_train.data.video import VideoConfig, encode_video
from omni_train.model.hf_adapters import backbone_config_from_hf, hf_to_backbone_state_dict, load_state_strict
from omni_train.model.omni import OmniConfig, OmniModel
from omni_train.model.projectors import ProjectorOptions
from omni_train.model.qwen3_omni import qwen3_vision_tower_config, qwen3_vision_tower_state_dict
from omni_train.model.vision_encoder import VisionEncoderConfig

transformers = pytest.importorskip("transformers")
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeVisionEncoderConfig  # noqa: E402
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (  # noqa: E402
    Qwen3OmniMoeThinkerTextModel, Qwen3OmniMoeVisionEncoder)

TOLERANCE = 1e-5
# a 6 x 6 position table (96 px at patch 16), deepstack after blocks 0 and 2; out_hidden_size = the text width
HF_VISION = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=16, spatial_merge_size=2,
                 temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=36, deepstack_visual_indexes=[0, 2])
PREFIX = "thinker.visual."
IMAGE_CFG = ImageConfig(patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=32 * 32, max_pixels=256 * 256)
VIDEO_CFG = VideoConfig(fps=2.0, temporal_patch_size=2, min_pixels=32 * 32, max_pixels=256 * 160)
# (file, width, height): grids 10 x 14 (the table resized up), 6 x 6 (the table's own grid), 2 x 2 (one merge block)
IMAGES = (("a.png", 224, 160), ("b.jpg", 96, 96), ("c.png", 32, 32))


def reference_tower() -> Qwen3OmniMoeVisionEncoder:
    torch.manual_seed(0)
    model = Qwen3OmniMoeVisionEncoder(Qwen3OmniMoeVisionEncoderConfig(**HF_VISION))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model.eval()


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> tuple[torch.Tensor, torch.Tensor]:
    """(patches, grid_thw) of three images and a 2 s video, decoded by the data layer, images first (as OmniModel)."""
    root = tmp_path_factory.mktemp("qwen3_vision_media")
    items = [encode_image(synth.pattern_image(root / name, width, height, seed=width), IMAGE_CFG)
             for name, width, height in IMAGES]
    video = synth.test_pattern_video(root / "clip.mp4", 2.0, fps=10, width=256, height=160)
    items.append(encode_video(video, VIDEO_CFG, IMAGE_CFG))
    grid_thw = torch.stack([item.tensors["grid_thw"] for item in items])
    assert grid_thw[:3].tolist() == [[1, 10, 14], [1, 6, 6], [1, 2, 2]] and grid_thw[3, 0] >= 2
    return torch.cat([item.tensors["patches"] for item in items]), grid_thw


def omni_model(reference: Qwen3OmniMoeVisionEncoder, text: Qwen3OmniMoeThinkerTextModel | None = None) -> OmniModel:
    """An OmniModel with the reference tower's weights (and the text model's, when given), loaded strictly."""
    vision = qwen3_vision_tower_config(reference.config.to_dict(), where="vision_config")
    backbone = backbone_config_from_hf({**text_config().to_dict(), "model_type": "qwen3_omni_moe_text",
                                        "tie_word_embeddings": True})
    cfg = OmniConfig(backbone=backbone, vision=vision, positions="mrope",
                     vision_projector=ProjectorOptions(kind="mlp", hidden_dim=vision.out_dim, input_norm=False))
    model = OmniModel(cfg).eval()
    encoder, projector, deepstack = qwen3_vision_tower_state_dict(
        {PREFIX + k: v for k, v in reference.state_dict().items()}, PREFIX)
    load_state_strict(model.vision_encoder, encoder, where="vision_encoder")
    load_state_strict(model.vision_projector, projector, where="vision_projector")
    load_state_strict(model.vision_deepstack, deepstack, where="vision_deepstack")
    if text is not None:
        state = hf_to_backbone_state_dict({f"model.{k}": v for k, v in text.state_dict().items()}, backbone)
        load_state_strict(model.backbone, state, where="backbone")
    return model


@torch.no_grad()
def test_tower_and_deepstack_features_equal_transformers_on_real_media(media):
    patches, grid_thw = media
    reference = reference_tower()
    model = omni_model(reference)
    expected = reference(patches, grid_thw=grid_thw)
    encoded, levels = model._encode_vision(patches, grid_thw)
    outputs = [("merger", model.vision_projector(encoded), expected.pooler_output)]
    outputs += [(f"deepstack {j}", ours, theirs) for j, (ours, theirs) in enumerate(zip(levels, expected.deepstack_features))]
    assert len(levels) == len(expected.deepstack_features) == 2
    for name, ours, theirs in outputs:
        diff = (ours - theirs).abs().max().item()
        print(f"{name}: {tuple(ours.shape)}, output std {theirs.std().item():.3f}, max abs diff {diff:.2e}")
        assert ours.shape == theirs.shape and diff <= TOLERANCE, (name, diff)
    # without the table (rope2d only) or with SigLIP's bicubic resize the outputs differ: the option is what matches
    for positions in ("rope2d", "learned"):
        other = dataclasses.replace(model.cfg.vision, positions=positions, deepstack_layers=[])
        changed = type(model.vision_encoder)(other).eval()
        changed.load_state_dict(model.vision_encoder.state_dict(), strict=positions != "rope2d")
        assert (model.vision_projector(changed(patches, grid_thw)) - expected.pooler_output).abs().max() > 1e-3


def batch_with_image(model: OmniModel, patches: torch.Tensor, grid_thw: torch.Tensor, *, text_before: int = 5) -> dict:
    """One row: text, the image's placeholder positions, text; 3-D positions as around a 2-D grid (positions_3d's)."""
    num_tokens = int(grid_thw.prod()) // model.cfg.vision.merge_size ** 2
    length = max(text_before + num_tokens + 6, 18)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 96, (1, length), generator=generator)
    modality_ids = torch.zeros(1, length, dtype=torch.long)
    modality_ids[0, text_before:text_before + num_tokens] = MODALITY_IDS["image"]
    return {"input_ids": input_ids, "labels": input_ids.clone(), "modality_ids": modality_ids,
            "document_ids": torch.zeros(1, length, dtype=torch.long), "position_ids": positions_3d(1, length),
            "image_patches": patches, "image_grid_thw": grid_thw[None], "image_num_tokens": torch.tensor([num_tokens])}


@torch.no_grad()
def test_deepstack_in_the_backbone_equals_transformers_text_model(media):
    patches, grid_thw = media
    first = int(grid_thw[0].prod())                     # the first image: 10 x 14 patches, 35 visual positions
    reference = reference_tower()
    torch.manual_seed(2)
    text = Qwen3OmniMoeThinkerTextModel(text_config()).eval()
    model = omni_model(reference, text)
    batch = batch_with_image(model, patches[:first], grid_thw[0])
    visual = batch["modality_ids"] == MODALITY_IDS["image"]

    tower = reference(patches[:first], grid_thw=grid_thw[:1])
    embeds = text.embed_tokens(batch["input_ids"]).clone()
    embeds[visual] = tower.pooler_output
    want = text(inputs_embeds=embeds, position_ids=batch["position_ids"], visual_pos_masks=visual,
                deepstack_visual_embeds=tower.deepstack_features).last_hidden_state
    without = text(inputs_embeds=embeds, position_ids=batch["position_ids"]).last_hidden_state
    logits = model(batch, return_logits=True).logits
    diff = (logits - want @ text.embed_tokens.weight.T).abs().max().item()
    moved = (want - without).abs().max().item()
    print(f"deepstack: max |logit difference| {diff:.2e}; the additions move the hidden states by up to {moved:.3f}")
    assert diff < 1e-4 and moved > 1e-2


def test_deepstack_projectors_train_and_run_on_batches_without_images(media):
    """Every parameter gets a gradient from an image batch; a text-only batch still reaches the deepstack projectors
    (the dummy path: the same modules on every rank under ZeRO-3), with zero gradients."""
    patches, grid_thw = media
    model = omni_model(reference_tower()).train()
    counts = model.num_parameters()
    assert counts["vision_deepstack"] > 0 and counts["total"] == sum(p.numel() for p in model.parameters())
    batch = batch_with_image(model, patches[: int(grid_thw[2].prod())], grid_thw[2])  # the 2 x 2 image
    model(batch).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None and not n.startswith(("audio", "transfer"))]
    assert not missing, missing
    assert all(p.grad.abs().sum() > 0 for p in model.vision_deepstack.parameters())
    model.zero_grad(set_to_none=True)
    text_only = {k: v for k, v in batch.items() if not k.startswith("image")}
    text_only["modality_ids"] = torch.zeros_like(batch["modality_ids"])
    model(text_only).loss.backward()
    assert all(p.grad is not None and not p.grad.abs().sum() for p in model.vision_deepstack.parameters())


def test_mapping_and_config_refusals():
    reference = reference_tower()
    encoder, projector, deepstack = qwen3_vision_tower_state_dict(
        {"thinker.audio_tower.conv2d1.weight": torch.zeros(1), **{PREFIX + k: v for k, v in reference.state_dict().items()}},
        PREFIX)
    qkv = reference.blocks[1].attn.qkv
    assert torch.equal(torch.cat([encoder[f"layers.1.self_attn.{p}_proj.weight"] for p in "qkv"]), qkv.weight)
    assert torch.equal(encoder["layers.1.self_attn.k_proj.bias"], qkv.bias[32:64])
    assert encoder["patch_embedding.weight"].shape == (32, 3 * 2 * 16 * 16)
    assert set(deepstack) == {f"{j}.{p}.{w}" for j in (0, 1) for p in ("norm", "fc1", "fc2") for w in ("weight", "bias")}
    assert set(projector) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    cfg = qwen3_vision_tower_config(HF_VISION, where="v")
    assert (cfg.positions, cfg.image_size, cfg.activation, cfg.deepstack_layers) == ("learned_rope2d", 96, "gelu_tanh", [0, 2])
    default = qwen3_vision_tower_config({}, where="v")  # the release's tower
    assert (default.dim, default.num_layers, default.image_size, default.deepstack_layers) == (1152, 27, 768, [8, 16, 24])
    for bad, match in [({"num_position_embeddings": 35}, r"^v.num_position_embeddings must be a square"),
                       ({"deepstack_visual_indexes": [2, 0]}, r"^v: deepstack_visual_indexes must hold ascending"),
                       ({"deepstack_visual_indexes": [3]}, r"^v: deepstack_visual_indexes must hold ascending"),
                       ({"hidden_act": "silu"}, r"^v.hidden_act 'silu' is not supported")]:
        with pytest.raises(ValueError, match=match):
            qwen3_vision_tower_config({**HF_VISION, **bad}, where="v")
    vision = dataclasses.replace(cfg)
    backbone = backbone_config_from_hf({**text_config().to_dict(), "model_type": "qwen3_omni_moe_text"})
    with pytest.raises(ValueError, match=r"^model.vision.deepstack_layers adds features at the visual positions"):
        OmniConfig(backbone=backbone, vision=vision, fusion="resampler", positions="1d")
    with pytest.raises(ValueError, match=r"^model.vision.image_size must be a positive multiple"):
        VisionEncoderConfig(dim=32, num_layers=1, num_heads=4, ffn_dim=64, positions="learned_rope2d")
