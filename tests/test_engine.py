"""The engine in one process: staged schedules, frozen modules, lr scales, checkpoints, pretrained backbones,
and a fusion's own modules (model.fusion cross_attn / resampler) as a group of their own for stages and LoRA."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from omni_train.config import load_recipe
from omni_train.data import synth
from omni_train.data.image import encode_image
from omni_train.config import RecipeError
from omni_train.data.packing import collate_packed
from omni_train.data.sequence_tokens import apply_sequence_tokens
from omni_train.data.text import Tokenizer, render_chat
from omni_train.model.omni import build_model
from omni_train.train.engine import Engine, init_distributed
from omni_train.train.lora import is_adapter_parameter
from omni_train.train.runs import build_run_model


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    cfg = load_recipe("recipes/smoke.yaml")
    tokenizer = Tokenizer.byte_level()
    image = encode_image(synth.pattern_image(tmp_path_factory.mktemp("img") / "i.png", 120, 90).read_bytes(), cfg.data.image)
    sample = render_chat([{"role": "user", "content": [{"type": "image", "member": "image_0.png"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "green bands on blue"}]}], [image], tokenizer)
    return collate_packed([[sample]], 256, tokenizer.pad_id, cfg.data.audio)


def make_engine(*overrides: str) -> Engine:
    cfg = load_recipe("recipes/smoke.yaml", ["train.engine=single", "train.warmup_steps=0", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size=Tokenizer.byte_level().vocab_size)
    return Engine(model, cfg.train, init_distributed("single"), micro_batch_size=1)


def snapshot(engine: Engine, prefix: str) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in engine.module.named_parameters() if n.startswith(prefix)}


def changed(before: dict, engine: Engine) -> bool:
    params = dict(engine.module.named_parameters())
    return any(not torch.equal(v, params[n]) for n, v in before.items())


def test_stage_trains_only_its_modules_then_everything(batch):
    engine = make_engine("train.stages=[{until_step: 2, train: [vision_projector]}]")
    backbone, projector = snapshot(engine, "backbone."), snapshot(engine, "vision_projector.")
    for _ in range(2):
        engine.train_step([batch])
    assert changed(projector, engine) and not changed(backbone, engine)
    engine.train_step([batch])
    assert changed(backbone, engine)


def test_frozen_module_and_lr_scale(batch):
    engine = make_engine("train.modules={vision_encoder: {freeze: true}, audio_projector: {lr_scale: 0.5}}")
    frozen = snapshot(engine, "vision_encoder.")
    assert all(not p.requires_grad for n, p in engine.module.named_parameters() if n.startswith("vision_encoder."))
    engine.train_step([batch])
    assert not changed(frozen, engine)
    lrs = {g["name"]: g["lr"] for g in engine.optimizer.param_groups}
    assert "vision_encoder" not in lrs and lrs["audio_projector"] == pytest.approx(0.5 * lrs["backbone"])
    with pytest.raises(ValueError, match="train.modules names \\['vison_encoder'\\]"):
        make_engine("train.modules={vison_encoder: {freeze: true}}")


def test_warmup_stable_decay_holds_the_learning_rate_until_the_last_decay_steps(batch):
    engine = make_engine("train.steps=10", "train.warmup_steps=2", "train.decay_steps=4", "train.min_lr_ratio=0.1",
                         "train.lr=1e-3")
    lrs = []
    for _ in range(10):
        lrs.append(engine.lr())
        engine.train_step([batch])
    lrs.append(engine.lr())
    assert lrs[:2] == pytest.approx([5e-4, 1e-3])                 # warmup
    assert lrs[2:7] == pytest.approx([1e-3] * 5)                  # stable until step 6 = 10 - 4
    assert lrs[6] > lrs[7] > lrs[8] > lrs[9] > lrs[10] == pytest.approx(1e-4)  # cosine over the last 4 steps
    plain = make_engine("train.steps=10", "train.warmup_steps=2", "train.min_lr_ratio=0.1", "train.lr=1e-3")
    plain.train_step([batch]), plain.train_step([batch]), plain.train_step([batch])
    assert plain.lr() < 1e-3                                      # decay_steps=0: the cosine starts after warmup


def test_single_engine_checkpoint_round_trip(batch, tmp_path):
    engine = make_engine()
    engine.train_step([batch])
    engine.save(tmp_path)
    next_loss = engine.train_step([batch])["loss"]
    restored = make_engine()
    restored.load(tmp_path)
    assert restored.train_step([batch])["loss"] == next_loss


def test_pretrained_qwen3_backbone_from_a_local_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.Qwen3Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)
    torch.manual_seed(0)
    reference = transformers.Qwen3ForCausalLM(hf_cfg).eval()
    reference.save_pretrained(tmp_path, safe_serialization=True)
    cfg = load_recipe("recipes/smoke.yaml", [f"model.pretrained_backbone={tmp_path}"])
    model = build_model(cfg.model, vocab_size=310).eval()  # the tokenizer added 10 special tokens
    assert model.backbone.embed_tokens.weight.shape == (310, 64) and model.backbone.lm_head.weight.shape == (310, 64)
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        ours = model.backbone.logits(model.backbone(ids, position_ids=torch.arange(12)[None], document_ids=torch.zeros_like(ids)))
        theirs = reference(ids).logits
    assert (ours[..., :300] - theirs).abs().max() < 1e-4


FUSIONS_WITH_MODULES = ["cross_attn", "resampler"]
SMALL = {"cross_attn": "model.cross_attn.every=4", "resampler": "model.resampler.queries=4"}  # one block; 4 queries


@pytest.fixture(scope="module")
def fusion_batches(tmp_path_factory) -> dict[str, dict]:
    """fusion -> one image conversation with the placeholders that fusion makes (one anchor, Q queries)."""
    image = encode_image(synth.pattern_image(tmp_path_factory.mktemp("img") / "i.png", 120, 90).read_bytes(),
                         load_recipe("recipes/smoke.yaml").data.image)
    tokenizer, out = Tokenizer.byte_level(), {}
    for fusion in FUSIONS_WITH_MODULES:
        cfg = load_recipe("recipes/smoke.yaml", [f"model.fusion={fusion}", SMALL[fusion]])
        sample = render_chat([{"role": "user", "content": [{"type": "image", "member": "image_0.png"}]},
                              {"role": "assistant", "content": [{"type": "text", "text": "green bands on blue"}]}],
                             [apply_sequence_tokens(image, cfg.data.sequence_tokens)], tokenizer)
        out[fusion] = collate_packed([[sample]], 256, tokenizer.pad_id, cfg.data.audio)
    return out


def fusion_moved(before: dict, engine: Engine, fusion: str) -> bool:
    """cross_attn: every gate left 0 (the blocks opened); resampler: the vision resampler's queries moved."""
    params = dict(engine.module.named_parameters())
    if fusion == "cross_attn":
        gates = [p for n, p in params.items() if n.startswith("fusion.") and n.endswith("_gate")]
        return bool(gates) and all(float(g.detach().abs().min()) > 0 for g in gates)
    return not torch.equal(before["fusion.vision.queries"], params["fusion.vision.queries"])


@pytest.mark.parametrize("fusion", FUSIONS_WITH_MODULES)
def test_a_stage_trains_the_fusion_alone(fusion_batches, fusion):
    engine = make_engine(f"model.fusion={fusion}", SMALL[fusion], "train.stages=[{until_step: 2, train: [fusion]}]")
    fusion_params = snapshot(engine, "fusion.")
    others = {n: p.detach().clone() for n, p in engine.module.named_parameters() if not n.startswith("fusion.")}
    for _ in range(2):  # the second with Adam moments for every module (the stage's 0 multiplier holds them still)
        engine.train_step([fusion_batches[fusion]])
    assert fusion_moved(fusion_params, engine, fusion)
    assert not changed(others, engine)  # bit-identical: encoders, projectors, backbone


@pytest.mark.parametrize("fusion", FUSIONS_WITH_MODULES)
def test_lora_trains_the_fusion_whole_beside_the_adapters(fusion_batches, fusion):
    cfg = load_recipe("recipes/smoke.yaml", ["train.engine=single", "train.warmup_steps=0", f"model.fusion={fusion}",
                                             SMALL[fusion], "train.lora={targets: [backbone.attention], full_modules: [fusion]}"])
    torch.manual_seed(0)
    engine = Engine(build_run_model(cfg, Tokenizer.byte_level()), cfg.train, init_distributed("single"),
                    micro_batch_size=1)
    params = dict(engine.module.named_parameters())
    assert all(p.requires_grad for n, p in params.items() if n.startswith("fusion."))
    base = {n: p.detach().clone() for n, p in params.items() if not is_adapter_parameter(n) and not n.startswith("fusion.")}
    fusion_params, adapters = snapshot(engine, "fusion."), {n: p.detach().clone() for n, p in params.items()
                                                             if ".lora_B." in n}
    engine.train_step([fusion_batches[fusion]])  # one step: tanh's slope 1 at 0 gives the gates a gradient at once
    assert fusion_moved(fusion_params, engine, fusion)
    assert adapters and changed(adapters, engine)
    assert not changed(base, engine)  # the base weights: bit-identical


@pytest.mark.parametrize("overrides,message", [
    (["model.fusion=cross_attn", "train.lora={targets: [backbone.attention]}"],
     "train.lora.full_modules must list fusion with model.fusion=cross_attn: its modules are new and randomly "
     "initialised and adapters do not train them (or set train.modules.fusion.freeze=true to keep the ones init.run "
     "trained)"),
    (["model.fusion=resampler", "train.lora={targets: [fusion], full_modules: [fusion]}"],
     "train.lora.targets: fusion cannot take adapters (its modules are new and randomly initialised, cross_attn's "
     "gates are no linear layer): list it in lora.full_modules to train it whole"),
    (["train.lora={full_modules: [fusion]}"],
     "train.lora.full_modules: model.fusion=interleave has no fusion module (cross_attn and resampler have one)"),
])
def test_lora_with_a_fusion_that_would_not_train_is_refused_in_one_line(overrides, message):
    with pytest.raises(RecipeError) as error:
        load_recipe("recipes/smoke.yaml", overrides)
    assert str(error.value) == message
    # a fusion that init.run trained may be kept frozen instead
    load_recipe("recipes/smoke.yaml", ["model.fusion=cross_attn", "train.lora={targets: [backbone.attention]}",
                                       "train.modules={fusion: {freeze: true}}"])
