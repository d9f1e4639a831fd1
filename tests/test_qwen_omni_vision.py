"""Qwen2.5-Omni's vision tower as VisionEncoder options + the mlp projector: parity with transformers.

The reference is transformers' own `Qwen2_5OmniVisionEncoder` (tiny, random, every parameter
perturbed so that RMSNorm weights and zero-initialized biases are tested too), its weights mapped
by `qwen2_5_omni.vision_tower_state_dict` and loaded strictly. Inputs are real media: PNG and JPEG
images made with PIL and an H.264 video made with ffmpeg, decoded by the data layer into patches
and grid_thw, images and video in one call as `OmniModel` does. Grids cover windows that do and
do not tile them (10 x 14 patches), a single merge block, and a two-step video.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from omni_train.data import synth
from omni_train.data.image import ImageConfig, encode_image
from omni_train.data.video import VideoConfig, encode_video
from omni_train.model.attention import document_ids_to_cu_seqlens
from omni_train.model.hf_adapters import load_state_strict
from omni_train.model.projectors import Projector, ProjectorConfig
from omni_train.model.qwen2_5_omni import HF_VISION_DEFAULTS, vision_tower_config, vision_tower_state_dict
from omni_train.model.vision_encoder import VisionEncoder, VisionEncoderConfig, row_layout

transformers = pytest.importorskip("transformers")
from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniVisionEncoderConfig  # noqa: E402
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniVisionEncoder  # noqa: E402
from transformers.vision_utils import get_vision_window_index  # noqa: E402

TOLERANCE = 1e-5
HF_VISION = dict(depth=4, hidden_size=64, num_heads=4, intermediate_size=96, in_channels=3, patch_size=14,
                 spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1, 3],
                 out_hidden_size=96)
PREFIX = "thinker.visual."
IMAGE_CFG = ImageConfig(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=28 * 28, max_pixels=224 * 224)
VIDEO_CFG = VideoConfig(fps=2.0, temporal_patch_size=2, min_pixels=28 * 28, max_pixels=252 * 140)
# (file, width, height) -> grid (h, w) in patches: 10 x 14 (windows cut short), 12 x 16 (6 x 8 merge blocks:
# whole windows across), 8 x 8 (exactly one window), 2 x 2 (one merge block)
IMAGES = (("a.png", 196, 140), ("b.jpg", 224, 168), ("c.png", 112, 112), ("d.png", 28, 28))


def reference(attn_implementation: str = "eager") -> Qwen2_5OmniVisionEncoder:
    torch.manual_seed(0)
    model = Qwen2_5OmniVisionEncoder(Qwen2_5OmniVisionEncoderConfig(**HF_VISION, attn_implementation=attn_implementation))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model.eval()


def ours(ref: Qwen2_5OmniVisionEncoder, **overrides) -> tuple[VisionEncoder, Projector]:
    """Our encoder + projector holding the reference's weights, read from a release-layout state dict."""
    cfg = dataclasses.replace(vision_tower_config(ref.config.to_dict(), where="vision_config"), **overrides)
    release = {PREFIX + key: value for key, value in ref.state_dict().items()}
    release["thinker.audio_tower.proj.weight"] = torch.zeros(1)  # another tower's key: not the vision tower's
    encoder_state, projector_state = vision_tower_state_dict(release, PREFIX)
    if not cfg.key_bias:
        encoder_state = {k: v for k, v in encoder_state.items() if not k.endswith("k_proj.bias")}
    encoder = VisionEncoder(cfg).eval()
    load_state_strict(encoder, encoder_state, where="encoder")
    projector = Projector(ProjectorConfig(kind="mlp", in_dim=cfg.out_dim, hidden_dim=cfg.out_dim,
                                          out_dim=HF_VISION["out_hidden_size"], input_norm=False)).eval()
    load_state_strict(projector, projector_state, where="projector")
    return encoder, projector


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> tuple[torch.Tensor, torch.Tensor]:
    """(patches, grid_thw) of four images and a 2 s video, decoded by the data layer, images first (as OmniModel)."""
    root = tmp_path_factory.mktemp("qwen_vision_media")
    items = [encode_image(synth.pattern_image(root / name, width, height, seed=width), IMAGE_CFG)
             for name, width, height in IMAGES]
    video = synth.test_pattern_video(root / "clip.mp4", 2.0, fps=10, width=252, height=140)
    items.append(encode_video(video, VIDEO_CFG, IMAGE_CFG))
    grid_thw = torch.stack([item.tensors["grid_thw"] for item in items])
    assert grid_thw.tolist() == [[1, 10, 14], [1, 12, 16], [1, 8, 8], [1, 2, 2], [2, 10, 18]]
    return torch.cat([item.tensors["patches"] for item in items]), grid_thw


@pytest.mark.parametrize("grid", [[[1, 10, 14]], [[1, 2, 2]], [[1, 12, 16]], [[2, 10, 18]],
                                  [[1, 10, 14], [1, 12, 16], [1, 8, 8], [1, 2, 2], [2, 10, 18]]])
def test_window_layout_is_transformers(grid):
    """Rows in window order and window boundaries (as the varlen kernels see them) equal get_vision_window_index's."""
    window_index, cu_window_seqlens = get_vision_window_index(torch.tensor(grid), spatial_merge_size=2,
                                                              window_size=112, patch_size=14)
    patch_order = (window_index[:, None] * 4 + torch.arange(4)).flatten()  # merge blocks -> their 4 patches
    index, is_valid, window_ids = row_layout(grid, merge_size=2, window_blocks=4)
    assert torch.equal(index[is_valid], patch_order)
    cu_seqlens, _ = document_ids_to_cu_seqlens(window_ids)                     # what run_layers gives varlen
    segment_ids = window_ids.flatten()[cu_seqlens[:-1].long()]
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1])[segment_ids >= 0]            # padding runs dropped
    assert torch.equal(lengths, (cu_window_seqlens[1:] - cu_window_seqlens[:-1]))


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_parity_on_real_images_and_video(media, attn_implementation):
    patches, grid_thw = media
    ref = reference(attn_implementation)
    encoder, projector = ours(ref)
    with torch.no_grad():
        # the data layer's (C, tp, p, p) rows are what transformers' Conv3d patch embedding reads
        embedded, embedded_ref = encoder.patch_embedding(patches), ref.patch_embed(patches)
        theirs = ref(patches, grid_thw).pooler_output
        got = projector(encoder(patches, grid_thw))
    diff = (got - theirs).abs().max().item()
    print(f"{attn_implementation}: pooler_output max |diff| {diff:.2e} (max |output| {theirs.abs().max().item():.2f}); "
          f"patch embedding max |diff| {(embedded - embedded_ref).abs().max().item():.2e} "
          f"(max |embedding| {embedded_ref.abs().max().item():.2f})")
    # oneDNN's Conv3d rounds more than the Linear (8.6e-6 vs 3.3e-6 from fp64 at |x| ~ 7, measured): relative bound
    torch.testing.assert_close(embedded, embedded_ref, rtol=TOLERANCE, atol=TOLERANCE)
    assert got.shape == theirs.shape == (int(grid_thw.prod(-1).sum()) // 4, HF_VISION["out_hidden_size"])
    assert diff <= TOLERANCE


def test_window_attention_and_key_bias_matter(media):
    """Without windows, or without the key bias (which rotary positions make count), the parity test fails 100-fold."""
    patches, grid_thw = media
    ref = reference()
    with torch.no_grad():
        theirs = ref(patches, grid_thw).pooler_output
        diffs = {}
        for name, overrides in (("no windows", dict(window_size=None, full_attention_layers=[])),
                                ("windows everywhere", dict(full_attention_layers=[])),
                                ("no key bias", dict(key_bias=False))):
            encoder, projector = ours(ref, **overrides)
            diffs[name] = (projector(encoder(patches, grid_thw)) - theirs).abs().max().item()
    print({name: f"{diff:.2e}" for name, diff in diffs.items()})
    assert all(diff > 100 * TOLERANCE for diff in diffs.values()), diffs


def test_activation_checkpointing_gives_the_same_gradients(media):
    patches, grid_thw = media
    ref = reference()
    grads = []
    for checkpointing in (False, True):
        encoder, projector = ours(ref)
        encoder.activation_checkpointing = checkpointing
        projector(encoder(patches, grid_thw)).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in encoder.parameters()]))
    assert grads[0].abs().max() > 0
    assert torch.equal(grads[0], grads[1])


def test_config_defaults_are_transformers_and_bad_values_are_refused():
    hf_defaults = Qwen2_5OmniVisionEncoderConfig().to_dict()
    assert {key: hf_defaults[key] for key in HF_VISION_DEFAULTS} == HF_VISION_DEFAULTS
    cfg = vision_tower_config({}, where="config.json: vision_config")  # missing keys: transformers' defaults
    assert (cfg.dim, cfg.num_layers, cfg.window_blocks, cfg.full_attention_layers) == (3584, 32, 4, [7, 15, 23, 31])
    for key, value in (("hidden_act", "gelu"), ("window_size", 100), ("fullatt_block_indexes", [1, 4]),
                       ("patch_size", [14, 14]), ("out_hidden_size", 0), ("embed_dim", 32),
                       ("rope_parameters", {"rope_type": "linear", "rope_theta": 10000.0})):
        with pytest.raises(ValueError, match=rf"^config\.json: vision_config\.{key}"):
            vision_tower_config({**HF_VISION, key: value}, where="config.json: vision_config")
    with pytest.raises(ValueError, match=r"^config\.json: vision_config: model\.vision\.dim"):
        vision_tower_config({**HF_VISION, "num_heads": 5}, where="config.json: vision_config")
    base = dict(dim=32, num_layers=2, num_heads=2, ffn_dim=8)
    for overrides, key in ((dict(window_size=100), "window_size"), (dict(full_attention_layers=[0]), "full_attention_layers"),
                           (dict(window_size=112, full_attention_layers=[2]), "full_attention_layers"),
                           (dict(norm="batch"), "norm"), (dict(mlp="geglu"), "mlp"), (dict(key_bias=1), "key_bias")):
        with pytest.raises(ValueError, match=rf"model\.vision\.{key}"):
            VisionEncoderConfig(**base, **overrides)


def test_state_dict_mapping_is_strict():
    ref = reference()
    cfg = vision_tower_config(ref.config.to_dict(), where="vision_config")
    for prefix in ("thinker.visual.", "visual."):
        state = {prefix + key: value for key, value in ref.state_dict().items()}
        encoder_state, projector_state = vision_tower_state_dict(state, prefix)
        assert set(projector_state) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
        assert encoder_state["patch_embedding.weight"].shape == (64, 3 * 2 * 14 * 14)
        load_state_strict(VisionEncoder(cfg), encoder_state, where="encoder")
    state[prefix + "blocks.0.attn.qkv.weight"] = torch.zeros(192, 64)               # unknown under the prefix: named
    with pytest.raises(ValueError, match=r"unexpected \(1\): layers\.0\.attn\.qkv\.weight"):
        load_state_strict(VisionEncoder(cfg), vision_tower_state_dict(state, prefix)[0], where="encoder")
    with pytest.raises(ValueError, match=r"missing \(1\): layers\.0\.self_attn\.k_proj\.bias"):
        load_state_strict(VisionEncoder(cfg), {k: v for k, v in encoder_state.items() if k != "layers.0.self_attn.k_proj.bias"},
                          where="encoder")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["flash", "varlen"])
def test_cuda_varlen_backends_match_sdpa_with_windows(media, backend):
    """The varlen kernels get the window and frame-group masks as cu_seqlens: bf16 outputs close to sdpa's."""
    from omni_train.model.attention import varlen_kernels

    flash_attn_varlen_func, varlen_attn, _ = varlen_kernels()
    if (flash_attn_varlen_func if backend == "flash" else varlen_attn) is None:
        pytest.skip(f"{backend} kernel not available")
    patches, grid_thw = (x.cuda() for x in media)
    encoder, _ = ours(reference())
    outputs = {}
    with torch.no_grad():
        for name in ("sdpa", backend):
            encoder.attn_backend = name
            outputs[name] = encoder.to("cuda", torch.bfloat16)(patches, grid_thw).float()
    scale = outputs["sdpa"].abs().max().item()
    assert (outputs["sdpa"] - outputs[backend]).abs().max().item() < 2e-2 * scale
