"""recipes/qwen2.5-omni-3b-meeting.yaml on a tiny random Qwen2.5-Omni thinker: LoRA under DeepSpeed ZeRO-3 on 2
ranks, on meeting folder shards and a ShareGPT manifest with audio, images and video; the held-out loss falls; the
`--format hf` export loads in transformers with every key, gives our logits, and generates what `omni-train probe` did."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import build_corpus
from distributed import torchrun
from qwen_omni import save_thinker, tiny_thinker, tiny_tokenizer
from test_finetune import build_meeting_shards, held_out_loss
from test_qwen_omni import hf_inputs

from omni_train.cli import main as cli

STEPS = 40
PROBE = ("{name: meeting, shards: '%s', tasks: [transcribe], max_items: 3, max_new_tokens: 12, batch_size: 3, "
         "metrics: [wer, cer]}")
# The fine-tuned model's held-out loss over the base thinker's: 5.959 -> 5.604 (0.940) measured with AVX-512 kernels;
# the limit asks for half that fall.
MAX_HELD_OUT_LOSS_RATIO = 0.97


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("omni_finetune")
    tokenizer = tiny_tokenizer(root / "tokenizer")
    release = save_thinker(tiny_thinker(tokenizer), root / "release", tokenizer, layout="release", talker=False)
    return {"root": root, "release": release,
            **finetune_on_tiny_twin("recipes/qwen2.5-omni-3b-meeting.yaml", release, root, steps=STEPS)}


def finetune_on_tiny_twin(recipe: str, release: Path, root: Path, *, steps: int) -> dict:
    """`recipe` on 2 CPU ranks from the tiny thinker `release`: meeting folder shards and a ShareGPT manifest
    (speech, tones, images, videos, text), fp32, short rows; {"meeting", "run", "output"}."""
    meeting = build_meeting_shards(root / "meeting", minutes=2)
    corpus = build_corpus(root / "corpus")
    run = root / "run"
    result = torchrun(
        "launch/finetune.py", "--recipe", recipe, f"model.pretrained={release}",
        f"name={run.name}", f"output_dir={run}", "data.seq_len=1536", "data.num_workers=0", "data.pack_pool=8",
        f"data.train=[{{shards: '{meeting['train']}'}}, {{shards: '{corpus['pattern']}'}}]",
        f"data.eval.0.shards={meeting['eval']}", "train.precision=fp32", "train.tracker=none", "train.progress=false",
        f"train.steps={steps}", "train.log_every=5", f"train.eval_every={steps}", f"train.checkpoint_every={steps}",
        "train.warmup_steps=3", "train.lr=5e-3", "train.loss_chunk_tokens=96", "train.probes_at_start=false",
        f"probes=[{PROBE % meeting['eval']}]", timeout_s=900)
    return {"meeting": meeting, "run": run, "output": result.stdout + result.stderr}


@pytest.mark.outcome
@pytest.mark.multiproc
def test_lora_zero3_finetune_lowers_held_out_loss(finetuned, capsys):
    from omni_train.config import load_recipe
    from omni_train.data.text import Tokenizer
    from omni_train.model.omni import build_model
    from omni_train.train.runs import load_run

    run = finetuned["run"]
    cfg = load_recipe(run / "config.yaml")
    assert (cfg.train.zero_stage, cfg.model.positions, cfg.data.positions) == (3, "tmrope", "tmrope")
    assert "in LoRA adapters" in finetuned["output"]
    # the thinker is its own frozen base: read again from its directory, never copied into the run
    assert not (run / "base").exists()
    adapter = json.loads(next((run / "checkpoints").glob("step_*/adapter.json")).read_text())
    assert adapter["base"] == str(finetuned["release"])
    tokenizer = Tokenizer.from_path(cfg.data.tokenizer)
    base = build_model(cfg.model, vocab_size=tokenizer.vocab_size).eval()
    tuned = load_run(run, merge=True)[0]
    before, after = held_out_loss(base, cfg, tokenizer), held_out_loss(tuned, cfg, tokenizer)
    with capsys.disabled():
        print(f"\nQwen2.5-Omni thinker LoRA ZeRO-3, held-out loss {before:.4f} -> {after:.4f} "
              f"(ratio {after / before:.3f}, limit {MAX_HELD_OUT_LOSS_RATIO})")
    assert after < before * MAX_HELD_OUT_LOSS_RATIO


@pytest.mark.multiproc
def test_hf_export_loads_in_transformers_with_our_logits_and_generations(finetuned, tmp_path, capsys):
    from transformers import Qwen2_5OmniForConditionalGeneration, Qwen2_5OmniThinkerForConditionalGeneration

    from omni_train.data.packing import collate_packed
    from omni_train.data.pipeline import decode_sample, read_entry
    from omni_train.data.text import render_prompt
    from omni_train.probes.generate import generate_ids
    from omni_train.probes.runner import ProbeConfig, list_items
    from omni_train.train.runs import load_run

    run, out = finetuned["run"], tmp_path / "export"
    assert cli(["export", "--run", str(run), "--out", str(out), "--format", "hf"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen2_5OmniModel"] and "thinker_config" in config
    marker = json.loads((out / "omni_train_export.json").read_text())
    assert marker["source"]["lora"] == "merged" and marker["source"]["step"] == STEPS

    hf, info = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(str(out), output_loading_info=True)
    hf = hf.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    whole = Qwen2_5OmniForConditionalGeneration.from_pretrained(str(out))  # the release's own class loads it too
    assert torch.equal(whole.thinker.lm_head.weight, hf.lm_head.weight)
    model, cfg, tokenizer, _ = load_run(run, merge=True)

    # logits: held-out meeting audio and the manifest's image and video samples
    items = list_items(ProbeConfig(name="x", shards=finetuned["meeting"]["eval"], max_items=3))
    samples = [decode_sample(read_entry(i.url, i.entry), i.id, cfg.data, tokenizer) for i in items]
    corpus = finetuned["root"] / "corpus" / "shards"
    for i in list_items(ProbeConfig(name="x", shards=str(corpus / "train-*.tar"))):
        if i.user_media() in (["image"], ["video"], ["audio", "image"]):
            samples.append(decode_sample(read_entry(i.url, i.entry), i.id, cfg.data, tokenizer))
    assert {m.modality for s in samples for m in s.media} == {"audio", "image", "video"}
    worst = 0.0
    with torch.no_grad():
        for sample in samples:
            ours = model(collate_packed([[sample]], len(sample), tokenizer.pad_id, cfg.data.audio), return_logits=True).logits[0]
            worst = max(worst, float((hf(**hf_inputs(sample)).logits[0] - ours).abs().max()))
    # generations: `omni-train probe` on the exported checkpoint, then transformers' greedy decoding of the same prompts
    assert cli(["probe", "--run", str(run)]) == 0
    examples = [json.loads(line) for line in (run / "probe_examples.jsonl").read_text().splitlines()]
    ours_by_id = {e["id"]: e["prediction"] for e in examples if e["step"] == STEPS}
    assert len(ours_by_id) == 3
    stops = [tokenizer.im_end_id, tokenizer.endoftext_id]  # where the probe stops a generation
    prompts = [render_prompt(item.sample["messages"], sample.media, tokenizer, positions=cfg.data.positions)
               for item, sample in zip(items, samples)]
    # and 24 tokens past any stop, so that the comparison covers more than the model's first choice
    long_ours = generate_ids(model, prompts, tokenizer, max_new_tokens=24, audio_cfg=cfg.data.audio, stop_ids=[])
    same_text = same_ids = 0
    for item, prompt, ours_ids in zip(items, prompts, long_ours):
        inputs = hf_inputs(prompt)
        inputs.pop("use_cache")
        with torch.no_grad():
            stopped = hf.generate(**inputs, max_new_tokens=12, do_sample=False, eos_token_id=stops,
                                  pad_token_id=tokenizer.pad_id)[0, len(prompt):].tolist()
            unstopped = hf.generate(**inputs, max_new_tokens=24, min_new_tokens=24, do_sample=False,
                                    pad_token_id=tokenizer.pad_id)[0, len(prompt):].tolist()
        text = tokenizer.decode([i for i in stopped if i not in stops])
        with capsys.disabled():
            print(f"{item.id}: omni-train probe {ours_by_id[item.id]!r}, transformers {text!r}; 24 tokens without "
                  f"stopping: ours {tokenizer.decode(ours_ids, skip_special=False)!r}")
        same_text += text == ours_by_id[item.id]
        same_ids += unstopped == ours_ids
    with capsys.disabled():
        print(f"export vs ours: logits max difference {worst:.2e} over {len(samples)} samples; probe generations "
              f"equal {same_text}/{len(items)}, 24-token greedy continuations equal {same_ids}/{len(items)}")
    assert worst < 1e-4
    assert same_text == same_ids == len(items)


@pytest.mark.multiproc
def test_full_finetune_under_zero3_streams_the_thinker_into_partitions(finetuned, tmp_path):
    """No LoRA: the model is born partitioned and the checkpoint streamed in tensor by tensor (train/zero3.py);
    after two steps at a learning rate of 1e-9 the consolidated weights are the thinker's."""
    from omni_train.config import load_recipe
    from omni_train.data.text import Tokenizer
    from omni_train.model.omni import build_model
    from omni_train.train.runs import load_run

    run, meeting = tmp_path / "full", finetuned["meeting"]
    torchrun("launch/finetune.py", "--recipe", "recipes/qwen2.5-omni-3b-meeting.yaml", f"model.pretrained={finetuned['release']}",
             f"name={run.name}", f"output_dir={run}", "data.seq_len=1536", "data.num_workers=0", "data.pack_pool=4",
             f"data.train.0.shards={meeting['train']}", f"data.eval.0.shards={meeting['eval']}", "train.lora=null",
             "train.precision=fp32", "train.tracker=none", "train.progress=false", "train.steps=2", "train.eval_every=0",
             "train.checkpoint_every=2", "train.warmup_steps=0", "train.lr=1e-9", "train.probes_at_start=false",
             "train.loss_chunk_tokens=0",
             "probes=[]", timeout_s=600)
    cfg = load_recipe(run / "config.yaml")
    reference = build_model(cfg.model, vocab_size=Tokenizer.from_path(cfg.data.tokenizer).vocab_size).state_dict()
    trained = load_run(run)[0].state_dict()
    assert trained.keys() == reference.keys()
    difference = max(float((trained[k] - reference[k]).abs().max()) for k in reference)
    print(f"full fine-tune, ZeRO-3 streamed load: max weight difference to the thinker after 2 steps at lr 1e-9: {difference:.1e}")
    assert difference < 1e-6
