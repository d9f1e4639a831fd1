"""Qwen3-Omni's whole thinker as an omni_train model (issue 16): `model.pretrained` in both layouts, against
transformers' own `Qwen3OmniMoeThinkerForConditionalGeneration` built tiny and random (nothing downloaded).

The thinker holds every new part at once: the mixture-of-experts text model with interleaved M-RoPE, the Conv2d
audio tower with attention windows across our 30 s windows, the vision tower with its position table and
deepstack, and TMRoPE at 13 ids a second. Real media go through the training pipeline's decoding and chat
template (the checkpoint's own markers), and the logits equal transformers' for each document of
`test_qwen_omni.DOCUMENTS` (text, speech and a 1.1 s tone, 31 s of audio, two images, a video, a video with its
audio, several turns) and for documents packed into rows.
"""

from __future__ import annotations

import json

import pytest
import torch
from qwen_omni import save_thinker, tiny_thinker, tiny_tokenizer
from test_qwen_omni import DOCUMENTS, decoded, hf_inputs, media, ours, packed_difference  # noqa: F401 (media: a fixture)

from omni_train.data.packing import collate_packed

pytest.importorskip("transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe")


@pytest.fixture(scope="module")
def omni3(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("omni3")
    tokenizer = tiny_tokenizer(root / "tokenizer", family="qwen3")
    reference = tiny_thinker(tokenizer, family="qwen3")
    return {"tokenizer": tokenizer, "reference": reference,
            "release": save_thinker(reference, root / "release", tokenizer, layout="release"),
            "thinker": save_thinker(reference, root / "thinker", tokenizer, layout="thinker")}


@pytest.fixture(scope="module")
def thinker3(omni3):
    return ours(omni3["release"])


@pytest.mark.parametrize("layout", ["release", "thinker"])
def test_pretrained_reads_both_layouts_with_the_checkpoints_tokenizer_and_processor(omni3, media, layout):
    model, tokenizer, cfg = ours(omni3[layout])
    assert cfg.model.positions == "tmrope_qwen3" and cfg.model.backbone.moe is not None
    assert (cfg.model.audio.stem, cfg.model.vision.positions, cfg.model.vision.deepstack_layers) == (
        "conv2d", "learned_rope2d", [0, 2])
    assert (cfg.data.audio.downsample, cfg.data.audio.chunk_frames, cfg.data.audio.valid_frames) == (8, 100, "ceil")
    from transformers.image_utils import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD  # Qwen3-VL's processor's

    assert cfg.data.image.patch_size == 16 and cfg.data.image.mean == tuple(IMAGENET_STANDARD_MEAN)
    assert cfg.data.image.std == tuple(IMAGENET_STANDARD_STD)
    assert tokenizer.num_added == 0 and tokenizer.native["<|image_start|>"] == "<|vision_start|>"
    merger = omni3["reference"].get_submodule("model.visual.merger_list.1.mlp.2")  # saved as visual.merger_list.1...
    assert torch.equal(model.state_dict()["vision_deepstack.1.fc2.weight"], merger.weight)
    sample = decoded(cfg, tokenizer, media, DOCUMENTS["turns"])  # audio, an image and a video: every tower's weights
    with torch.no_grad():
        logits = model(collate_packed([[sample]], len(sample), tokenizer.pad_id, cfg.data.audio), return_logits=True).logits
        assert float((logits[0] - omni3["reference"](**hf_inputs(sample)).logits[0]).abs().max()) < 1e-4


@pytest.mark.parametrize("name", list(DOCUMENTS))
def test_thinker_logits_equal_transformers_on_real_media(omni3, media, thinker3, name):
    model, tokenizer, cfg = thinker3
    sample = decoded(cfg, tokenizer, media, DOCUMENTS[name])
    assert sample.position_ids.dtype == torch.float32
    batch = collate_packed([[sample]], len(sample), tokenizer.pad_id, cfg.data.audio)
    with torch.no_grad():
        logits = model(batch, return_logits=True).logits[0]
        reference = omni3["reference"](**hf_inputs(sample)).logits[0]
    difference = float((logits - reference).abs().max())
    print(f"{name}: {len(sample)} tokens, media {[m.modality for m in sample.media]}, logits max difference {difference:.2e}")
    assert difference < 1e-4


def test_documents_packed_in_one_row_equal_each_alone_in_transformers(omni3, media, thinker3):
    assert packed_difference(thinker3, omni3["reference"], media) < 1e-4


def test_a_checkpoint_with_other_position_ids_per_second_is_one_error(omni3, tmp_path):
    import shutil

    from test_qwen_omni import recipe_for

    from omni_train.config import RecipeError

    bad = tmp_path / "bad"
    shutil.copytree(omni3["release"], bad)
    config = json.loads((bad / "config.json").read_text())
    del config["thinker_config"]["position_id_per_seconds"]  # the config class's default, 25, is not the release's 13
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(RecipeError, match=r"thinker_config.position_id_per_seconds=25 is not supported"):
        recipe_for(bad)


@pytest.mark.parametrize("layout", ["release", "thinker"])
def test_streaming_into_zero3_partitions_gives_the_whole_map(omni3, thinker3, layout):
    """iter_thinker_state (ZeRO-3's loader: one tensor at a time, one layer's experts held until fused) yields exactly
    the tensors the whole-checkpoint map gives, and every one of the model's."""
    from omni_train.model.qwen2_5_omni import iter_checkpoint_tensors, iter_thinker_state, read_omni_checkpoint
    from omni_train.model.qwen3_omni import qwen3_thinker_to_omni_state_dict

    model, _, cfg = thinker3
    streamed = dict(iter_thinker_state(omni3[layout], cfg.model.backbone))
    checkpoint = read_omni_checkpoint(omni3[layout])
    whole = qwen3_thinker_to_omni_state_dict(dict(iter_checkpoint_tensors(checkpoint)), cfg.model.backbone)
    assert set(streamed) == set(whole) == set(model.state_dict())
    assert all(torch.equal(streamed[key], whole[key]) for key in whole)
    assert streamed["backbone.layers.0.mlp.gate_up_proj"].shape == (4, 2 * 32, 64)  # 4 experts fused from 12 keys


@pytest.mark.parametrize("layout", ["release", "thinker"])
def test_release_export_loads_in_transformers_with_every_key_and_equal_logits(omni3, media, tmp_path, layout):
    """save_release (what `omni-train export --format hf` writes) of a changed model: the release layout with the
    experts one key each and qkv fused, which transformers loads with no missing or mismatched key and whose logits
    on a document with audio, an image and a video are ours."""
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (Qwen3OmniMoeForConditionalGeneration,
                                                                            Qwen3OmniMoeThinkerForConditionalGeneration)

    from omni_train.model.qwen2_5_omni import save_release

    model, tokenizer, cfg = ours(omni3[layout])
    with torch.no_grad():  # as if trained: every weight moves
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.01)
    out = tmp_path / "export"
    save_release(model.state_dict(), omni3[layout], out, backbone=model.cfg.backbone, max_shard_bytes=200_000)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3OmniMoeForConditionalGeneration"] and config["model_type"] == "qwen3_omni_moe"
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert "thinker.model.layers.0.mlp.experts.3.down_proj.weight" in index and "thinker.visual.blocks.2.attn.qkv.bias" in index
    if layout == "release":
        assert "talker.codec_head.weight" in index and "code2wav.code_embedding.weight" in index  # carried through

    sample = decoded(cfg, tokenizer, media, DOCUMENTS["turns"])
    batch = collate_packed([[sample]], len(sample), tokenizer.pad_id, cfg.data.audio)
    thinker, info = Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    assert all(k.startswith(("talker.", "code2wav.")) for k in info["unexpected_keys"]), info["unexpected_keys"]
    with torch.no_grad():
        logits = model(batch, return_logits=True).logits[0]
        difference = float((thinker.eval()(**hf_inputs(sample)).logits[0] - logits).abs().max())
    print(f"{layout}: export vs ours on {[m.modality for m in sample.media]}, logits max difference {difference:.2e}")
    assert difference < 1e-4
    if layout == "thinker":  # no talker in the source: the whole-model class loads it too (enable_audio_output false)
        whole = Qwen3OmniMoeForConditionalGeneration.from_pretrained(str(out)).eval()
        with torch.no_grad():
            assert float((whole.thinker(**hf_inputs(sample)).logits[0] - logits).abs().max()) < 1e-4


def test_greedy_generation_equals_transformers_with_deepstack_in_the_prompt(omni3, media, thinker3):
    """generate_ids (what the probes call: deepstack's additions padded with the prompt, positions continued past
    its largest id) gives transformers' greedy tokens after a prompt with audio, an image and a video."""
    from omni_train.data.text import render_prompt
    from omni_train.probes.generate import _fuse_prompts, generate_ids

    model, tokenizer, cfg = thinker3
    messages = DOCUMENTS["turns"]
    sample = decoded(cfg, tokenizer, media, messages)
    prompt = render_prompt(messages, sample.media, tokenizer, positions=cfg.data.positions)
    ours = generate_ids(model, [prompt], tokenizer, max_new_tokens=8, audio_cfg=cfg.data.audio, stop_ids=[])[0]
    inputs = hf_inputs(prompt)
    with torch.no_grad():  # the generation path's first step: its fused prompt through the backbone, as generate_ids
        embeds, positions, documents, last, _, (memory, deepstack) = _fuse_prompts(
            model, [prompt], tokenizer, room=0, audio_cfg=cfg.data.audio)
        hidden = model.backbone(inputs_embeds=embeds, position_ids=positions, document_ids=documents,
                                after_layer=model.after_layer(memory, documents, deepstack))
        first = model.backbone.logits(hidden[0, int(last[0])])
        difference = float((first - omni3["reference"](**inputs).logits[0, -1]).abs().max())
    assert deepstack is not None and difference < 1e-4, difference
    inputs.pop("use_cache")
    with torch.no_grad():
        theirs = omni3["reference"].generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                             pad_token_id=tokenizer.pad_id)[0, len(prompt):].tolist()
    print(f"greedy after {len(prompt)} prompt tokens: ours {ours}, transformers {theirs}")
    assert ours == theirs
