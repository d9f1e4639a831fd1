"""Qwen3-Omni's TMRoPE (`model.positions: tmrope_qwen3`, issue 16) against transformers' own `get_rope_index`.

`positions.document_positions` computes a document's (3, n) positions from its rendered spans; transformers'
`Qwen3OmniMoePreTrainedModelForConditionalGeneration.get_rope_index` computes them from token ids. Both are
given the same documents: text, audio (1 s and > 30 s), images, videos at frame rates whose time ids are
fractions (13 ids per second), and audio in video, whose token layout is also checked against the
processor's `replace_video_with_audio_token`.
"""

from __future__ import annotations

import types

import pytest
import torch

from omni_train.data.positions import (AudioInVideoSpan, AudioSpan, TextSpan, VisionSpan, audio_in_video_runs,
                                       document_positions)

modeling = pytest.importorskip("transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe")
processing = pytest.importorskip("transformers.models.qwen3_omni_moe.processing_qwen3_omni_moe")

VS, VE, AS, AE, IMAGE, VIDEO, AUDIO = 90, 91, 92, 93, 94, 95, 96
MERGE = 2


def reference_rope_index(ids: list[int], *, images=(), videos=(), seconds=(), audio_frames=(), audio_in_video=False):
    """transformers' get_rope_index on one row, bound to a stand-in holding the config fields it reads."""
    cls = modeling.Qwen3OmniMoePreTrainedModelForConditionalGeneration
    config = types.SimpleNamespace(image_token_id=IMAGE, video_token_id=VIDEO, audio_token_id=AUDIO,
                                   vision_start_token_id=VS, audio_start_token_id=AS, position_id_per_seconds=13,
                                   audio_config=types.SimpleNamespace(n_window=50))
    this = types.SimpleNamespace(config=config, spatial_merge_size=MERGE)
    this.get_llm_pos_ids_for_vision = types.MethodType(cls.get_llm_pos_ids_for_vision, this)
    input_ids = torch.tensor([ids])
    positions, _ = cls.get_rope_index(
        this, input_ids, image_grid_thw=torch.tensor(list(images)) if images else None,
        video_grid_thw=torch.tensor(list(videos)) if videos else None, attention_mask=torch.ones_like(input_ids),
        use_audio_in_video=audio_in_video, audio_seqlens=torch.tensor(list(audio_frames)) if audio_frames else None,
        second_per_grids=torch.tensor(list(seconds), dtype=torch.float32) if seconds else None)
    return positions[:, 0]                                                              # (3, n)


class Document:
    """Our spans and transformers' token ids of one document, built side by side."""

    def __init__(self):
        self.spans, self.ids = [], []
        self.images, self.videos, self.seconds, self.audio_frames = [], [], [], []

    def text(self, n: int, *markers: int) -> Document:
        ids = list(range(1, n + 1)) + list(markers)
        self.ids += ids
        if self.spans and isinstance(self.spans[-1], TextSpan):
            self.spans[-1] = TextSpan(self.spans[-1].num_tokens + len(ids))
        else:
            self.spans.append(TextSpan(len(ids)))
        return self

    def audio(self, frames: int) -> Document:
        tokens = int(modeling._get_feat_extract_output_lengths(torch.tensor(frames)))
        self.text(0, AS)
        self.spans.append(AudioSpan(tokens))
        self.ids += [AUDIO] * tokens
        self.audio_frames.append(frames)
        return self.text(0, AE)

    def vision(self, grid_thw: tuple[int, int, int], seconds_per_grid: float | None = None) -> Document:
        t, h, w = grid_thw
        span = VisionSpan(grid_t=t, grid_h=h // MERGE, grid_w=w // MERGE, seconds_per_grid=seconds_per_grid or 1.0)
        self.text(0, VS)
        self.spans.append(span)
        self.ids += [IMAGE if seconds_per_grid is None else VIDEO] * span.num_tokens
        (self.images if seconds_per_grid is None else self.videos).append(grid_thw)
        if seconds_per_grid is not None:
            self.seconds.append(seconds_per_grid)
        return self.text(0, VE)

    def audio_in_video(self, grid_thw: tuple[int, int, int], seconds_per_grid: float, frames: int) -> Document:
        t, h, w = grid_thw
        tokens = int(modeling._get_feat_extract_output_lengths(torch.tensor(frames)))
        span = AudioInVideoSpan(video=VisionSpan(grid_t=t, grid_h=h // MERGE, grid_w=w // MERGE,
                                                 seconds_per_grid=seconds_per_grid), num_audio_tokens=tokens)
        self.spans.append(span)
        self.ids += [VS, AS] + [VIDEO if name == "video" else AUDIO for name, first, end in audio_in_video_runs(span, "tmrope_qwen3")
                                for _ in range(first, end)] + [AE, VE]
        self.videos.append(grid_thw)
        self.seconds.append(seconds_per_grid)
        self.audio_frames.append(frames)
        return self

    def compare(self, audio_in_video: bool = False) -> torch.Tensor:
        ours = document_positions(self.spans, "tmrope_qwen3")
        assert ours.dtype == torch.float32 and ours.shape == (3, len(self.ids))
        theirs = reference_rope_index(self.ids, images=self.images, videos=self.videos, seconds=self.seconds,
                                      audio_frames=self.audio_frames, audio_in_video=audio_in_video)
        assert torch.equal(ours, theirs), (ours - theirs).abs().max()
        return ours


def test_text_audio_images_and_videos_equal_get_rope_index():
    # audio of 1.0 s and 31.37 s (frames: ceil(samples / 160)); videos at 2 fps (13 ids a grid) and 3 fps (8.67)
    doc = (Document().text(4).audio(100).text(3).vision((1, 4, 6)).text(2).vision((3, 4, 4), 2 / 3)
           .text(5).audio(3138).text(2).vision((2, 6, 2), 1.0).text(3))
    positions = doc.compare()
    video_t = positions[0][torch.tensor(doc.ids) == VIDEO][:8].tolist()  # the 3 fps video's first two grids
    assert video_t[4] - video_t[0] == pytest.approx(26 / 3, abs=1e-5)  # a fraction: float positions are the spec


@pytest.mark.parametrize("grid_thw,seconds,frames", [
    ((4, 4, 6), 1.0, 620),       # 4 grids at 0, 13, 26, 39; 81 audio tokens outlast them
    ((6, 2, 4), 0.8, 250),       # grids every 10.4 ids; audio ends first, video tokens remain
    ((3, 2, 2), 2.0, 100),       # one 1 s chunk of audio (13 tokens) between grids 26 ids apart
])
def test_audio_in_video_equals_get_rope_index_and_the_processor_layout(grid_thw, seconds, frames):
    doc = Document().text(3).audio_in_video(grid_thw, seconds, frames).text(4)
    doc.compare(audio_in_video=True)
    span = doc.spans[1]
    video_inputs = {"video_grid_thw": [list(grid_thw)], "video_second_per_grid": [seconds]}
    audio_inputs = {"num_audio_tokens": [span.num_audio_tokens]}
    this = types.SimpleNamespace(audio_bos_token="<A>", audio_eos_token="</A>", video_token="V", audio_token="a",
                                 video_processor=types.SimpleNamespace(merge_size=MERGE))
    layout = processing.Qwen3OmniMoeProcessor.replace_video_with_audio_token(
        this, video_inputs, 0, audio_inputs, 0, position_id_per_seconds=13.0)
    ours = "".join(("V" if name == "video" else "a") * (end - first)
                   for name, first, end in audio_in_video_runs(span, "tmrope_qwen3"))
    assert layout == f"<A>{ours}</A>"


def test_qwen2_5_layout_and_int_positions_are_unchanged():
    span = AudioInVideoSpan(video=VisionSpan(grid_t=3, grid_h=2, grid_w=2, seconds_per_grid=2.0), num_audio_tokens=120)
    runs = audio_in_video_runs(span, "tmrope")
    assert [name for name, _, _ in runs] == ["video", "audio", "video", "audio", "video", "audio"]  # 2 s chunks
    positions = document_positions([TextSpan(3), span, TextSpan(2)], "tmrope")
    assert positions.dtype == torch.int64 and positions.shape == (3, 3 + span.num_tokens + 2)
