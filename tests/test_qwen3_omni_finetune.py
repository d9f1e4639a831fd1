"""recipes/qwen3-omni-30b-a3b-meeting.yaml on its tiny twin, a tiny random Qwen3-Omni thinker (issue 16): LoRA on
attention and every expert under DeepSpeed ZeRO-3 on 2 ranks, the thinker born partitioned and streamed in (one
layer's experts at a time), on meeting folder shards and a ShareGPT manifest with audio, images and video; the
held-out loss falls, the experts move, and `omni-train export --format hf` loads in transformers with every key and
our logits. About 90 s: marked slow."""

from __future__ import annotations

import json

import pytest
import torch

from qwen_omni import save_thinker, tiny_thinker, tiny_tokenizer
from test_finetune import held_out_loss
from test_qwen_omni import hf_inputs
from test_qwen_omni_finetune import finetune_on_tiny_twin

from omni_train.cli import main as cli

STEPS = 30
# The fine-tuned model's held-out loss over the base thinker's: 5.953 -> 5.546 (0.932) measured with AVX-512 kernels;
# the limit asks for under half that fall.
MAX_HELD_OUT_LOSS_RATIO = 0.97


@pytest.mark.slow
@pytest.mark.outcome
@pytest.mark.multiproc
def test_lora_on_experts_under_zero3_lowers_held_out_loss(tmp_path, capsys):
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeThinkerForConditionalGeneration

    from omni_train.config import load_recipe
    from omni_train.data.packing import collate_packed
    from omni_train.data.pipeline import decode_sample, read_entry
    from omni_train.data.text import Tokenizer
    from omni_train.probes.runner import ProbeConfig, list_items
    from omni_train.model.omni import build_model
    from omni_train.train.runs import load_run

    tokenizer = tiny_tokenizer(tmp_path / "tokenizer", family="qwen3")
    release = save_thinker(tiny_thinker(tokenizer, family="qwen3"), tmp_path / "release", tokenizer, layout="release")
    tuned_run = finetune_on_tiny_twin("recipes/qwen3-omni-30b-a3b-meeting.yaml", release, tmp_path, steps=STEPS)
    run, output = tuned_run["run"], tuned_run["output"]
    cfg = load_recipe(run / "config.yaml")
    assert (cfg.train.zero_stage, cfg.model.positions, cfg.data.audio.chunk_frames) == (3, "tmrope_qwen3", 100)
    assert "in LoRA adapters" in output and not (run / "base").exists()
    adapter = json.loads(next((run / "checkpoints").glob("step_*/adapter.json")).read_text())
    assert adapter["base"] == str(release)
    tokenizer = Tokenizer.from_path(cfg.data.tokenizer)
    base = build_model(cfg.model, vocab_size=tokenizer.vocab_size).eval()
    tuned = load_run(run, merge=True)[0]
    before, after = held_out_loss(base, cfg, tokenizer), held_out_loss(tuned, cfg, tokenizer)
    with capsys.disabled():
        print(f"\nQwen3-Omni thinker, LoRA on attention and experts under ZeRO-3: held-out loss {before:.4f} -> "
              f"{after:.4f} (ratio {after / before:.3f}, limit {MAX_HELD_OUT_LOSS_RATIO})")
    assert after < before * MAX_HELD_OUT_LOSS_RATIO
    # the experts moved: merged weights differ from the base's in every sparse layer
    moved = [name for name, p in tuned.named_parameters() if "gate_up_proj" in name
             and not p.detach().equal(base.state_dict()[name])]
    assert len(moved) == sum(1 for name, _ in base.named_parameters() if "gate_up_proj" in name) > 0

    # `omni-train export --format hf`: transformers loads the release layout with every key and gives our logits
    out = tmp_path / "export"
    assert cli(["export", "--run", str(run), "--out", str(out), "--format", "hf"]) == 0
    hf, info = Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    assert all(k.startswith(("talker.", "code2wav.")) for k in info["unexpected_keys"]), info["unexpected_keys"]
    items = list_items(ProbeConfig(name="x", shards=tuned_run["meeting"]["eval"], max_items=2))
    items += [i for i in list_items(ProbeConfig(name="x", shards=str(tmp_path / "corpus" / "shards" / "train-*.tar")))
              if i.user_media() in (["image"], ["video"])]
    samples = [decode_sample(read_entry(i.url, i.entry), i.id, cfg.data, tokenizer) for i in items]
    assert {m.modality for s in samples for m in s.media} == {"audio", "image", "video"}
    worst = 0.0
    with torch.no_grad():
        for sample in samples:
            ours = tuned(collate_packed([[sample]], len(sample), tokenizer.pad_id, cfg.data.audio), return_logits=True).logits[0]
            worst = max(worst, float((hf.eval()(**hf_inputs(sample)).logits[0] - ours).abs().max()))
    with capsys.disabled():
        print(f"export vs ours: logits max difference {worst:.2e} over {len(samples)} samples")
    assert worst < 1e-4
