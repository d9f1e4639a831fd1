"""In-memory forms of one sample on its way to a batch: decoded media, then tokenized text.

`EncodedMedia` is what a per-modality decoder returns: the tensors its encoder consumes and the
exact number of tokens that encoder will produce; the fusion may turn them into another number of
backbone positions (`seq_tokens`, set by `sequence_tokens.apply_sequence_tokens`), which is what the
chat template reserves. A
video whose sample asks for audio in video carries its audio track as a nested audio item
(`EncodedMedia.audio`), which the template interleaves with the frames (`positions.py`).
`TokenizedSample` is one rendered conversation, with its 3-D positions when `model.positions` is
mrope or tmrope; `packing` packs several into a sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MODALITY_IDS = {"text": 0, "audio": 1, "image": 2, "video": 3}


@dataclass(kw_only=True)
class EncodedMedia:
    modality: str                     # "audio" | "image" | "video"
    num_tokens: int                   # tokens the encoder produces for this item (what batch["{m}_num_tokens"] lists)
    token_timestamps_s: torch.Tensor  # (num_tokens,) float32: time of each position; 0 for images
    tensors: dict[str, torch.Tensor]  # encoder inputs, see the modality module for the keys
    duration_s: float = 0.0           # audio/video duration after capping; 0 for images
    # video: nominal seconds one temporal patch spans (video.temporal_patch_size / video.fps): TMRoPE's time step
    seconds_per_grid: float = 0.0
    # video: its audio track when the sample uses audio in video (interleaved with the frames in 2 s chunks);
    # it is an audio item of the batch like any other, listed right after the audio items before this video
    audio: EncodedMedia | None = None
    # backbone positions the item takes when the fusion changes the count (data/sequence_tokens.py: pool, resampler,
    # anchor) and their timestamps; None: num_tokens positions with token_timestamps_s (interleave, the default)
    seq_tokens: int | None = None
    seq_timestamps_s: torch.Tensor | None = None

    def __post_init__(self):
        assert self.token_timestamps_s.shape == (self.num_tokens,), (self.token_timestamps_s.shape, self.num_tokens)
        assert self.audio is None or (self.modality == "video" and self.audio.modality == "audio"), "audio in video only"

    @property
    def num_seq_tokens(self) -> int:
        """Positions the item's own placeholders take in the sequence (seq_tokens, else num_tokens)."""
        return self.num_tokens if self.seq_tokens is None else self.seq_tokens

    @property
    def placeholder_timestamps_s(self) -> torch.Tensor:
        """(num_seq_tokens,) the timestamps its placeholders carry."""
        return self.token_timestamps_s if self.seq_timestamps_s is None else self.seq_timestamps_s

    @property
    def total_tokens(self) -> int:
        """Positions the item takes in the sequence: its own placeholders and its audio track's."""
        return self.num_seq_tokens + (self.audio.num_seq_tokens if self.audio is not None else 0)


@dataclass(kw_only=True)
class TokenizedSample:
    input_ids: torch.Tensor     # (L,) int64; media positions hold the modality's pad token id
    labels: torch.Tensor        # (L,) int64; -100 where no loss (everything but assistant turns)
    modality_ids: torch.Tensor  # (L,) int8; MODALITY_IDS
    timestamps_s: torch.Tensor  # (L,) float32; media positions' timestamps, -1 for text
    # (3, L) int64 (time, height, width) positions of this document for model.positions mrope / tmrope (float32: tmrope_qwen3)
    # (data/positions.py); None for 1d, where collate_packed numbers the tokens 0..L-1
    position_ids: torch.Tensor | None = None
    media: list[EncodedMedia] = field(default_factory=list)  # in placeholder order
    # token ids of meta.transcript for a sample with exactly one audio item (transfer mechanisms use it)
    audio_transcript_ids: torch.Tensor | None = None
    key: str = ""
    shard: str = ""
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


class MediaError(ValueError):
    """Media that cannot be used (undecodable, over a duration or pixel cap); the sample is skipped and logged."""
