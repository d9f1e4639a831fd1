"""Pretrained encoders from local HF directories: parity with transformers' WhisperEncoder and SiglipVisionModel.

Tiny random transformers models are written with `save_pretrained(tmp, safe_serialization=True)`
and read back through `hf_adapters`; nothing is downloaded. Every parameter of the references is
perturbed, so that LayerNorms, biases and position tables that init to constants are tested too.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from omni_train.config import RecipeError, load_recipe
from omni_train.data import synth
from omni_train.data.audio import AudioConfig, num_audio_tokens, split_windows
from omni_train.data.image import ImageConfig, decode_image, encode_image, image_to_patches
from omni_train.model.hf_adapters import load_siglip_vision, load_whisper_encoder
from omni_train.model.omni import build_model

transformers = pytest.importorskip("transformers")
from transformers.models.whisper.modeling_whisper import WhisperEncoder  # noqa: E402

TOLERANCE = 1e-4
NUM_MELS, DIM = 80, 64


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model.eval()


def whisper_reference(cls_name: str = "WhisperEncoder") -> torch.nn.Module:
    cfg = transformers.WhisperConfig(
        d_model=DIM, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128, num_mel_bins=NUM_MELS,
        max_source_positions=1500, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=128, vocab_size=100,
        max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    torch.manual_seed(0)
    cls = WhisperEncoder if cls_name == "WhisperEncoder" else getattr(transformers, cls_name)
    return perturbed(cls(cfg))


@pytest.fixture(scope="module")
def whisper(tmp_path_factory) -> tuple:
    """(directory, reference WhisperEncoder) of a tiny random WhisperEncoder checkpoint."""
    path = tmp_path_factory.mktemp("whisper")
    reference = whisper_reference()
    reference.save_pretrained(path, safe_serialization=True)
    return path, reference


@pytest.fixture(scope="module")
def siglip(tmp_path_factory) -> tuple:
    """(directory, reference SiglipVisionModel): 56-pixel table of 14-pixel patches (4 x 4 positions)."""
    path = tmp_path_factory.mktemp("siglip")
    cfg = transformers.SiglipVisionConfig(hidden_size=DIM, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, image_size=56, patch_size=14)
    torch.manual_seed(0)
    reference = perturbed(transformers.SiglipVisionModel(cfg))
    reference.save_pretrained(path, safe_serialization=True)
    return path, reference


# ---------------------------------------------------------------------------------------------
# Whisper
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls_name", ["WhisperEncoder", "WhisperModel", "WhisperForConditionalGeneration"])
def test_whisper_parity_on_a_full_window(tmp_path, cls_name):
    """Keys without prefix, under encoder. and under model.encoder.; a full 30 s window, before any pooling."""
    reference = whisper_reference(cls_name)
    reference.save_pretrained(tmp_path, safe_serialization=True)
    reference_encoder = reference if cls_name == "WhisperEncoder" else reference.get_encoder()
    encoder, cfg = load_whisper_encoder(tmp_path, downsample=2)  # pool 1: Whisper's own 50 positions per second
    assert (cfg.conv1_stride, cfg.pool, cfg.num_positions) == (1, 1, 1500)
    mel = torch.randn(2, NUM_MELS, 3000)
    with torch.no_grad():
        ours = encoder(mel, torch.full((2,), 3000)).view(2, 1500, DIM)
        theirs = reference_encoder(mel).last_hidden_state
    assert (ours - theirs).abs().max() < TOLERANCE


def test_whisper_pooled_to_25_tokens_per_second(whisper):
    """Qwen2-Audio's layout: Whisper's layers, average pool by 2, then Whisper's layer_norm."""
    path, reference = whisper
    encoder, cfg = load_whisper_encoder(path)
    assert (cfg.pool, cfg.downsample) == (2, AudioConfig().downsample)
    mel = torch.randn(1, NUM_MELS, 3000)
    captured = []
    hook = reference.layers[-1].register_forward_hook(lambda module, args, out: captured.append(out))
    with torch.no_grad():
        ours = encoder(mel, torch.full((1,), 3000))
        reference(mel)
        hook.remove()
        before_norm = captured[0][0] if isinstance(captured[0], tuple) else captured[0]  # (1, 1500, D), last layer's output
        theirs = reference.layer_norm(F.avg_pool1d(before_norm.transpose(1, 2), 2).transpose(1, 2))[0]
    assert ours.shape == (750, DIM) and (ours - theirs).abs().max() < TOLERANCE


def test_long_audio_is_windowed_and_a_window_depends_on_its_valid_frames_only(whisper):
    encoder, _ = load_whisper_encoder(whisper[0])
    data_cfg = AudioConfig(num_mel_bins=NUM_MELS)
    windows, frames = split_windows(torch.randn(NUM_MELS, 7000), data_cfg)  # 70 s of 10 ms frames
    assert windows.shape == (3, NUM_MELS, 3000) and frames.tolist() == [3000, 3000, 1000]
    with torch.no_grad():
        out = encoder(windows, frames)
        alone = encoder(windows[2:, :, :1000], frames[2:])  # the short last window, cropped, on its own
    assert out.shape[0] == num_audio_tokens(7000, data_cfg) == 750 + 750 + 250
    assert (out[1500:] - alone).abs().max() < 1e-5


@pytest.mark.parametrize("num_frames", [1, 2, 3, 5, 1001, 2999])
def test_whisper_token_counts_are_the_data_layers(whisper, num_frames):
    encoder, _ = load_whisper_encoder(whisper[0])
    with torch.no_grad():
        out = encoder(torch.randn(1, NUM_MELS, num_frames), torch.tensor([num_frames]))
    assert out.shape[0] == num_audio_tokens(num_frames, AudioConfig(num_mel_bins=NUM_MELS))


# ---------------------------------------------------------------------------------------------
# SigLIP
# ---------------------------------------------------------------------------------------------

def data_order(grid_h: int, grid_w: int, cfg: ImageConfig) -> torch.Tensor:
    """Raster index (row * grid_w + col) of each patch row that data/image.py emits, read off the data layer itself."""
    p = cfg.patch_size
    index = torch.arange(grid_h * grid_w, dtype=torch.float32).view(grid_h, grid_w)
    pixels = index.repeat_interleave(p, 0).repeat_interleave(p, 1).expand(1, 3, -1, -1)  # each patch filled with its index
    patches, _ = image_to_patches(pixels, cfg, 1)
    return patches[:, 0].long()


@pytest.mark.parametrize("temporal_patch_size", [1, 2])
@pytest.mark.parametrize("width,height", [(56, 56), (84, 56)])  # the table's own grid, and a resized one
def test_siglip_parity_on_a_real_image(siglip, tmp_path, temporal_patch_size, width, height):
    """A PNG through the data layer's decoding (SigLIP's 0.5 mean and std) and patching; pre-merge outputs compared."""
    path, reference = siglip
    image_cfg = ImageConfig(patch_size=14, merge_size=2, temporal_patch_size=temporal_patch_size,
                            min_pixels=56 * 56, max_pixels=84 * 56)
    png = synth.pattern_image(tmp_path / "image.png", width, height)
    media = encode_image(png, image_cfg)
    pixels = decode_image(png, image_cfg)                                          # (3, H, W) normalized
    assert pixels.shape == (3, height, width)
    encoder, cfg = load_siglip_vision(path, temporal_patch_size=temporal_patch_size, merge_size=2)
    with torch.no_grad():
        ours = encoder(media.tensors["patches"], media.tensors["grid_thw"][None]).reshape(-1, DIM)  # pre-merge, data order
        theirs = reference(pixels[None], interpolate_pos_encoding=True).last_hidden_state[0]     # raster order
    assert (ours - theirs[data_order(height // 14, width // 14, image_cfg)]).abs().max() < TOLERANCE


def test_siglip_model_checkpoint_loads_its_vision_tower(tmp_path):
    """SiglipModel: keys under vision_model.; the text tower, logit scale and pooling head are skipped."""
    vision = dict(hidden_size=DIM, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, image_size=28,
                  patch_size=14)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=50,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    reference = perturbed(transformers.SiglipModel(transformers.SiglipConfig(vision_config=vision, text_config=text)))
    reference.save_pretrained(tmp_path, safe_serialization=True)
    encoder, cfg = load_siglip_vision(tmp_path)
    pixels = torch.randn(1, 3, 28, 28)  # a random normalized image on the table's own 2 x 2 grid (one merge block)
    patches, grid_thw = image_to_patches(pixels.expand(2, -1, -1, -1), ImageConfig(patch_size=14), 2)
    with torch.no_grad():
        ours = encoder(patches, grid_thw[None]).reshape(-1, DIM)
        theirs = reference.vision_model(pixels).last_hidden_state[0]
    assert (ours - theirs).abs().max() < TOLERANCE  # a 2 x 2 grid is one merge block: data order is raster order


# ---------------------------------------------------------------------------------------------
# Errors and wiring
# ---------------------------------------------------------------------------------------------

def test_missing_directory_and_pickled_weights_are_refused(tmp_path, whisper):
    with pytest.raises(FileNotFoundError, match=r"nope: no such directory"):
        load_whisper_encoder(tmp_path / "nope")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(whisper[0] / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(FileNotFoundError, match=r"pytorch_model.bin is never read \(pickle\)"):
        load_whisper_encoder(pickled)


def test_shape_mismatch_names_the_key_and_the_file(tmp_path, whisper):
    shutil.copytree(whisper[0], tmp_path / "w")
    config = json.loads((tmp_path / "w" / "config.json").read_text())
    (tmp_path / "w" / "config.json").write_text(json.dumps({**config, "encoder_ffn_dim": 256}))
    with pytest.raises(ValueError, match=r"w/model.safetensors: .*layers.0.fc1.weight \(128, 64\) vs \(256, 64\)") as info:
        load_whisper_encoder(tmp_path / "w")
    assert "\n" not in str(info.value)


def test_other_model_types_are_refused(siglip, whisper):
    with pytest.raises(ValueError, match=r"config.json: model_type 'siglip_vision_model' is not supported"):
        load_whisper_encoder(siglip[0])
    with pytest.raises(ValueError, match=r"config.json: model_type 'whisper' is not supported"):
        load_siglip_vision(whisper[0])


def test_recipe_loads_pretrained_encoders_and_checks_them_against_the_data(whisper, siglip):
    overrides = [f"model.pretrained_audio={whisper[0]}", f"model.pretrained_vision={siglip[0]}",
                 "data.audio.num_mel_bins=80", "data.image.patch_size=14"]
    cfg = load_recipe("recipes/smoke.yaml", overrides)
    assert (cfg.model.audio.dim, cfg.model.audio.pool, cfg.model.vision.positions) == (DIM, 2, "learned")
    model = build_model(cfg.model, vocab_size=300)
    assert torch.equal(model.audio_encoder.layers[1].fc2.weight, whisper[1].layers[1].fc2.weight)
    assert torch.equal(model.vision_encoder.post_layernorm.bias, siglip[1].post_layernorm.bias)
    with torch.no_grad():  # the random projectors take the pretrained encoders' widths
        model.audio_projector(model.audio_encoder(*model.audio_encoder.dummy_input("cpu")))
        model.vision_projector(model.vision_encoder(*model.vision_encoder.dummy_input("cpu")))

    with pytest.raises(RecipeError, match=r"^model.audio.num_mel_bins=80 does not match data.audio.num_mel_bins=128$"):
        load_recipe("recipes/smoke.yaml", overrides[:2] + ["data.image.patch_size=14"])
    with pytest.raises(RecipeError, match=r"^model.audio.conv1_stride \* 2 \* pool=2 does not match data.audio.downsample=4$"):
        load_recipe("recipes/smoke.yaml", ["model.audio.conv1_stride=1"])
    with pytest.raises(RecipeError, match=r"^model.pretrained_audio: .*nope: no such directory"):
        load_recipe("recipes/smoke.yaml", ["model.pretrained_audio=/nope"])
