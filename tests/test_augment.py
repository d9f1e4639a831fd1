"""Training-time augmentation (issue 14): the media-transform hook, data.*.augment and SpecAugment.

The hook reaches each media part's decoded signal and nothing else, and without a transform (or with one that
changes nothing) decoding is what it was; an augmentation depends only on (seed, epoch, sample, part); batches are
equal with the decode cache on and off and after a mid-epoch resume; SpecAugment masks only in training, and a
resumed training run with both kinds of augmentation is exact.
"""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from omni_train.data import synth
from omni_train.data.augment import Augmenter, sample_seed
from omni_train.data.audio import AudioConfig, encode_audio
from omni_train.data.image import ImageConfig, encode_image
from omni_train.data.pipeline import (CleanSample, DataConfig, DataPipeline, SourceConfig, decode_sample,
                                      redecode_sample, sample_nbytes)
from omni_train.data.text import Tokenizer
from omni_train.data.video import VideoConfig, encode_video
from omni_train.model.audio_encoder import AudioEncoder, AudioEncoderConfig, SpecAugmentConfig, spec_augment

REPO = Path(__file__).resolve().parents[1]
TOK = Tokenizer.byte_level()
AUDIO_OPS = [{"op": "white_noise", "p": 0.5, "snr_db": [5, 20]}, {"op": "speed", "p": 0.5, "factor": [0.9, 1.1]}]
IMAGE_OPS = [{"op": "jpeg", "p": 0.5, "quality": [20, 60]}, {"op": "downscale", "p": 0.5, "factor": [1, 2]}]
VIDEO_OPS = [{"op": "frame_drop", "p": 0.5, "rate": [0.2, 0.5]}, {"op": "blur", "p": 0.5, "radius": [0.5, 2]}]
SMALL = dict(video=VideoConfig(fps=2.0, max_frames=8, max_pixels=12544, use_audio_in_video=True),
             image=ImageConfig(max_pixels=50176))


def augmented(**fields) -> DataConfig:
    """A DataConfig with AUDIO_OPS, IMAGE_OPS and VIDEO_OPS (and SMALL's media sizes)."""
    return DataConfig(**{"audio": AudioConfig(augment=AUDIO_OPS), "image": ImageConfig(max_pixels=50176, augment=IMAGE_OPS),
                         "video": dataclasses.replace(SMALL["video"], augment=VIDEO_OPS), **fields})


def part(kind: str, member: str, **extra) -> dict:
    return {"type": kind, "member": member, **extra}


def sample_json(content: list[dict], answer: str = "ok") -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": content},
                                    {"role": "assistant", "content": [{"type": "text", "text": answer}]}],
                       "meta": {"task": "t"}}).encode()


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("augment_media")
    synth.speech(root / "s0.flac", "three plus five is eight")
    synth.speech(root / "s1.wav", "drei plus fünf", voice="de")
    synth.pattern_image(root / "i0.png", 300, 120, seed=1)
    synth.pattern_image(root / "i1.jpg", 96, 64, seed=2)
    synth.test_pattern_video(root / "v0.mp4", 2.0, fps=10, width=160, height=120, with_audio=True)
    return root


MIXED = [part("audio", "s0.flac"), part("image", "i0.png"), part("video", "v0.mp4", use_audio_in_video=True)]


def raw_sample(media: Path, content: list[dict]) -> dict[str, bytes]:
    return {"json": sample_json(content), **{p["member"]: (media / p["member"]).read_bytes() for p in content}}


@pytest.fixture(scope="module")
def shards(media, tmp_path_factory) -> str:
    """3 shards of 4 samples: speech, images, a video with its audio track, mixed parts, text."""
    contents = [[part("audio", "s0.flac")], [part("audio", "s1.wav")], [part("image", "i0.png")],
                [part("image", "i1.jpg")], [part("video", "v0.mp4", use_audio_in_video=True)], MIXED,
                [part("audio", "s1.wav"), part("image", "i1.jpg")], [part("audio", "s0.flac")],
                [part("image", "i0.png")], [], [], []]
    out = tmp_path_factory.mktemp("augment_shards")
    for shard in range(3):
        with tarfile.open(out / f"aug-{shard:06d}.tar", "w") as tar:
            for i in range(4):
                key, content = f"{shard * 4 + i:06d}", contents[shard * 4 + i]
                members = {"json": sample_json(content or [{"type": "text", "text": f"say {key}"}], f"answer {key}")}
                members.update({p["member"]: (media / p["member"]).read_bytes() for p in content})
                for suffix, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(out / "aug-{000000..000002}.tar")


def tensors_of(sample) -> dict[str, torch.Tensor]:
    out = {"input_ids": sample.input_ids, "timestamps_s": sample.timestamps_s, "modality_ids": sample.modality_ids}
    for i, m in enumerate(sample.media):
        out.update({f"{i}.{k}": v for k, v in m.tensors.items()})
        if m.audio is not None:
            out[f"{i}.track"] = m.audio.tensors["mel"]
    return out


def assert_same(a, b) -> None:
    a, b = tensors_of(a), tensors_of(b)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


class Copying:
    """A transform that changes nothing but returns copies: the features are computed again from them."""

    def audio(self, waveform, sample_rate_hz, part):
        return waveform.clone()

    def frames(self, frames, timestamps_s, part, modality):
        return frames.clone(), timestamps_s.clone()


class Recording:
    """Records every call; darkens the frames or silences the waveform of the parts in `change`."""

    def __init__(self, change=()):
        self.calls, self.change = [], set(change)

    def audio(self, waveform, sample_rate_hz, part):
        self.calls.append(("audio", part, tuple(waveform.shape), sample_rate_hz))
        return waveform * 0.1 if ("audio", part) in self.change else waveform

    def frames(self, frames, timestamps_s, part, modality):
        self.calls.append((modality, part, tuple(frames.shape), str(frames.dtype)))
        return (frames // 2, timestamps_s) if (modality, part) in self.change else (frames, timestamps_s)


# ------------------------------------------------------------------------------------------------ the hook


def test_no_transform_and_copying_transform_decode_as_the_encoders(media):
    cfg = DataConfig(**SMALL)
    raw = raw_sample(media, MIXED)
    plain = decode_sample(raw, "mem:0", cfg, TOK)
    assert_same(decode_sample(raw, "mem:0", cfg, TOK, transform=Copying()), plain)
    # the same features as each modality's own encoder, which decodes without the hook
    audio = encode_audio(raw["s0.flac"], cfg.audio)
    image = encode_image(raw["i0.png"], cfg.image)
    video = encode_video(raw["v0.mp4"], cfg.video, cfg.image)
    track = encode_audio(raw["v0.mp4"], cfg.audio)
    assert torch.equal(plain.media[0].tensors["mel"], audio.tensors["mel"])
    assert torch.equal(plain.media[1].tensors["patches"], image.tensors["patches"])
    assert torch.equal(plain.media[2].tensors["patches"], video.tensors["patches"])
    assert torch.equal(plain.media[2].audio.tensors["mel"], track.tensors["mel"])


def test_transform_reaches_exactly_its_parts(media):
    cfg = DataConfig(**SMALL)
    raw = raw_sample(media, MIXED)
    plain = decode_sample(raw, "mem:0", cfg, TOK)
    seen = Recording()
    decode_sample(raw, "mem:0", cfg, TOK, transform=seen)
    # the decoded signal of every part, once: audio 0; image 1 as one uint8 frame as decoded (300 x 120, not resized);
    # the video's uint8 frames (4 at 2 fps from 2 s, 160 x 120 as decoded), then its track with the video's index
    assert [c[:2] for c in seen.calls] == [("audio", 0), ("image", 1), ("video", 2), ("audio", 2)]
    assert seen.calls[1][2:] == ((1, 3, 120, 300), "torch.uint8")
    assert seen.calls[2][2:] == ((4, 3, 120, 160), "torch.uint8")
    assert seen.calls[0][3] == seen.calls[3][3] == 16000
    for change, changed in [({("image", 1)}, {"1.patches"}), ({("audio", 2)}, {"2.track"}),
                            ({("audio", 0), ("video", 2)}, {"0.mel", "2.patches"})]:
        got = tensors_of(decode_sample(raw, "mem:0", cfg, TOK, transform=Recording(change)))
        want = tensors_of(plain)
        assert {k for k in want if k not in ("input_ids", "timestamps_s", "modality_ids")
                and not torch.equal(got[k], want[k])} == changed, change


# ------------------------------------------------------------------------------------------------ augmentation


def test_augmentation_depends_only_on_seed_epoch_and_key(media):
    cfg = augmented(**{"audio": AudioConfig(augment=[{"op": "white_noise", "p": 1.0, "snr_db": [5, 20]}]),
                       "image": ImageConfig(max_pixels=50176, augment=[{"op": "jpeg", "p": 1.0, "quality": [20, 60]},
                                                                       {"op": "downscale", "p": 1.0, "factor": [1, 2]}]),
                       "video": dataclasses.replace(SMALL["video"], augment=[{"op": "blur", "p": 1.0, "radius": [1, 2]}])})
    raws = {key: raw_sample(media, content) for key, content in [("a", MIXED), ("b", [part("audio", "s1.wav")])]}

    def decode(key, seed=0, epoch=0):
        return decode_sample(raws[key], f"shard-000000.tar:{key}", cfg, TOK,
                             transform=Augmenter.from_config(cfg, sample_seed(seed, epoch, "/x/shard-000000.tar", key)))

    a0 = decode("a")
    assert_same(decode("a"), a0)
    decode("b")
    assert_same(decode("a"), a0)  # another sample decoded in between changes nothing
    # the shard's directory is not part of it (data moved between runs), its file name is
    assert Augmenter.from_config(cfg, sample_seed(0, 0, "/y/shard-000000.tar", "a")).seed == \
        Augmenter.from_config(cfg, sample_seed(0, 0, "/x/shard-000000.tar", "a")).seed
    clean = tensors_of(decode_sample(raws["a"], "shard-000000.tar:a", cfg, TOK))
    for other in (decode("a", epoch=1), decode("a", seed=1)):
        got, first = tensors_of(other), tensors_of(a0)
        for key in ("0.mel", "1.patches", "2.patches", "2.track"):
            assert not torch.equal(got[key], first[key]) and not torch.equal(got[key], clean[key]), key


def test_ops_fire_at_their_probability():
    cfg = augmented()
    fired = np.zeros((2, 2))
    for key in range(400):
        augmenter = Augmenter.from_config(cfg, sample_seed(0, 0, "s.tar", str(key)))
        for part_index in range(2):
            for i, _ in augmenter._conditions("audio", part_index):
                fired[part_index, i] += 1
    # 400 draws at p = 0.5: 200 +- 3 sigma (30)
    assert (abs(fired - 200) < 30).all(), fired


def test_a_sample_left_as_it_was_is_rendered_once(media):
    """From the decode cache's clean parts, an epoch whose ops fire on no part returns the sample's first rendering
    (the very object: the text is not tokenized again); one whose op fires renders the changed parts anew."""
    cfg = augmented(audio=AudioConfig(augment=[{"op": "white_noise", "p": 1.0, "snr_db": [10, 20], "from_epoch": 1}]),
                    image=ImageConfig(max_pixels=50176), video=SMALL["video"])
    raw, where = raw_sample(media, MIXED), "shard-000000.tar:a"

    def augmenter(epoch):
        return Augmenter.from_config(cfg, sample_seed(0, epoch, "shard-000000.tar", "a"), epoch)

    keep = []
    first = decode_sample(raw, where, cfg, TOK, transform=augmenter(0), keep=keep)
    (clean,) = keep
    assert clean.rendered is first
    assert_same(first, decode_sample(raw, where, cfg, TOK))  # before from_epoch nothing fires
    assert redecode_sample(clean, where, cfg, TOK, transform=augmenter(0)) is first
    noisy = redecode_sample(clean, where, cfg, TOK, transform=augmenter(1))  # the speech and the video's track change
    assert noisy is not first and clean.rendered is first
    assert not torch.equal(noisy.media[0].tensors["mel"], first.media[0].tensors["mel"])
    assert not torch.equal(noisy.media[2].audio.tensors["mel"], first.media[2].audio.tensors["mel"])
    assert_same(redecode_sample(clean, where, cfg, TOK, transform=augmenter(1)), noisy)
    assert redecode_sample(clean, where, cfg, TOK, transform=augmenter(0)) is first
    # the cache counts the kept rendering's tokens beside the clean signals and features
    assert sample_nbytes(clean) == sample_nbytes(CleanSample(clean.sample, clean.parts)) + sum(
        t.numel() * t.element_size() for t in (first.input_ids, first.labels, first.modality_ids, first.timestamps_s,
                                               first.audio_transcript_ids) if t is not None)


@pytest.fixture(scope="module")
def pipeline_cfg(shards) -> DataConfig:
    return augmented(seq_len=512, batch_size=2, num_workers=0, pack_pool=4, train=[SourceConfig(shards=shards)])


def read(pipeline, num_batches):
    batches = []
    for batch in pipeline:
        batches.append(batch)
        if len(batches) == num_batches:
            return batches
    return batches


def assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        elif key == "audio_transcript_ids":
            assert len(a[key]) == len(b[key]) and all(torch.equal(x, y) for x, y in zip(a[key], b[key])), key
        else:
            assert a[key] == b[key], key


def test_decode_cache_on_and_off_give_equal_augmented_batches(pipeline_cfg):
    num_batches = 3 * len(read(DataPipeline(pipeline_cfg, epochs=1), None))  # three epochs
    reference = read(DataPipeline(pipeline_cfg, seed=3, augment=True), num_batches)
    cached = DataPipeline(dataclasses.replace(pipeline_cfg, decode_cache_mb=64), seed=3, augment=True)
    for got, want in zip(read(cached, num_batches), reference, strict=True):
        assert_batches_equal(got, want)
    cache = cached.dataset.cache
    assert cache.misses == 12 and cache.hits >= 12  # later epochs decoded nothing, yet were augmented anew
    # and augmentation changed them: the same reads without it give other features
    clean = read(DataPipeline(pipeline_cfg, seed=3), num_batches)
    for key in ("audio_mel", "image_patches", "video_patches"):
        features = [torch.cat([b[key].flatten() for b in batches if key in b]) for batches in (clean, reference)]
        assert not torch.equal(*features), key


@pytest.mark.parametrize("num_workers,cache_mb", [(0, 0), (2, 64)])
def test_resume_mid_epoch_is_exact_with_augmentation(pipeline_cfg, num_workers, cache_mb):
    cfg = dataclasses.replace(pipeline_cfg, num_workers=num_workers, decode_cache_mb=cache_mb)
    k, m = 3, 5  # 12 samples in about 6 batches an epoch: the tail crosses into the next epoch
    reference = read(DataPipeline(cfg, seed=5, augment=True), k + m)
    first = DataPipeline(cfg, seed=5, augment=True)
    head = read(first, k)
    resumed = DataPipeline(cfg, seed=5, augment=True)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    tail = read(resumed, m)
    for got, want in zip(head + tail, reference, strict=True):
        assert_batches_equal(got, want)


# ------------------------------------------------------------------------------------------------ SpecAugment


def test_spec_augment_masks_only_in_training():
    masks = SpecAugmentConfig(num_time_masks=2, max_time_frames=30, num_freq_masks=2, max_freq_bins=8)
    kwargs = dict(dim=32, num_layers=1, num_heads=2, ffn_dim=64, num_mel_bins=32)
    torch.manual_seed(0)
    plain = AudioEncoder(AudioEncoderConfig(**kwargs))
    masked = AudioEncoder(AudioEncoderConfig(**kwargs, spec_augment=masks))
    masked.load_state_dict(plain.state_dict())
    mel, frames = torch.randn(2, 32, 400) + 2.0, torch.tensor([400, 150])
    plain.eval(), masked.eval()
    assert torch.equal(masked(mel, frames), plain(mel, frames))  # eval (and probes) never mask
    plain.train(), masked.train()
    torch.manual_seed(1)
    out = masked(mel, frames)
    assert not torch.equal(out, plain(mel, frames))
    torch.manual_seed(1)
    assert torch.equal(masked(mel, frames), out)  # the torch RNG state decides the masks
    # the masks themselves: zeros in at most 2 x 8 bins and 2 x 30 frames (20% of 150 for the short window)
    torch.manual_seed(2)
    zeros = spec_augment(mel, frames, masks) == 0
    full_bins = zeros.all(dim=2).sum(dim=1)          # (W,) bins masked over all frames
    full_frames = zeros.all(dim=1).sum(dim=1)        # (W,) frames masked over all bins
    assert (full_bins <= 16).all() and (full_bins > 0).any() and (full_frames <= 60).all() and (full_frames > 0).all()
    assert not zeros[1, :, 150:].all(dim=0).any()  # time masks stay within a window's valid frames


def test_spec_augment_masks_from_its_step_on():
    """from_step: before it the encoder in training mode is the unmasked one, from it on it masks; the step is the
    one the training loop sets (`AudioEncoder.step`), and an encoder no loop told a step stays at 0."""
    masks = SpecAugmentConfig(num_time_masks=2, max_time_frames=30, num_freq_masks=2, max_freq_bins=8, from_step=5)
    kwargs = dict(dim=32, num_layers=1, num_heads=2, ffn_dim=64, num_mel_bins=32)
    torch.manual_seed(0)
    plain = AudioEncoder(AudioEncoderConfig(**kwargs)).train()
    later = AudioEncoder(AudioEncoderConfig(**kwargs, spec_augment=masks)).train()
    later.load_state_dict(plain.state_dict())
    mel, frames = torch.randn(2, 32, 400) + 2.0, torch.tensor([400, 150])
    assert later.step == 0
    for step in (0, 4):
        later.step = step
        state = torch.get_rng_state()
        assert torch.equal(later(mel, frames), plain(mel, frames)), step
        assert torch.equal(torch.get_rng_state(), state)  # no draws before from_step: the run's RNG stream is unchanged
    later.step = 5
    assert not torch.equal(later(mel, frames), plain(mel, frames))
    with pytest.raises(ValueError, match=r"^model\.audio\.spec_augment\.from_step must be an integer >= 0, got -1"):
        SpecAugmentConfig(num_time_masks=1, max_time_frames=5, from_step=-1).check(32)


def test_spec_augment_survives_a_pretrained_audio_config(tmp_path):
    """model.pretrained_audio replaces model.audio with the checkpoint's architecture; the masks are the recipe's."""
    import transformers

    from omni_train.config import RecipeError, load_recipe

    transformers.WhisperConfig(d_model=64, encoder_layers=1, encoder_attention_heads=4, encoder_ffn_dim=128,
                               num_mel_bins=128, max_source_positions=1500, decoder_layers=1, decoder_attention_heads=4,
                               decoder_ffn_dim=128, vocab_size=100).save_pretrained(tmp_path)
    masks = {"num_time_masks": 2, "max_time_frames": 40, "num_freq_masks": 1, "max_freq_bins": 20}
    cfg = load_recipe(REPO / "recipes" / "smoke.yaml", [f"model.pretrained_audio={tmp_path}",
                                                       f"model.audio.spec_augment={json.dumps(masks)}"])
    assert cfg.model.audio.dim == 64 and cfg.model.audio.spec_augment == SpecAugmentConfig(**masks)
    # architecture is the checkpoint's: a convolution block it lacks is refused, not dropped in silence
    with pytest.raises(RecipeError, match=r"model\.audio\.conv_kernel=5 adds convolution blocks that a pretrained"):
        load_recipe(REPO / "recipes" / "smoke.yaml", [f"model.pretrained_audio={tmp_path}", "model.audio.conv_kernel=5"])
    with pytest.raises(RecipeError, match=r"model\.audio\.mel_norm=window changes the features a pretrained audio"):
        load_recipe(REPO / "recipes" / "smoke.yaml", [f"model.pretrained_audio={tmp_path}", "model.audio.mel_norm=window"])
    with pytest.raises(RecipeError, match=r"model\.audio\.mel_lifter=24 changes the features a pretrained audio"):
        load_recipe(REPO / "recipes" / "smoke.yaml", [f"model.pretrained_audio={tmp_path}", "model.audio.mel_lifter=24"])
    with pytest.raises(RecipeError, match=r"^model\.audio\.spec_augment\.max_freq_bins must be <= "):
        load_recipe(REPO / "recipes" / "smoke.yaml", ["model.audio.spec_augment.max_freq_bins=200"])
    with pytest.raises(RecipeError, match=r"^data\.audio\.augment\[1\]\.p must be a probability"):
        load_recipe(REPO / "recipes" / "smoke.yaml", ['data.audio.augment=[{op: clip, p: 1, level: 0.5}, {op: speed, p: 2}]'])
    with pytest.raises(RecipeError, match=r"^data\.audio\.augment\[0\]\.op babble is not a training augmentation"):
        load_recipe(REPO / "recipes" / "smoke.yaml", ['data.audio.augment=[{op: babble, p: 0.5, snr_db: 10}]'])


@pytest.mark.slow
def test_training_resume_is_exact_with_augmentation(shards, tmp_path):
    """A single-process run, 6 steps, checkpoint at 3; resumed from it, steps 4-6 have the same losses. SpecAugment
    starts at step 5 (from_step): the loop tells the encoder its step, the resumed run's too, and before it the
    losses are those of a run without masks."""
    def run(name: str, *extra: str) -> dict[int, float]:
        out = tmp_path / name
        overrides = {"name": name, "output_dir": str(out), "data.train.0.shards": shards, "data.eval.0.shards": shards,
                     "train.engine": "single", "train.steps": 6, "train.checkpoint_every": 3, "train.eval_every": 0,
                     "train.log_every": 1, "train.tracker": "none", "train.progress": False, "data.num_workers": 1,
                     "data.seq_len": 512, "data.decode_cache_mb": 64, "data.video.use_audio_in_video": True,
                     "data.audio.augment": json.dumps(AUDIO_OPS), "data.image.augment": json.dumps(IMAGE_OPS),
                     "data.video.augment": json.dumps(VIDEO_OPS),
                     "model.audio.spec_augment": json.dumps({"num_time_masks": 2, "max_time_frames": 20,
                                                            "num_freq_masks": 2, "max_freq_bins": 16, "from_step": 5})}
        args = [f"{k}={v}" for k, v in overrides.items()] + list(extra)
        result = subprocess.run([sys.executable, "launch/pretrain.py", "--recipe", "recipes/smoke.yaml", *args], cwd=REPO,
                                capture_output=True, text=True, timeout=300,
                                env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-3000:]
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return {row["step"]: row["loss"] for row in rows if "loss" in row}

    full = run("full")
    resumed = run("resumed", f"train.resume={tmp_path / 'full' / 'checkpoints' / 'step_00000003'}")
    assert sorted(resumed) == [4, 5, 6]
    assert all(resumed[step] == full[step] for step in resumed), (full, resumed)
    unmasked = run("unmasked", "model.audio.spec_augment.from_step=100")
    assert [unmasked[step] == full[step] for step in range(1, 7)] == [True] * 4 + [False] * 2, (full, unmasked)


def test_from_epoch_delays_an_op_without_changing_its_draws():
    """A curriculum: an op with from_epoch E never fires before epoch E, and from then on fires exactly where the same
    op without from_epoch does, with the same condition."""
    from omni_train.data.augment import parse_augment

    def conditions(spec, epoch, key):
        ops = {"audio": parse_augment(spec, "audio.augment", "audio"), "image": [], "video": []}
        return Augmenter(ops, sample_seed(0, epoch, "s.tar", key), epoch)._conditions("audio", 0)

    op = {"op": "white_noise", "p": 0.5, "snr_db": [5, 30]}
    fired = {epoch: 0 for epoch in range(4)}
    for epoch in range(4):
        for key in map(str, range(100)):
            delayed, plain = conditions([{**op, "from_epoch": 2}], epoch, key), conditions([op], epoch, key)
            assert delayed == (plain if epoch >= 2 else [])
            fired[epoch] += len(delayed)
    assert fired[0] == fired[1] == 0 and fired[2] > 30 and fired[3] > 30, fired
    with pytest.raises(ValueError, match=r"audio.augment\[0\].from_epoch must be an epoch number >= 0, got -1"):
        parse_augment([{**op, "from_epoch": -1}], "audio.augment", "audio")


def test_speed_factors_are_drawn_on_a_grid_and_resampled_as_scipy_does():
    """Speeds drawn for augmentation lie on the 0.005 grid (each factor's filter is designed once) and cover it; a
    range narrower than a step keeps its own values; the cached filter resamples exactly as resample_poly's own."""
    from fractions import Fraction

    from scipy.signal import resample_poly

    from omni_train.data.augment import SPEED_STEP, parse_augment
    from omni_train.data.degrade import change_speed

    def factors(low, high, count=2000):
        (op,) = parse_augment([{"op": "speed", "p": 1, "factor": [low, high]}], "audio.augment", "audio")
        return {op.draw(np.random.default_rng([0, i])).severity for i in range(count)}

    drawn = factors(0.88, 1.12)
    assert len(drawn) == 49 and min(drawn) >= 0.88 - 1e-9 and max(drawn) <= 1.12 + 1e-9, sorted(drawn)
    assert all(abs(f / SPEED_STEP - round(f / SPEED_STEP)) < 1e-9 for f in drawn)
    narrow = factors(1.001, 1.002, 50)
    assert all(1.001 <= f <= 1.002 for f in narrow), narrow
    x = np.random.default_rng(1).standard_normal(16000)
    for factor in (0.9, 1.115, 0.88):
        ratio = 1 / Fraction(factor).limit_denominator(1000)
        assert np.array_equal(change_speed(x, factor), resample_poly(x, ratio.numerator, ratio.denominator)), factor
    same = change_speed(x, 1.0)
    assert np.array_equal(same, x) and same is not x
