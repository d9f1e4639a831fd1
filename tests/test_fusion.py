"""Fusions and projectors that change how many positions a media item takes (issue 13): pool and resampler.

Real media (espeak speech and a tone of odd lengths, an image, a video) are decoded by the data
layer's `decode_sample` with `data.sequence_tokens` derived from each model variant, rendered by the
chat template and packed by `collate_packed`, as in training; the models are test_model's tiny
random configurations. The invariants of issue 13 point 2 are checked for every projector (mlp,
linear, pool) and for the resampler: the batch's placeholders are what the model produces, packing
does not change a document's loss, pool and resampler never mix items, generation equals a full
forward, and recipes that combine them with what needs encoder tokens are refused in one line.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from omni_train.config import RecipeError, load_recipe
from omni_train.data import synth
from omni_train.data.inspect import inspect_shards
from omni_train.data.pipeline import DataConfig, decode_sample
from omni_train.data.sample import MODALITY_IDS, TokenizedSample
from omni_train.data.text import render_prompt
from omni_train.model.omni import OmniModel, fuse_interleave
from omni_train.model.projectors import PoolConfig, Projector, ProjectorConfig, ProjectorOptions
from omni_train.model.resampler import Resampler, ResamplerConfig
from omni_train.probes.generate import generate_ids
from omni_train.train.lora import TARGET_GROUPS, lora_targets
from omni_train.train.optim import module_groups
from test_model import AUDIO_CFG, TOKENIZER, collate, document_losses, tiny_config, train_steps

QUERIES, SPAN_TOKENS, POOL = 4, 10, 3
VARIANTS = {
    "mlp": {},
    "linear": {"projector": "linear"},
    "pool": {"projector": "pool", "pool": PoolConfig(factor=POOL)},
    "audio_pool": {"audio_projector": ProjectorOptions(kind="pool"), "pool": PoolConfig(factor=POOL)},
    # span_s 0.4 s = 10 tokens at data.audio's 25 per second (the recipe loader derives span_tokens so)
    "resampler": {"fusion": "resampler",
                  "resampler": ResamplerConfig(queries=QUERIES, span_s=0.4, span_tokens=SPAN_TOKENS, layers=2, heads=4)},
}


def expected_seq_tokens(variant: str, modality: str, n: int) -> int:
    """The positions an item of n encoder tokens takes, by hand (sequence_tokens.py's table)."""
    if variant == "pool" or (variant == "audio_pool" and modality == "audio"):
        return math.ceil(n / POOL)
    if variant == "resampler":
        return QUERIES * (math.ceil(n / SPAN_TOKENS) if modality == "audio" else 1)
    return n


def tiny_model(variant: str, seed: int = 0) -> OmniModel:
    torch.manual_seed(seed)
    return OmniModel(tiny_config(**VARIANTS[variant]))


def part(kind: str, member: str) -> dict:
    return {"type": kind, "member": member}


def text(value: str) -> dict:
    return {"type": "text", "text": value}


# documents: name -> (user parts, assistant answer)
DOCUMENTS = {
    "speech": ([part("audio", "speech.wav"), text("What was said?")], "three plus five"),
    "tone_image": ([part("audio", "tone.wav"), part("image", "image.png"), text("Describe both.")], "a tone, bands"),
    "video": ([part("video", "clip.mp4"), text("What happens?")], "a test pattern"),
    "text": ([text("print 2 plus 2")], "print(2 + 2)"),
}


@pytest.fixture(scope="module")
def members(tmp_path_factory) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("fusion_media")
    paths = {"speech.wav": synth.speech(root / "speech.wav", "three plus five"),
             "tone.wav": synth.tone(root / "tone.wav", 1.37, frequency_hz=330.0),  # 137 frames -> 35 tokens
             "image.png": synth.pattern_image(root / "image.png", 112, 84),
             "clip.mp4": synth.test_pattern_video(root / "clip.mp4", 2.0, fps=10, width=160, height=120)}
    return {name: path.read_bytes() for name, path in paths.items()}


@pytest.fixture(scope="module")
def documents(members) -> dict[str, dict[str, TokenizedSample]]:
    """variant -> document name -> the sample decoded by the pipeline's decode_sample for that variant."""
    out = {}
    for variant in VARIANTS:
        data_cfg = DataConfig(sequence_tokens=tiny_config(**VARIANTS[variant]).sequence_tokens())
        out[variant] = {}
        for name, (parts, answer) in DOCUMENTS.items():
            messages = [{"role": "user", "content": parts}, {"role": "assistant", "content": [text(answer)]}]
            raw = {"json": json.dumps({"messages": messages, "meta": {}}).encode(),
                   **{p["member"]: members[p["member"]] for p in parts if p["type"] != "text"}}
            out[variant][name] = decode_sample(raw, f"memory:{name}", data_cfg, TOKENIZER)
    return out


def packed(docs: dict[str, TokenizedSample]) -> dict:
    return collate([[docs["speech"], docs["tone_image"]], [docs["video"], docs["text"]]])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_batch_placeholders_are_what_the_model_produces(documents, variant):
    batch = packed(documents[variant])
    model = tiny_model(variant)
    audio_tokens = batch["audio_num_tokens"].tolist()
    assert any(n % POOL and n % SPAN_TOKENS and n % 2 for n in audio_tokens), audio_tokens  # partial last groups
    encoded = []
    model.audio_encoder.register_forward_hook(lambda module, args, out: encoded.append(out.shape[0]))
    with torch.no_grad():
        features, unused, _ = model._encode(batch)
        if variant == "resampler":
            features = model._resample(features, batch, unused)
        model._check_seq_tokens(batch, features)  # each item's placeholders against the model's count
        # raises when the placeholders and features of a modality differ in number
        fuse_interleave(model.backbone.embed(batch["input_ids"]), batch["modality_ids"], features)
    assert encoded == [sum(audio_tokens)]  # the encoder's tokens: what the batch lists per item
    for modality in ("audio", "image", "video"):
        num_tokens, seq_tokens = batch[f"{modality}_num_tokens"].tolist(), batch[f"{modality}_seq_tokens"].tolist()
        assert seq_tokens == [expected_seq_tokens(variant, modality, n) for n in num_tokens], (modality, num_tokens)
        assert int((batch["modality_ids"] == MODALITY_IDS[modality]).sum()) == sum(seq_tokens)
        assert features[modality].shape == (sum(seq_tokens), 64)
    # the timestamps of a pooled or resampled item's positions: each group's first token's
    tone = documents[variant]["tone_image"].media[0]
    starts = tone.token_timestamps_s[::POOL if "pool" in variant else SPAN_TOKENS if variant == "resampler" else 1]
    repeats = QUERIES if variant == "resampler" else 1
    assert torch.equal(tone.placeholder_timestamps_s, starts.repeat_interleave(repeats))


# mlp, the default, is test_model.py's test of the same name
@pytest.mark.parametrize("variant", ["linear", "pool", "resampler"])
def test_packed_and_one_document_per_row_give_the_same_per_sample_losses(documents, variant):
    """Each document alone (one row, and a batch of its own: a module that mixed the items of one batch, such as a
    resampler attending over all of them or a pool straddling two, would see other items only when packed)."""
    docs = documents[variant]
    model = tiny_model(variant)
    packed_order = ["tone_image", "video", "speech", "text"]  # the tone's 35 audio tokens end in a partial group
    together = collate([[docs[name] for name in packed_order[:2]], [docs[name] for name in packed_order[2:]]])

    packed_losses = document_losses(model, together, packed_order)
    assert all(loss > 0 for loss in packed_losses.values())
    for name in packed_order:
        alone = document_losses(model, collate([[docs[name]]]), [name])[name]
        assert packed_losses[name] == pytest.approx(alone, rel=1e-5, abs=1e-5), name


def test_pool_averages_within_each_item_only():
    torch.manual_seed(0)
    projector = Projector(ProjectorConfig(kind="pool", in_dim=8, out_dim=16, input_norm=True, pool_factor=3))
    num_tokens = [7, 5, 4]  # groups 3+3+1, 3+2, 3+1: every item ends in a partial group
    x = torch.randn(sum(num_tokens), 8)
    with torch.no_grad():
        out = projector(x, num_tokens)
        by_hand = []
        for item in x.split(num_tokens):
            for group in item.split(3):
                by_hand.append(group.mean(dim=0))
        mlp = torch.nn.Sequential(*list(projector))  # norm, fc1, act, fc2 on the group means
        torch.testing.assert_close(out, mlp(torch.stack(by_hand)), rtol=0, atol=1e-6)
        assert out.shape == (3 + 2 + 2, 16) and projector.num_outputs(num_tokens) == [3, 2, 2]

        changed = x.clone()
        changed[6] = torch.randn(8)  # item 0's last token, alone in its group, next to item 1's first token
        out_changed = projector(changed, num_tokens)
    assert torch.equal(out_changed[3:], out[3:])           # the other items: bit-identical
    assert torch.equal(out_changed[:2], out[:2]) and not torch.allclose(out_changed[2], out[2])


def test_resampler_groups_are_independent_of_each_other():
    torch.manual_seed(0)
    resampler = Resampler(ResamplerConfig(queries=3, layers=2, heads=2), 16)
    sizes = [7, 2, 12]
    x = torch.randn(sum(sizes), 16)
    with torch.no_grad():
        out = resampler(x, sizes)                                                  # (3 groups x 3 queries, 16)
        assert out.shape == (9, 16)
        for i, (group, start) in enumerate(zip(x.split(sizes), (0, 7, 9))):
            alone = resampler(group, [len(group)])                                 # no padding, no other group
            torch.testing.assert_close(out[3 * i:3 * i + 3], alone, rtol=0, atol=1e-6)
        changed = x.clone()
        changed[9:] = torch.randn(12, 16)                                          # the last group only
        out_changed = resampler(changed, sizes)
    assert torch.equal(out_changed[:6], out[:6]) and not torch.allclose(out_changed[6:], out[6:])


def test_resampler_gives_zero_gradients_without_media_and_is_its_own_module(documents):
    model = tiny_model("resampler")
    model(collate([[documents["resampler"]["text"]]])).loss.backward()
    grads = [p.grad for p in model.fusion.parameters()]
    assert grads and all(g is not None and float(g.abs().sum()) == 0.0 for g in grads)  # 0, not None (ZeRO-3, DDP)
    groups = {g["name"] for g in module_groups(model, {}, weight_decay=0.1)}
    assert {"fusion", "fusion.no_decay"} <= groups
    # no LoRA target covers the resampler: a LoRA run trains it whole (lora.full_modules; test_engine.py)
    everything = lora_targets(model, [g for g in TARGET_GROUPS if g != "backbone.router"])  # the router: MoE only
    assert everything and not [name for name in everything if name.startswith("fusion.")]


def test_generation_with_the_resampler_matches_a_full_forward(documents):
    model = tiny_model("resampler").eval()
    docs = documents["resampler"]
    prompts = [render_prompt([{"role": "user", "content": DOCUMENTS[name][0]}], docs[name].media, TOKENIZER)
               for name in ("tone_image", "speech")]
    new = 6
    generated = generate_ids(model, prompts, TOKENIZER, max_new_tokens=new, audio_cfg=AUDIO_CFG, stop_ids=[])
    assert [len(ids) for ids in generated] == [new, new]
    full = []
    for prompt, ids in zip(prompts, generated):
        ids = torch.tensor(ids)
        full.append(TokenizedSample(input_ids=torch.cat([prompt.input_ids, ids]),
                                    labels=torch.full((len(prompt) + new,), -100),
                                    modality_ids=torch.cat([prompt.modality_ids, torch.zeros(new, dtype=torch.int8)]),
                                    timestamps_s=torch.cat([prompt.timestamps_s, torch.full((new,), -1.0)]),
                                    media=prompt.media))
    with torch.no_grad():
        logits = model(collate([[sample] for sample in full]), return_logits=True).logits  # no cache, one forward
    for row, (prompt, ids) in enumerate(zip(prompts, generated)):
        predicted = logits[row, len(prompt) - 1:len(prompt) - 1 + new].argmax(dim=-1)
        assert predicted.tolist() == ids, row


MROPE = "model.backbone.mrope_section=[4,6,6]"
INTERLEAVE_ONLY = ("audio in video interleaves the encoders' tokens; it needs model.fusion interleave with an mlp or "
                   "linear projector")


@pytest.mark.parametrize("overrides, message", [
    (["model.fusion=resampler", "model.positions=tmrope", MROPE],
     "model.fusion=resampler changes the number of media positions; it does not support model.positions=tmrope "
     "(use model.positions: 1d)"),
    (["model.projector=pool", "model.positions=mrope", MROPE],
     "model.projector pool changes the number of media positions; it does not support model.positions=mrope "
     "(use model.positions: 1d)"),
    (["model.fusion=resampler", "data.video.use_audio_in_video=true"],
     f"data.video.use_audio_in_video=true is not supported with model.fusion=resampler ({INTERLEAVE_ONLY})"),
    (["model.vision_projector.kind=pool", "data.video.use_audio_in_video=true"],
     f"data.video.use_audio_in_video=true is not supported with model.projector pool ({INTERLEAVE_ONLY})"),
    (["model.fusion=resampler", "model.transfer.kind=token_rate"],
     "model.transfer.kind=token_rate splits audio by its encoder tokens; it does not support model.fusion=resampler "
     "(use model.transfer.kind: none)"),
    (["model.projector=pool", "model.transfer.kind=token_rate"],
     "model.transfer.kind=token_rate splits audio by its encoder tokens; it does not support model.projector pool "
     "(use model.transfer.kind: none)"),
    (["model.fusion=resampler", "model.audio_projector.kind=pool"],
     "model.projector pool (model.projector / model.audio_projector.kind / model.vision_projector.kind) needs "
     "model.fusion interleave, not resampler"),
    (["model.fusion=resampler", "model.resampler.span_s=0.05"],
     "model.resampler.span_s=0.05 must be a whole number of audio tokens (data.audio gives 25 per second, 0.04 s "
     "each), got 1.25"),
    (["model.pool.factor=0"], "model.pool.factor must be an integer >= 1, got 0"),
    (["model.fusion=resampler", "model.resampler.heads=3"], "model.resampler.heads=3 must divide model.backbone.dim=128"),
])
def test_unsupported_combinations_are_refused_in_one_line(overrides, message):
    with pytest.raises(RecipeError) as error:
        load_recipe("recipes/smoke.yaml", overrides)
    assert str(error.value) == message


def test_recipe_derives_the_data_layers_sequence_tokens():
    default = load_recipe("recipes/smoke.yaml").data.sequence_tokens
    assert default.kind == "encoder"
    cfg = load_recipe("recipes/smoke.yaml", ["model.fusion=resampler", "model.resampler.queries=8",
                                             "model.resampler.span_s=2.0"])
    assert (cfg.model.resampler.span_tokens, cfg.data.sequence_tokens.kind, cfg.data.sequence_tokens.queries,
            cfg.data.sequence_tokens.span_tokens) == (50, "resampler", 8, 50)
    cfg = load_recipe("recipes/smoke.yaml", ["model.audio_projector.kind=pool", "model.pool.factor=4"])
    assert (cfg.data.sequence_tokens.kind, cfg.data.sequence_tokens.factor, cfg.data.sequence_tokens.modalities) == (
        "pool", 4, ["audio"])


def test_shard_inspection_counts_the_fusions_positions(corpus):
    """`shards inspect` estimates from headers with the recipe's data.sequence_tokens, as the decode renders them."""
    pooled = DataConfig(sequence_tokens=tiny_config(**VARIANTS["pool"]).sequence_tokens())
    default = inspect_shards(corpus["pattern"])
    headers = inspect_shards(corpus["pattern"], cfg=pooled)
    decoded = inspect_shards(corpus["pattern"], cfg=pooled, decode=True)
    assert headers["samples"] == decoded["samples"] == default["samples"] == len(corpus["entries"])
    # only compressed-audio header durations (mp3/ogg padding) differ from the decoded length, by a token or so
    assert abs(headers["tokens"] - decoded["tokens"]) <= 0.01 * decoded["tokens"]
    assert headers["tokens"] < 0.75 * default["tokens"]  # 1470 of 2204: a third of the media tokens left


@pytest.mark.outcome
@pytest.mark.parametrize("variant", ["pool", "resampler"])
def test_a_few_steps_reduce_the_loss(documents, variant, capsys):
    model = tiny_model(variant)
    losses = train_steps(model, packed(documents[variant]), 5, lr=2e-3)
    with capsys.disabled():
        print(f"\n{variant}: same batch, 5 AdamW steps: loss {' '.join(f'{v:.4f}' for v in losses)}")
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.5, losses
