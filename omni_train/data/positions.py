"""Rotary positions of one rendered document (`model.positions`), and the audio-in-video layout.

    1d      the token index, restarting at 0 in every document. Nothing is stored with the sample:
            `packing.collate_packed` numbers each document's tokens (the default, today's behaviour).
    mrope   3-D (time, height, width) ids in the style of Qwen2-VL's M-RoPE: an image or video token
            gets (t, h, w) with t its temporal patch index (0, 1, 2, ... whatever the frame rate), h and
            w its row and column in the merged token grid; every other token (text, the media
            start/end markers, audio) advances all three streams by one, like text. No time
            alignment; audio in video is refused. This is tmrope's algorithm with t = the patch index;
            it equals transformers' Qwen2-VL `get_rope_index` (audio counted as text) except after a
            video with more temporal patches than merged tokens per side, where transformers 5
            continues text at start + max(h, w), below the video's last time ids, and we continue past
            them (max + 1, as the original Qwen2-VL code did).
    tmrope  Qwen2.5-Omni's TMRoPE (arXiv:2503.20215): as mrope, but a video's t is its nominal time
            in 1/25 s (`POSITION_IDS_PER_SECOND`), an audio token's id is its token index (25 per
            second with the default audio settings), and a video with audio in video interleaves
            its frames' and its audio's tokens in 2 s chunks (`SECONDS_PER_CHUNK`) that share one time axis.

The specification of mrope/tmrope is transformers' `Qwen2_5OmniPreTrainedModelForConditionalGeneration
.get_rope_index` applied to one document alone; `document_positions` reproduces it exactly, from
the rendered structure (`TextSpan`, `AudioSpan`, `VisionSpan`, `AudioInVideoSpan`), never from token
ids. Its rules:
- blocks are appended in order; each starts at (the maximum of the previous block over all three
  streams) + 1, 0 for the first. Text advances all streams by one per token.
- a vision block is (t_ids[T], h, w) + start over the merged grid (time-major, then rows, then columns);
  t_ids = (arange(T) * float32(seconds_per_grid) * 25).long() for tmrope, in transformers' float32
  order of operations and truncation (seconds_per_grid = temporal_patch_size / video.fps, the
  nominal rate, as Qwen2.5-Omni's processor sets it; images use 1.0); arange(T) for mrope.
- audio in video: both start markers (`<|video_start|><|audio_start|>`) take one position s; the
  video block and the audio block (arange(num_audio) + s) both start at s; their tokens are cut by
  `chunk_ranges` into chunks of 50 time ids (2 s) and laid out video chunk 0, audio chunk 0,
  video chunk 1, ... (Qwen2.5-Omni's processor); the next start is the maximum of the LAST chunk
  laid out + 1 (transformers' rule, not the maximum of the whole span), and both end markers
  (`<|audio_end|><|video_end|>`) share it.
Generation continues from the maximum over all streams of the whole document + 1 (transformers'
`mrope_position_deltas`), see `probes/generate.py`.

Since positions are a function of one document, packing never changes them: `collate_packed` copies each
sample's stored (3, n) ids into the batch's (3, B, L) `position_ids`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from omni_train.data.sample import EncodedMedia

POSITION_KINDS = ("1d", "mrope", "tmrope", "tmrope_qwen3")
POSITION_IDS_PER_SECOND = 25  # Qwen2.5-Omni's position_id_per_seconds
QWEN3_POSITION_IDS_PER_SECOND = 13.0  # Qwen3-Omni's (its processor's and the released config's; the config class says 25)
SECONDS_PER_CHUNK = 2         # Qwen2.5-Omni's seconds_per_chunk: audio in video is interleaved in chunks this long
IMAGE_SECONDS_PER_GRID = 1.0  # get_rope_index multiplies an image's temporal index by 1 second


@dataclass(frozen=True)
class TextSpan:
    """Text tokens, the chat template's own tokens and the start/end markers of media: one id per token."""
    num_tokens: int


@dataclass(frozen=True)
class AudioSpan:
    """An audio item's pads: like text, one id per token on every stream."""
    num_tokens: int


@dataclass(frozen=True)
class VisionSpan:
    """An image's or video's pads, `grid_t * grid_h * grid_w` tokens in the encoder's (merged) grid order."""
    grid_t: int
    grid_h: int               # merged rows: patches // merge_size
    grid_w: int
    seconds_per_grid: float   # nominal seconds one temporal patch spans (IMAGE_SECONDS_PER_GRID for images)

    @property
    def num_tokens(self) -> int:
        return self.grid_t * self.grid_h * self.grid_w


@dataclass(frozen=True)
class AudioInVideoSpan:
    """A video and its audio track, interleaved: 2 start markers, the chunks of `audio_in_video_chunks`, 2 end markers."""
    video: VisionSpan
    num_audio_tokens: int

    @property
    def num_tokens(self) -> int:
        return 4 + self.video.num_tokens + self.num_audio_tokens


Span = TextSpan | AudioSpan | VisionSpan | AudioInVideoSpan


def vision_span(item: EncodedMedia) -> VisionSpan:
    """The token grid of an encoded image or video.

    `grid_thw` counts patches; the encoder merges merge_size x merge_size of them into a token, so
    num_tokens = t * h * w / merge_size**2 (image.num_tokens_of) gives the merge back exactly.
    """
    grid_t, grid_h, grid_w = (int(v) for v in item.tensors["grid_thw"])
    merge = math.isqrt(grid_t * grid_h * grid_w // item.num_tokens)
    assert grid_t * (grid_h // merge) * (grid_w // merge) == item.num_tokens, (item.tensors["grid_thw"], item.num_tokens)
    if item.modality == "image":
        seconds_per_grid = IMAGE_SECONDS_PER_GRID
    else:
        assert item.seconds_per_grid > 0, "a video's seconds_per_grid is set by video.encode_video"
        seconds_per_grid = item.seconds_per_grid
    return VisionSpan(grid_t=grid_t, grid_h=grid_h // merge, grid_w=grid_w // merge, seconds_per_grid=seconds_per_grid)


def time_ids(span: VisionSpan, kind: str) -> torch.Tensor:
    """(grid_t,) time id of each temporal patch, relative to the span's start: int64, float32 for tmrope_qwen3."""
    steps = torch.arange(span.grid_t)
    if kind == "mrope":
        return steps
    if kind == "tmrope_qwen3":  # the same float32 product, not truncated: 13 ids per second of nominal time
        return steps * torch.tensor(span.seconds_per_grid, dtype=torch.float32) * QWEN3_POSITION_IDS_PER_SECOND
    # transformers: (torch.arange(grid_t) * second_per_grids[i].float() * position_id_per_seconds).long(), where
    # second_per_grids holds temporal_patch_size / fps as float32: int64 * float32 -> float32, truncated
    return (steps * torch.tensor(span.seconds_per_grid, dtype=torch.float32) * POSITION_IDS_PER_SECOND).long()


def _vision_block(span: VisionSpan, kind: str) -> torch.Tensor:
    """(3, num_tokens) (t, h, w) ids relative to the span's start, in token order (get_llm_pos_ids_for_vision)."""
    t, h, w = span.grid_t, span.grid_h, span.grid_w
    t_ids = time_ids(span, kind).view(-1, 1).expand(-1, h * w).flatten()
    h_ids = torch.arange(h).view(1, -1, 1).expand(t, -1, w).flatten()
    w_ids = torch.arange(w).view(1, 1, -1).expand(t, h, -1).flatten()
    return torch.stack([t_ids, h_ids, w_ids])


def chunk_ranges(values: torch.Tensor, per_chunk: int) -> list[tuple[int, int]]:
    """(start, end) slices of `values` (non-decreasing time ids from 0) cut at multiples of `per_chunk`.

    transformers' `get_chunked_index`, kept literally: the chunk counter advances by one per cut, so
    ids that jump past several multiples at once (a video sampled below 0.5 frames per second) are
    cut at every following token until the counter catches up, as Qwen2.5-Omni does.
    """
    ranges, start, chunk = [], 0, 1
    for i, value in enumerate(values.tolist()):
        if value >= chunk * per_chunk:
            ranges.append((start, i))
            start, chunk = i, chunk + 1
    ranges.append((start, len(values)))
    return ranges


def audio_in_video_runs(span: AudioInVideoSpan, kind: str) -> list[tuple[str, int, int]]:
    """The token layout of a video with its audio, between its markers: ("video" | "audio", first, end) runs in order.

    tmrope_qwen3: Qwen3-Omni's processor (`replace_video_with_audio_token`), token by token by time id, a
    video token first where its time id is <= the audio token's (13 ids per second both); any other kind:
    Qwen2.5-Omni's 2 s chunks (`audio_in_video_chunks`)."""
    runs: list[tuple[str, int, int]] = []
    if kind != "tmrope_qwen3":
        for video, audio in audio_in_video_chunks(span):
            runs += [(name, *part) for name, part in (("video", video), ("audio", audio)) if part is not None]
        return runs
    video_t = _vision_block(span.video, kind)[0].tolist()
    v = a = 0
    while v < len(video_t) or a < span.num_audio_tokens:
        take_video = a == span.num_audio_tokens or (v < len(video_t) and video_t[v] <= a)
        name, first = ("video", v) if take_video else ("audio", a)
        if runs and runs[-1][0] == name:
            runs[-1] = (name, runs[-1][1], first + 1)
        else:
            runs.append((name, first, first + 1))
        v, a = (v + 1, a) if take_video else (v, a + 1)
    return runs


def audio_in_video_chunks(span: AudioInVideoSpan) -> list[tuple[tuple[int, int] | None, tuple[int, int] | None]]:
    """The layout of a video with its audio: per chunk, (video token slice, audio token slice), either None.

    Qwen2.5-Omni's processor (`replace_video_with_audio_token`): video chunk j, then audio chunk j, for
    j up to the longer of the two; both are cut by time id (TMRoPE's, whatever `model.positions` is:
    the layout is the data's, the positions are the model's).
    """
    per_chunk = int(POSITION_IDS_PER_SECOND * SECONDS_PER_CHUNK)
    video = chunk_ranges(_vision_block(span.video, "tmrope")[0], per_chunk)
    audio = chunk_ranges(torch.arange(span.num_audio_tokens), per_chunk)
    return [(video[j] if j < len(video) else None, audio[j] if j < len(audio) else None)
            for j in range(max(len(video), len(audio)))]


def document_positions(spans: Sequence[Span], kind: str) -> torch.Tensor | None:
    """(3, n) positions of one document rendered as `spans` (n = their tokens), or None for `1d`: int64, float32 for
    tmrope_qwen3 (whose video time ids are fractions where seconds_per_grid * 13 is no whole number)."""
    if kind not in POSITION_KINDS:
        raise ValueError(f"model.positions must be one of {', '.join(POSITION_KINDS)}, got {kind!r}")
    if kind == "1d":
        return None
    blocks: list[torch.Tensor] = []
    start = 0  # where the next block starts: the maximum of the last block appended + 1

    dtype = torch.float32 if kind == "tmrope_qwen3" else torch.int64

    def append(block: torch.Tensor) -> None:
        nonlocal start
        blocks.append(block.to(dtype))
        start = block.max().item() + 1

    def sequential(n: int) -> torch.Tensor:
        return (torch.arange(n) + start).expand(3, -1)

    for span in spans:
        if isinstance(span, (TextSpan, AudioSpan)):
            if span.num_tokens:
                append(sequential(span.num_tokens))
        elif isinstance(span, VisionSpan):
            append(_vision_block(span, kind) + start)
        elif kind == "tmrope_qwen3":  # both start markers, then the runs, then both end markers: each its own id
            append(sequential(2))
            video = _vision_block(span.video, kind) + start
            audio = (torch.arange(span.num_audio_tokens) + start).expand(3, -1)
            runs = audio_in_video_runs(span, kind)
            blocks += [(video if name == "video" else audio)[:, first:end] for name, first, end in runs[:-1]]
            name, first, end = runs[-1]
            # transformers appends token by token and then the longer one's remainder: the next start is the
            # maximum of that last piece (the last token alone when the remainder is one token long)
            append((video if name == "video" else audio)[:, first:end])
            append(sequential(2))
        else:
            if kind != "tmrope":
                raise ValueError(f"audio in video needs model.positions tmrope or tmrope_qwen3 (or 1d), not {kind}: "
                                 "its audio and frames share TMRoPE's time axis")
            markers = sequential(1)
            blocks.append(markers)  # <|video_start|> and <|audio_start|> share one position
            append(markers)
            video = _vision_block(span.video, kind) + start
            audio = torch.arange(start, start + span.num_audio_tokens).expand(3, -1)
            for video_slice, audio_slice in audio_in_video_chunks(span):
                if video_slice is not None:
                    append(video[:, video_slice[0]:video_slice[1]])
                if audio_slice is not None:
                    append(audio[:, audio_slice[0]:audio_slice[1]])
            markers = sequential(1)
            blocks.append(markers)  # <|audio_end|> and <|video_end|> too
            append(markers)
    if not blocks:
        return torch.zeros(3, 0, dtype=dtype)
    return torch.cat([block.to(dtype) for block in blocks], dim=1).contiguous()


def check_model_positions(positions: str, mrope_section: Sequence[int] | None, transfer_kind: str) -> None:
    """`model.positions` against the model that applies it (OmniConfig's check); ValueError naming the keys."""
    if positions not in POSITION_KINDS:
        raise ValueError(f"model.positions must be one of {', '.join(POSITION_KINDS)}, got {positions!r}")
    if positions == "1d":
        return
    if mrope_section is None:
        raise ValueError(f"model.positions={positions} needs model.backbone.mrope_section (the time, height and width "
                         "rotary bands, summing to head_dim // 2)")
    if transfer_kind != "none":
        raise ValueError(f"model.transfer.kind={transfer_kind} repacks rows with 1-D positions; it does not support "
                         f"model.positions={positions} (use model.positions: 1d)")
