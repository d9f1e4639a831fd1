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
def test_pretrained_reads_both_layouts_with_the_checkpoints_tokenizer_and_processor(omni3, layout):
    model, tokenizer, cfg = ours(omni3[layout])
    assert cfg.model.positions == "tmrope_qwen3" and cfg.model.backbone.moe is not None
    assert (cfg.model.audio.stem, cfg.model.vision.positions, cfg.model.vision.deepstack_layers) == (
        "conv2d", "learned_rope2d", [0, 2])
    assert (cfg.data.audio.downsample, cfg.data.audio.chunk_frames, cfg.data.audio.valid_frames) == (8, 100, "ceil")
    assert cfg.data.image.patch_size == 16
    assert tokenizer.num_added == 0 and tokenizer.native["<|image_start|>"] == "<|vision_start|>"
    merger = omni3["reference"].get_submodule("model.visual.merger_list.1.mlp.2")  # saved as visual.merger_list.1...
    assert torch.equal(model.state_dict()["vision_deepstack.1.fc2.weight"], merger.weight)


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
