"""Packing tokenized samples into fixed-length sequences without crossing or cutting documents.

A `Packer` holds a small pool of samples and fills each sequence by best fit: it starts with the
oldest pooled sample (so none waits forever) and then adds the longest pooled sample that still
fits, until nothing fits. With a pool of a few dozen samples this leaves well under 3% padding on
mixed-length corpora (benchmarks/packing.py), where greedy in-order packing wastes about half a
sample per sequence. Samples are never split: one longer than `seq_len` is the caller's to refuse.

`collate_packed` turns packed sequences into the batch the model consumes: token tensors with
per-document positions and document ids (so attention can be restricted to each document), and
the media tensors of every placeholder in sequence order. Positions are each document's own: 1-D
ones restart at 0, 3-D ones (model.positions mrope / tmrope) are the (3, n) ids stored with the
sample when it was rendered (`positions.py`), so packing never changes them.

Per media item, in placeholder order, the batch lists two counts (int64, one entry per item):
`{m}_num_tokens`, the tokens its encoder produces (what splits the encoder's output into items), and
`{m}_seq_tokens`, the placeholder positions it takes in the sequence: equal to num_tokens with
interleave and an mlp / linear projector, ceil(n / factor) with the pool projector, queries per item
or audio span with the resampler, 1 (an anchor) with cross_attn (`sequence_tokens.py`). Both are
always present when the modality is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from omni_train.data.sample import MODALITY_IDS, TokenizedSample

IGNORE_INDEX = -100


@dataclass
class Pooled:
    sample: TokenizedSample
    address: Any  # where the sample came from, so a pipeline can rebuild the pool on resume


class Packer:
    """Best-fit packing over a pool of at most `pool_size` samples, in arrival order.

    Only the samples' lengths are read, so anything with a `len` packs: the model's `compact_rows`
    repacks document runs (`range`s of positions) with it.
    """

    def __init__(self, seq_len: int, pool_size: int):
        assert seq_len > 0 and pool_size >= 1
        self.seq_len = seq_len
        self.pool_size = pool_size
        self.pool: list[Pooled] = []

    def full(self) -> bool:
        return len(self.pool) >= self.pool_size

    def add(self, sample: TokenizedSample, address: Any = None) -> None:
        assert len(sample) <= self.seq_len, "callers refuse overlong samples before packing"
        self.pool.append(Pooled(sample, address))

    def pop_sequence(self) -> list[TokenizedSample]:
        """Remove and return the samples of one sequence (empty when the pool is empty)."""
        return [item.sample for item in self.pop_pooled()]

    def pop_pooled(self) -> list[Pooled]:
        """`pop_sequence` with each sample's address."""
        if not self.pool:
            return []
        chosen = [0]
        space = self.seq_len - len(self.pool[0].sample)
        while True:
            best, best_len = -1, 0
            for i, item in enumerate(self.pool):
                n = len(item.sample)
                if i not in chosen and best_len < n <= space:
                    best, best_len = i, n
            if best < 0:
                break
            chosen.append(best)
            space -= best_len
        sequence = [self.pool[i] for i in chosen]
        taken = set(chosen)
        self.pool = [item for i, item in enumerate(self.pool) if i not in taken]
        return sequence

    def addresses(self) -> list[Any]:
        return [item.address for item in self.pool]


def pad_to_longest_fraction(lengths: Sequence[int], batch_size: int) -> float:
    """Real-token fraction of the usual baseline: consecutive samples padded to the longest in each batch."""
    real = padded = 0
    for start in range(0, len(lengths), batch_size):
        chunk = lengths[start:start + batch_size]
        real += sum(chunk)
        padded += max(chunk) * len(chunk)
    return real / max(padded, 1)


def collate_packed(sequences: list[list[TokenizedSample]], seq_len: int, pad_id: int, audio_cfg=None) -> dict[str, Any]:
    """Packed sequences -> batch tensors (B = len(sequences), L = seq_len).

    document_ids number documents across the whole batch (-1 on padding) and position_ids restart
    at 0 in each document, so `cu_seqlens` for varlen attention and a block-diagonal mask for SDPA
    both follow from them. When any sample carries 3-D positions (`TokenizedSample.position_ids`),
    position_ids is (3, B, L) holding them (0 on padding); a text-only sample without them gets its
    token index on all three streams, which is what mrope and tmrope give text. Media tensors are
    listed in the order their placeholders occur when the batch is read row by row, which is the
    order fusion fills placeholder positions (a video's audio track, for audio in video, counts as the
    audio item that follows the audio items before the video).
    """
    batch_size = len(sequences)
    input_ids = torch.full((batch_size, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((batch_size, seq_len), IGNORE_INDEX, dtype=torch.long)
    three_d = any(sample.position_ids is not None for sequence in sequences for sample in sequence)
    # float32 where a sample's are (model.positions tmrope_qwen3: fractional video time ids), else int64
    floating = any(sample.position_ids is not None and sample.position_ids.is_floating_point()
                   for sequence in sequences for sample in sequence)
    position_ids = torch.zeros((3, batch_size, seq_len) if three_d else (batch_size, seq_len),
                               dtype=torch.float32 if floating else torch.long)
    document_ids = torch.full((batch_size, seq_len), -1, dtype=torch.long)
    modality_ids = torch.zeros((batch_size, seq_len), dtype=torch.int8)
    timestamps_s = torch.full((batch_size, seq_len), -1.0, dtype=torch.float32)
    media: dict[str, list] = {"audio": [], "image": [], "video": []}
    samples, seq_lens, doc = [], [], 0
    transcripts: list[torch.Tensor] = []  # per audio item: meta.transcript's token ids, empty when unknown
    for row, sequence in enumerate(sequences):
        offset = 0
        for sample in sequence:
            n = len(sample)
            span = slice(offset, offset + n)
            input_ids[row, span] = sample.input_ids
            labels[row, span] = sample.labels
            if sample.position_ids is not None:
                position_ids[:, row, span] = sample.position_ids
            elif three_d and sample.media:
                raise ValueError(f"{sample.shard}:{sample.key}: rendered without 3-D positions, packed with samples "
                                 "that have them (render every sample with the same model.positions)")
            else:
                position_ids[..., row, span] = torch.arange(n)
            document_ids[row, span] = doc
            modality_ids[row, span] = sample.modality_ids
            timestamps_s[row, span] = sample.timestamps_s
            for item in sample.media:
                media[item.modality].append(item)
                if item.modality == "audio":
                    # a copy: the batch's tensors move to shared memory, a cached sample's stay where they are
                    transcripts.append(sample.audio_transcript_ids.clone() if sample.audio_transcript_ids is not None
                                       else torch.zeros(0, dtype=torch.long))
                if item.audio is not None:  # audio in video: the track's tokens lie inside the video's span
                    media["audio"].append(item.audio)
                    transcripts.append(torch.zeros(0, dtype=torch.long))
            samples.append({"shard": sample.shard, "key": sample.key, "task": sample.meta.get("task"),
                            "language": sample.meta.get("language"), "num_tokens": n})
            seq_lens.append(n)
            offset += n
            doc += 1
    batch: dict[str, Any] = {
        "input_ids": input_ids, "labels": labels, "position_ids": position_ids, "document_ids": document_ids,
        "modality_ids": modality_ids, "timestamps_s": timestamps_s,
        "seq_lens": torch.tensor(seq_lens, dtype=torch.int32),  # real tokens per document, in order (no padding)
        "num_real_tokens": int(sum(seq_lens)), "samples": samples,
    }
    batch.update(_collate_media(media, audio_cfg))
    if media["audio"]:
        batch["audio_transcript_ids"] = transcripts
    return batch


def _collate_media(media: dict[str, list], audio_cfg) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    if media["audio"]:
        from omni_train.data.audio import AudioConfig, max_window_frames, split_windows
        audio_cfg = audio_cfg or AudioConfig()
        # Up to the longest valid window only: the encoder drops the rest anyway (zeros), and full 30 s windows
        # of short clips would be most of what crosses from the loader workers.
        longest = max(max_window_frames(item.tensors["mel"].shape[1], audio_cfg) for item in media["audio"])
        mels, frames, windows_per_item = [], [], []
        for item in media["audio"]:
            windows, valid = split_windows(item.tensors["mel"], audio_cfg, width=longest)
            mels.append(windows)
            frames.append(valid)
            windows_per_item.append(windows.shape[0])
        out["audio_mel"] = torch.cat(mels)                      # (num_windows, n_mels, <= window_frames)
        out["audio_window_frames"] = torch.cat(frames)          # (num_windows,) valid frames per window
        out["audio_windows_per_item"] = torch.tensor(windows_per_item)
        out["audio_num_tokens"] = torch.tensor([item.num_tokens for item in media["audio"]])
        out["audio_seq_tokens"] = torch.tensor([item.num_seq_tokens for item in media["audio"]])
    for modality in ("image", "video"):
        if media[modality]:
            out[f"{modality}_patches"] = torch.cat([item.tensors["patches"] for item in media[modality]])  # (num_patches, D)
            out[f"{modality}_grid_thw"] = torch.stack([item.tensors["grid_thw"] for item in media[modality]])  # (N, 3)
            out[f"{modality}_num_tokens"] = torch.tensor([item.num_tokens for item in media[modality]])
            out[f"{modality}_seq_tokens"] = torch.tensor([item.num_seq_tokens for item in media[modality]])
    if media["video"]:
        out["video_frame_timestamps_s"] = torch.cat([item.tensors["frame_timestamps_s"] for item in media["video"]])
    return out


def modality_token_counts(batch: dict[str, Any]) -> dict[str, int]:
    """Placeholder positions per modality in a batch (checked against the media's seq_tokens)."""
    return {name: int((batch["modality_ids"] == idx).sum()) for name, idx in MODALITY_IDS.items() if name != "text"}
