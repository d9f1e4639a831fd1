"""Degradations (data/degrade.py) measured on real media: espeak-ng speech and ffmpeg's test pattern, decoded by
the pipeline's decoders, then each op checked for what it is specified to do (SNR, RT60, band, length, counts,
pixels) and for being the same on every run of one seed."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from omni_train.config import RecipeError, load_recipe
from omni_train.data import synth
from omni_train.data.audio import AudioConfig, decode_audio
from omni_train.data.degrade import (OPS, Condition, Degradation, parse_degrade, room_impulse_response, speech_power)
from omni_train.data.video import VideoConfig, decode_video_frames
from omni_train.probes import ProbeConfig

SAMPLE_RATE_HZ = 16000
SENTENCES = ["three plus five is eight", "seven minus two", "four times six", "nine plus one is ten"]


@pytest.fixture(scope="module")
def utterances(tmp_path_factory) -> list[torch.Tensor]:
    """espeak-ng sentences as FLAC, decoded by the pipeline to 16 kHz float32."""
    root = tmp_path_factory.mktemp("degrade_speech")
    return [decode_audio(synth.speech(root / f"s{i}.flac", text).read_bytes(), AudioConfig())
            for i, text in enumerate(SENTENCES)]


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> tuple[torch.Tensor, torch.Tensor]:
    """ffmpeg's test pattern as mp4, decoded to (T, 3, H, W) uint8 frames and their times."""
    path = synth.test_pattern_video(tmp_path_factory.mktemp("degrade_video") / "v.mp4", 2.0, fps=10, width=96, height=64)
    frames, timestamps_s, _ = decode_video_frames(path.read_bytes(), VideoConfig(fps=8.0))
    return frames, timestamps_s


def condition(spec: dict) -> Condition:
    (c,) = parse_degrade([spec])
    return c


def degrade_audio(spec: dict, waveform: torch.Tensor, *, seed=(0, 0), others=()) -> tuple[np.ndarray, Degradation]:
    transform = Degradation(condition(spec), seed, others)
    out = transform.audio(waveform, SAMPLE_RATE_HZ, 0)
    assert out.dtype == torch.float32 and transform.applied
    return out.numpy().astype(np.float64), transform


def db(x: float) -> float:
    return 10 * math.log10(x)


def band_fraction(x: np.ndarray, above_hz: float) -> float:
    power = np.abs(np.fft.rfft(x)) ** 2
    return float(power[np.fft.rfftfreq(x.size, 1 / SAMPLE_RATE_HZ) > above_hz].sum() / power.sum())


def schroeder_rt60(rir: np.ndarray, sample_rate_hz: int) -> float:
    """RT60 from Schroeder's backward integral of the squared response: the -5..-25 dB decay (T20) times 3."""
    energy = np.cumsum(rir[::-1] ** 2)[::-1]
    decay_db = 10 * np.log10(energy / energy[0])
    fit = np.flatnonzero((decay_db <= -5) & (decay_db >= -25))
    slope_db_per_s = np.polyfit(fit / sample_rate_hz, decay_db[fit], 1)[0]
    return -60.0 / slope_db_per_s


# ------------------------------------------------------------------------------------------------ spec


def test_spec_gives_one_condition_per_severity():
    conditions = parse_degrade([{"op": "white_noise", "snr_db": [20, 10, 5]}, {"op": "mp3", "kbps": 16},
                                {"op": "speed", "factor": [0.9, 1.1]}, {"op": "overlap", "level_db": [-10]},
                                {"op": "frame_drop", "rate": [0.5]}, {"op": "babble", "snr_db": 5, "talkers": 3},
                                {"op": "opus"}, {"op": "telephone"}])
    assert [(c.op, c.severity) for c in conditions] == [
        ("white_noise", 20), ("white_noise", 10), ("white_noise", 5), ("mp3", 16), ("speed", 0.9), ("speed", 1.1),
        ("overlap", -10), ("frame_drop", 0.5), ("babble", 5), ("opus", 8), ("telephone", 8000)]
    assert conditions[8].num_others == 3 and conditions[6].num_others == 1
    assert conditions[0].label == "white_noise snr_db=20" and conditions[8].label == "babble snr_db=5 talkers=3"
    assert conditions[10]["high_hz"] == 3400
    assert conditions[0].applies_to(["audio"]) and conditions[0].applies_to(["video"])  # a video's audio track
    assert not conditions[7].applies_to(["audio", "image"]) and conditions[7].applies_to(["video"])


@pytest.mark.parametrize("spec,message", [
    ([{"op": "echo"}], "degrade[0].op must be one of white_noise, "),
    ([{"op": "mp3"}, {"op": "mp3", "bitrate": 16}], "degrade[1].bitrate is not a field of op mp3 (fields: kbps)"),
    ([{"op": "white_noise"}], "degrade[0].snr_db is required by op white_noise"),
    ([{"op": "white_noise", "snr_db": [20, "loud"]}], "degrade[0].snr_db must be a number of dB, got 'loud'"),
    ([{"op": "jpeg", "quality": 0}], "degrade[0].quality must be an integer in 1..95, got 0"),
    ([{"op": "speed", "factor": []}], "degrade[0].factor must be a factor in [0.5, 2], or a non-empty list"),
    ([{"op": "babble", "snr_db": 5, "talkers": [2, 3]}], "degrade[0].talkers must be an integer in 1..16, got [2, 3]"),
    ([{"op": "telephone", "high_hz": 5000}], "degrade[0].high_hz must lie above low_hz and below half"),
    ([{"op": "clip", "level": [0.5]}, {"op": "clip", "level": 0.5}], "degrade[1].level repeats clip level=0.5"),
    (["white_noise"], "degrade[0] must be a mapping with an op"),
])
def test_spec_errors_name_the_field_in_one_line(spec, message):
    with pytest.raises(ValueError) as error:
        parse_degrade(spec)
    assert str(error.value).startswith(message) and "\n" not in str(error.value), str(error.value)


@dataclass(kw_only=True)
class _ProbesOnly:
    probes: list[ProbeConfig] = field(default_factory=list)


def test_a_bad_degrade_stops_at_recipe_load_naming_the_key():
    with pytest.raises(RecipeError) as error:
        load_recipe(None, ["probes=[{name: a, shards: x, degrade: [{op: mp3}, {op: opus, kbps: 2}]}]"], schema=_ProbesOnly)
    assert str(error.value).startswith("probes[0].degrade[1].kbps must be a bitrate in 6..256, got 2"), str(error.value)
    probes = load_recipe(None, ["probes=[{name: a, shards: x, degrade: [{op: blur, radius: [1, 2]}]}]"],
                         schema=_ProbesOnly).probes
    assert [c.label for c in probes[0].conditions()] == ["blur radius=1", "blur radius=2"]


# ------------------------------------------------------------------------------------------------ audio


@pytest.mark.parametrize("op", ["white_noise", "brown_noise", "babble"])
def test_noise_is_added_at_the_target_snr_over_voiced_samples(utterances, op):
    clean = utterances[0]
    for snr_db in (20, 10, 5):
        noisy, _ = degrade_audio({"op": op, "snr_db": snr_db}, clean, others=utterances[1:])
        noise = noisy - clean.numpy()
        measured = db(speech_power(clean.numpy()) / np.mean(noise ** 2))
        assert abs(measured - snr_db) < 0.5, (op, snr_db, measured)
        assert noisy.shape == clean.shape
    if op == "brown_noise":  # a rumble: most of its power below 500 Hz, where white noise has 1/16 of it
        assert band_fraction(noise, 500) < 0.2
    if op == "babble":  # speech of the other utterances: the noise correlates with them, not with the item
        assert abs(np.corrcoef(noise[: utterances[1].numel()], utterances[1].numpy()[: noise.size])[0, 1]) < 0.9


def test_reverb_impulse_response_decays_in_rt60_by_schroeder(utterances):
    rng = np.random.default_rng(0)
    for rt60_s in (0.3, 0.6, 1.2):
        measured = schroeder_rt60(room_impulse_response(rt60_s, SAMPLE_RATE_HZ, rng), SAMPLE_RATE_HZ)
        assert abs(measured - rt60_s) < 0.1 * rt60_s, (rt60_s, measured)
    wet, _ = degrade_audio({"op": "reverb", "rt60_s": 0.6}, utterances[0])
    assert wet.shape == utterances[0].shape and not np.allclose(wet, utterances[0].numpy(), atol=1e-3)


def test_codec_round_trips_decode_and_differ_and_telephone_cuts_above_4khz(utterances):
    clean = utterances[0].numpy().astype(np.float64)
    for spec in ({"op": "mp3", "kbps": 16}, {"op": "opus", "kbps": 8}, {"op": "telephone"}):
        out, _ = degrade_audio(spec, utterances[0])
        error_db = db(np.mean((out - clean) ** 2) / np.mean(clean ** 2))
        # decoded, aligned with the input (not delayed by the encoder: measured 0.97 mp3, 0.73 opus 8 kbps, 0.92
        # telephone; a few ms of delay would decorrelate speech), and not the input (-12, -3, -8 dB of error)
        assert out.shape == clean.shape and np.corrcoef(out, clean)[0, 1] > 0.6 and error_db > -30, (spec, error_db)
        if spec["op"] == "telephone":
            assert band_fraction(clean, 4000) > 0.01 and band_fraction(out, 4000) < 1e-4
            assert band_fraction(out, 0) - band_fraction(out, 3600) > 0.999  # nothing left above the band either


def test_speed_changes_the_length_and_pitch_keeps_it():
    t = np.arange(SAMPLE_RATE_HZ * 2) / SAMPLE_RATE_HZ
    tone = torch.from_numpy(0.3 * np.sin(2 * np.pi * 440.0 * t)).float()

    def peak_hz(x: np.ndarray) -> float:
        return float(np.fft.rfftfreq(x.size, 1 / SAMPLE_RATE_HZ)[np.argmax(np.abs(np.fft.rfft(x)))])

    for factor in (0.9, 1.1):
        out, _ = degrade_audio({"op": "speed", "factor": factor}, tone)
        assert abs(out.size - tone.numel() / factor) <= 1, (factor, out.size)
        assert abs(peak_hz(out) / (440.0 * factor) - 1) < 0.01
    for semitones in (2, -3):
        out, _ = degrade_audio({"op": "pitch", "semitones": semitones}, tone)
        assert out.size == tone.numel()
        assert abs(peak_hz(out) / (440.0 * 2 ** (semitones / 12)) - 1) < 0.01, (semitones, peak_hz(out))


def test_gain_changes_the_level_by_its_decibels_and_shifts_every_feature_alike(utterances):
    """A gain of g dB multiplies the power by 10^(g/10); Whisper's log-mel (log10, then / 4) moves by g / 40 in every
    cell above the floor: the level the model hears, which no feature normalizes away."""
    from omni_train.data.audio import AudioConfig, log_mel

    clean, cfg = utterances[0], AudioConfig()
    clean_power, clean_mel = np.mean(clean.numpy().astype(np.float64) ** 2), log_mel(clean, cfg)
    for gain_db in (-6.0, 3.0):
        out, _ = degrade_audio({"op": "gain", "gain_db": gain_db}, clean)
        assert abs(db(np.mean(out ** 2) / clean_power) - gain_db) < 1e-3
        shift = log_mel(torch.from_numpy(out).float(), cfg) - clean_mel
        assert torch.allclose(shift, torch.full_like(shift, gain_db / 40), atol=2e-3), (gain_db, shift.min(), shift.max())


def test_eq_applies_its_drawn_gains_at_its_control_frequencies():
    """White noise through the random equalizer: at each control frequency the power ratio out / in is the drawn gain
    (within 0.5 dB, averaged over the neighbouring bins), the gains lie in [-gain_db, gain_db], and a larger gain_db
    scales the same draws."""
    from omni_train.data.degrade import eq_frequencies_hz

    noise = torch.from_numpy(np.random.default_rng(0).standard_normal(8 * SAMPLE_RATE_HZ)).float()
    spectrum_in = np.abs(np.fft.rfft(noise.numpy().astype(np.float64))) ** 2
    bins_hz = np.fft.rfftfreq(noise.numpy().size, 1 / SAMPLE_RATE_HZ)
    controls_hz = eq_frequencies_hz(6, SAMPLE_RATE_HZ)
    measured = {}
    for gain_db in (6.0, 12.0):
        out, transform = degrade_audio({"op": "eq", "gain_db": gain_db, "bands": 6}, noise, seed=[3, 4])
        draws = transform._rng(0, 0).uniform(-1.0, 1.0, 6)  # the transform's own draws, again
        spectrum_out = np.abs(np.fft.rfft(out)) ** 2
        gains = []
        for f in controls_hz[:-1]:  # Nyquist has bins on one side only
            near = np.abs(np.log(np.maximum(bins_hz, 1.0) / f)) < 0.01
            gains.append(db(spectrum_out[near].sum() / spectrum_in[near].sum()))
        assert np.abs(np.array(gains) - gain_db * draws[:-1]).max() < 0.5, (gain_db, gains, gain_db * draws)
        assert np.abs(gain_db * draws).max() <= gain_db and np.ptp(draws) > 0.5
        measured[gain_db] = np.array(gains)
    assert np.allclose(measured[12.0], 2 * measured[6.0], atol=0.5)  # the same shape, twice as deep
    flat, _ = degrade_audio({"op": "eq", "gain_db": 0.0}, noise)
    assert np.allclose(flat, noise.numpy(), atol=1e-5)


def test_clipping_and_packet_loss_do_what_they_say(utterances):
    clean = utterances[0].numpy()
    clipped, _ = degrade_audio({"op": "clip", "level": 0.3}, utterances[0])
    assert np.isclose(np.abs(clipped).max(), 0.3 * np.abs(clean).max(), rtol=1e-6)
    assert np.mean(np.abs(clipped) < np.abs(clean) - 1e-6) > 0.01  # some samples were cut

    noise = torch.from_numpy(np.random.default_rng(0).uniform(0.1, 1.0, 20 * SAMPLE_RATE_HZ)).float()  # no zero
    for rate in (0.05, 0.2, 0.5):
        out, transform = degrade_audio({"op": "packet_loss", "rate": rate}, noise)
        frames = out.reshape(-1, SAMPLE_RATE_HZ // 50)  # 20 ms frames
        zeroed = int(np.all(frames == 0, axis=1).sum())
        assert transform.stats["packets"] == 1000 and transform.stats["packets_lost"] == zeroed
        assert abs(zeroed / 1000 - rate) < 0.05, (rate, zeroed)
        assert np.count_nonzero(out == 0) == zeroed * SAMPLE_RATE_HZ // 50  # only whole frames


def test_overlap_adds_another_utterance_at_its_relative_level(utterances):
    clean, other = utterances[0], utterances[2]
    for level_db in (-10, 0):
        mixed, _ = degrade_audio({"op": "overlap", "level_db": level_db}, clean, others=[other])
        added = mixed - clean.numpy()
        assert abs(db(speech_power(added) / speech_power(clean.numpy())) - level_db) < 0.5
        # the other utterance itself, scaled, from a point of the first half (float32 rounding aside)
        start = int(np.flatnonzero(added)[0]) - int(np.flatnonzero(other.numpy())[0])
        piece = other.numpy().astype(np.float64)[: clean.numel() - start]
        placed = added[start: start + piece.size]
        scale = np.dot(placed, piece) / np.dot(piece, piece)
        assert 0 <= start <= clean.numel() // 2 and np.abs(placed - scale * piece).max() < 1e-6
        assert not added[:start].any() and not added[start + piece.size:].any()
    # without another utterance it cannot apply: the waveform is returned as it is
    transform = Degradation(condition({"op": "overlap", "level_db": -10}), [0, 0])
    assert transform.audio(clean, SAMPLE_RATE_HZ, 0) is clean and not transform.applied


# ------------------------------------------------------------------------------------------------ frames


def test_frame_drops_are_counted_and_keep_their_timestamps(video):
    frames, timestamps_s = video
    num_frames = frames.shape[0]
    transform = Degradation(condition({"op": "frame_drop", "rate": 0.5}), [0, 1])
    kept, kept_s = transform.frames(frames, timestamps_s, 0, "video")
    assert transform.stats == {"frames_dropped": num_frames - kept.shape[0], "frames": num_frames}
    assert 0 < kept.shape[0] < num_frames and kept_s.shape[0] == kept.shape[0]
    index = [int(torch.nonzero(timestamps_s == s)[0]) for s in kept_s]  # each kept frame with its own time
    assert index == sorted(index) and all(torch.equal(kept[i], frames[j]) for i, j in enumerate(index))
    everything, everything_s = Degradation(condition({"op": "frame_drop", "rate": 1.0}), [0, 1]).frames(
        frames, timestamps_s, 0, "video")
    assert everything.shape[0] == 1 and everything_s.shape == (1,)  # never all
    image = Degradation(condition({"op": "frame_drop", "rate": 1.0}), [0, 1])  # a video op: an image is left alone
    assert torch.equal(image.frames(frames[:1], timestamps_s[:1], 0, "image")[0], frames[:1]) and not image.applied


def test_jpeg_blur_and_downscale_change_the_pixels(video):
    frames, timestamps_s = video
    for spec in ({"op": "jpeg", "quality": 10}, {"op": "blur", "radius": 2}, {"op": "downscale", "factor": 2}):
        out, out_s = Degradation(condition(spec), [0, 1]).frames(frames, timestamps_s, 0, "video")
        assert out.dtype == torch.uint8 and torch.equal(out_s, timestamps_s)
        if spec["op"] == "downscale":
            assert out.shape == (frames.shape[0], 3, frames.shape[2] // 2, frames.shape[3] // 2)
            out = torch.nn.functional.interpolate(out.float(), size=frames.shape[-2:], mode="nearest")
        assert out.shape == frames.shape
        difference = (out.float() - frames.float()).abs().mean()
        assert 1.0 < difference < 60.0, (spec, difference)


# ------------------------------------------------------------------------------------------------ determinism


RANDOM_OPS = {"white_noise", "brown_noise", "babble", "reverb", "eq", "packet_loss", "overlap", "frame_drop"}
ONE_OF_EACH = [{"op": "white_noise", "snr_db": 10}, {"op": "brown_noise", "snr_db": 10}, {"op": "babble", "snr_db": 5},
               {"op": "reverb", "rt60_s": 0.5}, {"op": "mp3"}, {"op": "opus"}, {"op": "telephone"},
               {"op": "speed", "factor": 1.1}, {"op": "pitch", "semitones": 2}, {"op": "eq", "gain_db": 10},
               {"op": "gain", "gain_db": -6}, {"op": "clip", "level": 0.5},
               {"op": "packet_loss", "rate": 0.3}, {"op": "overlap", "level_db": -5}, {"op": "frame_drop", "rate": 0.5},
               {"op": "downscale", "factor": 2}, {"op": "jpeg", "quality": 20}, {"op": "blur", "radius": 1.5}]


def test_every_op_is_identical_under_one_seed_and_random_ops_differ_under_another(utterances, video):
    assert {spec["op"] for spec in ONE_OF_EACH} == set(OPS)

    def run(spec, seed):
        transform = Degradation(condition(spec), seed, utterances[1:])
        if "audio" in OPS[spec["op"]].modalities:
            return transform.audio(utterances[0], SAMPLE_RATE_HZ, 0).numpy().tobytes()
        frames, timestamps_s = transform.frames(*video, 0, "video")
        return frames.numpy().tobytes() + timestamps_s.numpy().tobytes()

    for spec in ONE_OF_EACH:
        first, again, other = run(spec, [7, 3]), run(spec, [7, 3]), run(spec, [8, 3])
        assert first == again, spec
        assert (first != other) == (spec["op"] in RANDOM_OPS), spec
    # the severities of an op share their draws: the packets lost at 0.1 are among those lost at 0.3
    noise = torch.ones(SAMPLE_RATE_HZ * 4)
    light, heavy = (degrade_audio({"op": "packet_loss", "rate": rate}, noise, seed=[1, 2])[0] for rate in (0.1, 0.3))
    assert np.all(heavy[light == 0] == 0) and np.count_nonzero(heavy == 0) > np.count_nonzero(light == 0)
