"""Qwen3-Omni's audio tower as options of our AudioEncoder + an `mlp` projector: parity with transformers.

The reference is a tiny random `Qwen3OmniMoeAudioEncoder` (every parameter perturbed). Its weights go
through `qwen3_omni.qwen3_audio_tower_state_dict` and the strict loader; the audio is real (espeak-ng
speech over ffmpeg tones, odd lengths up to 65 s: the data layer's 30 s windows, the tower's 1 s chunks and
its attention windows all cut differently), decoded by our data layer and cut into windows by the collator
as in training. transformers gets the same mel: each item's windows' valid frames, concatenated.
Nothing is downloaded.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_qwen_omni_audio import assert_items_close, collate, media, reference_inputs, split  # noqa: F401 (media: a fixture)

from omni_train.config import RecipeError, load_recipe
from omni_train.data.audio import AudioConfig, audio_token_timestamps, num_audio_tokens
from omni_train.model.audio_encoder import AudioEncoder, AudioEncoderConfig, _fixed_sinusoids
from omni_train.model.hf_adapters import build_loaded, load_state_strict
from omni_train.model.projectors import Projector, ProjectorConfig
from omni_train.model.qwen3_omni import (QWEN3_OMNI_AUDIO_DATA, qwen3_audio_data, qwen3_audio_tower_config,
                                         qwen3_audio_tower_state_dict)

transformers = pytest.importorskip("transformers")
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeAudioEncoderConfig  # noqa: E402
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (  # noqa: E402
    Qwen3OmniMoeAudioEncoder, _get_feat_extract_output_lengths)

TOLERANCE = 1e-5  # as test_qwen_omni_audio's, which assert_items_close applies
# n_window_infer 400: attention in 4 s runs of 52 positions, which a 30 s window's 390 do not hold a whole number of
TINY = dict(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128, num_mel_bins=128,
            n_window=50, n_window_infer=400, downsample_hidden_size=16, output_dim=96)
DATA = AudioConfig(**QWEN3_OMNI_AUDIO_DATA)  # ceil valid frames, 8 frames per token counted per 1 s chunk


def reference_tower() -> Qwen3OmniMoeAudioEncoder:
    torch.manual_seed(0)
    model = Qwen3OmniMoeAudioEncoder(Qwen3OmniMoeAudioEncoderConfig(**TINY))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model.eval()


def mlp_projector(cfg: AudioEncoderConfig) -> Projector:
    return Projector(ProjectorConfig(kind="mlp", in_dim=cfg.dim, out_dim=TINY["output_dim"], hidden_dim=cfg.dim)).eval()


@pytest.fixture(scope="module")
def towers() -> tuple[Qwen3OmniMoeAudioEncoder, AudioEncoder, Projector]:
    """(reference, our encoder, our projector) holding the reference's weights, loaded strictly."""
    reference = reference_tower()
    cfg = qwen3_audio_tower_config(reference.config.to_dict(), where="tiny audio_config")
    encoder_state, projector_state = qwen3_audio_tower_state_dict(
        {f"thinker.audio_tower.{k}": v for k, v in reference.state_dict().items()}, "thinker.audio_tower.")
    encoder, projector = AudioEncoder(cfg).eval(), mlp_projector(cfg)
    load_state_strict(encoder, encoder_state, where="tiny encoder")
    load_state_strict(projector, projector_state, where="tiny projector")
    return reference, encoder, projector


def encode(encoder: AudioEncoder, projector: Projector, batch: dict) -> torch.Tensor:
    return projector(encoder(batch["audio_mel"], batch["audio_window_frames"], batch["audio_windows_per_item"]))


@torch.no_grad()
def test_parity_with_transformers_on_real_audio_batched(media, towers):
    reference, encoder, projector = towers
    items, batch = collate(media, DATA)
    assert batch["audio_windows_per_item"].tolist() == [1, 2, 3, 1, 1]
    features, feature_lens = reference_inputs(batch)
    assert torch.equal(features, torch.cat([item.tensors["mel"] for item in items], dim=1))

    expected = reference(features, feature_lens=feature_lens).last_hidden_state          # (sum tokens, 96)
    ours = encode(encoder, projector, batch)                                              # (sum tokens, 96)

    counts = batch["audio_num_tokens"].tolist()
    assert counts == _get_feat_extract_output_lengths(feature_lens).tolist()
    assert counts[2] == 65 * 13 + 4  # 65.3 s: 6,531 frames, 65 whole chunks and 31 frames (16, 8, 4)
    assert ours.shape == expected.shape == (sum(counts), TINY["output_dim"])
    assert_items_close(ours, expected, counts, feature_lens.tolist())  # within 1e-5


@torch.no_grad()
def test_each_item_alone_equals_the_batch(media, towers):
    """Other items never leak in, and an item's attention runs go on across its 30 s windows."""
    _, encoder, projector = towers
    _, batch = collate(media, DATA)
    together = split(encode(encoder, projector, batch), batch["audio_num_tokens"].tolist())
    for index, data in enumerate(media):
        _, alone = collate([data], DATA)
        torch.testing.assert_close(encode(encoder, projector, alone), together[index], rtol=0, atol=1e-6)


@torch.no_grad()
def test_attention_runs_cross_the_data_windows(media, towers):
    """Without windows_per_item every 30 s window would start its own runs: the 31 s and 65 s items then differ."""
    reference, encoder, projector = towers
    _, batch = collate(media[1:3], DATA)  # 31.37 s and 65.3 s
    features, feature_lens = reference_inputs(batch)
    expected = reference(features, feature_lens=feature_lens).last_hidden_state
    per_window = projector(encoder(batch["audio_mel"], batch["audio_window_frames"]))
    diff = (per_window - expected).abs().amax(dim=1)                                       # (tokens,)
    print(f"windows as items: max abs diff {diff.max().item():.3f}")
    # the first window's first 7 runs of 52 positions (364) agree; from its cut run on they do not
    assert diff[:364].max() <= TOLERANCE and diff[364:390].min() > 1e-3
    whole = AudioEncoder(dataclasses.replace(encoder.cfg, attention_window_frames=None)).eval()
    whole.load_state_dict(encoder.state_dict())
    assert (projector(whole(batch["audio_mel"], batch["audio_window_frames"], batch["audio_windows_per_item"]))
            - expected).abs().max() > 1e-2  # attention within each 1 s chunk instead of 4 s runs


def test_token_counts_and_timestamps_follow_the_chunks():
    frames = torch.arange(0, 9100, 7)
    counts = [num_audio_tokens(int(n), DATA) for n in frames]
    assert counts == _get_feat_extract_output_lengths(frames).tolist()
    assert num_audio_tokens(3000, DATA) == 390 and num_audio_tokens(100, DATA) == 13
    assert num_audio_tokens(3000, dataclasses.replace(DATA, chunk_frames=None)) == 375  # a whole window's ceil(n / 8)
    stamps = audio_token_timestamps(3137, DATA)
    assert stamps.shape == (num_audio_tokens(3137, DATA),)
    assert torch.allclose(stamps[:14], torch.tensor([0.08 * j for j in range(13)] + [1.0]))
    assert stamps[390] == 30.0 and bool((stamps[1:] > stamps[:-1]).all())


def test_sinusoids_are_the_reference_buffer_and_never_state(towers):
    reference, encoder, _ = towers
    assert torch.equal(_fixed_sinusoids(encoder.cfg.num_positions, 64), reference.positional_embedding.positional_embedding[:13])
    assert not any("position" in key for key in encoder.state_dict())


@torch.no_grad()
def test_meta_device_construction_and_a_training_step(media, towers):
    """build_loaded (meta device, as ZeRO-3 does) gives the same outputs; every parameter gets a gradient."""
    _, encoder, projector = towers
    _, batch = collate(media[:2], DATA)
    expected = encoder(batch["audio_mel"], batch["audio_window_frames"], batch["audio_windows_per_item"])
    loaded = build_loaded(AudioEncoder, encoder.cfg, encoder.state_dict(), dtype=None, where="meta").eval()
    torch.testing.assert_close(loaded(batch["audio_mel"], batch["audio_window_frames"], batch["audio_windows_per_item"]),
                               expected, rtol=0, atol=0)
    with torch.enable_grad():
        fresh = AudioEncoder(encoder.cfg).train()
        fresh(batch["audio_mel"], batch["audio_window_frames"], batch["audio_windows_per_item"]).square().mean().backward()
        missing = [name for name, param in fresh.named_parameters() if param.grad is None or not param.grad.abs().sum()]
        assert not missing, missing


def test_state_dict_mapping():
    reference = reference_tower()
    hf = {"thinker.model.embed_tokens.weight": torch.zeros(1),
          **{f"thinker.audio_tower.{k}": v for k, v in reference.state_dict().items()}}
    encoder_state, projector_state = qwen3_audio_tower_state_dict(hf, "thinker.audio_tower.")
    assert set(projector_state) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    assert torch.equal(projector_state["fc2.weight"], reference.proj2.weight)
    assert torch.equal(encoder_state["layer_norm.weight"], reference.ln_post.weight)
    assert torch.equal(encoder_state["conv2d3.weight"], reference.conv2d3.weight)
    cfg = qwen3_audio_tower_config(reference.config.to_dict(), where="c")
    encoder_state["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unexpected \(1\): extra.weight"):
        load_state_strict(AudioEncoder(cfg), encoder_state, where="tiny")


def test_config_mapping_and_refusals():
    cfg = qwen3_audio_tower_config(TINY, where="cfg.json: audio_config")
    assert (cfg.dim, cfg.num_layers, cfg.stem, cfg.stem_channels, cfg.chunk_frames, cfg.attention_window_frames) == (
        64, 2, "conv2d", 16, 100, 400)
    assert cfg.downsample == DATA.downsample == 8 and cfg.num_positions == 13 and cfg.key_bias
    assert qwen3_audio_data(cfg) == QWEN3_OMNI_AUDIO_DATA
    default = qwen3_audio_tower_config({}, where="w")  # the release's tower: 8 s attention windows
    assert (default.dim, default.num_layers, default.stem_channels, default.attention_window_frames) == (1280, 32, 480, 800)
    assert qwen3_audio_tower_config({**TINY, "n_window_infer": 450}, where="w").attention_window_frames == 400  # floored
    for bad, match in [({"activation_function": "relu"}, r"^w: activation_function 'relu' is not supported"),
                       ({"dropout": 0.1}, r"^w: dropout=0.1 is not supported"),
                       ({"n_window_infer": 60}, r"^w: n_window_infer=60 is under a chunk"),
                       ({"n_window": 7}, r"^w: n_window=7: model.audio.chunk_frames must"),
                       ({"downsample_hidden_size": 0}, r"^w: downsample_hidden_size must be a positive integer")]:
        with pytest.raises(ValueError, match=match):
            qwen3_audio_tower_config({**TINY, **bad}, where="w")


@pytest.mark.parametrize("fields,match", [
    (dict(stem="conv3d"), r"^model.audio.stem must be one of conv1d, conv2d"),
    (dict(stem="conv2d"), r"^model.audio.stem conv2d runs per chunk"),
    (dict(stem="conv2d", chunk_frames=100, pool=2), r"^model.audio.stem conv2d runs per chunk"),
    (dict(stem="conv2d", chunk_frames=100, conv1_stride=1), r"^model.audio.conv1_stride is the conv1d stem's"),
    (dict(chunk_frames=100, attention_window_frames=150), r"^model.audio.attention_window_frames must be null or a"),
    (dict(attention_window_frames=400), r"^model.audio.attention_window_frames must"),
])
def test_encoder_options_refused(fields, match):
    with pytest.raises(ValueError, match=match):
        AudioEncoderConfig(dim=64, num_layers=1, num_heads=4, ffn_dim=128, **fields)


def test_recipe_refuses_data_counting_other_tokens(tmp_path):
    """The data layer must count per chunk as the conv2d stem does, or the placeholders would not match."""
    model = {"preset": "tiny", "audio": {"dim": 64, "num_layers": 1, "num_heads": 4, "ffn_dim": 128, "stem": "conv2d",
                                          "stem_channels": 8, "chunk_frames": 100}}
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\ndata: {audio: {downsample: 8}, train: [{shards: x.tar}]}\n"
                      f"model: {model}\ntrain: {{steps: 1}}\n".replace("'", ""))
    with pytest.raises(RecipeError, match=r"model.audio.chunk_frames=100 does not match data.audio.chunk_frames=None"):
        load_recipe(recipe)
    recipe.write_text(recipe.read_text().replace("downsample: 8}", "downsample: 8, chunk_frames: 100}"))
    cfg = load_recipe(recipe)
    assert cfg.data.audio.chunk_frames == cfg.model.audio.chunk_frames == 100
