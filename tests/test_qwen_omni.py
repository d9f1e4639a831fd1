"""Qwen2.5-Omni's thinker as an omni_train model: `model.pretrained` in both layouts, strict key mapping, and the
release-layout export, against transformers' own classes on tiny random thinkers (nothing downloaded)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from qwen_omni import save_thinker, tiny_thinker, tiny_tokenizer

from omni_train.config import RecipeError, load_recipe
from omni_train.data.text import Tokenizer, render_chat
from omni_train.model.omni import build_model
from omni_train.model.qwen2_5_omni import save_release


@pytest.fixture(scope="module")
def omni(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("omni")
    tokenizer = tiny_tokenizer(root / "tokenizer")
    reference = tiny_thinker(tokenizer)
    return {"root": root, "tokenizer": tokenizer, "reference": reference,
            "release": save_thinker(reference, root / "release", tokenizer, layout="release"),
            "thinker": save_thinker(reference, root / "thinker", tokenizer, layout="thinker")}


def recipe_for(pretrained: Path, *overrides: str):
    recipe = pretrained.parent / f"{pretrained.name}-recipe.yaml"
    recipe.write_text(f"name: omni\ndata: {{seq_len: 4096}}\nmodel: {{pretrained: {json.dumps(str(pretrained))}}}\n")
    return load_recipe(recipe, list(overrides))


def ours(pretrained: Path):
    cfg = recipe_for(pretrained)
    tokenizer = Tokenizer.from_path(cfg.data.tokenizer)
    return build_model(cfg.model, vocab_size=tokenizer.vocab_size).eval(), tokenizer, cfg


def text_batch(tokenizer: Tokenizer) -> dict:
    sample = render_chat([{"role": "user", "content": [{"type": "text", "text": "three plus five"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "eight"}]}], [], tokenizer)
    ids = sample.input_ids[None]
    return {"input_ids": ids, "labels": sample.labels[None], "modality_ids": sample.modality_ids[None],
            "position_ids": torch.arange(ids.shape[1])[None], "document_ids": torch.zeros_like(ids)}


@pytest.mark.parametrize("layout", ["release", "thinker"])
def test_pretrained_loads_both_layouts_with_the_checkpoints_tokenizer(omni, layout):
    model, tokenizer, cfg = ours(omni[layout])
    assert cfg.data.tokenizer == str(omni[layout]) and cfg.model.positions == "tmrope"
    assert (cfg.data.audio.valid_frames, cfg.data.audio.pool_tail) == ("ceil", "drop")
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD  # Qwen2-VL's image processor's

    assert cfg.data.image.mean == tuple(OPENAI_CLIP_MEAN) and cfg.data.image.std == tuple(OPENAI_CLIP_STD)
    # native markers, nothing added: the template writes the checkpoint's own tokens
    assert tokenizer.num_added == 0 and tokenizer.vocab_size == len(json.loads(
        (omni[layout] / "tokenizer.json").read_text())["model"]["vocab"]) + len(tokenizer.native) + 1
    assert tokenizer.token_id("<|image_start|>") == tokenizer.token_id("<|video_start|>")
    batch = text_batch(tokenizer)
    assert "<|im_start|>assistant" in tokenizer.decode(batch["input_ids"][0], skip_special=False)
    with torch.no_grad():
        logits = model(batch, return_logits=True).logits
        reference = omni["reference"](input_ids=batch["input_ids"], use_cache=False).logits
    difference = float((logits - reference).abs().max())
    print(f"{layout}: text logits max difference {difference:.2e}")
    assert difference < 1e-4


def test_talker_and_unused_keys_are_not_loaded_but_every_thinker_key_is(omni):
    index = json.loads((omni["release"] / "model.safetensors.index.json").read_text())["weight_map"]
    assert any(k.startswith("talker.") for k in index) and "thinker.audio_tower.audio_bos_eos_token.weight" in index
    model, _, _ = ours(omni["release"])
    thinker_keys = {k for k in index if k.startswith("thinker.")} - {"thinker.audio_tower.audio_bos_eos_token.weight"}
    assert len(model.state_dict()) == len(thinker_keys)  # one of ours per thinker weight: nothing left unmapped


def _rewrite(src: Path, dst: Path, edit) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    edit(state)
    save_file(state, dst / "model.safetensors")
    return dst


def test_checkpoint_that_does_not_fit_is_one_error_naming_the_keys(omni, tmp_path):
    one_file = tmp_path / "one"
    shutil.copytree(omni["tokenizer"], one_file)
    omni["reference"].save_pretrained(str(one_file))  # a single model.safetensors
    cases = {
        "missing": (lambda s: s.pop("model.layers.1.mlp.up_proj.weight"), "missing (1): backbone.layers.1.mlp.up_proj.weight"),
        "unexpected": (lambda s: s.__setitem__("visual.blocks.0.attn.qkv.weight", torch.zeros(3)),
                       "unexpected (1): vision_encoder.layers.0.attn.qkv.weight"),
        "shape": (lambda s: s.__setitem__("audio_tower.proj.weight", torch.zeros(64, 31)),
                  "audio_projector.fc.weight (64, 31) vs (64, 32)"),
    }
    for name, (edit, expected) in cases.items():
        bad = _rewrite(one_file, tmp_path / name, edit)
        with pytest.raises(ValueError) as error:
            ours(bad)
        message = str(error.value)
        print(message)
        assert "\n" not in message and expected in message and str(bad / "model.safetensors") in message


def test_checkpoint_directory_errors_are_one_line(omni, tmp_path):
    pickled = tmp_path / "pickled"
    shutil.copytree(omni["thinker"], pickled)
    for file in pickled.glob("model*.safetensors*"):
        file.unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    wrong_type = tmp_path / "qwen2"
    shutil.copytree(omni["thinker"], wrong_type)
    config = json.loads((wrong_type / "config.json").read_text())
    (wrong_type / "config.json").write_text(json.dumps({**config, "model_type": "qwen2"}))
    for directory, expected in ((pickled, "only safetensors checkpoints are read"),
                                (wrong_type, "model_type 'qwen2' is not a Qwen2.5-Omni or Qwen3-Omni checkpoint"),
                                (tmp_path / "nowhere", "no such directory")):
        with pytest.raises((RecipeError, OSError, ValueError)) as error:
            ours(directory)
        print(error.value)
        assert expected in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("layout", ["release", "thinker"])
def test_release_export_loads_in_transformers_with_every_key_and_equal_logits(omni, tmp_path, layout):
    from transformers import Qwen2_5OmniForConditionalGeneration, Qwen2_5OmniThinkerForConditionalGeneration

    model, tokenizer, _ = ours(omni[layout])
    with torch.no_grad():  # as if trained: every weight moves
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.01)
    out = tmp_path / "export"
    save_release(model.state_dict(), omni[layout], out, backbone=model.cfg.backbone, max_shard_bytes=200_000)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen2_5OmniModel"] and config["model_type"] == "qwen2_5_omni"
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1 and "thinker.audio_tower.audio_bos_eos_token.weight" in index
    assert all(k.startswith(("thinker.", "talker.", "token2wav.")) for k in index)
    if layout == "release":  # the source's config is kept, talker tensors carried through
        source = json.loads((omni[layout] / "config.json").read_text())
        assert config == {**source, "architectures": ["Qwen2_5OmniModel"]} and "talker.codec_head.weight" in index
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "spk_dict.pt"):
        assert (out / name).is_file(), name

    thinker, info = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    unexpected = sorted(info["unexpected_keys"])
    assert all(k.startswith(("talker.", "token2wav.")) for k in unexpected), unexpected
    batch = text_batch(tokenizer)
    with torch.no_grad():
        logits = model(batch, return_logits=True).logits
        difference = float((thinker.eval()(input_ids=batch["input_ids"], use_cache=False).logits - logits).abs().max())
    print(f"{layout}: export vs ours, text logits max difference {difference:.2e}")
    assert difference < 1e-4
    if layout == "thinker":  # no talker in the source: the whole-model class loads it too (enable_audio_output false)
        whole = Qwen2_5OmniForConditionalGeneration.from_pretrained(str(out)).eval()
        with torch.no_grad():
            assert float((whole.thinker(input_ids=batch["input_ids"], use_cache=False).logits - logits).abs().max()) < 1e-4


# ------------------------------------------------------------------------- whole-thinker parity on real media


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    from omni_train.data import synth

    root = tmp_path_factory.mktemp("omni_media")
    synth.speech(root / "speech.flac", "three plus five", voice="en-us")
    synth.tone(root / "odd.wav", 1.137, frequency_hz=330.0, sample_rate_hz=16000)   # 1819.2 hops: ceil counts a frame
    synth.tone(root / "long.wav", 31.37, frequency_hz=220.0, sample_rate_hz=16000)  # two windows, odd tail dropped
    for i, (w, h) in enumerate([(112, 84), (300, 120)]):
        synth.pattern_image(root / f"image{i}.png", w, h, seed=i)
    synth.test_pattern_video(root / "silent.mp4", 2.6, fps=10, width=160, height=120)
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc=duration=4.6:size=160x120:rate=10",
                    "-f", "lavfi", "-i", "sine=frequency=300:duration=3.1", "-c:v", "libx264", "-pix_fmt", "yuv420p",
                    "-c:a", "aac", str(root / "talk.mp4")], check=True)
    return root


def decoded(cfg, tokenizer, media_root: Path, messages: list[dict]):
    """One sample through the training pipeline's decode_sample: decoding, chat template, TMRoPE positions."""
    from omni_train.data.pipeline import decode_sample

    raw = {"json": json.dumps({"messages": messages}).encode()}
    for message in messages:
        for part in message["content"]:
            if "member" in part:
                raw[part["member"]] = (media_root / part["member"]).read_bytes()
    return decode_sample(raw, "mem:doc", cfg.data, tokenizer)


def hf_inputs(sample) -> dict:
    """transformers' thinker inputs for one rendered document: the same ids, mel frames, patches and grids."""
    audios = [a for m in sample.media for a in ([m] if m.modality == "audio" else [m.audio] if m.audio else [])]
    images = [m for m in sample.media if m.modality == "image"]
    videos = [m for m in sample.media if m.modality == "video"]
    # an attention mask: without one, transformers cannot compute its 3-D positions and silently falls back to 1-D
    inputs = {"input_ids": sample.input_ids[None], "attention_mask": torch.ones_like(sample.input_ids[None]), "use_cache": False,
              "use_audio_in_video": any(v.audio is not None for v in videos)}
    if audios:
        longest = max(a.tensors["mel"].shape[1] for a in audios)
        inputs["input_features"] = torch.stack([F.pad(a.tensors["mel"], (0, longest - a.tensors["mel"].shape[1]))
                                                for a in audios])
        inputs["feature_attention_mask"] = torch.stack([(torch.arange(longest) < a.tensors["mel"].shape[1]).long()
                                                        for a in audios])
    if images:
        inputs["pixel_values"] = torch.cat([m.tensors["patches"] for m in images])
        inputs["image_grid_thw"] = torch.stack([m.tensors["grid_thw"] for m in images])
    if videos:
        inputs["pixel_values_videos"] = torch.cat([m.tensors["patches"] for m in videos])
        inputs["video_grid_thw"] = torch.stack([m.tensors["grid_thw"] for m in videos])
        inputs["video_second_per_grid"] = torch.tensor([v.seconds_per_grid for v in videos])
    return inputs


def turn(*parts) -> list[dict]:
    return [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]


def conversation(*user_parts, answer: str = "eight") -> list[dict]:
    return [{"role": "user", "content": turn(*user_parts)}, {"role": "assistant", "content": turn(answer)}]


DOCUMENTS = {
    "text": conversation("What is three plus five?"),
    "audio": conversation({"type": "audio", "member": "speech.flac"}, "and", {"type": "audio", "member": "odd.wav"}),
    "long_audio": conversation({"type": "audio", "member": "long.wav"}, "What was that?", answer="a tone"),
    "images": conversation({"type": "image", "member": "image0.png"}, {"type": "image", "member": "image1.png"}, "Which?"),
    "video": conversation({"type": "video", "member": "silent.mp4"}, "What happens?", answer="a test pattern"),
    "audio_in_video": conversation({"type": "video", "member": "talk.mp4", "use_audio_in_video": True}, "Heard?",
                                   answer="a beep"),
    "turns": [{"role": "system", "content": turn("You see and hear.")}, *conversation(
        {"type": "audio", "member": "odd.wav"}, {"type": "image", "member": "image1.png"}, "What?", answer="tone"),
        {"role": "user", "content": turn({"type": "video", "member": "silent.mp4"}, "And?")},
        {"role": "assistant", "content": turn("a counter")}],
}


@pytest.fixture(scope="module")
def thinker_model(omni):
    return ours(omni["release"])


@pytest.mark.parametrize("name", list(DOCUMENTS))
def test_thinker_logits_equal_transformers_on_real_media(omni, media, thinker_model, name):
    from omni_train.data.packing import collate_packed

    model, tokenizer, cfg = thinker_model
    sample = decoded(cfg, tokenizer, media, DOCUMENTS[name])
    batch = collate_packed([[sample]], len(sample), tokenizer.pad_id, cfg.data.audio)
    assert batch["position_ids"].shape == (3, 1, len(sample))
    with torch.no_grad():
        logits = model(batch, return_logits=True).logits[0]
        reference = omni["reference"](**hf_inputs(sample)).logits[0]
    difference = float((logits - reference).abs().max())
    print(f"{name}: {len(sample)} tokens, media {[m.modality for m in sample.media]}, logits max difference {difference:.2e}")
    assert difference < 1e-4
    if name == "images":  # the 3-D positions are what makes it equal: 1-D ones give another model
        batch["position_ids"] = torch.arange(len(sample))[None]
        with torch.no_grad():
            assert float((model(batch, return_logits=True).logits[0] - reference).abs().max()) > 1e-3


def test_documents_packed_in_one_row_equal_each_alone_in_transformers(omni, media, thinker_model):
    assert packed_difference(thinker_model, omni["reference"], media) < 1e-4


def packed_difference(thinker_model, reference_model, media) -> float:
    """The largest logit difference of documents packed two to a row against each alone in transformers (printed)."""
    from omni_train.data.packing import collate_packed

    model, tokenizer, cfg = thinker_model
    docs = [decoded(cfg, tokenizer, media, DOCUMENTS[name]) for name in ("audio_in_video", "text", "turns", "images")]
    rows = [docs[:2], docs[2:]]
    seq_len = max(sum(len(d) for d in row) for row in rows) + 7
    batch = collate_packed(rows, seq_len, tokenizer.pad_id, cfg.data.audio)
    with torch.no_grad():
        logits = model(batch, return_logits=True).logits
        worst = 0.0
        for r, row in enumerate(rows):
            offset = 0
            for doc in row:
                reference = reference_model(**hf_inputs(doc)).logits[0]
                worst = max(worst, float((logits[r, offset:offset + len(doc)] - reference).abs().max()))
                offset += len(doc)
    print(f"packed rows of {[len(d) for d in docs]} tokens: logits max difference {worst:.2e}")
    return worst
