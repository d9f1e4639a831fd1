"""Greedy decoding and pooled hidden states for probes, on the single-device `OmniModel`.

    prompts = [render_prompt(messages, media, tokenizer) for ...]     # ends with <|im_start|>assistant\\n
    texts = generate(model, prompts, tokenizer, max_new_tokens=64)

One prompt per row, right-padded with room for the new tokens; `model.fuse(batch)` runs once
(encoders, projectors, fusion and any transfer mechanism), then each step runs the backbone over
the input embeddings, takes the argmax at each row's last real position and writes that token's
embedding at the next position, in the same document. The new tokens' position ids continue from
the prompt's largest id over all streams + 1, one per token, the same on all three streams with 3-D
positions (transformers' `mrope_position_deltas`: after an interleaved audio-in-video span the last
token's id can be below the maximum); with 1-D positions that is the last id + 1. No KV cache for
self-attention: the probe models are small, and a step only attends over the rows' current lengths.
With model.fusion cross_attn the media memory's keys and values of every cross-attention block are
computed once per call (`fusion.cache`, a media KV cache) and read at every step; the new tokens
carry their row's document id, so they read its media. A row stops at `<|im_end|>` or `<|endoftext|>`.

Row lengths come from the fused `document_ids` (>= 0 on real positions), never from the batch:
a fusion or transfer mechanism may replace a media span by fewer vectors.

Distributed rule: the parameters must be whole on every rank (`runner.run_probes` says how under
ZeRO-3), so no forward here is collective. `generate` runs exactly `max_new_tokens` steps (finished
rows stop changing) unless `stop_early` is set, which stops once every row has ended and changes no
output; the probe runner sets it. Only a module whose forward gathers parameters collectively
(ZeRO-3's own, which probes never get) would need every rank to make the same calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from omni_train.data.packing import collate_packed
from omni_train.data.sample import TokenizedSample
from omni_train.data.text import Tokenizer, render_prompt


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _fuse_prompts(model: nn.Module, prompts: Sequence[TokenizedSample], tokenizer: Tokenizer, *, room: int,
                  audio_cfg: Any = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Any]:
    """Collate one prompt per row, fuse, and leave `room` free positions after each row's end.

    Returns embeds (B, L, D), position_ids (B, L) or (3, B, L), document_ids (B, L), the index of
    each row's last real position (B,), the position id of each row's next token (B,) and
    (the fusion's media memory: FusedInputs.memory, None but for cross_attn; deepstack's (B, L, D)
    additions, None without model.vision.deepstack_layers).
    """
    assert prompts, "no prompts"
    batch = collate_packed([[p] for p in prompts], max(len(p) for p in prompts) + room, tokenizer.pad_id, audio_cfg)
    fused = model.fuse(_to_device(batch, model_device(model)))
    real = fused.document_ids >= 0                                                   # (B, L)
    assert bool(real.any(dim=1).all()), "a prompt row has no real position after fusion"
    columns = torch.arange(real.shape[1], device=real.device)
    last = torch.where(real, columns, -1).max(dim=1).values                           # (B,)
    length = int(last.max()) + 1 + room
    num_rows, fused_len, dim = fused.embeds.shape
    embeds = fused.embeds.new_zeros(num_rows, length, dim)
    embeds[:, :min(fused_len, length)] = fused.embeds[:, :length]
    positions = fused.position_ids.new_zeros(*fused.position_ids.shape[:-1], length)
    positions[..., :min(fused_len, length)] = fused.position_ids[..., :length]
    documents = fused.document_ids.new_full((num_rows, length), -1)
    documents[:, :min(fused_len, length)] = fused.document_ids[:, :length]
    streams_max = fused.position_ids if fused.position_ids.dim() == 2 else fused.position_ids.amax(dim=0)  # (B, L)
    next_position = torch.where(real, streams_max, -1).amax(dim=1) + 1                                      # (B,)
    deepstack = None
    if fused.deepstack:  # model.vision.deepstack_layers: the additions laid out as embeds, zero in the room
        deepstack = [addition.new_zeros(num_rows, length, dim) for addition in fused.deepstack]
        for padded, addition in zip(deepstack, fused.deepstack):
            padded[:, :min(fused_len, length)] = addition[:, :length]
    return embeds, positions, documents, last, next_position, (fused.memory, deepstack)


@torch.no_grad()
def generate_ids(model: nn.Module, prompts: Sequence[TokenizedSample], tokenizer: Tokenizer, *, max_new_tokens: int,
                 audio_cfg: Any = None, stop_early: bool = False, stop_ids: Sequence[int] | None = None,
                 cache_media: bool = True) -> list[list[int]]:
    """Greedy continuations of `prompts` (token ids, without the stop token), one list per prompt.

    `stop_ids`: the tokens that end a row (default `<|im_end|>` and `<|endoftext|>`; [] for exactly
    `max_new_tokens` tokens, as when comparing with another implementation's greedy decoding).
    `cache_media=False` recomputes the cross_attn media keys and values at every step (tests compare).
    """
    embeds, positions, documents, last, next_position, (memory, deepstack) = _fuse_prompts(
        model, prompts, tokenizer, room=max_new_tokens, audio_cfg=audio_cfg)
    media = model.fusion.cache(memory) if memory is not None and cache_media else memory
    backbone = model.backbone
    num_rows = len(prompts)
    rows = torch.arange(num_rows, device=embeds.device)
    stop_ids = torch.tensor([tokenizer.im_end_id, tokenizer.endoftext_id] if stop_ids is None else list(stop_ids),
                            dtype=torch.long, device=embeds.device)
    done = torch.zeros(num_rows, dtype=torch.bool, device=embeds.device)
    generated: list[list[int]] = [[] for _ in range(num_rows)]
    for _ in range(max_new_tokens):
        if stop_early and bool(done.all()):
            break
        width = int(last.max()) + 1  # positions after every row's end are padding or unwritten: leave them out
        hidden = backbone(inputs_embeds=embeds[:, :width], position_ids=positions[..., :width],
                          document_ids=documents[:, :width],
                          after_layer=model.after_layer(media, documents[:, :width],
                                                        deepstack and [d[:, :width] for d in deepstack]))  # (B, width, D)
        next_ids = backbone.logits(hidden[rows, last]).argmax(dim=-1)                   # (B,)
        stops = torch.isin(next_ids, stop_ids)
        write = ~done & ~stops                                                          # rows that go on
        for row in write.nonzero().flatten().tolist():
            generated[row].append(int(next_ids[row]))
        new_embeds = backbone.embed(next_ids)  # every step, for every row: the same calls on every rank
        at, to = rows[write], last[write] + 1
        embeds[at, to] = new_embeds[write].to(embeds.dtype)
        positions[..., at, to] = next_position[write]  # on every stream of 3-D positions
        documents[at, to] = documents[at, last[write]]
        last = torch.where(write, last + 1, last)
        next_position = torch.where(write, next_position + 1, next_position)
        done |= stops
    return generated


def generate(model: nn.Module, prompts: Sequence[TokenizedSample], tokenizer: Tokenizer, *, max_new_tokens: int,
             audio_cfg: Any = None, stop_early: bool = False) -> list[str]:
    """Greedy continuations of `prompts` as text (special tokens dropped); see the module docstring."""
    ids = generate_ids(model, prompts, tokenizer, max_new_tokens=max_new_tokens, audio_cfg=audio_cfg, stop_early=stop_early)
    return [tokenizer.decode(row) for row in ids]


def text_messages(text: str, instruction: str | None = None) -> list[dict]:
    """A one-turn user conversation: the input text, then the instruction as its own part (the corpus layout)."""
    parts = [{"type": "text", "text": text}]
    if instruction is not None:
        parts.append({"type": "text", "text": instruction})
    return [{"role": "user", "content": parts}]


def generate_from_text(model: nn.Module, tokenizer: Tokenizer, prompts: Sequence[str], *, instruction: str | None = None,
                       max_new_tokens: int, stop_early: bool = False) -> list[str]:
    """Greedy answers to text-only user turns `prompt` (+ `instruction` as a second text part)."""
    rendered = [render_prompt(text_messages(text, instruction), [], tokenizer) for text in prompts]
    return generate(model, rendered, tokenizer, max_new_tokens=max_new_tokens, stop_early=stop_early)


@torch.no_grad()
def mean_hidden(model: nn.Module, prompts: Sequence[TokenizedSample], tokenizer: Tokenizer, *,
                trims: Sequence[tuple[int, int]], exclude_ids: Sequence[int] = (), audio_cfg: Any = None) -> torch.Tensor:
    """(B, D) float32: per row, the mean of the backbone's final hidden states over its real positions
    minus `trims[i] = (first positions to leave out, last positions to leave out)`, and minus the
    positions whose input is the embedding of one of `exclude_ids` (e.g. media start/end markers).

    The trims count text tokens around the span of interest (the chat template's role header and
    the end of the turn), which fusion leaves as they are; a media span in between may be shortened,
    and its markers dropped, so those are found by their embedding rather than by position.
    """
    embeds, positions, documents, last, _, (memory, deepstack) = _fuse_prompts(model, prompts, tokenizer, room=0,
                                                                                audio_cfg=audio_cfg)
    hidden = model.backbone(inputs_embeds=embeds, position_ids=positions, document_ids=documents,
                            after_layer=model.after_layer(memory, documents, deepstack))  # (B, L, D)
    columns = torch.arange(hidden.shape[1], device=hidden.device)
    start = torch.tensor([t[0] for t in trims], device=hidden.device)
    end = last + 1 - torch.tensor([t[1] for t in trims], device=hidden.device)
    mask = (columns >= start[:, None]) & (columns < end[:, None])                            # (B, L)
    marker_embeds = model.backbone.embed(torch.tensor(list(exclude_ids) or [tokenizer.pad_id], device=embeds.device))
    for marker in marker_embeds[:len(exclude_ids)]:  # (D,) each
        mask &= ~(embeds == marker.to(embeds.dtype)).all(dim=-1)
    if not bool(mask.any(dim=1).all()):
        raise ValueError("mean_hidden: a row has no position left between its trims")
    summed = (hidden.float() * mask[..., None]).sum(dim=1)
    return summed / mask.sum(dim=1, keepdim=True)
