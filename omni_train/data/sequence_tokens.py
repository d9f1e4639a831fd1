"""How many backbone positions a media item takes (its "sequence tokens"), for the data layer and the model alike.

An encoder turns an item into n encoder tokens (`EncodedMedia.num_tokens`); the fusion decides how
many positions the item then occupies in the backbone's sequence, and the chat template reserves
exactly that many placeholders (`EncodedMedia.seq_tokens`):

    encoder    n                    interleave with an mlp / linear projector (the default, today's layout)
    pool       ceil(n / factor)     model.projector pool: groups of `factor` neighbouring encoder tokens, in
                                    encoder order (the last group partial), averaged before the MLP
    resampler  queries x spans      model.fusion resampler: `queries` learned-query outputs per item, or for
                                    audio with model.resampler.span_s, per span of `span_tokens` encoder tokens
                                    (ceil(n / span_tokens) spans, the last partial)
    anchor     1                    model.fusion cross_attn: one placeholder per item, whose row and document
                                    tell which document the item belongs to; its features stay out of the sequence

A kind applies to the modalities in `SequenceTokens.modalities` (a pool projector set for audio only
pools audio only); the others keep `encoder`. The recipe loader derives `data.sequence_tokens` from
the model's settings (`OmniConfig.sequence_tokens`), and the model groups its features with the same
functions, so placeholders and features always agree. A group's position carries the timestamp of
its first encoder token (`group_timestamps`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from omni_train.data.sample import EncodedMedia

SEQUENCE_TOKEN_KINDS = ("encoder", "pool", "resampler", "anchor")
MEDIA_MODALITIES = ("audio", "image", "video")


@dataclass(kw_only=True)
class SequenceTokens:
    """`data.sequence_tokens`: derived from model.fusion / model.projector / model.pool / model.resampler by the recipe loader."""

    kind: str = "encoder"          # SEQUENCE_TOKEN_KINDS
    factor: int = 2                # pool: encoder tokens averaged into one position (model.pool.factor)
    queries: int = 16              # resampler: positions per item or span (model.resampler.queries)
    span_tokens: int | None = None  # resampler, audio only: encoder tokens per span (model.resampler.span_s); None: whole items
    modalities: list[str] = field(default_factory=lambda: list(MEDIA_MODALITIES))  # where `kind` applies; else encoder

    def __post_init__(self):
        if self.kind not in SEQUENCE_TOKEN_KINDS:
            raise ValueError(f"sequence_tokens.kind must be one of {', '.join(SEQUENCE_TOKEN_KINDS)}, got {self.kind!r}")
        for name in ("factor", "queries"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"sequence_tokens.{name} must be an integer >= 1, got {value!r}")
        if self.span_tokens is not None and (not isinstance(self.span_tokens, int) or self.span_tokens < 1):
            raise ValueError(f"sequence_tokens.span_tokens must be an integer >= 1 or null, got {self.span_tokens!r}")
        unknown = [m for m in self.modalities if m not in MEDIA_MODALITIES]
        if unknown:
            raise ValueError(f"sequence_tokens.modalities must be among {', '.join(MEDIA_MODALITIES)}, got {unknown}")

    def kind_of(self, modality: str) -> str:
        return self.kind if modality in self.modalities else "encoder"


def group_sizes(modality: str, num_encoder_tokens: int, cfg: SequenceTokens) -> list[int]:
    """The item's encoder tokens cut into consecutive groups, one per pool position or resampler span.

    encoder: groups of 1; pool: of `factor`; resampler: one group per span (audio with `span_tokens`)
    or the whole item; anchor: the whole item. The last group is partial. Sum = num_encoder_tokens.
    """
    n = num_encoder_tokens
    kind = cfg.kind_of(modality)
    if kind == "encoder":
        size = 1
    elif kind == "pool":
        size = cfg.factor
    elif kind == "resampler" and modality == "audio" and cfg.span_tokens is not None:
        size = cfg.span_tokens
    else:
        size = max(n, 1)
    return [size] * (n // size) + ([n % size] if n % size else [])


def sequence_token_count(modality: str, num_encoder_tokens: int, cfg: SequenceTokens) -> int:
    """Backbone positions of one item of `modality` with `num_encoder_tokens` encoder tokens (module docstring)."""
    kind = cfg.kind_of(modality)
    if kind == "anchor":
        return 1
    num_groups = len(group_sizes(modality, num_encoder_tokens, cfg))
    return num_groups * cfg.queries if kind == "resampler" else num_groups


def group_timestamps(modality: str, token_timestamps_s: torch.Tensor, cfg: SequenceTokens) -> torch.Tensor:
    """(seq_tokens,) float32 timestamps of an item's positions: each group's first encoder token's (0 when it has none)."""
    n = int(token_timestamps_s.shape[0])
    count = sequence_token_count(modality, n, cfg)
    if n == 0:
        return torch.zeros(count)
    sizes = group_sizes(modality, n, cfg)
    firsts = token_timestamps_s[torch.tensor([0, *sizes[:-1]], dtype=torch.long).cumsum(0)].to(torch.float32)
    return firsts[:1] if cfg.kind_of(modality) == "anchor" else firsts.repeat_interleave(count // len(sizes))


def apply_sequence_tokens(item: EncodedMedia, cfg: SequenceTokens) -> EncodedMedia:
    """The `EncodedMedia` with `seq_tokens` and `seq_timestamps_s` for `cfg` (a copy; the item itself for kind encoder)."""
    if cfg.kind_of(item.modality) == "encoder":
        return item
    assert item.audio is None, "audio in video keeps encoder tokens (refused at recipe load)"
    seq_timestamps_s = group_timestamps(item.modality, item.token_timestamps_s, cfg)
    return dataclasses.replace(item, seq_tokens=int(seq_timestamps_s.shape[0]), seq_timestamps_s=seq_timestamps_s)
