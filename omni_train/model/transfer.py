"""Cross-modal transfer mechanisms (`model.transfer`): a speech prefix the decoder reads like text.

`kind: token_rate` (TRANSFER-CALIBRATION.md, "a mechanism that worked": zero-shot speech -> code
went from 0% to 75% on a tiny model) acts between fusion and the backbone:

    audio projector output (num frames, D), about 25 per second
      -> ctc_head (Linear D -> vocab_size + 1, last index = blank)
      -> CTC loss against the transcript token ids (`batch["audio_transcript_ids"]`), weight ctc_weight
      -> greedy labels per frame; runs of one label collapse into a span, blank runs are dropped
      -> one vector per span: the mean of the projector vectors over the span, rescaled to the mean
         L2 norm of the backbone's input embedding rows (detached)
      -> alignment: cosine distance of each vector to the (detached) input embedding of its
         transcript token, weight align_weight
      -> gated items: their audio span, with `replace_markers` also `<|audio_start|>` and
         `<|audio_end|>`, is replaced by the span vectors and every row is `repack`ed (shorter
         documents, more padding at the end)

Which items are compressed. Training (and eval with `compress_at_inference: false`): items with
a transcript whose greedy labels equal it (`gate: exact`; without the gate, recognition never
left its plateau in the calibration), or every item that yields a span (`gate: always`); the
others keep their full audio features (`ungated: keep`, the calibration's variant) or leave the
backbone's batch altogether (`ungated: drop`: their whole sample is removed, the audio encoder
learns from the CTC loss alone until the gate opens). Eval with `compress_at_inference: true`:
every audio item that yields a span, transcript or not, so the decoder sees only the token-rate
prefix.

`max_backbone_items` (training, with `drop`) caps the compressed items of a micro-batch that enter the
backbone; the ones over the cap leave it like ungated ones, after their CTC and alignment losses. A
batch can then carry far more speech for the recognizer than the decoder needs to learn to read
compressed prefixes: on the demo, twice the utterances per step opened the gate ~2x sooner, and the
cap keeps the backbone's cost once it is open.

Why `drop` (docs/demo.md): at inference the decoder only ever reads compressed prefixes, so the
full-audio samples it trains on before the gate opens cost about half of the backbone's positions
and teach it nothing the probes use; without them a CPU step is cheaper and the gate opens
sooner in wall-clock time.

Rows are compacted in training whenever something was compressed or dropped: the remaining
samples are packed again by the data layer's best-fit packer into as few rows of the same length
as they fill (`compact_rows`). Attention never crosses a document and the loss is a mean over
the same tokens, so this changes only how much padding the backbone computes.

Spaces are labels like any other token: a transcript's space tokens are CTC targets, and the
compressed prefix holds the vectors CTC emitted for them. On espeak digit strings the CTC head
learns the spaces together with the digits (tests/test_transfer.py's learning check opens the
gate with them), so the calibration's separate insertion of the space embedding is not needed;
with a tokenizer that merges spaces into word pieces there is nothing to insert anyway.

Metrics (`FusedInputs.aux`, logged by the engine): ctc_loss, align_loss, gated_fraction (compressed
items over the gate's population: the items with a transcript, or every audio item where any may
be compressed), ctc_exact (items whose greedy labels equal their transcript), compressed_len and
transcript_len (mean spans and mean transcript tokens over the items with a transcript),
transcribed_items, dropped_samples (`ungated: drop`) and backbone_fraction (positions the backbone
runs after compaction over those of the batch). Every key is present in every forward, 0.0 where
undefined.

Distributed rule (omni.py): the CTC head runs exactly once per forward on every rank (on a
zero vector when the batch has no audio) and always reaches the loss (`0.0 * ...` where there
is nothing to recognize), and the input embedding is called exactly once more for the
alignment targets, however many items have transcripts.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from omni_train.data.packing import IGNORE_INDEX, Packer
from omni_train.data.sample import MODALITY_IDS
from omni_train.model.attention import document_ids_to_cu_seqlens

if TYPE_CHECKING:
    from omni_train.model.omni import FusedInputs  # omni imports this module

TRANSFER_KINDS = ("none", "token_rate")
GATES = ("exact", "always")
UNGATED = ("keep", "drop")


@dataclass(kw_only=True)
class TransferConfig:
    kind: str = "none"                  # TRANSFER_KINDS; none: the plain fusion, bit-identical to a model without this field
    ctc_weight: float = 0.3             # CTC loss on the audio projector output (token_rate)
    align_weight: float = 1.0           # cosine distance of span vectors to their transcript tokens' embeddings
    gate: str = "exact"                 # GATES: exact = compress only items whose greedy CTC labels equal the transcript
    compress_at_inference: bool = True  # eval mode: compress every audio item from its greedy labels, no transcript needed
    replace_markers: bool = True        # the compressed span replaces <|audio_start|> and <|audio_end|> too (text layout)
    ungated: str = "keep"               # UNGATED, training: an item with a transcript that the gate keeps out is fed as
                                        # full audio (keep) or its sample leaves the backbone's batch (drop)
    max_backbone_items: int = 0         # training with ungated=drop: at most this many compressed items per micro-batch
                                        # enter the backbone, the others train the audio side only (0: all)

    def __post_init__(self):
        if self.kind not in TRANSFER_KINDS:
            raise ValueError(f"model.transfer.kind must be one of {', '.join(TRANSFER_KINDS)}, got {self.kind!r}")
        if self.gate not in GATES:
            raise ValueError(f"model.transfer.gate must be one of {', '.join(GATES)}, got {self.gate!r}")
        if self.ungated not in UNGATED:
            raise ValueError(f"model.transfer.ungated must be one of {', '.join(UNGATED)}, got {self.ungated!r}")
        for name in ("ctc_weight", "align_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"model.transfer.{name} must be a number >= 0, got {value!r}")
        if isinstance(self.max_backbone_items, bool) or not isinstance(self.max_backbone_items, int) \
                or self.max_backbone_items < 0:
            raise ValueError(f"model.transfer.max_backbone_items must be an integer >= 0, got {self.max_backbone_items!r}")
        if self.max_backbone_items and self.ungated != "drop":
            raise ValueError("model.transfer.max_backbone_items needs ungated: drop (with keep, the items over the cap "
                             "would enter the backbone as full audio)")
        for name in ("compress_at_inference", "replace_markers"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"model.transfer.{name} must be true or false, got {getattr(self, name)!r}")


@dataclass
class Spans:
    """Greedy CTC spans of every audio item: span k belongs to item `item[k]` and emitted token `label[k]`."""

    item: torch.Tensor     # (S,) long, items in batch order, spans in time order within an item
    label: torch.Tensor    # (S,) long, never the blank
    vectors: torch.Tensor  # (S, D) float32: mean projector vector over the span's frames (not rescaled)
    counts: list[int]      # spans per item (num_items,)


def greedy_spans(frame_features: torch.Tensor, frame_labels: torch.Tensor, num_frames: list[int], blank: int) -> Spans:
    """Collapse each item's greedy labels into spans (runs of one label, blanks dropped), each with its mean vector.

    frame_features (N, D) and frame_labels (N,) hold the frames of all items one after another,
    `num_frames[i]` of item i; runs never cross from one item into the next.
    """
    device = frame_labels.device
    num_items = len(num_frames)
    frame_item = torch.repeat_interleave(torch.arange(num_items, device=device),
                                         torch.tensor(num_frames, device=device))  # (N,)
    # one key per (item, label), so a run that would continue across an item boundary is cut there
    _, run_of_frame, run_length = torch.unique_consecutive(frame_item * (blank + 1) + frame_labels,
                                                           return_inverse=True, return_counts=True)
    num_runs = run_length.shape[0]
    sums = frame_features.float().new_zeros(num_runs, frame_features.shape[1]).index_add(0, run_of_frame,
                                                                                         frame_features.float())
    run_item = frame_item.new_zeros(num_runs).scatter(0, run_of_frame, frame_item)
    run_label = frame_labels.new_zeros(num_runs).scatter(0, run_of_frame, frame_labels)
    keep = run_label != blank
    item = run_item[keep]
    counts = torch.bincount(item, minlength=num_items).tolist() if num_items else []
    return Spans(item=item, label=run_label[keep], vectors=(sums / run_length[:, None])[keep], counts=counts)


def repack(embeds: torch.Tensor, position_ids: torch.Tensor, document_ids: torch.Tensor, labels: torch.Tensor,
           spans: list[tuple[int, int, int]], vectors: list[torch.Tensor]
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replace positions [start, end) of `row` by `vectors[k]` (n_k, D) for each spans[k] = (row, start, end); rows keep length L.

    Each touched row is rebuilt: the tokens before a span, its vectors, the tokens after, for
    every span of the row in order; labels and document ids move with their tokens (the vectors
    get IGNORE_INDEX and the span's document), positions restart at each document's first
    position and count up, and the freed positions go to padding at the end of the row (zero
    embedding, position 0, document -1, no label). A span must lie inside one document and leave
    room: n_k <= end - start (a longer replacement could push a document out of its row).
    Rows without a span come back unchanged. Returns (embeds, position_ids, document_ids, labels).
    """
    num_rows, row_len, dim = embeds.shape
    assert position_ids.shape == document_ids.shape == labels.shape == (num_rows, row_len), \
        "repack takes 1-D positions (B, L); 3-D (tmrope) positions are not supported"
    assert len(spans) == len(vectors)
    if not spans:
        return embeds, position_ids, document_ids, labels
    device = embeds.device
    by_row: dict[int, list[int]] = {}
    for k, (row, start, end) in enumerate(spans):
        assert 0 <= start < end <= row_len and vectors[k].shape[0] <= end - start, (spans[k], vectors[k].shape)
        by_row.setdefault(row, []).append(k)

    # Every output position reads one entry of a pool: the original (B * L) tokens, then every
    # replacement vector, then one padding entry.
    num_vectors = [v.shape[0] for v in vectors]
    vector_offset = [num_rows * row_len + n for n in itertools.accumulate([0] + num_vectors[:-1])]  # each span's first vector
    pad_index = num_rows * row_len + sum(num_vectors)
    index = torch.arange(num_rows * row_len).view(num_rows, row_len).clone()  # (B, L) into the pool
    flat_docs = document_ids.flatten().tolist()
    for row, ks in by_row.items():
        ks = sorted(ks, key=lambda k: spans[k][1])
        pieces, cursor = [], 0
        for k in ks:
            _, start, end = spans[k]
            assert start >= cursor, f"spans overlap in row {row}"
            docs_in_span = set(flat_docs[row * row_len + start: row * row_len + end])
            assert len(docs_in_span) == 1 and min(docs_in_span) >= 0, f"span {spans[k]} crosses a document boundary or covers padding"
            pieces += [torch.arange(row * row_len + cursor, row * row_len + start),
                       torch.arange(vector_offset[k], vector_offset[k] + num_vectors[k])]
            cursor = end
        real_end = row_len
        while real_end > cursor and flat_docs[row * row_len + real_end - 1] < 0:  # the row's original padding is dropped
            real_end -= 1
        pieces.append(torch.arange(row * row_len + cursor, row * row_len + real_end))
        kept = torch.cat(pieces)
        index[row] = torch.cat([kept, torch.full((row_len - kept.shape[0],), pad_index)])
    index = index.to(device)

    span_docs = torch.tensor([flat_docs[row * row_len + start] for row, start, _ in spans], device=device)
    span_positions = position_ids[torch.tensor([s[0] for s in spans], device=device),
                                  torch.tensor([s[1] for s in spans], device=device)]
    vector_span = torch.repeat_interleave(torch.arange(len(spans), device=device), torch.tensor(num_vectors, device=device))
    vector_rank = torch.cat([torch.arange(n, device=device) for n in num_vectors])  # index of a vector within its span
    pool_embeds = torch.cat([embeds.reshape(-1, dim), *[v.to(embeds.dtype) for v in vectors], embeds.new_zeros(1, dim)])
    pool_docs = torch.cat([document_ids.flatten(), span_docs[vector_span], document_ids.new_full((1,), -1)])
    pool_labels = torch.cat([labels.flatten(), labels.new_full((vector_span.shape[0] + 1,), IGNORE_INDEX)])
    pool_positions = torch.cat([position_ids.flatten(), span_positions[vector_span] + vector_rank, position_ids.new_zeros(1)])

    new_docs = pool_docs[index]  # (B, L)
    # positions: each document keeps the position of its first token and counts up from there
    column = torch.arange(row_len, device=device).expand(num_rows, row_len)
    starts = torch.ones_like(new_docs, dtype=torch.bool)
    starts[:, 1:] = new_docs[:, 1:] != new_docs[:, :-1]
    first = torch.where(starts, column, 0).cummax(dim=1).values  # (B, L) column of the document's first token
    new_positions = pool_positions[index.gather(1, first)] + column - first
    new_positions = torch.where(new_docs >= 0, new_positions, 0)
    touched = torch.zeros(num_rows, 1, dtype=torch.bool, device=device)
    touched[list(by_row)] = True
    return (pool_embeds[index], torch.where(touched, new_positions, position_ids), new_docs, pool_labels[index])


def compact_rows(embeds: torch.Tensor, position_ids: torch.Tensor, document_ids: torch.Tensor, labels: torch.Tensor,
                 drop: set[int] = frozenset()) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack the documents of (B, L) rows again into as few rows as they fill, leaving out the documents in `drop`.

    Every document is a contiguous run of one id in one row (the packer never cuts a sample, and
    repack keeps them whole); the runs, longest first, go through the data layer's best-fit
    `Packer`, and each token keeps its embedding, position, label and document id, which stay
    unique across the batch. The row length becomes that of the fullest new row. With nothing left,
    one padding position remains, so the backbone still runs (distributed rule). Returns
    (embeds, position_ids, document_ids, labels).
    """
    num_rows, row_len, dim = embeds.shape
    assert position_ids.shape == document_ids.shape == labels.shape == (num_rows, row_len), \
        "compact_rows takes 1-D positions (B, L)"
    bounds = document_ids_to_cu_seqlens(document_ids)[0].tolist()  # runs of one id, never across rows
    flat_docs = document_ids.flatten().tolist()
    runs = [range(start, end) for start, end in zip(bounds[:-1], bounds[1:])
            if flat_docs[start] >= 0 and flat_docs[start] not in drop]
    packer = Packer(row_len, pool_size=max(len(runs), 1))
    for run in sorted(runs, key=len, reverse=True):
        packer.add(run)
    rows = []
    while sequence := packer.pop_sequence():
        rows.append(torch.cat([torch.arange(run.start, run.stop) for run in sequence]))
    pad_index = num_rows * row_len
    index = torch.full((max(len(rows), 1), max((len(row) for row in rows), default=1)), pad_index, dtype=torch.long)
    for r, row in enumerate(rows):
        index[r, :len(row)] = row
    index = index.to(embeds.device)

    def gather(x: torch.Tensor, pad_value) -> torch.Tensor:
        pool = torch.cat([x.reshape(num_rows * row_len, *x.shape[2:]), x.new_full((1, *x.shape[2:]), pad_value)])
        return pool[index]

    return gather(embeds, 0), gather(position_ids, 0), gather(document_ids, -1), gather(labels, IGNORE_INDEX)


class TokenRateTransfer(nn.Module):
    """`kind: token_rate`: the CTC head and the compression, alignment, gating and repacking around it (module docstring)."""

    def __init__(self, cfg: TransferConfig, dim: int, vocab_size: int, *, init_std: float = 0.02):
        super().__init__()
        assert cfg.kind == "token_rate", cfg.kind
        self.cfg = cfg
        self.blank = vocab_size  # the last of vocab_size + 1 outputs
        self.ctc_head = nn.Linear(dim, vocab_size + 1)
        with torch.no_grad():
            self.ctc_head.weight.normal_(0.0, init_std)
            self.ctc_head.bias.zero_()

    def compress(self, fused: FusedInputs, batch: dict[str, Any], audio_features: torch.Tensor | None,
                 embedding: nn.Embedding) -> FusedInputs:
        """Fused inputs with the full audio in place -> the same, repacked, with `aux_loss` and `aux` set.

        audio_features (num frames, D): the audio projector's output for every audio item of the
        batch in order (None without audio); `embedding` is the backbone's input embedding.
        A plain method, not `forward`: ZeRO-3 hooks wrap the tensors a module's forward takes and
        returns, and they cannot see into FusedInputs or the batch dict (they would rewrite it in
        place); the modules with parameters that run here (`ctc_head`, `embedding`) take and return
        plain tensors, so their hooks work as usual.
        """
        embeds, position_ids, document_ids, labels = fused.embeds, fused.position_ids, fused.document_ids, fused.labels
        device = embeds.device
        frames = audio_features if audio_features is not None else embeds.new_zeros(1, embeds.shape[-1])
        logits = self.ctc_head(frames).float()  # (N, V + 1): once per forward, also without audio
        num_frames = batch["audio_num_tokens"].tolist() if audio_features is not None else []
        transcripts = [t.to(device=device, dtype=torch.long) for t in batch.get("audio_transcript_ids", [])] \
            if audio_features is not None else []
        assert not transcripts or len(transcripts) == len(num_frames), (len(transcripts), len(num_frames))
        transcripts = transcripts or [torch.zeros(0, dtype=torch.long, device=device)] * len(num_frames)
        with_transcript = [i for i, t in enumerate(transcripts) if t.numel() > 0]

        # alignment targets: one embedding call per forward whatever the batch holds (distributed rule)
        with torch.no_grad():
            targets = embedding(torch.cat([transcripts[i] for i in with_transcript]) if with_transcript
                                else torch.zeros(0, dtype=torch.long, device=device)).float()  # (sum of lengths, D)
        target_of = dict(zip(with_transcript, targets.split([transcripts[i].numel() for i in with_transcript])))

        ctc = self._ctc_loss(logits, num_frames, transcripts, with_transcript)
        spans = greedy_spans(frames, logits.argmax(-1).detach(), num_frames, self.blank) if num_frames else None
        span_vectors = spans.vectors.split(spans.counts) if spans is not None else ()
        span_labels = spans.label.split(spans.counts) if spans is not None else ()

        compress_all = not self.training and self.cfg.compress_at_inference
        chosen, aligned, exact = [], [], []
        for i in range(len(num_frames)):
            matches = i in target_of and torch.equal(span_labels[i], transcripts[i])
            exact.append(matches)
            if span_vectors[i].shape[0] == 0:
                continue  # nothing recognized: keep the full audio
            if compress_all or self.cfg.gate == "always" or matches:
                chosen.append(i)
            if i in target_of and span_vectors[i].shape[0] == transcripts[i].numel() and (matches or self.cfg.gate == "always"):
                aligned.append(i)

        # the vectors of the text embedding's scale, so the backbone reads them like token embeddings; the weight
        # is read directly, as Backbone.logits reads it for tied embeddings
        target_norm = embedding.weight.detach().float().norm(dim=-1).mean()
        compressed = {i: span_vectors[i] * (target_norm / span_vectors[i].norm(dim=-1, keepdim=True).clamp_min(1e-6))
                      for i in chosen}
        if aligned:
            # cosine ignores the rescaling: the span means themselves are compared
            cosine = F.cosine_similarity(torch.cat([span_vectors[i] for i in aligned]),
                                         torch.cat([target_of[i] for i in aligned]), dim=-1)
            align = (1.0 - cosine).mean()
        else:
            align = logits.new_zeros(())

        item_spans = audio_item_spans(batch["modality_ids"], num_frames) if num_frames else []
        passed = len(chosen)
        if self.training and self.cfg.max_backbone_items and passed > self.cfg.max_backbone_items:
            # the first items in batch order (the pipeline's shuffle); the rest still had their CTC and alignment
            chosen = chosen[:self.cfg.max_backbone_items]
        dropped: set[int] = set()
        if self.training and self.cfg.ungated == "drop":
            doc_of = {i: int(document_ids[item_spans[i][0], item_spans[i][1]]) for i in range(len(num_frames))}
            # a sample whose other audio item is compressed stays (with this one as full audio)
            dropped = {doc_of[i] for i in with_transcript if i not in chosen} - {doc_of[i] for i in chosen}
        if chosen:
            margin = 1 if self.cfg.replace_markers else 0
            replace = [(item_spans[i][0], item_spans[i][1] - margin, item_spans[i][2] + margin) for i in chosen]
            embeds, position_ids, document_ids, labels = repack(embeds, position_ids, document_ids, labels, replace,
                                                                [compressed[i] for i in chosen])
        num_positions = document_ids.numel()
        if self.training and (chosen or dropped):
            embeds, position_ids, document_ids, labels = compact_rows(embeds, position_ids, document_ids, labels, dropped)

        aux_loss = self.cfg.ctc_weight * ctc + self.cfg.align_weight * align
        num_transcribed = len(with_transcript)
        # the gate's population: the items with a transcript, or every audio item where any may be compressed
        considered = len(num_frames) if compress_all or self.cfg.gate == "always" else num_transcribed
        aux = {
            "ctc_loss": float(ctc.detach()),
            "align_loss": float(align.detach()),
            "gated_fraction": passed / considered if considered else 0.0,
            "ctc_exact": sum(exact[i] for i in with_transcript) / num_transcribed if num_transcribed else 0.0,
            "compressed_len": sum(spans.counts[i] for i in with_transcript) / num_transcribed if num_transcribed else 0.0,
            "transcript_len": sum(transcripts[i].numel() for i in with_transcript) / num_transcribed if num_transcribed else 0.0,
            "transcribed_items": float(num_transcribed),
            "dropped_samples": float(len(dropped)),
            "backbone_fraction": document_ids.numel() / num_positions,  # positions the backbone runs, after compaction
        }
        return dataclasses.replace(fused, embeds=embeds, position_ids=position_ids, document_ids=document_ids,
                                   labels=labels, aux_loss=fused.aux_loss + aux_loss, aux={**fused.aux, **aux})

    def _ctc_loss(self, logits: torch.Tensor, num_frames: list[int], transcripts: list[torch.Tensor],
                  with_transcript: list[int]) -> torch.Tensor:
        """Mean CTC loss (each item's divided by its transcript length) over the items with a transcript.

        Exact, over a few columns: CTC reads only the log-probabilities of the transcripts' tokens and of
        the blank, so after the full log-softmax the others are summed into one "other" column
        (logsumexp). The columns still form a distribution, the loss and every gradient are those of the
        full vocabulary (tests/test_transfer.py), and `F.ctc_loss` runs over ~30 columns instead of
        vocab_size + 1 (151k with a Qwen tokenizer), where its CPU kernel spent most of the head's time.
        """
        if not with_transcript:
            return 0.0 * logits.sum()  # keeps the head in the graph: a gradient (of zeros) on every rank
        log_probs = logits.log_softmax(-1)
        targets = torch.cat([transcripts[i] for i in with_transcript])
        used = torch.unique(targets)  # sorted
        keep = torch.cat([used, used.new_tensor([self.blank])])
        others = torch.ones(log_probs.shape[-1], dtype=torch.bool, device=log_probs.device)
        others[keep] = False
        columns = [log_probs[:, keep]]
        if others.any():
            columns.append(log_probs[:, others].logsumexp(-1, keepdim=True))
        per_item = torch.cat(columns, -1).split(num_frames)
        chosen = [per_item[i] for i in with_transcript]
        padded = nn.utils.rnn.pad_sequence(chosen)  # (T_max, n, tokens used + blank + other)
        input_lengths = torch.tensor([x.shape[0] for x in chosen])
        target_lengths = torch.tensor([transcripts[i].numel() for i in with_transcript])
        return F.ctc_loss(padded, torch.searchsorted(used, targets), input_lengths, target_lengths,
                          blank=used.numel(), reduction="mean", zero_infinity=True)


def audio_item_spans(modality_ids: torch.Tensor, num_frames: list[int]) -> list[tuple[int, int, int]]:
    """(row, start, end) of each audio item's placeholder positions, in the row-major order fusion fills them."""
    rows, cols = (modality_ids == MODALITY_IDS["audio"]).nonzero(as_tuple=True)
    assert rows.numel() == sum(num_frames), (rows.numel(), sum(num_frames))
    rows, cols = rows.tolist(), cols.tolist()
    out, offset = [], 0
    for n in num_frames:
        row, start, end = rows[offset], cols[offset], cols[offset + n - 1] + 1
        if rows[offset + n - 1] != row or end - start != n:  # a video's audio track, interleaved with its frames
            raise ValueError("model.transfer replaces whole audio spans, but an audio item's placeholders are not "
                             "contiguous (audio in video); set use_audio_in_video to false for its samples")
        out.append((row, start, end))
        offset += n
    return out


def build_transfer(cfg: TransferConfig, *, dim: int, vocab_size: int, init_std: float = 0.02) -> nn.Module | None:
    """The module of `model.transfer` (None for kind none: no parameters, the model is unchanged)."""
    if cfg.kind == "none":
        return None
    return TokenRateTransfer(cfg, dim, vocab_size, init_std=init_std)

