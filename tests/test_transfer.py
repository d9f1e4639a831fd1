"""The token-rate speech prefix (`model.transfer`): repacking, the CTC head, gating, the distributed rule, learning.

Batches are built as the training pipeline builds them: espeak-ng speech and generated images
decoded by the data layer, rendered with the chat template and packed by `collate_packed`; the
transcript ids are set on the samples the way `decode_sample` sets them from `meta.transcript`.
"""

from __future__ import annotations

import contextlib
import time

import pytest
import torch

from omni_train.data import synth
from omni_train.data.audio import AudioConfig, encode_audio
from omni_train.data.image import ImageConfig, encode_image
from omni_train.data.packing import IGNORE_INDEX, collate_packed
from omni_train.data.sample import MODALITY_IDS
from omni_train.data.text import Tokenizer, render_chat, render_prompt
from omni_train.model.audio_encoder import AudioEncoderConfig
from omni_train.model.backbone import Backbone, BackboneConfig
from omni_train.model.hf_adapters import save_qwen_backbone
from omni_train.model.omni import OmniConfig, OmniModel, build_model, fuse_interleave
from omni_train.model.transfer import TransferConfig, compact_rows, greedy_spans, repack
from omni_train.model.vision_encoder import VisionEncoderConfig

TOKENIZER = Tokenizer.byte_level()
AUDIO_CFG = AudioConfig()
# short digit strings: espeak voices each digit as a word, the transcript keeps the spaces
DIGITS = ["3 5 1", "7 2", "4 8 6", "9 0", "2 6", "5 1 8", "6 4", "1 9 7"]
AUX_KEYS = {"ctc_loss", "align_loss", "gated_fraction", "ctc_exact", "compressed_len", "transcript_len", "transcribed_items",
            "dropped_samples", "backbone_fraction"}


def tiny_config(transfer: TransferConfig | None = None, *, vision: bool = True, audio_dim: int = 32) -> OmniConfig:
    return OmniConfig(
        backbone=BackboneConfig(vocab_size=TOKENIZER.vocab_size, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=128),
        audio=AudioEncoderConfig(dim=audio_dim, num_layers=2, num_heads=4, ffn_dim=2 * audio_dim),
        vision=VisionEncoderConfig(dim=32, num_layers=2, num_heads=2, ffn_dim=64) if vision else None,
        **({"transfer": transfer} if transfer is not None else {}))


def tiny_model(transfer: TransferConfig | None = None, *, seed: int = 0, **kwargs) -> OmniModel:
    torch.manual_seed(seed)
    return OmniModel(tiny_config(transfer, **kwargs))


def chat(modality: str | None, prompt: str, answer: str) -> list[dict]:
    media = [{"type": modality, "member": f"{modality}_0"}] if modality else []
    return [{"role": "user", "content": [*media, {"type": "text", "text": prompt}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]}]


def asr_sample(audio, transcript: str, *, with_transcript: bool = True):
    sample = render_chat(chat("audio", "", transcript), [audio], TOKENIZER)
    if with_transcript:  # what decode_sample does for meta.transcript
        sample.audio_transcript_ids = torch.tensor(TOKENIZER.encode(transcript), dtype=torch.long)
    return sample


def collate(rows: list[list]) -> dict:
    seq_len = max(sum(len(s) for s in row) for row in rows)
    return collate_packed(rows, seq_len=seq_len, pad_id=TOKENIZER.pad_id, audio_cfg=AUDIO_CFG)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("transfer_media")
    speech = [encode_audio(synth.speech(root / f"digits{i}.wav", text), AUDIO_CFG) for i, text in enumerate(DIGITS)]
    image = encode_image(synth.pattern_image(root / "image.png", 64, 48), ImageConfig())
    return {"speech": speech, "image": image}


def mixed_batch(media) -> dict:
    """Audio with a transcript, audio without one, an image and a text document, in two rows."""
    image = render_chat(chat("image", "Describe.", "bands"), [media["image"]], TOKENIZER)
    return collate([[asr_sample(media["speech"][0], DIGITS[0]), image],
                    [asr_sample(media["speech"][1], DIGITS[1], with_transcript=False),
                     render_chat(chat(None, "print 2 plus 2", "print(2 + 2)"), [], TOKENIZER)]])


def grads(model: OmniModel) -> dict[str, torch.Tensor | None]:
    return {name: p.grad for name, p in model.named_parameters()}


# ------------------------------------------------------------------------------------------------ kind none


def test_kind_none_is_the_plain_composition_bit_for_bit(media):
    batch = mixed_batch(media)
    model = tiny_model()
    explicit = tiny_model(TransferConfig(kind="none"))
    assert model.transfer is None and not any(name.startswith("transfer") for name in model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), explicit.state_dict().values()))
    with torch.no_grad():
        out, out_explicit = model(batch), explicit(batch)
        # the composition as it was before model.transfer existed
        features, unused, _ = model._encode(batch)
        embeds = fuse_interleave(model.backbone.embed(batch["input_ids"]), batch["modality_ids"], features)
        hidden = model.backbone(inputs_embeds=embeds, position_ids=batch["position_ids"], document_ids=batch["document_ids"])
        loss, num_loss_tokens, _ = model.next_token_loss(hidden, batch["labels"], batch["document_ids"])
    assert not unused and out.aux == {}
    assert torch.equal(out.loss, loss) and torch.equal(out_explicit.loss, loss) and out.num_loss_tokens == num_loss_tokens


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"model\.transfer\.kind must be one of none, token_rate, got 'qformer'"):
        TransferConfig(kind="qformer")
    with pytest.raises(ValueError, match=r"model\.transfer\.gate must be one of exact, always"):
        TransferConfig(kind="token_rate", gate="count")
    with pytest.raises(ValueError, match=r"model\.transfer\.ctc_weight must be a number >= 0"):
        TransferConfig(ctc_weight=-1.0)
    with pytest.raises(ValueError, match=r"model\.transfer\.kind=token_rate needs an audio encoder"):
        OmniConfig(backbone=tiny_config().backbone, transfer=TransferConfig(kind="token_rate"))


# ------------------------------------------------------------------------------------------------ repack


def test_repack_moves_tokens_restarts_positions_and_pads_at_the_end():
    # row 0: document 0 at 0..5 (span 2..4 -> 2 vectors), document 1 at 6..10 (span 7..9 -> 1 vector), padding at 11
    # row 1: document 2 at 0..8, no span, padding 9..11
    row_len, dim = 12, 2
    document_ids = torch.tensor([[0] * 6 + [1] * 5 + [-1], [2] * 9 + [-1] * 3])
    position_ids = torch.tensor([list(range(6)) + list(range(5)) + [0], list(range(9)) + [0] * 3])
    code = torch.arange(2 * row_len, dtype=torch.float32).view(2, row_len)  # token t of row r carries r * 12 + t
    embeds = torch.stack([code, -code], dim=-1).requires_grad_(True)          # (2, 12, 2)
    labels = torch.full((2, row_len), IGNORE_INDEX)
    for col in (1, 5, 6, 10):
        labels[0, col] = 1000 + col
    labels[1, 3:9] = torch.arange(3, 9) + 2000
    vectors = [torch.tensor([[0.5, 0.5], [0.25, 0.25]], requires_grad=True), torch.tensor([[0.75, 0.75]], requires_grad=True)]

    new_embeds, new_positions, new_documents, new_labels = repack(
        embeds, position_ids, document_ids, labels, [(0, 7, 10), (0, 2, 5)], vectors[::-1])  # spans in any order

    assert new_embeds.shape == (2, row_len, dim)
    assert new_embeds[0, :, 0].tolist() == [0, 1, 0.5, 0.25, 5, 6, 0.75, 10, 0, 0, 0, 0]
    assert new_documents[0].tolist() == [0] * 5 + [1] * 3 + [-1] * 4
    assert new_positions[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 0, 0, 0]
    assert new_labels[0].tolist() == [IGNORE_INDEX, 1001, IGNORE_INDEX, IGNORE_INDEX, 1005, 1006, IGNORE_INDEX, 1010,
                                      *[IGNORE_INDEX] * 4]
    assert int((new_documents[0] >= 0).sum()) == 8  # what a generation probe takes as the row's length
    # the document without a span is untouched, padding included
    for new, old in ((new_embeds, embeds), (new_positions, position_ids), (new_documents, document_ids), (new_labels, labels)):
        assert torch.equal(new[1], old[1])
    # gradients reach the kept tokens and the vectors, and not the replaced or padding positions
    new_embeds[..., 0].sum().backward()
    assert embeds.grad[0, :, 0].tolist() == [1, 1, 0, 0, 0, 1, 1, 0, 0, 0, 1, 0]
    assert vectors[0].grad[:, 0].tolist() == [1, 1] and vectors[1].grad[:, 0].tolist() == [1]

    with pytest.raises(AssertionError, match="crosses a document boundary"):
        repack(embeds, position_ids, document_ids, labels, [(0, 4, 8)], [vectors[1]])
    assert repack(embeds, position_ids, document_ids, labels, [], [])[0] is embeds


def test_compact_rows_repacks_documents_and_keeps_what_the_backbone_computes():
    """Documents move between rows and dropped ones leave; every kept token's backbone output is unchanged."""
    torch.manual_seed(0)
    backbone = Backbone(BackboneConfig(vocab_size=50, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=64))
    # row 0: documents 0 (4) and 1 (3), padding; row 1: document 2 (6); row 2: 3 (2), 4 (5), 5 (2); length 12
    layout = [[0] * 4 + [1] * 3 + [-1] * 5, [2] * 6 + [-1] * 6, [3] * 2 + [4] * 5 + [5] * 2 + [-1] * 3]
    document_ids = torch.tensor(layout)
    position_ids = torch.zeros_like(document_ids)
    for row in range(3):
        for doc in document_ids[row].unique().tolist():
            if doc >= 0:
                where = (document_ids[row] == doc).nonzero().flatten()
                position_ids[row, where] = torch.arange(where.numel())
    embeds = torch.randn(3, 12, 32)
    labels = torch.where(document_ids >= 0, torch.randint(0, 50, (3, 12)), IGNORE_INDEX)
    with torch.no_grad():
        before = backbone(inputs_embeds=embeds, position_ids=position_ids, document_ids=document_ids)
    new_embeds, new_positions, new_docs, new_labels = compact_rows(embeds, position_ids, document_ids, labels, {1})
    # 4 + 6 + 2 + 5 + 2 = 19 tokens of 12-position rows: two rows, the fullest decides the length
    assert new_docs.shape[0] == 2 and new_docs.shape[1] <= 12 and int((new_docs >= 0).sum()) == 19
    assert not (new_docs == 1).any()
    with torch.no_grad():
        after = backbone(inputs_embeds=new_embeds, position_ids=new_positions, document_ids=new_docs)
    for doc in (0, 2, 3, 4, 5):
        old_where, new_where = document_ids == doc, new_docs == doc
        assert new_where.any(dim=1).sum() == 1, f"document {doc} was cut"
        assert torch.equal(new_positions[new_where], position_ids[old_where])
        assert torch.equal(new_labels[new_where], labels[old_where])
        assert torch.equal(new_embeds[new_where], embeds[old_where])
        torch.testing.assert_close(after[new_where], before[old_where], rtol=1e-5, atol=1e-5)
    # nothing left: one padding position, so the backbone still runs
    empty = compact_rows(embeds, position_ids, document_ids, labels, {0, 1, 2, 3, 4, 5})
    assert empty[2].tolist() == [[-1]] and empty[3].tolist() == [[IGNORE_INDEX]]


def test_ungated_drop_leaves_the_backbone_to_text_until_the_gate_opens(media):
    """`ungated: drop`: an untrained gate keeps every transcribed sample out of the backbone; CTC still trains the
    audio side, every parameter still gets a gradient, and eval is unchanged (every item compressed)."""
    batch = mixed_batch(media)
    keep = tiny_model(TransferConfig(kind="token_rate"))
    drop = tiny_model(TransferConfig(kind="token_rate", ungated="drop"))
    out = drop(batch)
    assert out.aux["gated_fraction"] == 0.0 and out.aux["dropped_samples"] == 1.0  # document 0 (row 0's speech)
    assert out.aux["backbone_fraction"] < 1.0 and keep(batch).aux["backbone_fraction"] == 1.0
    fused = drop.fuse(batch)
    assert not (fused.document_ids == 0).any()
    for doc in (1, 2, 3):  # the image, the speech without a transcript (full audio) and the text stay whole
        assert int((fused.document_ids == doc).sum()) == int((batch["document_ids"] == doc).sum())
    out.loss.backward()
    assert all(g is not None for g in grads(drop).values())
    assert drop.audio_encoder.conv1.weight.grad.abs().sum() > 0 and drop.transfer.ctc_head.weight.grad.abs().sum() > 0
    keep.eval(), drop.eval()
    with torch.no_grad():
        torch.testing.assert_close(drop(batch).loss, keep(batch).loss)
    with pytest.raises(ValueError, match=r"model\.transfer\.ungated must be one of keep, drop"):
        TransferConfig(kind="token_rate", ungated="skip")


def test_greedy_spans_collapse_runs_drop_blanks_and_stop_at_items():
    blank = 9
    labels = torch.tensor([9, 3, 3, 9, 3, 5, 5, 5, 9, 9, 4, 4])  # item 0: 8 frames, item 1: 4 frames ("5" then "4")
    features = torch.arange(12, dtype=torch.float32)[:, None]
    spans = greedy_spans(features, labels, [8, 4], blank)
    assert spans.counts == [3, 1]
    assert spans.label.tolist() == [3, 3, 5, 4] and spans.item.tolist() == [0, 0, 0, 1]
    assert spans.vectors[:, 0].tolist() == [1.5, 4.0, 6.0, 10.5]
    spans = greedy_spans(features[:8], labels[:8], [2, 6], blank)  # a run of 3s across the item boundary is cut
    assert spans.counts == [1, 3] and spans.label.tolist() == [3, 3, 3, 5]


# ------------------------------------------------------------------------------------------------ token_rate


def test_ctc_loss_over_the_used_columns_equals_the_full_vocabulary():
    """The head's CTC runs over the transcripts' tokens, the blank and one "other" column: loss and gradients
    are those of torch's CTC over every vocabulary column."""
    import torch.nn.functional as F
    from torch import nn

    from omni_train.model.transfer import TokenRateTransfer

    torch.manual_seed(0)
    vocab = 300
    head = TokenRateTransfer(TransferConfig(kind="token_rate"), 16, vocab)
    num_frames = [40, 25, 33, 12]
    transcripts = [torch.randint(0, vocab, (n,)) for n in (9, 4, 0, 3)]  # item 2 has no transcript
    frames = torch.randn(sum(num_frames), 16, requires_grad=True)
    with_transcript = [0, 1, 3]

    def full_vocabulary():
        log_probs = head.ctc_head(frames).log_softmax(-1).split(num_frames)
        chosen = [log_probs[i] for i in with_transcript]
        return F.ctc_loss(nn.utils.rnn.pad_sequence(chosen), torch.cat([transcripts[i] for i in with_transcript]),
                          torch.tensor([x.shape[0] for x in chosen]), torch.tensor([transcripts[i].numel() for i in with_transcript]),
                          blank=vocab, zero_infinity=True)

    expected = full_vocabulary()
    got = head._ctc_loss(head.ctc_head(frames), num_frames, transcripts, with_transcript)
    assert torch.allclose(got, expected, rtol=1e-6), (got, expected)
    parameters = [frames, head.ctc_head.weight, head.ctc_head.bias]
    for a, b in zip(torch.autograd.grad(got, parameters), torch.autograd.grad(expected, parameters)):
        assert (a - b).abs().max() <= 1e-6 * b.abs().max(), (a - b).abs().max()
    assert head._ctc_loss(head.ctc_head(frames), num_frames, transcripts, []).item() == 0.0




def test_token_rate_forward_backward_and_aux(media):
    batch = mixed_batch(media)
    model = tiny_model(TransferConfig(kind="token_rate"))
    assert model.transfer.ctc_head.out_features == TOKENIZER.vocab_size + 1
    assert model.num_parameters()["transfer"] == (64 + 1) * (TOKENIZER.vocab_size + 1)
    out = model(batch)
    assert AUX_KEYS <= set(out.aux) and out.aux["transcribed_items"] == 1.0
    assert out.aux["ctc_loss"] > 0 and out.aux["transcript_len"] == len(DIGITS[0])
    assert out.aux["gated_fraction"] == 0.0  # an untrained CTC head does not recognize the digits: full audio kept
    plain = tiny_model()
    with torch.no_grad():
        lm_loss = plain(batch).loss
    # the same initialization up to the head: the language-model loss is unchanged, the CTC term comes on top
    torch.testing.assert_close(out.loss, lm_loss + 0.3 * out.aux["ctc_loss"])
    out.loss.backward()
    assert all(g is not None for g in grads(model).values())
    assert model.transfer.ctc_head.weight.grad.abs().sum() > 0
    assert model.audio_projector.fc2.weight.grad.abs().sum() > 0


def test_max_backbone_items_caps_the_compressed_speech_the_backbone_reads(media):
    """Over the cap, compressed samples leave the backbone's batch; every item still has its CTC and alignment loss."""
    text = render_chat(chat(None, "print 2 plus 2", "print(2 + 2)"), [], TOKENIZER)
    batch = collate([[asr_sample(media["speech"][i], DIGITS[i]) for i in range(3)] + [text]])
    capped = tiny_model(TransferConfig(kind="token_rate", gate="always", ungated="drop", max_backbone_items=1))
    uncapped = tiny_model(TransferConfig(kind="token_rate", gate="always", ungated="drop"))
    out, full = capped(batch), uncapped(batch)
    assert out.aux["gated_fraction"] == full.aux["gated_fraction"] == 1.0  # the gate's pass rate, before the cap
    assert out.aux["dropped_samples"] == 2.0 and full.aux["dropped_samples"] == 0.0
    assert out.aux["ctc_loss"] == full.aux["ctc_loss"] and out.aux["align_loss"] == full.aux["align_loss"]
    fused = capped.fuse(batch)
    assert sorted(set(fused.document_ids.flatten().tolist()) - {-1}) == [0, 3]  # the first speech sample and the text
    out.loss.backward()
    assert capped.audio_encoder.conv1.weight.grad.abs().sum() > 0
    capped.eval(), uncapped.eval()
    with torch.no_grad():  # eval reads every item
        torch.testing.assert_close(capped(batch).loss, uncapped(batch).loss)
    with pytest.raises(ValueError, match=r"model\.transfer\.max_backbone_items needs ungated: drop"):
        TransferConfig(kind="token_rate", max_backbone_items=4)


def test_gate_always_compresses_and_repacks(media):
    batch = mixed_batch(media)
    model = tiny_model(TransferConfig(kind="token_rate", gate="always"))
    out = model(batch)
    fused = model.fuse(batch)
    num_spans = round(out.aux["compressed_len"])  # of the one item with a transcript (row 0, document 0)
    assert out.aux["gated_fraction"] == 1.0 and num_spans > 0
    # documents are counted wherever compaction put them
    original = int((batch["document_ids"] == 0).sum())
    assert int((fused.document_ids == 0).sum()) == original - (int(batch["audio_num_tokens"][0]) + 2) + num_spans
    # row 1's audio item (document 2) has no transcript: with `always`, training compresses it too
    assert (fused.document_ids == 2).sum() < (batch["document_ids"] == 2).sum()
    assert out.aux["backbone_fraction"] < 1.0  # compaction: the rows hold less padding
    out.loss.backward()
    assert model.transfer.ctc_head.weight.grad.abs().sum() > 0


def test_eval_compresses_every_audio_item_from_its_greedy_labels(media):
    model = tiny_model(TransferConfig(kind="token_rate"), vision=False).eval()
    prompts = [render_prompt(chat("audio", "as code", ""), [media["speech"][i]], TOKENIZER) for i in (2, 3)]
    batch = collate([[p] for p in prompts])  # no transcripts: none is needed at inference
    with torch.no_grad():
        fused = model.fuse(batch)
        features, _, _ = model._encode(batch)
        logits = model.transfer.ctc_head(features["audio"])
        spans = greedy_spans(features["audio"], logits.argmax(-1), batch["audio_num_tokens"].tolist(), model.transfer.blank)
        text_embeds = model.backbone.embed(batch["input_ids"])
    mean_norm = model.backbone.embed_tokens.weight.norm(dim=-1).mean()
    offset = 0
    for row, prompt in enumerate(prompts):
        n, num_pads = spans.counts[row], prompt.media[0].num_tokens
        assert 0 < n < num_pads
        start = int((batch["modality_ids"][row] == MODALITY_IDS["audio"]).nonzero()[0]) - 1  # <|audio_start|> is replaced too
        length = len(prompt) - (num_pads + 2) + n
        assert int((fused.document_ids[row] >= 0).sum()) == length
        assert fused.position_ids[row, :length].tolist() == list(range(length))
        assert torch.equal(fused.embeds[row, :start], text_embeds[row, :start])  # <|im_start|>user\n
        prefix = fused.embeds[row, start:start + n]
        torch.testing.assert_close(prefix.norm(dim=-1), mean_norm.expand(n))
        torch.testing.assert_close(prefix / prefix.norm(dim=-1, keepdim=True),
                                   torch.nn.functional.normalize(spans.vectors[offset:offset + n], dim=-1))
        after = start + num_pads + 2
        assert torch.equal(fused.embeds[row, start + n:length], text_embeds[row, after:len(prompt)])  # "as code"... assistant\n
        offset += n


def test_every_parameter_gets_a_gradient_without_transcripts_or_audio(media):
    model = tiny_model(TransferConfig(kind="token_rate"))
    no_transcript = collate([[asr_sample(media["speech"][1], DIGITS[1], with_transcript=False)]])
    no_audio = collate([[render_chat(chat("image", "Describe.", "bands"), [media["image"]], TOKENIZER)],
                        [render_chat(chat(None, "print 1", "print(1)"), [], TOKENIZER)]])
    for batch, zero_modules in ((no_transcript, ("transfer.", "vision_")), (no_audio, ("transfer.", "audio_"))):
        model.zero_grad(set_to_none=True)
        out = model(batch)
        assert out.aux["ctc_loss"] == 0.0 and out.aux["transcribed_items"] == 0.0
        out.loss.backward()
        for name, grad in grads(model).items():
            assert grad is not None, name
            if name.startswith(zero_modules):
                assert grad.abs().sum() == 0, name
    model.zero_grad(set_to_none=True)
    model(no_transcript).loss.backward()
    assert model.audio_encoder.conv1.weight.grad.abs().sum() > 0  # the full audio still reaches the decoder


def test_module_calls_do_not_depend_on_the_batch(media):
    """The same modules run the same number of times in the same order, whatever the batch holds (ZeRO-3 safety)."""
    model = tiny_model(TransferConfig(kind="token_rate", gate="always"))
    calls: list[str] = []
    handles = [module.register_forward_pre_hook(lambda m, args, name=name: calls.append(name))
               for name, module in model.named_modules() if name]
    batches = [mixed_batch(media), collate([[asr_sample(media["speech"][4], DIGITS[4], with_transcript=False)]]),
               collate([[render_chat(chat(None, "print 1", "print(1)"), [], TOKENIZER)]])]
    sequences = []
    for train in (True, False):
        model.train(train)
        for batch in batches:
            calls.clear()
            with torch.no_grad():
                model(batch)
            sequences.append(list(calls))
    for handle in handles:
        handle.remove()
    assert sequences[0].count("transfer.ctc_head") == 1 and sequences[0].count("backbone.embed_tokens") == 2
    assert all(seq == sequences[0] for seq in sequences[1:])


def test_pretrained_backbone_with_a_grown_vocabulary_gets_a_matching_head(tmp_path):
    small = BackboneConfig(vocab_size=200, dim=64, num_layers=1, num_heads=4, num_kv_heads=2, ffn_dim=128, qk_norm=True)
    save_qwen_backbone(Backbone(small), small, tmp_path)
    cfg = tiny_config(TransferConfig(kind="token_rate"), vision=False)
    cfg = OmniConfig(backbone=cfg.backbone, audio=cfg.audio, transfer=cfg.transfer, pretrained_backbone=str(tmp_path))
    model = build_model(cfg, vocab_size=TOKENIZER.vocab_size)
    assert model.backbone.embed_tokens.num_embeddings == TOKENIZER.vocab_size
    assert model.transfer.ctc_head.out_features == TOKENIZER.vocab_size + 1 and model.transfer.blank == TOKENIZER.vocab_size


# ------------------------------------------------------------------------------------------------ learning


@contextlib.contextmanager
def one_thread():
    """Ops this small gain nothing from a second intra-op thread, and on a busy 2-core machine the
    second thread's spinning made steps 5-10x slower (38 ms vs 200-390 ms measured side by side)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.outcome
def test_ctc_learns_the_digits_opens_the_gate_and_eval_sees_the_token_rate_prefix(media, capsys):
    """Train on speech -> transcript only; the gate opens once greedy CTC labels equal the transcripts.

    Measured on the 2-core machine, one thread: the gated fraction passes 0.5 at step 384 (seed 0;
    300-470 over other seeds and model widths), 27-38 ms per step, 10-15 s. Trained on to 800 steps
    (not done here), every item is gated from step 456 and greedy decoding from the compressed
    prefix alone gives all 8 transcripts exactly. The step moves with the CPU's float kernels (a Zen 4
    EPYC: 371 with AVX-512, 363 with ATEN_CPU_CAPABILITY=avx2, 352 with =default); 900 leaves 2.4x.
    """
    samples = [asr_sample(audio, text) for audio, text in zip(media["speech"], DIGITS)]
    batch = collate([[s] for s in samples])
    model = tiny_model(TransferConfig(kind="token_rate"), vision=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    start, opened_at, max_steps = time.perf_counter(), None, 900
    with one_thread():
        for step in range(max_steps):
            out = model(batch)
            if out.aux["gated_fraction"] > 0.5:  # stop before the update: eval below sees the weights that opened it
                opened_at = step
                break
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
    elapsed_s = time.perf_counter() - start
    with capsys.disabled():
        print(f"\ntoken_rate ({torch.backends.cpu.get_cpu_capability()} kernels): gate > 0.5 at step {opened_at} of "
              f"{max_steps} after {elapsed_s:.1f} s; ctc_exact {out.aux['ctc_exact']:.3f}")
    assert opened_at is not None, f"the gate did not open in {max_steps} steps ({elapsed_s:.0f} s): {out.aux}"
    assert out.aux["ctc_exact"] > 0.5 and out.aux["align_loss"] > 0  # the alignment loss runs on the gated items

    model.eval()
    with torch.no_grad():
        fused = model.fuse(batch)
        features, _, _ = model._encode(batch)
        logits = model.transfer.ctc_head(features["audio"])
    spans = greedy_spans(features["audio"], logits.argmax(-1), batch["audio_num_tokens"].tolist(), model.transfer.blank)
    recognized = [i for i, labels in enumerate(spans.label.split(spans.counts)) if TOKENIZER.decode(labels.tolist()) == DIGITS[i]]
    assert len(recognized) > len(DIGITS) // 2, [TOKENIZER.decode(x.tolist()) for x in spans.label.split(spans.counts)]
    for i in recognized:  # the decoder sees exactly one vector per transcript token in place of the audio
        expected = len(samples[i]) - (samples[i].media[0].num_tokens + 2) + len(DIGITS[i])
        assert int((fused.document_ids[i] >= 0).sum()) == expected, i

    # a recognized utterance followed by text: the prefix has the transcript's length, the text follows it as is
    i = recognized[0]
    prompt = render_prompt(chat("audio", "as code", ""), [media["speech"][i]], TOKENIZER)
    prompt_batch = collate([[prompt]])
    with torch.no_grad():
        fused = model.fuse(prompt_batch)
        text_embeds = model.backbone.embed(prompt_batch["input_ids"])
    start = int((prompt_batch["modality_ids"][0] == MODALITY_IDS["audio"]).nonzero()[0]) - 1
    length = int((fused.document_ids[0] >= 0).sum())
    assert length == len(prompt) - (prompt.media[0].num_tokens + 2) + len(DIGITS[i])
    assert torch.equal(fused.embeds[0, start + len(DIGITS[i]):length], text_embeds[0, start + prompt.media[0].num_tokens + 2:])
