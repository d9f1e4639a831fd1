"""model.fusion cross_attn: gated cross-attention blocks reading the media outside the sequence (cross_attention.py).

Real decoded media (test_model's fixture), rendered with one anchor position per item as the data
layer does for cross_attn (`sequence_tokens` kind anchor), packed by `collate_packed`; a tiny random
model. Random gates at 0 make the blocks vanish, so the tests that need the media to matter open
them by hand (0.5).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from omni_train.data.sample import MODALITY_IDS
from omni_train.data.sequence_tokens import SequenceTokens, apply_sequence_tokens
from omni_train.data.text import render_chat, render_prompt
from omni_train.model.backbone import BackboneConfig
from omni_train.model.cross_attention import CrossAttnConfig
from omni_train.model.omni import OmniModel
from omni_train.model.transfer import TransferConfig
from omni_train.probes.generate import generate_ids, mean_hidden
from test_model import AUDIO_CFG, TOKENIZER, chat, collate, samples, tiny_config, train_steps  # noqa: F401 (samples: a fixture)

ANCHOR = SequenceTokens(kind="anchor")


def anchored(item):
    return apply_sequence_tokens(copy.copy(item), ANCHOR)


@pytest.fixture(scope="module")
def docs(samples) -> dict:
    """The fixture's conversations rendered for cross_attn (one anchor per media item), plus a second image."""
    media = {name: anchored(item) for name, item in samples["media"].items()}
    other = copy.copy(media["image"])
    other.tensors = {**other.tensors, "patches": torch.randn_like(other.tensors["patches"])}
    return {
        "long_audio": render_chat(chat("audio", "What pitch?", "330 Hz"), [media["long"]], TOKENIZER),
        "image": render_chat(chat("image", "Describe.", "green bands"), [media["image"]], TOKENIZER),
        "other_image": render_chat(chat("image", "Describe.", "green bands"), [other], TOKENIZER),
        "short_audio": render_chat(chat("audio", "", "three plus five is eight"), [media["short"]], TOKENIZER),
        "video": render_chat(chat("video", "What happens?", "a test pattern"), [media["video"]], TOKENIZER),
        "text": samples["text"],
        "media": media,
    }


def cross_model(seed: int = 0, *, gates: float | None = 0.5, **overrides) -> OmniModel:
    torch.manual_seed(seed)
    model = OmniModel(tiny_config(fusion="cross_attn", **overrides))
    if gates is not None:
        open_gates(model, gates)
    return model


@torch.no_grad()
def open_gates(model: OmniModel, value: float) -> None:
    for block in model.fusion.layers:
        block.attn_gate.fill_(value)
        block.mlp_gate.fill_(value)


def per_document(model: OmniModel, batch: dict, names: list[str]) -> dict[str, float]:
    with torch.no_grad():
        per_token = model(batch).per_token_loss
    real = batch["document_ids"] >= 0
    sums = torch.zeros(len(names), dtype=torch.float64).index_add_(0, batch["document_ids"][real], per_token[real].double())
    return dict(zip(names, sums.tolist()))


def test_gates_at_zero_give_the_backbone_alone_and_the_blocks_are_their_own_group(docs):
    model = cross_model(gates=None)
    assert [n for n, _ in model.named_children()][-1] == "fusion" and len(model.fusion.layers) == 2
    assert all(b.attn_gate.item() == b.mlp_gate.item() == 0.0 for b in model.fusion.layers)
    batch = collate([[docs["short_audio"], docs["image"]], [docs["video"], docs["text"]]])
    with torch.no_grad():
        out = model(batch, return_logits=True)
        fused = model.fuse(batch)
        alone = model.backbone(inputs_embeds=fused.embeds, position_ids=fused.position_ids, document_ids=fused.document_ids)
    assert torch.equal(out.logits, model.backbone.logits(alone))
    # the media stay out of the sequence: one anchor per item, keeping the pad token's embedding
    assert torch.equal(fused.embeds, model.backbone.embed(batch["input_ids"]))
    assert fused.memory.features.shape[-1] == 64 and int((fused.memory.item_ids >= 0).sum()) == sum(
        int(batch[f"{m}_num_tokens"].sum()) for m in ("audio", "image", "video"))
    counts = model.num_parameters()
    assert counts["fusion"] == sum(p.numel() for p in model.fusion.parameters()) > 0
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    # the blocks come after every other module: interleave and cross_attn draw the same backbone initialization
    torch.manual_seed(0)
    interleave = OmniModel(tiny_config())
    assert all(torch.equal(a, b) for a, b in zip(interleave.backbone.parameters(), model.backbone.parameters()))


def test_a_position_reads_only_its_own_documents_media_anchored_before_it(docs):
    model = cross_model()
    names = ["image", "short_audio", "video", "text"]  # the changed image first: later documents could otherwise read it
    batch = collate([[docs["image"], docs["short_audio"]], [docs["video"], docs["text"]]])
    changed = collate([[docs["other_image"], docs["short_audio"]], [docs["video"], docs["text"]]])
    with torch.no_grad():
        before, after = model(batch, return_logits=True).logits, model(changed, return_logits=True).logits
    documents = batch["document_ids"]
    for doc, name in enumerate(names):
        same = torch.equal(before[documents == doc], after[documents == doc])
        assert same == (name != "image"), name  # the image's own document changes (its media are read), no other
    assert torch.isfinite(before).all() and torch.isfinite(after).all()
    # within the image's document, the positions before its anchor have not seen it yet; from the anchor on they have
    anchor = int((batch["modality_ids"][0] == MODALITY_IDS["image"]).nonzero())
    assert torch.equal(before[0, :anchor], after[0, :anchor])
    assert not torch.equal(before[0, anchor], after[0, anchor])

    # closed gates: the media change nothing at all
    open_gates(model, 0.0)
    with torch.no_grad():
        assert torch.equal(model(batch, return_logits=True).logits, model(changed, return_logits=True).logits)


def test_packed_and_one_document_per_row_give_the_same_per_document_losses(docs):
    model = cross_model()
    packed_order = ["short_audio", "video", "text", "long_audio", "image"]
    separate_order = ["long_audio", "image", "short_audio", "video", "text"]
    packed = collate([[docs[n] for n in packed_order[:3]], [docs[n] for n in packed_order[3:]]])
    separate = collate([[docs[n]] for n in separate_order])
    packed_losses, separate_losses = per_document(model, packed, packed_order), per_document(model, separate, separate_order)
    assert all(loss > 0 for loss in packed_losses.values())
    for name in separate_order:
        assert packed_losses[name] == pytest.approx(separate_losses[name], rel=1e-5, abs=1e-5), name


def test_a_batch_without_media_runs_the_blocks_and_gives_every_parameter_a_gradient(docs):
    model = cross_model()
    batch = collate([[docs["text"]], [docs["text"]]])
    out = model(batch, return_logits=True)
    fused = model.fuse(batch)
    with torch.no_grad():  # no position reads the dummy memory: exactly the backbone alone
        alone = model.backbone(inputs_embeds=fused.embeds, position_ids=fused.position_ids, document_ids=fused.document_ids)
    assert torch.equal(out.logits.detach(), model.backbone.logits(alone))
    out.loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if not name.startswith("backbone.")}
    assert all(g is not None and float(g.abs().sum()) == 0.0 for g in grads.values()), \
        [n for n, g in grads.items() if g is None or float(g.abs().sum())]


def test_activation_checkpointing_gives_identical_gradients(docs):
    batch = collate([[docs["short_audio"], docs["image"]], [docs["text"]]])
    grads = []
    for checkpointing in (False, True):
        model = cross_model(activation_checkpointing=checkpointing)
        model(batch).loss.backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.equal(grads[0][name], grads[1][name]) for name in grads[0]), \
        [name for name in grads[0] if not torch.equal(grads[0][name], grads[1][name])]
    assert float(grads[1]["fusion.layers.0.attn_gate"].abs()) > 0


@pytest.mark.outcome
def test_a_few_steps_reduce_the_loss_and_open_the_gates(docs, capsys):
    model = cross_model(gates=None)
    losses = train_steps(model, collate([[docs["short_audio"], docs["image"]], [docs["text"]]]), 6, lr=1e-3)
    gates = [g.item() for b in model.fusion.layers for g in (b.attn_gate, b.mlp_gate)]
    with capsys.disabled():
        print(f"\ncross_attn, same batch, 6 AdamW steps: loss {' '.join(f'{v:.4f}' for v in losses)}; "
              f"gates {' '.join(f'{g:+.4f}' for g in gates)}")
    assert losses[-1] < losses[0] - 0.5, losses
    assert all(abs(g) > 1e-3 for g in gates), gates  # AdamW's first steps move every gate by about lr per step


def test_generation_with_the_media_cache_matches_a_full_forward(docs):
    model = cross_model().eval()
    media = docs["media"]
    prompts = [render_prompt(chat("image", "Describe.", "")[:1], [media["image"]], TOKENIZER),
               render_prompt(chat("audio", "What was said?", "")[:1], [media["short"]], TOKENIZER),
               render_prompt(chat(None, "print 2 plus 2", "")[:1], [], TOKENIZER)]
    cached = generate_ids(model, prompts, TOKENIZER, max_new_tokens=6, audio_cfg=AUDIO_CFG, stop_ids=[])
    uncached = generate_ids(model, prompts, TOKENIZER, max_new_tokens=6, audio_cfg=AUDIO_CFG, stop_ids=[], cache_media=False)
    assert cached == uncached and all(len(row) == 6 for row in cached)
    # one forward over prompt + generated tokens: its argmax at each step's position is the generated token
    full = [dataclasses.replace(p, input_ids=torch.cat([p.input_ids, torch.tensor(row)]),
                                labels=torch.full((len(p) + len(row),), -100),
                                modality_ids=torch.cat([p.modality_ids, torch.zeros(len(row), dtype=torch.int8)]),
                                timestamps_s=torch.cat([p.timestamps_s, torch.full((len(row),), -1.0)]))
            for p, row in zip(prompts, cached)]
    with torch.no_grad():
        logits = model(collate([[f] for f in full]), return_logits=True).logits
    for i, (prompt, row) in enumerate(zip(prompts, cached)):
        steps = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(row))
        assert logits[i, steps].argmax(-1).tolist() == row, i

    # mean_hidden reads the media too: another image changes the pooled state of its prompt only
    other = render_prompt(chat("image", "Describe.", "")[:1], [docs["other_image"].media[0]], TOKENIZER)
    trims = [(0, 0)] * 2
    pooled = mean_hidden(model, [prompts[0], prompts[2]], TOKENIZER, trims=trims, audio_cfg=AUDIO_CFG)
    pooled_other = mean_hidden(model, [other, prompts[2]], TOKENIZER, trims=trims, audio_cfg=AUDIO_CFG)
    assert torch.isfinite(pooled).all() and not torch.equal(pooled[0], pooled_other[0])
    torch.testing.assert_close(pooled[1], pooled_other[1], rtol=0, atol=1e-6)


def test_config_errors_name_the_key(docs):
    with pytest.raises(ValueError, match=r"model\.cross_attn\.every must be a positive integer, got 0"):
        CrossAttnConfig(every=0)
    with pytest.raises(ValueError, match=r"model\.cross_attn\.kv_heads \(3\) must divide model\.cross_attn\.heads \(4\)"):
        CrossAttnConfig(heads=4, kv_heads=3)
    with pytest.raises(ValueError, match=r"model\.cross_attn\.every=3 is more than model\.backbone\.num_layers=2"):
        tiny_config(fusion="cross_attn", cross_attn=CrossAttnConfig(every=3))
    with pytest.raises(ValueError, match=r"model\.cross_attn\.heads \(3\) must divide model\.backbone\.dim \(64\)"):
        tiny_config(fusion="cross_attn", cross_attn=CrossAttnConfig(heads=3))
    mrope = BackboneConfig(vocab_size=TOKENIZER.vocab_size, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=128,
                           mrope_section=[2, 3, 3])
    with pytest.raises(ValueError, match=r"model\.fusion=cross_attn changes the number of media positions; it does not "
                                         r"support model\.positions=tmrope \(use model\.positions: 1d\)"):
        tiny_config(fusion="cross_attn", backbone=mrope, positions="tmrope")
    with pytest.raises(ValueError, match=r"model\.transfer\.kind=token_rate splits audio by its encoder tokens; it does not "
                                         r"support model\.fusion=cross_attn \(use model\.transfer\.kind: none\)"):
        tiny_config(fusion="cross_attn", transfer=TransferConfig(kind="token_rate"))

    # every=2 on 2 layers: one block, after the second layer; other heads and grouped keys work
    model = cross_model(cross_attn=CrossAttnConfig(every=2, heads=8, kv_heads=2, qk_norm=True, media_norm=False))
    assert model.fusion.layer_indices == [1] and model.fusion.layers[0].k_proj.out_features == 2 * 8
    batch = collate([[docs["short_audio"], docs["image"]]])
    assert torch.isfinite(model(batch).loss)

    # a batch rendered for interleave (every encoder token a placeholder) is refused with both counts
    image = dataclasses.replace(docs["media"]["image"], seq_tokens=None, seq_timestamps_s=None)
    interleaved = collate([[render_chat(chat("image", "Describe.", "x"), [image], TOKENIZER)]])
    with pytest.raises(ValueError, match=rf"image items have \[{image.num_tokens}\] placeholder positions but "
                                         r"model\.fusion=cross_attn with these projectors makes \[1\]"):
        model(interleaved)
    del interleaved["image_seq_tokens"]  # without the per-item counts, the anchors are counted
    with pytest.raises(ValueError, match=f"{image.num_tokens} image anchor positions but 1 image items"):
        model(interleaved)
