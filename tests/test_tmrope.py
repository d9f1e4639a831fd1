"""3-D positions (`model.positions: mrope | tmrope`) and audio in video, against transformers' own code.

The specification is `Qwen2_5OmniPreTrainedModelForConditionalGeneration.get_rope_index` (TMRoPE) and
`Qwen2_5OmniProcessor.replace_video_with_audio_token` (the audio-in-video layout); mrope is checked
against Qwen2-VL's `get_rope_index`. Media are generated (ffmpeg, PIL), decoded by the pipeline's
`decode_sample` and rendered by the chat template, exactly as training does; transformers gets the
same token sequence with our special ids mapped onto its config's (it opens images and videos with one
`<|vision_bos|>`, we have one start token per modality).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from omni_train.config import RecipeError, load_recipe
from omni_train.data import synth
from omni_train.data.audio import AudioConfig
from omni_train.data.format import ShardFormatError, parse_sample
from omni_train.data.packing import collate_packed
from omni_train.data.pipeline import DataConfig, DataPipeline, SourceConfig, decode_sample, index_tar, read_entry
from omni_train.data.positions import VisionSpan, document_positions
from omni_train.data.sample import MODALITY_IDS, EncodedMedia, MediaError
from omni_train.data.text import Tokenizer, render_chat, render_prompt
from omni_train.data.video import VideoConfig
from omni_train.data.writer import build_shards
from omni_train.model.audio_encoder import AudioEncoderConfig
from omni_train.model.backbone import BackboneConfig
from omni_train.model.omni import OmniConfig, OmniModel
from omni_train.model.vision_encoder import VisionEncoderConfig
from omni_train.probes.generate import generate_ids

TOK = Tokenizer.byte_level()
# transformers' special ids in the tiny thinker config (outside the byte tokenizer's 0..268)
HF_IDS = {"audio": 1001, "image": 1002, "video": 1003, "audio_start": 1004, "audio_end": 1005,
          "vision_start": 1006, "vision_end": 1007}
REMAP = {TOK.token_id(ours): HF_IDS[theirs] for ours, theirs in (
    ("<|audio_start|>", "audio_start"), ("<|audio_pad|>", "audio"), ("<|audio_end|>", "audio_end"),
    ("<|image_start|>", "vision_start"), ("<|image_pad|>", "image"), ("<|image_end|>", "vision_end"),
    ("<|video_start|>", "vision_start"), ("<|video_pad|>", "video"), ("<|video_end|>", "vision_end"))}
FPS2 = DataConfig(positions="tmrope", video=VideoConfig(fps=2.0))   # seconds per temporal patch 1.0
FPS3 = DataConfig(positions="tmrope", video=VideoConfig(fps=3.0))   # 2/3


# ------------------------------------------------------------------------------------------------ fixtures


def av_clip(path: Path, video_s: float, audio_s: float, *, width: int = 160, height: int = 120) -> Path:
    """An mp4 whose video and audio streams have their own lengths (synth's clips share one)."""
    synth.require("ffmpeg")
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i",
                    f"testsrc=duration={video_s}:size={width}x{height}:rate=10", "-f", "lavfi", "-i",
                    f"sine=frequency=300:duration={audio_s}", "-c:v", "libx264", "-pix_fmt", "yuv420p",
                    "-c:a", "aac", str(path)], check=True)
    return path


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tmrope_media")
    for name, seconds in (("odd1.wav", 0.37), ("odd2.flac", 1.13), ("odd3.wav", 2.71)):
        synth.tone(root / name, seconds, frequency_hz=330.0, sample_rate_hz=16000)
    for i, (w, h) in enumerate([(112, 84), (300, 120), (64, 200)]):
        synth.pattern_image(root / f"image{i}.png", w, h, seed=i)
    synth.test_pattern_video(root / "silent.mp4", 3.3, fps=10, width=160, height=120)
    av_clip(root / "long_audio.mp4", 2.5, 5.3)    # audio longer than its video
    av_clip(root / "short_audio.mp4", 4.6, 1.1)   # audio shorter than its video
    av_clip(root / "wide.mp4", 1.0, 0.3, width=896, height=56)  # 32 tokens wide: a late max position
    return root


@pytest.fixture(scope="module")
def thinker():
    """transformers' Qwen2.5-Omni thinker on a tiny config (its get_rope_index is the specification)."""
    from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration

    config = Qwen2_5OmniThinkerConfig(
        audio_config=dict(d_model=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=16,
                          num_mel_bins=128, output_dim=16),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16,
                           fullatt_block_indexes=[0], spatial_merge_size=2, temporal_patch_size=2),
        text_config=dict(vocab_size=1100, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
        audio_token_index=HF_IDS["audio"], image_token_index=HF_IDS["image"], video_token_index=HF_IDS["video"],
        audio_start_token_id=HF_IDS["audio_start"], audio_end_token_id=HF_IDS["audio_end"],
        vision_start_token_id=HF_IDS["vision_start"], vision_end_token_id=HF_IDS["vision_end"])
    assert (config.position_id_per_seconds, config.seconds_per_chunk) == (25, 2)
    return Qwen2_5OmniThinkerForConditionalGeneration(config).eval()


def part(kind: str, member: str, **extra) -> dict:
    return {"type": kind, "member": member, **extra}


def text(value: str) -> dict:
    return {"type": "text", "text": value}


def document(media_root: Path, messages: list[dict], cfg: DataConfig = FPS2):
    """One sample through the pipeline's decode_sample (decode + chat template + positions)."""
    raw = {"json": json.dumps({"messages": messages}).encode()}
    for message in messages:
        for p in message["content"]:
            for key in ("member", "audio_member"):
                if key in p:
                    raw[p[key]] = (media_root / p[key]).read_bytes()
    return decode_sample(raw, "mem:doc", cfg, TOK)


def hf_positions(thinker, sample) -> tuple[torch.Tensor, int]:
    """transformers' (3, n) positions of one document and its mrope_position_delta."""
    ids = torch.tensor([[REMAP.get(int(i), int(i)) for i in sample.input_ids]])
    images = [m for m in sample.media if m.modality == "image"]
    videos = [m for m in sample.media if m.modality == "video"]
    with_audio = {v.audio is not None for v in videos}
    assert len(with_audio) <= 1, "transformers decides audio in video per call, not per video"
    audio_items = [a for m in sample.media for a in ([m] if m.modality == "audio" else [m.audio] if m.audio else [])]
    # transformers counts audio tokens from mel frames, ((n - 1) // 2 + 1 - 2) // 2 + 1: 4k - 1 frames give k
    position_ids, delta = thinker.get_rope_index(
        ids, image_grid_thw=torch.stack([m.tensors["grid_thw"] for m in images]) if images else None,
        video_grid_thw=torch.stack([m.tensors["grid_thw"] for m in videos]) if videos else None,
        attention_mask=torch.ones_like(ids), use_audio_in_video=with_audio == {True},
        audio_seqlens=torch.tensor([4 * a.num_tokens - 1 for a in audio_items]) if audio_items else None,
        second_per_grids=torch.tensor([v.seconds_per_grid for v in videos]) if videos else None)
    return position_ids[:, 0], int(delta)


def assert_parity(thinker, sample) -> None:
    expected, _ = hf_positions(thinker, sample)
    assert sample.position_ids.dtype == torch.long and sample.position_ids.shape == (3, len(sample))
    assert torch.equal(sample.position_ids, expected), (sample.position_ids - expected).abs().max()


# ------------------------------------------------------------------------------------- parity per document


def test_text_only(thinker, media):
    sample = document(media, [{"role": "system", "content": [text("Be brief.")]},
                              {"role": "user", "content": [text("print 2 plus 2")]},
                              {"role": "assistant", "content": [text("print(2 + 2)")]}])
    assert_parity(thinker, sample)
    assert torch.equal(sample.position_ids, torch.arange(len(sample)).expand(3, -1))


def test_audio_with_odd_lengths(thinker, media):
    sample = document(media, [{"role": "user", "content": [part("audio", "odd1.wav"), text(" then "),
                                                           part("audio", "odd2.flac"), part("audio", "odd3.wav")]},
                              {"role": "assistant", "content": [text("three tones")]}])
    assert any(m.num_tokens % 2 for m in sample.media), [m.num_tokens for m in sample.media]
    assert_parity(thinker, sample)


def test_several_images(thinker, media):
    sample = document(media, [{"role": "user", "content": [part("image", "image0.png"), part("image", "image1.png"),
                                                           text("and"), part("image", "image2.png"), text("Compare.")]},
                              {"role": "assistant", "content": [text("bands")]}])
    grids = [tuple(m.tensors["grid_thw"].tolist()) for m in sample.media]
    assert len(set(grids)) == 3, grids
    assert_parity(thinker, sample)


@pytest.mark.parametrize("cfg,seconds", [(FPS2, 1.0), (FPS3, 2 / 3)], ids=["fps2", "fps3"])
def test_videos_at_one_and_two_thirds_second_per_patch(thinker, media, cfg, seconds):
    sample = document(media, [{"role": "user", "content": [text("Watch:"), part("video", "silent.mp4"),
                                                           part("video", "silent.mp4"), text("What happens?")]},
                              {"role": "assistant", "content": [text("a counter")]}], cfg)
    video = sample.media[0]
    assert video.seconds_per_grid == seconds and int(video.tensors["grid_thw"][0]) >= 3
    assert_parity(thinker, sample)
    time_ids = sample.position_ids[0, sample.modality_ids == MODALITY_IDS["video"]].unique()
    start = int(time_ids[0])
    assert (time_ids[:4] - start).tolist() == ([0, 25, 50, 75] if seconds == 1.0 else [0, 16, 33, 50])


def processor_layout(video) -> str:
    """Qwen2.5-Omni's processor's placeholder string for a video with its audio ('V' per video, 'a' per audio token)."""
    from transformers import Qwen2_5OmniProcessor

    processor = SimpleNamespace(video_processor=SimpleNamespace(merge_size=2), audio_bos_token="",
                                audio_eos_token="", video_token="V", audio_token="a")
    processor.get_chunked_index = functools.partial(Qwen2_5OmniProcessor.get_chunked_index, processor)
    return Qwen2_5OmniProcessor.replace_video_with_audio_token(
        processor, {"video_grid_thw": [video.tensors["grid_thw"].tolist()], "video_second_per_grid": [video.seconds_per_grid]},
        0, {"num_audio_tokens": [video.audio.num_tokens]}, 0, position_id_per_seconds=25, seconds_per_chunk=2.0)


@pytest.mark.parametrize("clip", ["long_audio.mp4", "short_audio.mp4"])
@pytest.mark.parametrize("cfg", [FPS2, FPS3], ids=["fps2", "fps3"])
def test_audio_in_video(thinker, media, clip, cfg):
    sample = document(media, [{"role": "user", "content": [text("Listen and watch:"),
                                                           part("video", clip, use_audio_in_video=True), text("?")]},
                              {"role": "assistant", "content": [text("a beep")]}], cfg)
    video = sample.media[0]
    longer = video.audio.duration_s > video.duration_s
    assert longer == (clip == "long_audio.mp4"), (video.audio.duration_s, video.duration_s)
    assert_parity(thinker, sample)
    # the layout is the processor's: markers, then video and audio chunks interleaved, then markers
    ids = sample.input_ids.tolist()
    start = ids.index(TOK.token_id("<|video_start|>"))
    assert ids[start + 1] == TOK.token_id("<|audio_start|>")
    end = start + 2 + video.num_tokens + video.audio.num_tokens
    assert ids[end:end + 2] == [TOK.token_id("<|audio_end|>"), TOK.token_id("<|video_end|>")]
    letters = {MODALITY_IDS["video"]: "V", MODALITY_IDS["audio"]: "a"}
    ours = "".join(letters[int(m)] for m in sample.modality_ids[start + 2:end])
    assert ours == processor_layout(video) and ours.count("V") == video.num_tokens
    assert ours != "V" * video.num_tokens + "a" * video.audio.num_tokens  # really interleaved
    # each start pair and each end pair share a position; the pads carry their own timestamps
    assert torch.equal(sample.position_ids[:, start], sample.position_ids[:, start + 1])
    assert torch.equal(sample.position_ids[:, end], sample.position_ids[:, end + 1])
    audio_at = sample.modality_ids == MODALITY_IDS["audio"]
    assert torch.equal(sample.timestamps_s[audio_at], video.audio.token_timestamps_s)


def test_several_media_and_turns(thinker, media):
    plain = document(media, [
        {"role": "system", "content": [text("You see and hear.")]},
        {"role": "user", "content": [part("audio", "odd2.flac"), part("image", "image1.png"), text("What?")]},
        {"role": "assistant", "content": [text("a tone and bands")]},
        {"role": "user", "content": [part("video", "silent.mp4"), text("And this?"), part("image", "image2.png")]},
        {"role": "assistant", "content": [text("a counter")]}], FPS3)
    assert_parity(thinker, plain)
    with_audio = document(media, [
        {"role": "user", "content": [part("image", "image0.png"), part("video", "long_audio.mp4", use_audio_in_video=True)]},
        {"role": "assistant", "content": [text("both")]},
        {"role": "user", "content": [part("audio", "odd1.wav"), part("video", "short_audio.mp4", use_audio_in_video=True),
                                     text("Now?")]},
        {"role": "assistant", "content": [text("again")]}], FPS2)
    assert_parity(thinker, with_audio)


def test_packed_rows_equal_the_documents(thinker, media):
    docs = [document(media, [{"role": "user", "content": [part("video", "short_audio.mp4", use_audio_in_video=True)]},
                             {"role": "assistant", "content": [text("beep")]}], FPS3),
            document(media, [{"role": "user", "content": [text("hi")]}, {"role": "assistant", "content": [text("ho")]}]),
            document(media, [{"role": "user", "content": [part("audio", "odd3.wav"), part("image", "image0.png")]},
                             {"role": "assistant", "content": [text("tone")]}]),
            document(media, [{"role": "user", "content": [part("video", "silent.mp4"), part("audio", "odd1.wav")]},
                             {"role": "assistant", "content": [text("counter")]}], FPS3)]
    rows = [[docs[0], docs[1]], [docs[2], docs[3]]]
    seq_len = max(sum(len(d) for d in row) for row in rows) + 5
    batch = collate_packed(rows, seq_len, TOK.pad_id, AudioConfig())
    assert batch["position_ids"].shape == (3, 2, seq_len)
    for r, row in enumerate(rows):
        offset = 0
        for doc in row:
            expected, _ = hf_positions(thinker, doc)
            assert torch.equal(batch["position_ids"][:, r, offset:offset + len(doc)], expected)
            offset += len(doc)
        assert not batch["position_ids"][:, r, offset:].any()  # padding
    # audio items in the order fusion fills them: the video's track where it lies in the row
    audio_at = batch["modality_ids"] == MODALITY_IDS["audio"]
    tracks = [docs[0].media[0].audio, docs[2].media[0], docs[3].media[1]]
    assert batch["audio_num_tokens"].tolist() == [a.num_tokens for a in tracks]
    assert torch.equal(batch["timestamps_s"][audio_at], torch.cat([a.token_timestamps_s for a in tracks]))
    assert len(batch["audio_transcript_ids"]) == 3


def test_mrope_is_qwen2_vl_positions(media):
    """mrope: transformers' Qwen2-VL get_rope_index (audio counts as text there), for videos with no more
    temporal patches than tokens per side (longer ones: see positions.py)."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    cfg = DataConfig(positions="mrope")
    sample = document(media, [{"role": "user", "content": [part("image", "image1.png"), part("audio", "odd1.wav"),
                                                           part("video", "silent.mp4"), text("?")]},
                              {"role": "assistant", "content": [text("ok")]}], cfg)
    video = sample.media[2]
    t, h, w = video.tensors["grid_thw"].tolist()
    assert 1 < t <= max(h, w) // 2
    qwen2_vl = SimpleNamespace(config=SimpleNamespace(vision_config=SimpleNamespace(spatial_merge_size=2)))
    qwen2_vl.get_vision_position_ids = functools.partial(Qwen2VLModel.get_vision_position_ids, qwen2_vl)
    types = {MODALITY_IDS["image"]: 1, MODALITY_IDS["video"]: 2}
    token_types = torch.tensor([[types.get(int(m), 0) for m in sample.modality_ids]])
    expected, _ = Qwen2VLModel.get_rope_index(qwen2_vl, sample.input_ids[None], token_types,
                                              image_grid_thw=sample.media[0].tensors["grid_thw"][None],
                                              video_grid_thw=video.tensors["grid_thw"][None])
    assert torch.equal(sample.position_ids, expected[:, 0])


def test_time_ids_truncate_like_transformers(thinker):
    """float32 products truncated: 2/3 s per patch gives 16, 33, 50 (rounding would give 17). Ids that jump past
    several 2 s chunks (4 s per patch) are cut at every following token until transformers' chunk counter catches up."""
    span = VisionSpan(grid_t=7, grid_h=1, grid_w=1, seconds_per_grid=2 / 3)
    assert document_positions([span], "tmrope")[0].tolist() == [0, 16, 33, 50, 66, 83, 100]
    audio = EncodedMedia(modality="audio", num_tokens=130, token_timestamps_s=torch.zeros(130), tensors={})
    video = EncodedMedia(modality="video", num_tokens=6, token_timestamps_s=torch.zeros(6), seconds_per_grid=4.0,
                         tensors={"grid_thw": torch.tensor([3, 2, 4])}, audio=audio)
    sample = render_chat([{"role": "user", "content": [text("slow"), part("video", "v.mp4")]},
                          {"role": "assistant", "content": [text("x")]}], [video], TOK, positions="tmrope")
    assert_parity(thinker, sample)
    layout = "".join({MODALITY_IDS["video"]: "V", MODALITY_IDS["audio"]: "a"}.get(int(m), "") for m in sample.modality_ids)
    assert layout == processor_layout(video) == "VV" + "a" * 50 + "V" + "a" * 50 + "V" + "a" * 30 + "VV"


# ---------------------------------------------------------------------------------------------- generation


def test_generation_continues_from_the_document_maximum(thinker, media):
    """A prompt whose last token is below its maximum position (a wide video's early chunk): new tokens start at
    max + 1 on all three streams, as transformers' mrope_position_deltas make them."""
    cfg = DataConfig(positions="tmrope", video=VideoConfig(fps=2.0))
    messages = [{"role": "user", "content": [part("video", "wide.mp4", use_audio_in_video=True)]},
                {"role": "assistant", "content": [text("x")]}]
    decoded = document(media, messages, cfg)
    prompt = render_prompt(messages, decoded.media, TOK, positions="tmrope")
    expected, delta = hf_positions(thinker, prompt)
    assert torch.equal(prompt.position_ids, expected)
    maximum = int(prompt.position_ids.max())
    assert maximum > int(prompt.position_ids[0, -1]) + 5, "the test needs a maximum well above the last position"
    assert maximum + 1 == len(prompt) + delta

    torch.manual_seed(0)
    model = OmniModel(OmniConfig(
        backbone=BackboneConfig(vocab_size=TOK.vocab_size, dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                ffn_dim=128, mrope_section=[2, 3, 3]),
        audio=AudioEncoderConfig(dim=32, num_layers=1, num_heads=4, ffn_dim=64),
        vision=VisionEncoderConfig(dim=32, num_layers=1, num_heads=2, ffn_dim=64), positions="tmrope")).eval()
    seen = []
    hook = model.backbone.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs["position_ids"].clone()),
                                                    with_kwargs=True)
    try:
        generated = generate_ids(model, [prompt], TOK, max_new_tokens=6, audio_cfg=cfg.audio)[0]
    finally:
        hook.remove()
    assert len(generated) >= 3, generated
    n, visible = len(prompt), len(seen) - 1  # the last step sees the prompt and the tokens written before it
    last = seen[-1]
    assert last.shape == (3, 1, n + visible) and visible >= 2
    assert torch.equal(last[:, 0, :n], prompt.position_ids)
    assert torch.equal(last[:, 0, n:], torch.arange(maximum + 1, maximum + 1 + visible).expand(3, -1))
    new = torch.arange(maximum + 1, maximum + 1 + len(generated)).expand(3, -1)
    # the same tokens as greedy decoding over the whole sequence with those positions
    full = torch.cat([prompt.position_ids, new], dim=1)[:, None]
    ids = torch.cat([prompt.input_ids, torch.tensor(generated)])
    batch = collate_packed([[prompt]], n, TOK.pad_id, cfg.audio)
    with torch.no_grad():
        fused = model.fuse(batch)
        embeds = torch.cat([fused.embeds, model.backbone.embed(ids[n:])[None]], dim=1)
        hidden = model.backbone(inputs_embeds=embeds, position_ids=full, document_ids=torch.zeros(1, len(ids), dtype=torch.long))
        greedy = model.backbone.logits(hidden[0, n - 1:-1]).argmax(-1)
    assert greedy.tolist() == generated


# ----------------------------------------------------------------------- manifests, shards, pipeline, config


def test_manifest_to_batches_per_video_choice(thinker, media, tmp_path):
    """use_audio_in_video per manifest entry -> per video part in the shard -> interleaved (or not) in batches."""
    entries = [
        {"messages": [{"role": "user", "content": "<video>What is heard?"}, {"role": "assistant", "content": "beep"}],
         "videos": ["long_audio.mp4"], "use_audio_in_video": True},
        {"messages": [{"role": "user", "content": "<video><video>Which?"}, {"role": "assistant", "content": "both"}],
         "videos": ["short_audio.mp4", "silent.mp4"], "use_audio_in_video": [True, False]},
        {"messages": [{"role": "user", "content": "<video>And?"}, {"role": "assistant", "content": "a counter"}],
         "videos": ["short_audio.mp4"]},  # not said: the recipe's default (false) applies
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(e) + "\n" for e in entries))
    build_shards(manifest, media, tmp_path / "shards")
    cfg = DataConfig(positions="tmrope", seq_len=4096, num_workers=0, shuffle=False, pack_pool=1,
                     video=VideoConfig(fps=2.0), train=[SourceConfig(shards=str(tmp_path / "shards" / "train-000000.tar"))])
    pipeline = DataPipeline(cfg, tokenizer=TOK, epochs=1, skip_log=tmp_path / "skipped.jsonl")
    batches = list(pipeline)
    assert not (tmp_path / "skipped.jsonl").exists()
    by_key = {}
    for batch in batches:
        assert batch["position_ids"].shape[0] == 3
        by_key[batch["samples"][0]["key"]] = batch
    assert sorted(by_key) == ["000000", "000001", "000002"]
    tracks = {"000000": [True], "000001": [True, False], "000002": [False]}
    url = cfg.train[0].shards
    entries = {e.key: e for e in index_tar(url)}
    for key, batch in by_key.items():
        n = batch["samples"][0]["num_tokens"]
        sample = decode_sample(read_entry(url, entries[key]), f"{url}:{key}", cfg, TOK)  # the same sample, alone
        assert torch.equal(sample.input_ids, batch["input_ids"][0, :n])
        assert [m.audio is not None for m in sample.media] == tracks[key]
        assert len(batch.get("audio_num_tokens", [])) == sum(tracks[key])
        assert torch.equal(batch["position_ids"][:, 0, :n], sample.position_ids)
        if key != "000001":  # transformers decides audio in video per call; 000001 mixes both
            expected, _ = hf_positions(thinker, sample)
            assert torch.equal(sample.position_ids, expected)
    # with the recipe's default on, what an entry said still holds (000001's silent video stays without audio)
    default_on = dataclasses.replace(cfg, video=VideoConfig(fps=2.0, use_audio_in_video=True))
    for key, flags in (("000001", [True, False]), ("000002", [True])):
        sample = decode_sample(read_entry(url, entries[key]), f"{url}:{key}", default_on, TOK)
        assert [m.audio is not None for m in sample.media] == flags


def test_video_without_audio_track(media, tmp_path):
    entry = {"messages": [{"role": "user", "content": "<video>?"}, {"role": "assistant", "content": "x"}],
             "videos": ["silent.mp4"], "use_audio_in_video": True}
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps(entry) + "\n")
    with pytest.raises(ValueError, match=r"entry 0.*videos\[0\].*silent.mp4 has no audio stream \(use_audio_in_video"):
        build_shards(manifest, media, tmp_path / "shards")
    assert not (tmp_path / "shards").exists()
    # in a shard (built without the flag) with the recipe's default on: the sample is skipped, with the reason
    del entry["use_audio_in_video"]
    manifest.write_text(json.dumps(entry) + "\n")
    build_shards(manifest, media, tmp_path / "shards")
    cfg = DataConfig(positions="tmrope", num_workers=0, max_consecutive_failures=5, video=VideoConfig(use_audio_in_video=True),
                     train=[SourceConfig(shards=str(tmp_path / "shards" / "train-000000.tar"))])
    assert list(DataPipeline(cfg, tokenizer=TOK, epochs=1, skip_log=tmp_path / "skipped.jsonl")) == []
    reason = json.loads((tmp_path / "skipped.jsonl").read_text().splitlines()[0])["reason"]
    assert "use_audio_in_video needs the video's audio track" in reason and "\n" not in reason
    with pytest.raises(MediaError, match="needs model.positions tmrope"):
        document(media, [{"role": "user", "content": [part("video", "short_audio.mp4", use_audio_in_video=True)]},
                         {"role": "assistant", "content": [text("x")]}], DataConfig(positions="mrope"))


def test_audio_member_beside_the_video_and_1d_layout(media):
    """`audio_member` interleaves another member's audio; under 1d the layout is the same and no positions are stored."""
    messages = [{"role": "user", "content": [part("video", "silent.mp4", use_audio_in_video=True, audio_member="odd3.wav")]},
                {"role": "assistant", "content": [text("x")]}]
    tmrope = document(media, messages)
    one_d = document(media, messages, DataConfig())
    assert tmrope.media[0].audio.num_tokens == document(
        media, [{"role": "user", "content": [part("audio", "odd3.wav")]}, {"role": "assistant", "content": [text("x")]}]
    ).media[0].num_tokens
    assert one_d.position_ids is None and torch.equal(one_d.input_ids, tmrope.input_ids)
    batch = collate_packed([[one_d]], len(one_d), TOK.pad_id)
    assert torch.equal(batch["position_ids"], torch.arange(len(one_d))[None])
    with pytest.raises(ValueError, match="rendered without 3-D positions"):  # media positions are never guessed
        collate_packed([[tmrope], [one_d]], len(one_d), TOK.pad_id)


@pytest.mark.parametrize("content,match", [
    ([{"type": "audio", "member": "audio_0.wav", "use_audio_in_video": True}], "belong to video parts, not audio"),
    ([{"type": "video", "member": "video_0.mp4", "use_audio_in_video": "yes"}], "use_audio_in_video must be true or false"),
    ([{"type": "video", "member": "video_0.mp4", "audio_member": "audio_0.wav"}], "audio_member needs"),
    ([{"type": "video", "member": "video_0.mp4", "use_audio_in_video": True, "audio_member": "x.mp4"}],
     "audio_member must name an audio member"),
])
def test_shard_json_audio_in_video_keys(content, match):
    raw = json.dumps({"messages": [{"role": "user", "content": content}]})
    with pytest.raises(ShardFormatError, match=match):
        parse_sample(raw, "s:k")


RECIPE = """
name: unit
data: {train: [{shards: "shards/x-{000000..000003}.tar"}]}
model: {backbone: {mrope_section: [4, 6, 6]}}
"""


@pytest.mark.parametrize("overrides,match", [
    (["model.positions=3d"], r"^model.positions must be one of 1d, mrope, tmrope"),
    (["model.positions=tmrope", "model.backbone.mrope_section=null"], r"^model.positions=tmrope needs model.backbone.mrope_section"),
    (["model.positions=tmrope", "model.transfer.kind=token_rate"],
     r"^model.transfer.kind=token_rate repacks rows with 1-D positions; it does not support model.positions=tmrope"),
    (["model.positions=mrope", "data.video.use_audio_in_video=true"],
     r"^data.video.use_audio_in_video=true needs model.positions tmrope"),
    (["model.transfer.kind=token_rate", "data.video.use_audio_in_video=true"], r"not supported with model.transfer.kind"),
])
def test_recipe_checks(tmp_path, overrides, match):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE)
    with pytest.raises(RecipeError, match=match) as info:
        load_recipe(path, overrides)
    assert "\n" not in str(info.value)


def test_recipe_hands_positions_to_the_data_layer(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE)
    assert load_recipe(path).data.positions == "1d"
    cfg = load_recipe(path, ["model.positions=tmrope", "data.video.use_audio_in_video=true"])
    assert cfg.data.positions == "tmrope" and cfg.data.video.use_audio_in_video
