"""Folder mode of `omni-train shards build --audio-dir DIR`: meeting recordings and their transcripts -> shards.

A recording is any file with an extension in RECORDING_EXTENSIONS (any codec torchcodec reads,
including the audio track of .mp4/.mkv/.webm video calls), found anywhere under DIR (hidden
files and folders are skipped). Beside it, with the same stem, one transcript:

    meeting.txt    plain text, no timestamps
    meeting.srt    SubRip cues;  a "Name: text" (or "[Name]: text") line start is a speaker label
                   (one to four words before the colon, so "Note: ..." reads as a speaker too)
    meeting.vtt    WebVTT cues;  <v Name> voice spans or "Name: text" line starts are speaker labels
    meeting.json   {"transcript": str, "segments": [{"start": s, "end": s, "speaker": str, "text": str}],
                    "action_items": [str]}: `transcript` or `segments` (segments win when both are
                   there), `action_items` optional

A `.json` holding only `action_items` may sit beside an `.srt`, `.vtt` or `.txt` transcript.

Samples (the layout `launch/finetune.py` and the WER evaluation read):

    user       [{"type": "audio", "member": "audio_0.flac"}, {"type": "text", "text": "\\nTranscribe."}]
    assistant  [{"type": "text", "text": "<what is said in that audio, plain text without speaker labels>"}]
    meta       {"task": "transcribe", "source": "folder", "recording": "<path relative to DIR>",
                "offset_s": 12.48, "duration_s": 27.9, "speakers": ["Alice", "Bob"], "num_speakers": 2,
                "alignment": "timestamps" | "proportional"}        (+ "language" with --language)

and, where a recording has action items and is at most --action-items-max-s long, one sample of
task "action_items": the whole recording, user text "\\nList the action items.", assistant one
"- item" line per item (`speakers` are the recording's, `alignment` is its transcript's).
Speakers live in meta only, so the target is what WER scores; `num_speakers` counts the labelled
speakers in the sample (0 when the transcript names none). The audio member is the cut, mono (the
channels' mean, as `audio.py` downmixes) at the recording's own sample rate, as 16-bit FLAC:
lossless for 16-bit sources, deterministic bytes on one machine; training resamples it to 16 kHz.

How recordings become samples:
- Timestamped transcripts (srt, vtt, json segments): overlapping cues are merged into one unit;
  consecutive units are grouped into one sample while the group spans at most --segment-s, so a
  cue is never cut. A unit longer than --segment-s is split by time into equal parts and its
  words are shared out by their estimated time (alignment "proportional"). Time between groups
  that no cue covers is "untranscribed": reported, not an error.
- Plain text (txt, json transcript only): windows of --segment-s every --segment-s - --overlap-s
  seconds; each word gets a time proportional to its character position in the transcript, and a
  window takes the words whose time falls inside it (words in an overlap go to both windows).
  alignment "proportional": rough on long recordings; use timestamps when you have them.
Each recording is decoded once, front to back, a READ_BLOCK_S block at a time with torchcodec's
`get_samples_played_in_range` (see SequentialReader), keeping only the block and the overlap a
later cut needs, so memory does not grow with the length of a recording.

Splits: `train-*.tar` and `eval-*.tar` in --out. A sample goes to eval when a hash of (seed,
recording, offset) falls under --eval-fraction (`--eval-by recording`: a hash of (seed,
recording), so whole recordings are held out). With overlapping windows a segment-level split
shares the overlaps' audio between train and eval: use `--eval-by recording` to avoid that.

Errors, one line each naming the file; the recording is skipped and the rest of the folder built:
a recording with no transcript beside it (or several), an unreadable, corrupt or truncated
recording, an unparsable transcript, a transcript whose timestamps run past the end of the audio
by more than PAST_END_TOLERANCE_S (the whole file is refused: a transcript that overruns its
audio is usually the wrong file or drifts, and clipping it would train on misaligned text; an
overrun within the tolerance, header rounding, is clipped), and a transcript with no recording.
Exit code: 0 when every recording went in, 1 when some were skipped (their shards are written
anyway), 2 when nothing could be built. The summary adds up: hours of the recordings = hours
inside transcribe samples + hours not in samples, per reason.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import hashlib
import html
import json
import math
import os
import re
import shutil
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from omni_train.data.audio import _one_line
from omni_train.data.writer import RECORDING_EXTENSIONS, PreparedSample, ShardSink, existing_shards
TRANSCRIPT_EXTENSIONS = ("txt", "srt", "vtt", "json")
SPLITS = ("train", "eval")
SOURCE = "folder"
INSTRUCTIONS = {"transcribe": "Transcribe.", "action_items": "List the action items."}
AUDIO_MEMBER = "audio_0.flac"
# A last cue may end a little after the audio (header durations and cue times are rounded);
# anything further is a transcript that does not belong to this audio.
PAST_END_TOLERANCE_S = 1.0
# A cut that decodes this much shorter than asked means the file stops early (truncated or corrupt).
SHORT_DECODE_TOLERANCE_S = 0.1
READ_BLOCK_S = 60.0  # audio decoded per torchcodec call (see SequentialReader)
BRIDGE_S = 2.0       # the second decoder's share of each block: longer than any codec's frame

# Why audio is not in any sample; the keys of FolderSummary.not_in, in the order the summary prints them.
REASONS = {
    "untranscribed": "untranscribed (no cue covers it: pauses, untranscribed speech)",
    "no_transcript": "no transcript",
    "ambiguous": "several transcripts or recordings share a name",
    "unparsable": "unparsable transcript",
    "past_end": "timestamps past the end of the audio",
    "unreadable": "unreadable or corrupt audio",
}

_TIME = r"(?:(\d+):)?(\d{1,2}):(\d{2})(?:[,.](\d{1,3}))?"
_TIMING = re.compile(rf"^\s*{_TIME}\s*-->\s*{_TIME}(?:\s.*)?$")
# "Alice: ...", "SPEAKER_1: ...", "Dr. Smith: ...", "[Bob]: ...", "- Alice: ...", ">> Alice: ..."
_SPEAKER = re.compile(r"^(?:-\s*|>>\s*)?(?:\[(?P<bracket>[^\]\n]{1,40})\]|(?P<name>[^\W\d]\w*(?:[ .'\-]+\w+){0,3}))"
                      r"\s*:(?:\s+|$)(?P<rest>.*)$")
_VOICE = re.compile(r"<v(?:\.[^\s>]*)?\s+([^>]+)>")
_TAG = re.compile(r"<[^>]*>|\{\\[^}]*\}")  # html-like tags, and ASS overrides such as {\an8} in srt


@dataclass(kw_only=True)
class FolderConfig:
    """How a folder of recordings becomes samples; the CLI flags of `shards build --audio-dir`."""
    segment_s: float = 30.0
    overlap_s: float = 2.0
    eval_fraction: float = 0.1
    eval_by: str = "segment"             # "segment": (recording, offset) hashed; "recording": whole recordings held out
    seed: int = 0
    # The action_items sample holds the whole recording, so it must fit the recipe's data.seq_len:
    # with the default model and byte-level tokenizer a 76 s one measured 2,058 tokens, so 60 s
    # keeps within the default 2048. `shards inspect --decode` lists any sample that does not fit.
    action_items_max_s: float = 60.0     # longer recordings get no action_items sample (reported)
    language: str | None = None
    max_samples: int = 1000
    max_bytes: float = 1e9

    def __post_init__(self):
        if not self.segment_s >= 1.0 or not math.isfinite(self.segment_s):
            raise ValueError(f"--segment-s must be at least 1 second, got {self.segment_s}")
        if not 0.0 <= self.overlap_s < self.segment_s:
            raise ValueError(f"--overlap-s must be in [0, --segment-s={self.segment_s:g}), got {self.overlap_s}")
        if not 0.0 <= self.eval_fraction <= 1.0:
            raise ValueError(f"--eval-fraction must be in [0, 1], got {self.eval_fraction}")
        if self.eval_by not in ("segment", "recording"):
            raise ValueError(f"--eval-by must be segment or recording, got {self.eval_by!r}")
        if not self.action_items_max_s >= 0:
            raise ValueError(f"--action-items-max-s must be >= 0 seconds, got {self.action_items_max_s}")
        if self.max_samples < 1:
            raise ValueError(f"--max-samples must be at least 1 (got {self.max_samples})")
        if not self.max_bytes > 0 or not math.isfinite(self.max_bytes):
            raise ValueError(f"--max-bytes must be a positive number of bytes (got {self.max_bytes})")


class RecordingError(Exception):
    """A recording that cannot go in; `reason` is a key of REASONS, the message one line naming the file."""

    def __init__(self, reason: str, message: str):
        assert reason in REASONS, reason
        super().__init__(message)
        self.reason = reason


# ----------------------------------------------------------------------------------------------
# Transcripts


@dataclass(kw_only=True)
class Cue:
    start_ms: int | None   # None for plain text, which has no times
    end_ms: int | None
    text: str
    speakers: tuple[str, ...] = ()


@dataclass(kw_only=True)
class Transcript:
    cues: list[Cue]
    timed: bool
    source: str                  # the file the cues came from, for messages
    action_items: list[str] = field(default_factory=list)


def _clean(text: str) -> str:
    return " ".join(html.unescape(_TAG.sub("", text)).split())


def _split_speaker(line: str) -> tuple[str | None, str]:
    match = _SPEAKER.match(line.strip())
    if not match:
        return None, line
    return (match["bracket"] or match["name"]).strip(), match["rest"]


def _cue_text(lines: list[str], voice_tags: bool) -> tuple[str, tuple[str, ...]]:
    """The cue's plain text and its speakers (in order), from speaker prefixes and WebVTT <v> spans."""
    speakers: list[str] = []
    texts = []
    for line in lines:
        voices = _VOICE.findall(line) if voice_tags else []
        speakers += [" ".join(v.split()) for v in voices]
        if not voices:
            speaker, line = _split_speaker(_clean(line))
            if speaker:
                speakers.append(speaker)
        texts.append(_clean(line))
    return " ".join(t for t in texts if t), tuple(dict.fromkeys(speakers))


def _ms(groups: tuple[str | None, ...]) -> int:
    hours, minutes, seconds, fraction = groups
    return ((int(hours or 0) * 60 + int(minutes)) * 60 + int(seconds)) * 1000 + int((fraction or "0").ljust(3, "0"))


def _blocks(text: str) -> list[tuple[int, list[str]]]:
    """(first line number, lines) of each run of non-blank lines."""
    blocks, current, first = [], [], 0
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            if not current:
                first = number
            current.append(line)
        elif current:
            blocks.append((first, current))
            current = []
    if current:
        blocks.append((first, current))
    return blocks


def _timed_cue(where: str, number: int, timing: str, lines: list[str], voice_tags: bool) -> Cue:
    match = _TIMING.match(timing)
    if not match:
        raise ValueError(f"{where}: line {number}: expected 'start --> end' times such as "
                         f"'00:01:02,500 --> 00:01:05,000', got {timing.strip()[:60]!r}")
    start_ms, end_ms = _ms(match.groups()[:4]), _ms(match.groups()[4:])
    if end_ms <= start_ms:
        raise ValueError(f"{where}: line {number}: the cue ends ({timing.split('-->')[1].strip()}) "
                         f"before or when it starts ({timing.split('-->')[0].strip()})")
    text, speakers = _cue_text(lines, voice_tags)
    return Cue(start_ms=start_ms, end_ms=end_ms, text=text, speakers=speakers)


def parse_srt(text: str, where: str) -> list[Cue]:
    cues = []
    for number, lines in _blocks(text):
        timing_at = 1 if lines[0].strip().isdigit() and len(lines) > 1 else 0  # the cue number is optional
        cues.append(_timed_cue(where, number + timing_at, lines[timing_at], lines[timing_at + 1:], voice_tags=False))
    return cues


def parse_vtt(text: str, where: str) -> list[Cue]:
    blocks = _blocks(text)
    if not blocks or not blocks[0][1][0].startswith("WEBVTT"):
        raise ValueError(f"{where}: line 1: a WebVTT file starts with 'WEBVTT'")
    cues = []
    for number, lines in blocks[1:]:
        if lines[0].split(maxsplit=1)[0] in ("NOTE", "STYLE", "REGION"):
            continue
        timing_at = 0 if "-->" in lines[0] else 1  # an optional cue identifier line comes first
        if timing_at >= len(lines):
            raise ValueError(f"{where}: line {number}: a cue needs a 'start --> end' line, got {lines[0].strip()[:60]!r}")
        cues.append(_timed_cue(where, number + timing_at, lines[timing_at], lines[timing_at + 1:], voice_tags=True))
    return cues


def parse_txt(text: str) -> list[Cue]:
    cues = []
    for line in text.splitlines():
        speaker, line = _split_speaker(_clean(line))
        if line.strip():
            cues.append(Cue(start_ms=None, end_ms=None, text=_clean(line), speakers=(speaker,) if speaker else ()))
    return cues


def parse_json(text: str, where: str) -> tuple[list[Cue] | None, list[str]]:
    """(cues or None when it holds only action items, action items)."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON on line {e.lineno}, column {e.colno} ({e.msg})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: must be a JSON object with 'transcript', 'segments' or 'action_items'")
    items = record.get("action_items", [])
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise ValueError(f"{where}: 'action_items' must be a list of strings")
    items = [_clean(i) for i in items if _clean(i)]
    segments, transcript = record.get("segments"), record.get("transcript")
    if segments:
        if not isinstance(segments, list):
            raise ValueError(f"{where}: 'segments' must be a list of {{start, end, speaker, text}} objects")
        cues = []
        for i, segment in enumerate(segments):
            if not isinstance(segment, dict):
                raise ValueError(f"{where}: segments[{i}] must be an object with start, end, text (and speaker)")
            start, end, seg_text = segment.get("start"), segment.get("end"), segment.get("text")
            for key, value in (("start", start), ("end", end)):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                    raise ValueError(f"{where}: segments[{i}].{key} must be a number of seconds >= 0, got {value!r}")
            if not isinstance(seg_text, str):
                raise ValueError(f"{where}: segments[{i}].text must be a string")
            start_ms, end_ms = round(start * 1000), round(end * 1000)
            if end_ms <= start_ms:
                raise ValueError(f"{where}: segments[{i}] ends ({end}) before or when it starts ({start})")
            speaker = segment.get("speaker")
            if speaker is not None and not isinstance(speaker, (str, int)):
                raise ValueError(f"{where}: segments[{i}].speaker must be a string")
            speakers = (str(speaker).strip(),) if speaker is not None and str(speaker).strip() else ()
            cues.append(Cue(start_ms=start_ms, end_ms=end_ms, text=_clean(seg_text), speakers=speakers))
        return cues, items
    if transcript is not None:
        if not isinstance(transcript, str):
            raise ValueError(f"{where}: 'transcript' must be a string")
        return parse_txt(transcript), items
    if "action_items" not in record:
        raise ValueError(f"{where}: holds none of 'transcript', 'segments', 'action_items'")
    return None, items


def _read_text(path: Path, where: str) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_transcript(sidecars: dict[str, Path], recording: str) -> Transcript:
    """The recording's transcript from its sidecar files (ext -> path); RecordingError when there is none or several."""
    notes: list[str] = []
    sources: dict[str, tuple[list[Cue], bool]] = {}
    try:
        for ext, path in sidecars.items():
            where = str(path)
            text = _read_text(path, where)
            if ext == "json":
                cues, notes = parse_json(text, where)
                if cues is not None:
                    sources[ext] = (cues, bool(cues) and cues[0].start_ms is not None)
            elif ext == "srt":
                sources[ext] = (parse_srt(text, where), True)
            elif ext == "vtt":
                sources[ext] = (parse_vtt(text, where), True)
            else:
                sources[ext] = (parse_txt(text), False)
    except ValueError as e:
        raise RecordingError("unparsable", str(e)) from None
    if not sources:
        raise RecordingError("no_transcript", f"{recording}: no transcript beside it ({sidecars['json']} holds only "
                                              f"action_items; add a .txt, .srt or .vtt, or a transcript to the .json)")
    if len(sources) > 1:
        names = ", ".join(str(sidecars[ext]) for ext in sources)
        raise RecordingError("ambiguous", f"{recording}: several transcripts beside it ({names}); keep one (a .json "
                                          f"beside an .srt, .vtt or .txt may hold only action_items)")
    (ext, (cues, timed)), = sources.items()
    cues = [c for c in cues if c.text]  # an empty cue leaves its time untranscribed
    if not cues:
        raise RecordingError("unparsable", f"{sidecars[ext]}: holds no transcript text")
    return Transcript(cues=cues, timed=timed, source=str(sidecars[ext]), action_items=notes)


# ----------------------------------------------------------------------------------------------
# Planning: transcript + duration -> sample cuts


@dataclass(kw_only=True)
class Cut:
    """One planned sample: a range of the recording and its target text."""
    task: str
    start_ms: int
    end_ms: int
    text: str
    speakers: list[str]
    alignment: str


def _word_times(cues: list[Cue], span: tuple[int, int] | None = None) -> list[tuple[float, str, str | None]]:
    """(estimated time in ms, word, speaker) for every word: proportional to character position.

    Timed cues spread their words over their own span; untimed cues (plain text) over `span`.
    """
    words = []
    if span is not None:  # plain text: the whole transcript is one stretch of speech
        stream = [(w, c.speakers[0] if c.speakers else None) for c in cues for w in c.text.split()]
        stretches = [(span[0], span[1], stream)]
    else:
        stretches = [(c.start_ms, c.end_ms, [(w, c.speakers[0] if c.speakers else None) for w in c.text.split()])
                     for c in cues]
    for start_ms, end_ms, stream in stretches:
        total = sum(len(w) + 1 for w, _ in stream)
        before = 0
        for word, speaker in stream:
            words.append((start_ms + (before + (len(word) + 1) / 2) / total * (end_ms - start_ms), word, speaker))
            before += len(word) + 1
    return words


def _take(words: list[tuple[float, str, str | None]], start_ms: int, end_ms: int, last: bool) -> tuple[str, list[str]]:
    chosen = [(w, s) for t, w, s in words if start_ms <= t < end_ms or (last and t == end_ms)]
    return " ".join(w for w, _ in chosen), list(dict.fromkeys(s for _, s in chosen if s))


def plan_windows(cues: list[Cue], duration_ms: int, segment_ms: int, overlap_ms: int) -> list[Cut]:
    """Plain text: fixed windows with overlap, words placed proportionally; windows without words are left out."""
    words = _word_times(cues, (0, duration_ms))
    cuts, start = [], 0
    while start < duration_ms:
        end = min(start + segment_ms, duration_ms)
        text, speakers = _take(words, start, end, last=end == duration_ms)
        if text:
            cuts.append(Cut(task="transcribe", start_ms=start, end_ms=end, text=text, speakers=speakers,
                            alignment="proportional"))
        if end == duration_ms:
            break
        start += segment_ms - overlap_ms
    return cuts


def plan_segments(cues: list[Cue], segment_ms: int) -> list[Cut]:
    """Timestamped cues: overlapping cues merged, then grouped up to segment_ms; long units split by time."""
    units: list[list[Cue]] = []
    unit_end = -1
    for cue in sorted(cues, key=lambda c: (c.start_ms, c.end_ms)):
        if units and cue.start_ms < unit_end:
            units[-1].append(cue)
            unit_end = max(unit_end, cue.end_ms)
        else:
            units.append([cue])
            unit_end = cue.end_ms
    pieces: list[Cut] = []
    for unit in units:
        start, end = unit[0].start_ms, max(c.end_ms for c in unit)
        if end - start <= segment_ms:
            speakers = list(dict.fromkeys(s for c in unit for s in c.speakers))
            pieces.append(Cut(task="transcribe", start_ms=start, end_ms=end, text=" ".join(c.text for c in unit),
                              speakers=speakers, alignment="timestamps"))
            continue
        words = _word_times(unit)
        num_parts = math.ceil((end - start) / segment_ms)
        bounds = [start + round(i * (end - start) / num_parts) for i in range(num_parts + 1)]
        for a, b in zip(bounds, bounds[1:]):
            text, speakers = _take(words, a, b, last=b == end)
            if text:
                pieces.append(Cut(task="transcribe", start_ms=a, end_ms=b, text=text, speakers=speakers,
                                  alignment="proportional"))
    cuts: list[Cut] = []
    for piece in pieces:
        group = cuts[-1] if cuts else None
        if group is not None and piece.end_ms - group.start_ms <= segment_ms:
            group.end_ms = piece.end_ms
            group.text += " " + piece.text
            group.speakers = list(dict.fromkeys(group.speakers + piece.speakers))
            if piece.alignment == "proportional":
                group.alignment = "proportional"
        else:
            cuts.append(piece)
    return cuts


def _covered_ms(cuts: list[Cut]) -> int:
    """Length of the union of the cuts' ranges."""
    total, reach = 0, 0
    for cut in sorted(cuts, key=lambda c: c.start_ms):
        if cut.end_ms > reach:
            total += cut.end_ms - max(cut.start_ms, reach)
            reach = cut.end_ms
    return total


# ----------------------------------------------------------------------------------------------
# Audio


def _open(path: Path, where: str) -> tuple[int, float]:
    """(sample rate, duration in s) from the header; RecordingError('unreadable') if FFmpeg cannot read it."""
    from torchcodec.decoders import AudioDecoder

    try:
        decoder = AudioDecoder(str(path))
        metadata = decoder.metadata
        rate_hz = int(metadata.sample_rate)
        duration_s = metadata.duration_seconds_from_header or metadata.duration_seconds
        if not duration_s:  # no duration in the header (some webm/mkv): count by decoding, a block at a time
            reader, num_samples = SequentialReader(path, rate_hz, where), 0
            while not reader.exhausted:
                num_samples += reader.decode_next_block().size
            duration_s = num_samples / rate_hz
    except RecordingError:
        raise
    except Exception as e:  # torchcodec raises RuntimeError / ValueError with FFmpeg's reason
        raise RecordingError("unreadable", f"{where}: cannot read the audio ({_one_line(e)})") from None
    if not duration_s or duration_s <= 0:
        raise RecordingError("unreadable", f"{where}: the audio decodes to nothing")
    return rate_hz, float(duration_s)


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


def _release_freed_memory() -> None:
    """Hand the heap memory freed by the last cut back to the OS (glibc; a no-op elsewhere).

    After the first large free, glibc raises its mmap threshold, so later cut-sized buffers
    (decoded samples, FFmpeg frames) come from the heap and stay mapped once freed: without this
    the build's peak RSS grew by about 3 MB per 30 s cut, 200 MB for a 30-minute meeting.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class SequentialReader:
    """One recording as a stream of mono samples at its native rate, read front to back.

    `read(start, stop)` takes sample indices that never go back before an earlier read's start;
    only the samples a later cut may still need (window overlap) stay in memory. The decoding is
    shaped by torchcodec 0.13: any request that is not strictly ahead of the last decoded frame
    makes it decode again from the start of the file (torchcodec issue #1448, fixed upstream by
    PR #1449), so consecutive ranges on one decoder are quadratic. Two decoders take turns
    instead, each only ever moving forward: `main` reads [kB + H, (k+1)B) and `bridge` the
    H-second holes [kB, kB + H) between them (B = READ_BLOCK_S, H = BRIDGE_S, longer than any
    codec frame). Their blocks join into exactly the samples one full decode gives (tested for
    wav, flac, mp3, ogg, opus, m4a and an mp4's AAC track; Matroska/WebM time stamps are whole
    milliseconds, so there a join may repeat or skip up to 1 ms), and decoding stays linear.
    A reused decoder that resamples shifts later ranges by its resampler's delay, so the
    recording's own rate is kept.
    """

    def __init__(self, path: Path, rate_hz: int, where: str):
        from torchcodec.decoders import AudioDecoder

        self.rate_hz, self.where = rate_hz, where
        try:
            self.main, self.bridge = AudioDecoder(str(path)), AudioDecoder(str(path))
        except Exception as e:
            raise RecordingError("unreadable", f"{where}: cannot read the audio ({_one_line(e)})") from None
        self.buffer = np.zeros(0, dtype=np.float32)  # (N,) stream samples from buffer_start
        self.buffer_start = 0
        self.next_block = 0
        self.exhausted = False

    def _requests(self, block: int) -> list[tuple[Any, float, float]]:
        start_s, stop_s = block * READ_BLOCK_S, (block + 1) * READ_BLOCK_S
        if block == 0:
            return [(self.main, start_s, stop_s)]
        return [(self.bridge, start_s, start_s + BRIDGE_S), (self.main, start_s + BRIDGE_S, stop_s)]

    def decode_next_block(self) -> np.ndarray:
        parts = []
        for decoder, start_s, stop_s in self._requests(self.next_block):
            try:
                data = decoder.get_samples_played_in_range(start_s, stop_s).data.numpy()  # (C, n)
            except RuntimeError:  # torchcodec: no frames in the range, the audio has ended
                self.exhausted = True
                break
            if data.shape[-1] == 0:
                self.exhausted = True
                break
            parts.append(data.mean(axis=0, dtype=np.float32) if data.shape[0] > 1 else data[0])  # audio.py downmixes alike
        self.next_block += 1
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)

    def read(self, start: int, stop: int) -> np.ndarray:
        """(stop - start,) float32 samples, or fewer where the audio ends."""
        assert start >= self.buffer_start, (start, self.buffer_start)
        while True:  # drop what no later cut needs, decoding through a pause that no cut covers
            drop = min(start - self.buffer_start, self.buffer.size)
            self.buffer, self.buffer_start = self.buffer[drop:], self.buffer_start + drop
            if self.buffer_start == start or self.exhausted:
                break
            self.buffer = self.decode_next_block()
        while self.buffer_start + self.buffer.size < stop and not self.exhausted:
            self.buffer = np.concatenate([self.buffer, self.decode_next_block()])
        if self.buffer_start < start:  # the audio ended before `start`
            return self.buffer[:0]
        return self.buffer[: stop - start]


def flac_cut(reader: SequentialReader, cut: Cut) -> tuple[bytes, float]:
    """The cut as 16-bit mono FLAC bytes at the recording's rate, and its length in seconds."""
    from torchcodec.encoders import AudioEncoder

    rate_hz, where = reader.rate_hz, reader.where
    start, stop = round(cut.start_ms * rate_hz / 1000), round(cut.end_ms * rate_hz / 1000)
    try:
        samples = reader.read(start, stop)
    except Exception as e:  # FFmpeg's decoding errors
        raise RecordingError("unreadable", f"{where}: decoding fails at {cut.start_ms / 1000:.2f} s "
                                           f"({_one_line(e)})") from None
    if samples.size < stop - start - SHORT_DECODE_TOLERANCE_S * rate_hz:
        raise RecordingError("unreadable", f"{where}: the audio is truncated or corrupt: decoding stops at "
                                           f"{(start + samples.size) / rate_hz:.2f} s, the header says more")
    # numpy, single-threaded: torch's elementwise ops on a busy machine spent most of the build
    # waiting on their intra-op thread pool (90 ms for one isfinite over a 30 s cut on 2 cores).
    if not np.isfinite(samples).all():
        raise RecordingError("unreadable", f"{where}: non-finite samples at {cut.start_ms / 1000:.2f} s")
    # 16 bits: lossless for 16-bit sources, and FLAC then compresses (a float cut would take 24 bits).
    quantized = np.clip(np.round(samples * 32768.0), -32768, 32767).astype(np.float32)[None] / np.float32(32768.0)
    data = AudioEncoder(torch.from_numpy(quantized), sample_rate=rate_hz).to_tensor("flac").numpy().tobytes()
    seconds = quantized.shape[-1] / rate_hz
    del samples, quantized
    _release_freed_memory()
    return data, seconds


# ----------------------------------------------------------------------------------------------
# Building


@dataclass(kw_only=True)
class SplitStats:
    num_samples: int = 0
    audio_s: float = 0.0
    tasks: Counter = field(default_factory=Counter)
    shards: list[str] = field(default_factory=list)
    num_bytes: int = 0


@dataclass(kw_only=True)
class FolderSummary:
    """What `build_folder` did; `format()` is the text the CLI prints. Seconds add up:
    input_s == covered_s + sum(seconds in not_in)."""
    audio_dir: str
    num_recordings: int = 0
    input_s: float = 0.0
    unknown_length: list[str] = field(default_factory=list)   # recordings whose length could not be read
    covered_s: float = 0.0                                      # recording time inside at least one transcribe sample
    splits: dict[str, SplitStats] = field(default_factory=lambda: {s: SplitStats() for s in SPLITS})
    not_in: dict[str, dict[str, Any]] = field(default_factory=lambda: {r: {"seconds": 0.0, "files": []} for r in REASONS})
    errors: list[str] = field(default_factory=list)
    action_items_skipped: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.splits.values())

    def format(self) -> str:
        def names(files: list[str]) -> str:
            return ", ".join(files[:5]) + (f", ... ({len(files) - 5} more)" if len(files) > 5 else "")

        unknown = f"; {len(self.unknown_length)} of unknown length" if self.unknown_length else ""
        lines = [f"recordings: {self.num_recordings} in {self.audio_dir}, {self.input_s / 3600:.4f} h{unknown}"]
        for split, stats in self.splits.items():
            tasks = ", ".join(f"{t}={n}" for t, n in sorted(stats.tasks.items())) or "-"
            lines.append(f"{split}: {stats.num_samples} samples in {len(stats.shards)} shard(s), "
                         f"{stats.audio_s / 3600:.4f} h of audio ({tasks}), {stats.num_bytes} bytes")
        lines.append(f"in samples: {self.covered_s / 3600:.4f} h of the recordings are inside transcribe samples")
        not_in_s = sum(v["seconds"] for v in self.not_in.values())
        lines.append(f"not in samples: {not_in_s / 3600:.4f} h")
        for reason, value in self.not_in.items():
            if value["files"]:
                lines.append(f"  {REASONS[reason]}: {value['seconds'] / 3600:.4f} h in {len(value['files'])} file(s): "
                             f"{names(value['files'])}")
        lines.append(f"check: {self.covered_s / 3600:.4f} h in samples + {not_in_s / 3600:.4f} h not = "
                     f"{(self.covered_s + not_in_s) / 3600:.4f} h of {self.input_s / 3600:.4f} h")
        if self.action_items_skipped:
            lines.append(f"no action_items sample (recording longer than --action-items-max-s): "
                         f"{len(self.action_items_skipped)}: {names(self.action_items_skipped)}")
        if self.ignored:
            lines.append(f"ignored (not a recording or transcript extension): {len(self.ignored)}: {names(self.ignored)}")
        if self.errors:
            lines.append(f"skipped with errors: {len(self.errors)} file(s) (messages above)")
        return "\n".join(lines)


def _walk(audio_dir: Path, skip: list[Path]) -> tuple[dict[tuple[Path, str], list[Path]], dict[tuple[Path, str], dict[str, Path]], list[Path]]:
    """Recordings and transcripts grouped by (folder, stem), and the other files; hidden entries skipped."""
    recordings: dict[tuple[Path, str], list[Path]] = {}
    transcripts: dict[tuple[Path, str], dict[str, Path]] = {}
    other: list[Path] = []
    skip = [p.resolve() for p in skip]
    for folder, dirs, files in os.walk(audio_dir):
        folder = Path(folder)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (folder / d).resolve() not in skip)
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = folder / name
            ext = path.suffix.lstrip(".").lower()
            if ext in RECORDING_EXTENSIONS:
                recordings.setdefault((folder, path.stem), []).append(path)
            elif ext in TRANSCRIPT_EXTENSIONS:
                transcripts.setdefault((folder, path.stem), {})[ext] = path
            else:
                other.append(path)
    return recordings, transcripts, other


def _split_of(cfg: FolderConfig, recording: str, unit: str) -> str:
    key = recording if cfg.eval_by == "recording" else f"{recording}\0{unit}"
    digest = hashlib.sha256(f"{cfg.seed}\0{key}".encode()).digest()
    return "eval" if int.from_bytes(digest[:8], "big") / 2.0**64 < cfg.eval_fraction else "train"


def _messages(task: str, text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "audio", "member": AUDIO_MEMBER},
                                         {"type": "text", "text": "\n" + INSTRUCTIONS[task]}]},
            {"role": "assistant", "content": [{"type": "text", "text": text}]}]


def build_folder(audio_dir: str | Path, out: str | Path, cfg: FolderConfig | None = None, *, overwrite: bool = False,
                 say: Callable[[str], None] = print, warn: Callable[[str], None] | None = None) -> FolderSummary:
    """Build `train-*.tar` / `eval-*.tar` in `out` from the recordings and transcripts under `audio_dir`.

    Per-file problems go to `warn` (default: stderr), one line each, and into the summary; the
    rest of the folder is built. ValueError for unusable arguments, before anything is written.
    """
    cfg = cfg or FolderConfig()
    warn = warn or (lambda line: print(f"omni-train: error: {line}", file=sys.stderr, flush=True))
    audio_dir, out = Path(audio_dir), Path(out)
    if not audio_dir.is_dir():
        raise ValueError(f"--audio-dir {audio_dir} is not a directory")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    old = [p for split in SPLITS for p in existing_shards(out, split)]
    if old and not overwrite:
        raise ValueError(f"{old[0]} already exists ({len(old)} train/eval shard(s) in {out}); "
                         f"pass --overwrite to replace them or choose another --out")
    recordings, transcripts, other = _walk(audio_dir, skip=[out])
    if not recordings:
        raise ValueError(f"--audio-dir {audio_dir} holds no recordings (files ending in "
                         f"{', '.join('.' + e for e in RECORDING_EXTENSIONS)})")

    summary = FolderSummary(audio_dir=str(audio_dir), num_recordings=sum(len(v) for v in recordings.values()),
                            ignored=[str(p) for p in other])
    for key, sidecars in transcripts.items():  # a transcript nothing will read is reported, not skipped quietly
        if key not in recordings:
            for path in sidecars.values():
                line = f"{path}: no recording beside it (a file named {key[1]}.<audio or video extension>)"
                warn(line)
                summary.errors.append(line)

    out.mkdir(parents=True, exist_ok=True)
    for path in old:  # a smaller rebuild must not leave stale shards behind for a glob to pick up
        path.unlink()
    spool = Path(tempfile.mkdtemp(prefix=".spool-", dir=out))  # one recording's cuts until all of it decoded
    sinks = {split: ShardSink(out, split, max_samples=cfg.max_samples, max_bytes=int(cfg.max_bytes)) for split in SPLITS}
    try:
        for key in sorted(recordings):
            paths = recordings[key]
            for path in paths:
                relative = path.relative_to(audio_dir).as_posix()
                try:
                    if len(paths) > 1 and key in transcripts:
                        raise RecordingError("ambiguous", f"{path}: shares its transcript with "
                                                          f"{', '.join(str(p) for p in paths if p != path)}; "
                                                          f"rename one of them")
                    built = _build_recording(path, relative, transcripts.get(key, {}), cfg, str(path), spool)
                except RecordingError as e:
                    warn(f"{e}; skipped")
                    summary.errors.append(str(e))
                    seconds = _probe_seconds(path)
                    if seconds is None:
                        summary.unknown_length.append(str(path))
                    summary.input_s += seconds or 0.0
                    summary.not_in[e.reason]["seconds"] += seconds or 0.0
                    summary.not_in[e.reason]["files"].append(str(path))
                    continue
                summary.input_s += built.duration_s
                summary.covered_s += built.covered_s
                if built.duration_s - built.covered_s > 0:
                    summary.not_in["untranscribed"]["seconds"] += built.duration_s - built.covered_s
                    summary.not_in["untranscribed"]["files"].append(str(path))
                if built.action_items_skipped:
                    summary.action_items_skipped.append(str(path))
                counts = Counter()
                for cut, member_path, duration_s, split in built.samples:
                    stats = summary.splits[split]
                    meta = {"task": cut.task, "source": SOURCE, "recording": relative,
                            "offset_s": cut.start_ms / 1000, "duration_s": round(duration_s, 4),
                            "speakers": cut.speakers, "num_speakers": len(cut.speakers), "alignment": cut.alignment}
                    if cfg.language:
                        meta["language"] = cfg.language
                    sample = PreparedSample(messages=_messages(cut.task, cut.text), meta=meta,
                                            media=[(AUDIO_MEMBER, member_path, member_path.stat().st_size)],
                                            audio_duration_s=duration_s)
                    sinks[split].write(f"{stats.num_samples:06d}", sample)
                    member_path.unlink()
                    stats.num_samples += 1
                    stats.audio_s += duration_s
                    stats.tasks[cut.task] += 1
                    counts[split] += 1
                say(f"{path}: {sum(counts.values())} samples (train {counts['train']}, eval {counts['eval']})")
        for sink in sinks.values():
            if sink.tar is not None:
                sink.close_shard()
    except BaseException:
        for sink in sinks.values():
            sink.abort()
        raise
    finally:
        shutil.rmtree(spool, ignore_errors=True)
    for split, sink in sinks.items():
        summary.splits[split].shards = [str(p) for p in sink.shards]
        summary.splits[split].num_bytes = sum(p.stat().st_size for p in sink.shards)
    return summary


def _probe_seconds(path: Path) -> float | None:
    """The recording's length for the summary of a skipped file, or None when it cannot be read."""
    try:
        return _open(path, str(path))[1]
    except RecordingError:
        return None


@dataclass(kw_only=True)
class BuiltRecording:
    samples: list[tuple[Cut, Path, float, str]]  # (cut, spooled FLAC file, its seconds, split)
    duration_s: float
    covered_s: float                             # inside at least one transcribe cut
    action_items_skipped: bool


def _build_recording(path: Path, relative: str, sidecars: dict[str, Path], cfg: FolderConfig, where: str,
                     spool: Path) -> BuiltRecording:
    """Plan and decode one recording into spooled FLAC cuts.

    Raises RecordingError before anything of this recording reaches a shard, so a file that fails
    halfway leaves no samples behind.
    """
    if not sidecars:
        looked = ", ".join(f"{path.stem}.{ext}" for ext in TRANSCRIPT_EXTENSIONS)
        raise RecordingError("no_transcript", f"{where}: no transcript beside it (looked for {looked})")
    transcript = read_transcript(sidecars, where)
    rate_hz, duration_s = _open(path, where)
    duration_ms = math.floor(duration_s * 1000)
    segment_ms, overlap_ms = round(cfg.segment_s * 1000), round(cfg.overlap_s * 1000)
    if transcript.timed:
        last_ms = max(c.end_ms for c in transcript.cues)
        if last_ms > duration_ms + PAST_END_TOLERANCE_S * 1000 or any(c.start_ms >= duration_ms for c in transcript.cues):
            raise RecordingError("past_end", f"{transcript.source}: timestamps run {(last_ms - duration_ms) / 1000:.2f} s past the "
                                             f"end of the audio (last cue ends at {last_ms / 1000:.2f} s, {path.name} "
                                             f"is {duration_s:.2f} s long)")
        for cue in transcript.cues:  # within the tolerance: header rounding, clipped
            cue.end_ms = min(cue.end_ms, duration_ms)
        cuts = plan_segments(transcript.cues, segment_ms)
    else:
        cuts = plan_windows(transcript.cues, duration_ms, segment_ms, overlap_ms)
    covered_ms = _covered_ms(cuts)
    action_items_skipped = bool(transcript.action_items) and duration_s > cfg.action_items_max_s
    if transcript.action_items and not action_items_skipped:
        speakers = list(dict.fromkeys(s for c in transcript.cues for s in c.speakers))
        cuts.append(Cut(task="action_items", start_ms=0, end_ms=duration_ms,
                        text="\n".join(f"- {item}" for item in transcript.action_items), speakers=speakers,
                        alignment="timestamps" if transcript.timed else "proportional"))

    reader = SequentialReader(path, rate_hz, where)
    result = []
    try:
        # By start: the reader goes front to back (the action_items cut, from 0, comes first).
        for index, cut in sorted(enumerate(cuts), key=lambda item: (item[1].start_ms, item[1].end_ms)):
            data, seconds = flac_cut(reader, cut)
            member_path = spool / f"{index:06d}.flac"
            member_path.write_bytes(data)
            unit = "action_items" if cut.task == "action_items" else f"{cut.start_ms}"
            result.append((index, (cut, member_path, seconds, _split_of(cfg, relative, unit))))
    except RecordingError:
        for _, (_, member_path, _, _) in result:
            member_path.unlink(missing_ok=True)
        raise
    result = [sample for _, sample in sorted(result, key=lambda item: item[0])]  # samples in plan order
    return BuiltRecording(samples=result, duration_s=duration_ms / 1000, covered_s=covered_ms / 1000,
                          action_items_skipped=action_items_skipped)


def build_folder_cli(args: argparse.Namespace) -> int:
    """`shards build --audio-dir`: exit 0 when every recording went in, 1 when some were skipped."""
    defaults = FolderConfig()
    cfg = FolderConfig(
        segment_s=args.segment_s if args.segment_s is not None else defaults.segment_s,
        overlap_s=args.overlap_s if args.overlap_s is not None else defaults.overlap_s,
        eval_fraction=args.eval_fraction if args.eval_fraction is not None else defaults.eval_fraction,
        eval_by=args.eval_by or defaults.eval_by,
        seed=args.seed if args.seed is not None else defaults.seed,
        action_items_max_s=args.action_items_max_s if args.action_items_max_s is not None else defaults.action_items_max_s,
        language=args.language, max_samples=args.max_samples, max_bytes=args.max_bytes)
    summary = build_folder(args.audio_dir, args.out, cfg, overwrite=args.overwrite)
    print(summary.format())
    sys.stdout.flush()
    if summary.num_samples == 0:
        raise ValueError(f"nothing was built from {args.audio_dir}: every recording was skipped (reasons above)")
    return 1 if summary.errors else 0
