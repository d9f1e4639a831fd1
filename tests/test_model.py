"""The multimodal model on real batches: encoders -> projectors -> fusion -> backbone -> loss.

Media are generated (espeak-ng, ffmpeg, PIL), decoded by the data layer, rendered with the chat
template and packed by `collate_packed`, exactly as the training pipeline does; the model is a
tiny random configuration.
"""

from __future__ import annotations

import pytest
import torch

from omni_train.data import synth
from omni_train.data.audio import AudioConfig, encode_audio, num_audio_tokens, split_windows
from omni_train.data.image import ImageConfig, encode_image, image_to_patches
from omni_train.data.packing import collate_packed
from omni_train.data.sample import MODALITY_IDS
from omni_train.data.text import Tokenizer, render_chat
from omni_train.data.video import VideoConfig, encode_video
from omni_train.model.audio_encoder import AudioEncoder, AudioEncoderConfig, dct_basis, lifter_mels, normalize_windows
from omni_train.model.backbone import BackboneConfig
from omni_train.model.omni import OmniConfig, OmniModel, fuse_interleave
from omni_train.model.projectors import build_projector
from omni_train.model.vision_encoder import VisionEncoder, VisionEncoderConfig, _group_layout

TOKENIZER = Tokenizer.byte_level()
AUDIO_CFG, IMAGE_CFG, VIDEO_CFG = AudioConfig(), ImageConfig(), VideoConfig()
ENCODERS = ("audio_encoder", "audio_projector", "vision_encoder", "vision_projector")


def tiny_config(**overrides) -> OmniConfig:
    fields = dict(
        backbone=BackboneConfig(vocab_size=TOKENIZER.vocab_size, dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                ffn_dim=128),
        audio=AudioEncoderConfig(dim=32, num_layers=2, num_heads=4, ffn_dim=64),
        vision=VisionEncoderConfig(dim=32, num_layers=2, num_heads=2, ffn_dim=64))
    return OmniConfig(**{**fields, **overrides})


def tiny_model(seed: int = 0, **overrides) -> OmniModel:
    torch.manual_seed(seed)
    return OmniModel(tiny_config(**overrides))


def chat(modality: str | None, prompt: str, answer: str) -> list[dict]:
    media = [{"type": modality, "member": f"{modality}_0"}] if modality else []
    return [{"role": "user", "content": [*media, {"type": "text", "text": prompt}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]}]


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> dict:
    """Tokenized samples of every modality, from real generated media."""
    root = tmp_path_factory.mktemp("model_media")
    short = encode_audio(synth.speech(root / "short.wav", "three plus five is eight"), AUDIO_CFG)
    long = encode_audio(synth.tone(root / "long.flac", 35.0, frequency_hz=330.0), AUDIO_CFG)
    image = encode_image(synth.pattern_image(root / "image.png", 112, 84), IMAGE_CFG)
    video = encode_video(synth.test_pattern_video(root / "clip.mp4", 2.0, fps=10, width=160, height=120),
                         VIDEO_CFG, IMAGE_CFG)
    return {
        "long_audio": render_chat(chat("audio", "What pitch?", "330 Hz"), [long], TOKENIZER),
        "image": render_chat(chat("image", "Describe.", "green bands"), [image], TOKENIZER),
        "short_audio": render_chat(chat("audio", "", "three plus five is eight"), [short], TOKENIZER),
        "video": render_chat(chat("video", "What happens?", "a test pattern"), [video], TOKENIZER),
        "text": render_chat(chat(None, "print 2 plus 2", "print(2 + 2)"), [], TOKENIZER),
        "media": {"short": short, "long": long, "image": image, "video": video},
    }


def collate(rows: list[list]) -> dict:
    seq_len = max(sum(len(s) for s in row) for row in rows)
    return collate_packed(rows, seq_len=seq_len, pad_id=TOKENIZER.pad_id, audio_cfg=AUDIO_CFG)


def packed_batch(samples) -> dict:
    """Two rows holding all five documents (order: long audio, image, short audio, video, text)."""
    return collate([[samples["long_audio"], samples["image"]], [samples["short_audio"], samples["video"], samples["text"]]])


def grad_sums(model: OmniModel) -> dict[str, list[float | None]]:
    return {name: [None if p.grad is None else float(p.grad.abs().sum()) for p in getattr(model, name).parameters()]
            for name in ENCODERS}


def test_all_modalities_forward_backward_and_counts(samples):
    model = tiny_model()
    batch = packed_batch(samples)
    out = model(batch)
    assert torch.isfinite(out.loss) and out.loss > 0
    has_target = (batch["labels"] != -100) & (batch["position_ids"] > 0)  # a document's first token has no predictor
    assert out.num_loss_tokens == int(has_target.sum()) > 0
    assert out.per_token_loss.shape == batch["input_ids"].shape
    assert torch.equal(out.per_token_loss != 0, has_target)
    assert torch.isclose(out.loss, out.per_token_loss.sum() / out.num_loss_tokens)
    out.loss.backward()
    for name, sums in grad_sums(model).items():
        assert all(s is not None and s > 0 for s in sums), (name, sums)

    with torch.no_grad():
        features = model.encode_media(batch)
        pooled = model.encode_media(batch, pooled=True)
    for modality in ("audio", "image", "video"):
        num_positions = int((batch["modality_ids"] == MODALITY_IDS[modality]).sum())
        assert features[modality].shape == (num_positions, 64)
        assert num_positions == int(batch[f"{modality}_num_tokens"].sum())
    assert features["audio"].shape[0] == samples["media"]["long"].num_tokens + samples["media"]["short"].num_tokens
    assert {m: tuple(t.shape) for m, t in pooled.items()} == {"audio": (2, 64), "image": (1, 64), "video": (1, 64)}
    assert torch.allclose(pooled["image"][0], features["image"].mean(0))


def test_absent_modalities_get_zero_not_none_gradients(samples):
    model = tiny_model()
    model(collate([[samples["image"], samples["text"]]])).loss.backward()
    sums = grad_sums(model)
    assert all(s == 0.0 for s in sums["audio_encoder"] + sums["audio_projector"]), sums  # 0.0, not None
    assert all(s is not None and s > 0 for s in sums["vision_encoder"] + sums["vision_projector"])

    model.zero_grad(set_to_none=True)
    model(collate([[samples["text"]]])).loss.backward()
    sums = grad_sums(model)
    assert all(s == 0.0 for name in ENCODERS for s in sums[name]), sums


def test_placeholder_feature_count_mismatch_raises(samples):
    model = tiny_model()
    batch = packed_batch(samples)
    row, col = (batch["modality_ids"] == MODALITY_IDS["image"]).nonzero()[0].tolist()
    num_image = int(batch["image_num_tokens"].sum())
    batch["modality_ids"] = batch["modality_ids"].clone()
    batch["modality_ids"][row, col] = MODALITY_IDS["text"]
    with pytest.raises(ValueError, match=f"{num_image - 1} image placeholder positions .* produced {num_image} features"):
        model(batch)

    no_video = collate([[samples["text"]]])
    no_video["modality_ids"] = no_video["modality_ids"].clone()
    no_video["modality_ids"][0, 3] = MODALITY_IDS["video"]  # a placeholder without media
    with pytest.raises(ValueError, match="1 video placeholder positions .* produced 0 features"):
        model(no_video)
    with pytest.raises(ValueError, match="model.audio is not set"):
        tiny_model(audio=None)(collate([[samples["short_audio"]]]))


def test_packed_and_one_sample_per_row_give_the_same_per_sample_losses(samples):
    model = tiny_model()
    packed_order = ["short_audio", "video", "text", "long_audio", "image"]
    separate_order = ["long_audio", "image", "short_audio", "video", "text"]  # another media order than packed's
    packed = collate([[samples[name] for name in packed_order[:3]], [samples[name] for name in packed_order[3:]]])
    separate = collate([[samples[name]] for name in separate_order])
    assert separate["input_ids"].shape[0] == 5 and packed["input_ids"].shape[0] == 2

    packed_losses = document_losses(model, packed, packed_order)
    separate_losses = document_losses(model, separate, separate_order)
    assert all(loss > 0 for loss in packed_losses.values())
    for name in separate_order:
        assert packed_losses[name] == pytest.approx(separate_losses[name], rel=1e-5, abs=1e-5), name


def test_fusion_fills_placeholders_in_row_major_order():
    modality_ids = torch.tensor([[0, 1, 1, 0, 2], [1, 0, 2, 2, 0]])
    features = {"audio": torch.tensor([[1.0], [2.0], [3.0]]), "image": torch.tensor([[4.0], [5.0], [6.0]])}
    fused = fuse_interleave(torch.zeros(2, 5, 1), modality_ids, features)
    assert fused[..., 0].tolist() == [[0, 1, 2, 0, 4], [3, 0, 5, 6, 0]]


@pytest.mark.parametrize("conv_kernel", [0, 7])
def test_audio_encoder_windows_are_independent_and_counted_exactly(samples, conv_kernel):
    """conv_kernel 7: each layer's convolution block sees only its window's valid positions."""
    torch.manual_seed(0)
    encoder = AudioEncoder(AudioEncoderConfig(dim=32, num_layers=2, num_heads=4, ffn_dim=64,
                                              conv_kernel=conv_kernel)).eval()
    with torch.no_grad():  # non-zero biases: with zero ones, a conv over zero padding outputs exact zeros
        for name, param in encoder.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.1)
    mel = samples["media"]["long"].tensors["mel"]  # (128, 3500)
    windows, frames = split_windows(mel, AUDIO_CFG)
    assert frames.tolist() == [3000, 500]
    with torch.no_grad():
        out = encoder(windows, frames)
        assert out.shape == (num_audio_tokens(mel.shape[1], AUDIO_CFG), 32) == (samples["media"]["long"].num_tokens, 32)
        assert out.shape[0] == 750 + 125

        changed = windows.clone()
        changed[1] = torch.randn_like(changed[1])
        out_changed = encoder(changed, frames)
        torch.testing.assert_close(out_changed[:750], out[:750], rtol=0, atol=1e-6)  # first window untouched
        assert not torch.allclose(out_changed[750:], out[750:])

        # a window's outputs depend only on its valid frames, not on how far it is padded; odd and even
        # conv1 lengths (497 frames -> 249, 500 -> 250) differ in whether conv2 reaches past the valid ones
        for num_frames in (497, 500):
            changed[1, :, num_frames:] = 0.0
            frames[1] = num_frames
            padded = encoder(changed, frames)[750:]
            alone = encoder(changed[1:, :, :num_frames], frames[1:])
            assert alone.shape[0] == num_audio_tokens(num_frames, AUDIO_CFG)
            torch.testing.assert_close(alone, padded, rtol=1e-5, atol=1e-5)


def test_audio_encoder_convolution_block_is_an_option(samples):
    """model.audio.conv_kernel adds a depthwise convolution block to each layer; 0 keeps Whisper's parameters."""
    kwargs = dict(dim=32, num_layers=2, num_heads=4, ffn_dim=64)
    torch.manual_seed(0)
    plain = AudioEncoder(AudioEncoderConfig(**kwargs))
    torch.manual_seed(0)
    conv = AudioEncoder(AudioEncoderConfig(**kwargs, conv_kernel=5))
    added = sorted(set(dict(conv.named_parameters())) - set(dict(plain.named_parameters())))
    assert added == [f"layers.{i}.{name}" for i in range(2) for name in (
        "conv_depthwise.bias", "conv_depthwise.weight", "conv_layer_norm.bias", "conv_layer_norm.weight",
        "conv_proj.bias", "conv_proj.weight")]
    assert conv.layers[0].conv_depthwise.weight.shape == (32, 1, 1, 5)  # one filter per channel
    mel = samples["media"]["short"].tensors["mel"]
    windows, frames = split_windows(mel, AUDIO_CFG)
    with torch.no_grad():
        assert not torch.allclose(conv(windows, frames), plain(windows, frames))
    for bad in (2, -1, True):
        with pytest.raises(ValueError, match=r"^model\.audio\.conv_kernel must be 0 \(no convolution block\) or an odd"):
            AudioEncoderConfig(**kwargs, conv_kernel=bad)


def test_mel_norm_window_normalizes_each_window_over_its_valid_frames(samples):
    """model.audio.mel_norm window: each bin of each window at zero mean and unit variance over the valid frames, a
    per-bin offset (a voice's or a channel's spectral envelope) removed, the padding zero and never read; the
    encoder's windows stay independent."""
    mel = samples["media"]["long"].tensors["mel"]  # (128, 3500): windows of 3000 and 500 frames
    windows, frames = split_windows(mel, AUDIO_CFG)
    out = normalize_windows(windows, frames)
    valid = out[1, :, :500]
    torch.testing.assert_close(valid.mean(-1), torch.zeros(128), rtol=0, atol=1e-5)
    raw = windows[1, :, :500].std(-1, unbiased=False)  # a bin spread under 0.1 (4 dB) is divided by 0.1
    torch.testing.assert_close(valid.std(-1, unbiased=False), raw / raw.clamp(min=0.1), rtol=1e-4, atol=1e-5)
    assert (raw > 0.1).any() and (raw < 0.1).any()  # both cases are met
    assert (out[1, :, 500:] == 0).all()
    offset = torch.linspace(-0.5, 0.5, 128)[None, :, None]
    moved = (windows + offset) * (torch.arange(windows.shape[-1]) < frames[:, None]).unsqueeze(1)
    moved[1, :, 500:] = 7.0  # padding the normalization must not read
    torch.testing.assert_close(normalize_windows(moved, frames), out, rtol=0, atol=1e-5)
    torch.testing.assert_close(normalize_windows(windows[1:, :, :500], frames[1:]), out[1:, :, :500], rtol=0, atol=1e-5)

    torch.manual_seed(0)
    kwargs = dict(dim=32, num_layers=2, num_heads=4, ffn_dim=64)
    plain = AudioEncoder(AudioEncoderConfig(**kwargs)).eval()
    torch.manual_seed(0)
    normed = AudioEncoder(AudioEncoderConfig(**kwargs, mel_norm="window")).eval()
    with torch.no_grad():
        torch.testing.assert_close(normed(windows, frames), plain(out, frames))
        torch.testing.assert_close(normed(moved, frames)[:750], normed(windows, frames)[:750], rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match=r"^model\.audio\.mel_norm must be one of none, window, got 'cmvn'"):
        AudioEncoderConfig(**kwargs, mel_norm="cmvn")


def test_mel_lifter_keeps_each_frames_spectral_envelope(samples):
    """model.audio.mel_lifter k: each frame's log-mel keeps its first k DCT coefficients over the mel bins and loses
    the rest (a voice's harmonics), the padding stays zero, the weights and checkpoints are Whisper's."""
    mel = samples["media"]["long"].tensors["mel"]  # real speech features: (128, 3500), windows of 3000 and 500 frames
    windows, frames = split_windows(mel, AUDIO_CFG)
    basis = dct_basis(128, 24)
    torch.testing.assert_close(basis @ basis.T, torch.eye(24), rtol=0, atol=1e-6)  # orthonormal rows
    bins = torch.arange(128, dtype=torch.float64)
    cosine = lambda j: torch.cos(torch.pi * j * (bins + 0.5) / 128).float()  # noqa: E731
    envelope, ripple = 0.7 * cosine(0) + 0.4 * cosine(3) - 0.2 * cosine(23), 0.5 * cosine(40)  # DCT indices < / >= 24
    frame = (envelope + ripple)[None, :, None].expand(1, 128, 5)
    torch.testing.assert_close(lifter_mels(frame, basis), envelope[None, :, None].expand(1, 128, 5), rtol=0, atol=1e-5)
    out = lifter_mels(windows, basis)
    assert (out[1, :, 500:] == 0).all()  # padding frames are zero and stay zero
    # a projection: applying it twice changes nothing, and it keeps most of real speech but not all of it
    torch.testing.assert_close(lifter_mels(out, basis), out, rtol=0, atol=1e-4)
    kept = out[1, :, :500].square().sum() / windows[1, :, :500].square().sum()
    assert 0.8 < float(kept) < 1.0, float(kept)

    torch.manual_seed(0)
    kwargs = dict(dim=32, num_layers=2, num_heads=4, ffn_dim=64)
    plain = AudioEncoder(AudioEncoderConfig(**kwargs)).eval()
    torch.manual_seed(0)
    liftered = AudioEncoder(AudioEncoderConfig(**kwargs, mel_lifter=24)).eval()
    assert liftered.state_dict().keys() == plain.state_dict().keys()  # the basis is a constant, not a weight
    with torch.no_grad():
        torch.testing.assert_close(liftered(windows, frames), plain(out, frames))
    for bad in (-1, 129, True, 2.0):
        with pytest.raises(ValueError, match=r"^model\.audio\.mel_lifter must be 0 \(off\) or a number of DCT"):
            AudioEncoderConfig(**kwargs, mel_lifter=bad)


def test_vision_encoder_merges_and_keeps_images_apart(samples):
    torch.manual_seed(0)
    cfg = VisionEncoderConfig(dim=32, num_layers=2, num_heads=2, ffn_dim=64)
    encoder = VisionEncoder(cfg).eval()
    image, video = samples["media"]["image"], samples["media"]["video"]
    with torch.no_grad():
        alone = encoder(image.tensors["patches"], image.tensors["grid_thw"][None])
        both = encoder(torch.cat([image.tensors["patches"], video.tensors["patches"]]),
                       torch.stack([image.tensors["grid_thw"], video.tensors["grid_thw"]]))
    assert alone.shape == (image.num_tokens, 4 * 32)
    assert both.shape == (image.num_tokens + video.num_tokens, 4 * 32)
    torch.testing.assert_close(both[: image.num_tokens], alone, rtol=1e-5, atol=1e-5)


def test_vision_positions_follow_the_patch_layout():
    """Rows and columns given to the 2-D rotary positions are those of data/image.py's patch order."""
    cfg = ImageConfig()
    gh, gw = 6, 4
    rows = torch.arange(gh).repeat_interleave(cfg.patch_size)[:, None].expand(-1, gw * cfg.patch_size)
    cols = torch.arange(gw).repeat_interleave(cfg.patch_size)[None, :].expand(gh * cfg.patch_size, -1)
    pixels = torch.stack([rows, cols, torch.zeros_like(rows)]).float()[None].expand(2, -1, -1, -1)  # (T, 3, H, W)
    patches, grid_thw = image_to_patches(pixels, cfg, 2)
    sizes, got_rows, got_cols = _group_layout([grid_thw.tolist(), [2, gh, gw]], cfg.merge_size)
    assert sizes == [gh * gw] * 3
    first = patches.view(gh * gw, 3, -1)[:, :, 0]  # each patch's top-left value per channel
    assert torch.equal(got_rows[: gh * gw], first[:, 0].long()) and torch.equal(got_cols[: gh * gw], first[:, 1].long())
    assert torch.equal(got_rows[gh * gw:], got_rows[: gh * gw].repeat(2))

    encoder = VisionEncoder(VisionEncoderConfig(dim=32, num_layers=1, num_heads=2, ffn_dim=8))
    cos, _ = encoder.rotary(got_rows.float(), got_cols.float())  # (P, 16): rows turn the first band
    same_row = got_rows == got_rows[0]
    assert torch.equal(cos[same_row, :4], cos[:1, :4].expand(int(same_row.sum()), -1))
    assert not torch.equal(cos[same_row, 4:8], cos[:1, 4:8].expand(int(same_row.sum()), -1))


def document_losses(model: OmniModel, batch, order: list[str]) -> dict[str, float]:
    """Each document's summed per-token loss, by name (`order`: the names in document-id order)."""
    with torch.no_grad():
        per_token = model(batch).per_token_loss
    real = batch["document_ids"] >= 0
    sums = torch.zeros(len(order)).index_add_(0, batch["document_ids"][real], per_token[real])
    return dict(zip(order, sums.tolist()))


def train_steps(model: OmniModel, batch, steps: int, lr: float) -> list[float]:
    """`steps` AdamW steps on one batch; the loss before each."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.outcome
def test_a_few_steps_reduce_the_loss(samples, capsys):
    model = tiny_model()
    batch = collate([[samples["short_audio"], samples["image"]], [samples["video"], samples["text"]]])
    losses = train_steps(model, batch, 8, lr=1e-3)
    # one batch, small steps: each falls by 0.1 or more (5.5615 -> 4.6378, equal to 4 decimals under AVX-512, AVX2
    # and default kernels), far above rounding, so even the step-by-step fall holds on any CPU
    with capsys.disabled():
        print(f"\nsame batch, 8 AdamW steps ({torch.backends.cpu.get_cpu_capability()} kernels): loss "
              f"{' '.join(f'{v:.4f}' for v in losses)}")
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.5, losses


def test_loss_never_crosses_a_document_boundary():
    model = tiny_model()
    # every token labelled: two documents then padding; the first token of each document has no predictor
    document_ids = torch.tensor([[0, 0, 0, 1, 1, -1]])
    labels = torch.tensor([[5, 6, 7, 8, 9, -100]])
    hidden = torch.randn(1, 6, 64, requires_grad=True)
    loss, num_loss_tokens, per_token_loss = model.next_token_loss(hidden, labels, document_ids)
    assert num_loss_tokens == 3
    assert (per_token_loss[0] != 0).tolist() == [False, True, True, False, True, False]
    loss.backward()
    assert hidden.grad[0, 2].abs().sum() == 0 and hidden.grad[0, 0].abs().sum() > 0  # position 2 predicts nothing
    logits = model.backbone.logits(hidden[0, 3])
    expected = torch.nn.functional.cross_entropy(logits[None], labels[0, 4:5])
    torch.testing.assert_close(per_token_loss[0, 4], expected)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"model\.projector must be one of mlp, linear, pool, got 'qformer'"):
        tiny_config(projector="qformer")
    with pytest.raises(ValueError, match=r"model\.projector must be one of mlp, linear, pool"):
        build_projector("conv", 8, 8)
    with pytest.raises(ValueError, match=r"model\.fusion must be one of interleave, cross_attn, resampler, got 'concat'"):
        tiny_config(fusion="concat")
    with pytest.raises(ValueError, match=r"model\.vision\.dim"):
        VisionEncoderConfig(dim=30, num_layers=1, num_heads=3, ffn_dim=8)
    linear = tiny_model(projector="linear")
    assert [type(m).__name__ for m in linear.audio_projector] == ["Linear"]
    counts = linear.num_parameters()
    assert counts["total"] == sum(p.numel() for p in linear.parameters()) == sum(v for k, v in counts.items() if k != "total")
