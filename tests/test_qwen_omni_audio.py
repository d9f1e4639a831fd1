"""Qwen2.5-Omni's audio tower as options of our AudioEncoder + a `linear` projector: parity with transformers.

The reference is a tiny random `Qwen2_5OmniAudioEncoder` (every parameter perturbed, so LayerNorms
and biases that init to constants are tested too). Its weights go through
`qwen2_5_omni.audio_tower_state_dict` and the strict loader; the audio is real (espeak-ng speech,
ffmpeg tones) of odd lengths, decoded by our data layer and cut into windows by the collator as
in training. transformers gets the same mel: each item's windows' valid frames, concatenated.
Nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import io
import wave

import numpy as np
import pytest
import torch

from omni_train.config import RecipeError, load_recipe
from omni_train.data import synth
from omni_train.data.audio import AudioConfig, decode_audio, encode_audio, log_mel, num_audio_tokens, num_mel_frames
from omni_train.data.packing import _collate_media
from omni_train.model.audio_encoder import AudioEncoder, AudioEncoderConfig, _fixed_sinusoids
from omni_train.model.hf_adapters import build_loaded, load_state_strict
from omni_train.model.projectors import build_projector
from omni_train.model.qwen2_5_omni import QWEN_OMNI_AUDIO_DATA, audio_tower_config, audio_tower_state_dict

transformers = pytest.importorskip("transformers")
from transformers import WhisperFeatureExtractor  # noqa: E402
from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniAudioEncoderConfig  # noqa: E402
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniAudioEncoder  # noqa: E402
from transformers.models.qwen2_5_omni.processing_qwen2_5_omni import Qwen2_5OmniProcessor  # noqa: E402

TOLERANCE = 1e-5
TINY = dict(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128, num_mel_bins=128,
            n_window=100, output_dim=96, max_source_positions=1500)
DATA = AudioConfig(**QWEN_OMNI_AUDIO_DATA)  # ceil valid frames, 4 frames per token, drop-tail pool
SENTENCE = "Three plus five, times two, is sixteen. Please write the code that prints it."
# Samples at 16 kHz, none a whole number of 10 ms hops: 31.37 s (two windows, the last with 138 frames:
# 69 positions, an odd tail to drop), 65.3 s (three windows, the last cut into chunks of 200 + 200 + 131
# frames), 1.244 s (125 frames: 63 positions, odd) and 0.351 s.
LENGTHS = [501_957, 1_044_851, 19_905, 5_617]


def wav_bytes(waveform: torch.Tensor, sample_rate_hz: int = 16000) -> bytes:
    pcm = (waveform.clamp(-1, 1) * 32767).round().to(torch.int16).numpy()
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(sample_rate_hz)
        wav.writeframes(pcm.tobytes())
    return buffer.getvalue()


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> list[bytes]:
    """Encoded audio files: espeak-ng speech as flac, and speech over a tone of each of LENGTHS as 16 kHz WAV."""
    root = tmp_path_factory.mktemp("qwen_audio")
    speech_file = synth.speech(root / "speech.flac", SENTENCE, rate_wpm=150)
    speech = decode_audio(speech_file, AudioConfig())                                   # (N,) 16 kHz
    tone = decode_audio(synth.tone(root / "tone.ogg", 66.0, frequency_hz=220.0), AudioConfig())
    files = [speech_file.read_bytes()]
    for num_samples in LENGTHS:
        waveform = 0.1 * tone[:num_samples].clone()
        for start in range(0, num_samples, 5 * 16000):  # a sentence every 5 s, cut at the end
            part = speech[: num_samples - start]
            waveform[start : start + part.shape[0]] += 0.7 * part
        files.append(wav_bytes(waveform))
    return files


def reference_tower() -> Qwen2_5OmniAudioEncoder:
    torch.manual_seed(0)
    model = Qwen2_5OmniAudioEncoder(Qwen2_5OmniAudioEncoderConfig(**TINY))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model.eval()


@pytest.fixture(scope="module")
def towers() -> tuple[Qwen2_5OmniAudioEncoder, AudioEncoder, torch.nn.Module]:
    """(reference, our encoder, our projector) holding the reference's weights, loaded strictly."""
    reference = reference_tower()
    cfg = audio_tower_config(reference.config.to_dict(), where="tiny audio_config")
    encoder_state, projector_state = audio_tower_state_dict(
        {f"thinker.audio_tower.{k}": v for k, v in reference.state_dict().items()}, "thinker.audio_tower.")
    encoder, projector = AudioEncoder(cfg).eval(), build_projector("linear", cfg.dim, TINY["output_dim"]).eval()
    load_state_strict(encoder, encoder_state, where="tiny encoder")
    load_state_strict(projector, projector_state, where="tiny projector")
    return reference, encoder, projector


def collate(files: list[bytes], cfg: AudioConfig) -> tuple[list, dict]:
    items = [encode_audio(data, cfg, where=f"item {i}") for i, data in enumerate(files)]
    return items, _collate_media({"audio": items, "image": [], "video": []}, cfg)


def reference_inputs(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(num_mel_bins, total valid frames), (num_items,) frames: each item's windows' valid frames end to end."""
    per_window = [window[:, : int(n)] for window, n in zip(batch["audio_mel"], batch["audio_window_frames"])]
    features, lengths, first = [], [], 0
    for num_windows in batch["audio_windows_per_item"].tolist():
        item = torch.cat(per_window[first : first + num_windows], dim=1)
        features.append(item)
        lengths.append(item.shape[1])
        first += num_windows
    return torch.cat(features, dim=1), torch.tensor(lengths)


def split(x: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
    return list(torch.split(x, counts))


@torch.no_grad()
def test_parity_with_transformers_on_real_audio_batched(media, towers):
    reference, encoder, projector = towers
    items, batch = collate(media, DATA)
    assert batch["audio_windows_per_item"].tolist() == [1, 2, 3, 1, 1]
    features, feature_lens = reference_inputs(batch)
    # the mel the collator cut into windows is the item's, frame for frame
    for item, length in zip(items, feature_lens.tolist()):
        assert item.tensors["mel"].shape[1] == length
    assert torch.equal(features, torch.cat([item.tensors["mel"] for item in items], dim=1))

    expected = reference(features, feature_lens=feature_lens).last_hidden_state          # (sum tokens, 96)
    ours = projector(encoder(batch["audio_mel"], batch["audio_window_frames"]))          # (sum tokens, 96)

    _, reference_counts = reference._get_feat_extract_output_lengths(feature_lens)
    counts = batch["audio_num_tokens"].tolist()
    assert counts == reference_counts.tolist() == [num_audio_tokens(n, DATA) for n in feature_lens.tolist()]
    assert counts[1] == 750 + 34 and counts[4] == 9  # 31.37 s: the odd 69th position of window 2 dropped
    assert ours.shape == expected.shape == (sum(counts), TINY["output_dim"])
    assert_items_close(ours, expected, counts, feature_lens.tolist())


def assert_items_close(ours: torch.Tensor, expected: torch.Tensor, counts: list[int], frames: list[int]) -> None:
    """Each item's rows within TOLERANCE, its difference printed."""
    for index, (a, b) in enumerate(zip(split(ours, counts), split(expected, counts))):
        diff = (a - b).abs().max().item()
        print(f"item {index}: {frames[index]} frames, {counts[index]} tokens, "
              f"output std {b.std().item():.3f}, max abs diff {diff:.2e}")
        assert diff <= TOLERANCE, (index, diff)


@torch.no_grad()
def test_each_item_alone_equals_the_batch(media, towers):
    """Windows and chunks of other items never leak in: one item per batch gives the same outputs."""
    reference, encoder, projector = towers
    _, batch = collate(media, DATA)
    together = split(projector(encoder(batch["audio_mel"], batch["audio_window_frames"])), batch["audio_num_tokens"].tolist())
    for index, data in enumerate(media):
        _, alone = collate([data], DATA)
        out = projector(encoder(alone["audio_mel"], alone["audio_window_frames"]))
        torch.testing.assert_close(out, together[index], rtol=0, atol=1e-6)


@torch.no_grad()
def test_chunked_attention_and_drop_tail_matter(media, towers):
    """The options are what makes parity: without chunks the outputs differ; keeping the tail adds a token."""
    reference, encoder, projector = towers
    _, batch = collate(media[:3], DATA)  # speech, 31.37 s, 65.3 s
    features, feature_lens = reference_inputs(batch)
    expected = reference(features, feature_lens=feature_lens).last_hidden_state

    unchunked = AudioEncoder(dataclasses.replace(encoder.cfg, chunk_frames=None)).eval()
    unchunked.load_state_dict(encoder.state_dict())
    diff = (projector(unchunked(batch["audio_mel"], batch["audio_window_frames"])) - expected).abs().max().item()
    print(f"chunk_frames=None: max abs diff {diff:.3f}")
    assert diff > 1e-2

    keep_data = AudioConfig(valid_frames="ceil")
    keep_counts = [num_audio_tokens(n, keep_data) for n in feature_lens.tolist()]
    assert keep_counts[1] == batch["audio_num_tokens"][1].item() + 1  # 69 positions: the last one averaged alone
    keep = AudioEncoder(dataclasses.replace(encoder.cfg, pool_tail="keep")).eval()
    keep.load_state_dict(encoder.state_dict())
    assert keep(batch["audio_mel"], batch["audio_window_frames"]).shape[0] == sum(keep_counts) != expected.shape[0]


def test_valid_frames_match_the_processors_feature_extractor(media):
    """ceil(samples / 160): the count of WhisperFeatureExtractor's mask as Qwen2_5OmniProcessor calls it; floor is not."""
    extractor = WhisperFeatureExtractor(feature_size=128)  # Qwen2.5-Omni's preprocessor: 128 mel bins, 16 kHz, 160 hop
    kwargs = {**Qwen2_5OmniProcessor.audio_kwargs, "padding": "max_length"}  # as its _process_audio calls it
    floor_differs = 0
    for data in media:
        waveform = decode_audio(data, DATA)
        out = extractor(waveform.numpy(), return_tensors="np", **kwargs)
        valid = int(out["attention_mask"].sum())
        # the processor truncates at 30 s; our windows keep every frame, the first window's equal its
        assert valid == min(num_mel_frames(waveform.shape[0], DATA), 3000) == min(-(-waveform.shape[0] // 160), 3000)
        if waveform.shape[0] < 480_000 and waveform.shape[0] % 160:  # floor misses the last partial hop's frame
            assert num_mel_frames(waveform.shape[0], AudioConfig()) == valid - 1
            floor_differs += 1
        ours = log_mel(waveform, DATA)
        assert ours.shape[1] == num_mel_frames(waveform.shape[0], DATA)
        # and the extra last frame is the extractor's, like every other
        assert np.abs(ours[:, :valid].numpy() - out["input_features"][0][:, :valid]).max() < 1e-3
    assert floor_differs >= 2  # the short 16 kHz WAVs are no whole number of hops


def test_sinusoids_are_the_reference_buffer_and_never_state(towers):
    reference, encoder, _ = towers
    assert torch.equal(_fixed_sinusoids(1500, 64), reference.positional_embedding.positional_embedding)
    assert not any("position" in key for key in encoder.state_dict())
    assert not any("position" in name for name, _ in encoder.named_buffers())


@torch.no_grad()
def test_meta_device_construction_and_dtype_cast_keep_the_positions(media, towers):
    """build_loaded constructs on the meta device: nothing position-related may be left there."""
    _, encoder, _ = towers
    _, batch = collate(media[:2], DATA)
    expected = encoder(batch["audio_mel"], batch["audio_window_frames"])
    loaded = build_loaded(AudioEncoder, encoder.cfg, encoder.state_dict(), dtype=None, where="meta").eval()
    torch.testing.assert_close(loaded(batch["audio_mel"], batch["audio_window_frames"]), expected, rtol=0, atol=0)
    doubled = loaded.to(torch.float64)(batch["audio_mel"].double(), batch["audio_window_frames"])
    torch.testing.assert_close(doubled.float(), expected, rtol=0, atol=1e-5)


def test_state_dict_mapping():
    reference = reference_tower()
    hf = reference.state_dict()
    assert "positional_embedding.positional_embedding" not in hf  # non-persistent in the spec
    hf = {"thinker.model.embed_tokens.weight": torch.zeros(1), "talker.x": torch.zeros(1),
          **{f"thinker.audio_tower.{k}": v for k, v in hf.items()},
          "thinker.audio_tower.positional_embedding.positional_embedding": torch.zeros(1500, 64)}  # older exports
    encoder_state, projector_state = audio_tower_state_dict(hf, "thinker.audio_tower.")
    assert set(projector_state) == {"fc.weight", "fc.bias"}
    assert torch.equal(projector_state["fc.weight"], reference.proj.weight)
    assert torch.equal(encoder_state["layer_norm.bias"], reference.ln_post.bias)
    assert "audio_bos_eos_token.weight" not in encoder_state and not any("positional" in k for k in encoder_state)
    cfg = audio_tower_config(reference.config.to_dict(), where="c")
    load_state_strict(AudioEncoder(cfg), encoder_state, where="tiny")
    # a key it does not know reaches the strict loader, which names it
    encoder_state, _ = audio_tower_state_dict({"audio_tower.extra.weight": torch.zeros(1),
                                               **{f"audio_tower.{k}": v for k, v in reference.state_dict().items()}},
                                              "audio_tower.")
    with pytest.raises(ValueError, match=r"unexpected \(1\): extra.weight"):
        load_state_strict(AudioEncoder(cfg), encoder_state, where="tiny")


def test_config_mapping_and_refusals():
    cfg = audio_tower_config(TINY, where="cfg.json: audio_config")
    assert (cfg.dim, cfg.num_layers, cfg.num_heads, cfg.ffn_dim, cfg.num_mel_bins) == (64, 2, 4, 128, 128)
    assert (cfg.conv1_stride, cfg.pool, cfg.pool_tail, cfg.chunk_frames, cfg.positions) == (1, 2, "drop", 200, "sinusoid")
    assert cfg.downsample == DATA.downsample and cfg.num_positions == 100
    default = audio_tower_config({}, where="w")  # a config.json without the defaults: the 7B's tower
    assert (default.dim, default.num_layers, default.num_heads, default.ffn_dim) == (1280, 32, 20, 5120)
    for bad, match in [({"activation_function": "relu"}, r"^w: activation_function 'relu' is not supported"),
                       ({"dropout": 0.1}, r"^w: dropout=0.1 is not supported"),
                       ({"n_window": 7}, r"^w: n_window=7: model.audio.chunk_frames must"),
                       ({"n_window": 1600, "max_source_positions": 1500}, r"^w: n_window=1600 is over max_source_positions"),
                       ({"d_model": 66, "encoder_attention_heads": 4}, r"^w: model.audio.dim \(66\) must be a multiple"),
                       ({"output_dim": 0}, r"^w: output_dim must be a positive integer")]:
        with pytest.raises(ValueError, match=match):
            audio_tower_config({**TINY, **bad}, where="w")


@pytest.mark.parametrize("fields,match", [
    (dict(chunk_frames=7), r"^model.audio.chunk_frames must be null or a positive integer that divides"),
    (dict(chunk_frames=201, conv1_stride=1), r"^model.audio.chunk_frames must"),
    (dict(chunk_frames=202, conv1_stride=1), r"^model.audio.chunk_frames must"),  # does not divide 3000
    (dict(pool_tail="drop"), r"^model.audio.pool_tail drop is AvgPool1d\(2\): it needs model.audio.pool 2"),
    (dict(pool_tail="cut"), r"^model.audio.pool_tail must be one of keep, drop"),
    (dict(positions="rope"), r"^model.audio.positions must be one of learned, sinusoid"),
])
def test_encoder_config_validation(fields, match):
    with pytest.raises(ValueError, match=match):
        AudioEncoderConfig(dim=64, num_layers=1, num_heads=4, ffn_dim=128, **fields)


@pytest.mark.parametrize("fields,match", [
    (dict(valid_frames="round"), r"^audio.valid_frames must be one of floor, ceil"),
    (dict(pool_tail="cut"), r"^audio.pool_tail must be one of keep, drop"),
    (dict(pool_tail="drop", downsample=1), r"^audio.pool_tail drop needs audio.downsample >= 2"),
])
def test_data_config_validation(fields, match):
    with pytest.raises(ValueError, match=match):
        AudioConfig(**fields)


def test_token_counts_follow_transformers():
    lengths = torch.arange(0, 7000)
    _, expected = Qwen2_5OmniAudioEncoder._get_feat_extract_output_lengths(None, lengths)
    # within one window the data layer's count is transformers' (windows: 3000 frames, an even 750 tokens each)
    assert [num_audio_tokens(n, DATA) for n in range(3001)] == expected[:3001].tolist()
    assert num_audio_tokens(6999, DATA) == 750 + 750 + 250 == expected[6999].item()
    assert num_audio_tokens(3001, DATA) == 750 == expected[3001].item()  # the 3001st frame: a lone position, dropped
    assert num_audio_tokens(3001, AudioConfig()) == 751


RECIPE = """
name: unit
data:
  train: [{shards: "shards/x-{000000..000003}.tar"}]
model:
  audio: {dim: 64, num_layers: 1, num_heads: 4, ffn_dim: 128, conv1_stride: 1, pool: 2}
"""


def test_recipe_checks_pool_tail_agrees(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE)
    with pytest.raises(RecipeError, match=r"model.audio.pool_tail=drop does not match data.audio.pool_tail=keep"):
        load_recipe(path, ["model.audio.pool_tail=drop"])
    cfg = load_recipe(path, ["model.audio.pool_tail=drop", "model.audio.chunk_frames=200", "model.audio.positions=sinusoid",
                             "data.audio.pool_tail=drop", "data.audio.valid_frames=ceil"])
    assert cfg.model.audio.chunk_frames == 200 and cfg.data.audio.valid_frames == "ceil"
    with pytest.raises(RecipeError, match=r"^model.audio.chunk_frames must"):
        load_recipe(path, ["model.audio.chunk_frames=7"])
