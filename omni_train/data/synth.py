"""Synthesize real media files with ffmpeg, espeak-ng and PIL.

Used by the tests (which never download data) and by generated corpora. Every function writes a
real file in the container its extension names, so what it makes goes through the same decoders
as users' media.

`synth_meeting` writes a long multi-speaker recording with its transcript (SRT, WebVTT, JSON or
plain text), the input of `omni-train shards build --audio-dir` (`folder.py`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import os
import random
import shutil
import subprocess
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

AUDIO_CODECS = {"wav": ["-c:a", "pcm_s16le"], "flac": ["-c:a", "flac"], "mp3": ["-c:a", "libmp3lame", "-b:a", "64k"],
                "ogg": ["-c:a", "libvorbis"], "opus": ["-c:a", "libopus", "-b:a", "32k"]}


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise RuntimeError(f"'{tool}' is not installed: run `apt-get install -y ffmpeg espeak-ng` (or `make install`)")
    return path


def _ffmpeg(args: list[str]) -> None:
    cmd = [require("ffmpeg"), "-hide_banner", "-loglevel", "error", "-y", *args]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ffmpeg failed ({' '.join(cmd)}): {result.stderr.strip()}")


def tone(path: str | Path, duration_s: float, *, frequency_hz: float = 440.0, sample_rate_hz: int = 44100,
         channels: int = 1) -> Path:
    """A sine tone in the codec named by the extension (wav, flac, mp3, ogg, opus)."""
    path = Path(path)
    ext = path.suffix.lstrip(".").lower()
    if ext == "opus":
        sample_rate_hz = 48000  # opus only encodes 8/12/16/24/48 kHz
    _ffmpeg(["-f", "lavfi", "-i", f"sine=frequency={frequency_hz}:sample_rate={sample_rate_hz}:duration={duration_s}",
             "-ac", str(channels), *AUDIO_CODECS.get(ext, []), str(path)])
    return path


def speech(path: str | Path, text: str, *, voice: str = "en-us", rate_wpm: int = 160, pitch: int = 50,
           sample_rate_hz: int | None = None) -> Path:
    """Text spoken by espeak-ng, converted by ffmpeg to the extension's codec (espeak writes 22.05 kHz wav)."""
    path = Path(path)
    wav = path.with_suffix(".espeak.wav")
    result = subprocess.run([require("espeak-ng"), "-v", voice, "-s", str(rate_wpm), "-p", str(pitch), "-w", str(wav), text],
                            capture_output=True, text=True)
    if result.returncode != 0 or not wav.exists():
        raise RuntimeError(f"espeak-ng failed for voice {voice!r}: {result.stderr.strip()}")
    if path.suffix.lower() == ".wav" and sample_rate_hz is None:
        wav.replace(path)
        return path
    rate = ["-ar", str(sample_rate_hz)] if sample_rate_hz else []
    ext = path.suffix.lstrip(".").lower()
    if ext == "opus" and not sample_rate_hz:
        rate = ["-ar", "48000"]
    _ffmpeg(["-i", str(wav), *rate, *AUDIO_CODECS.get(ext, []), str(path)])
    wav.unlink()
    return path


def test_pattern_video(path: str | Path, duration_s: float, *, fps: int = 25, width: int = 320, height: int = 240,
                       with_audio: bool = False) -> Path:
    """ffmpeg's testsrc pattern (a frame counter is drawn in it) encoded by the extension's container."""
    path = Path(path)
    ext = path.suffix.lstrip(".").lower()
    codec = {"mp4": ["-c:v", "libx264", "-pix_fmt", "yuv420p"], "mkv": ["-c:v", "libx264", "-pix_fmt", "yuv420p"],
             "webm": ["-c:v", "libvpx-vp9", "-b:v", "200k"], "avi": ["-c:v", "mpeg4"]}[ext]
    audio = ["-f", "lavfi", "-i", f"sine=frequency=300:duration={duration_s}"] if with_audio else []
    audio_codec = (["-c:a", "aac"] if ext in ("mp4", "mkv") else ["-c:a", "libopus"] if ext == "webm" else ["-c:a", "mp3"]) if with_audio else []
    _ffmpeg(["-f", "lavfi", "-i", f"testsrc=duration={duration_s}:size={width}x{height}:rate={fps}", *audio,
             *codec, *audio_codec, "-t", str(duration_s), str(path)])
    return path


def pattern_image(path: str | Path, width: int, height: int, *, seed: int = 0) -> Path:
    """A PIL image with coloured bands and a diagonal, saved in the extension's format."""
    from PIL import Image, ImageDraw

    path = Path(path)
    image = Image.new("RGB", (width, height), ((37 * seed) % 256, 90, 160))
    draw = ImageDraw.Draw(image)
    for i in range(0, width, max(1, width // 8)):
        draw.rectangle([i, 0, i + max(1, width // 16), height], fill=((i * 7 + seed) % 256, 200, 40))
    draw.line([0, 0, width, height], fill=(255, 255, 255), width=max(1, min(width, height) // 30))
    image.save(path)
    return path


# ----------------------------------------------------------------------------------------------
# Synthetic meetings

# Speakers: a name (the transcript's label) and an espeak-ng English voice with a variant, so
# each one sounds different in accent, timbre and pitch.
MEETING_SPEAKERS = (("Alice", "en-us+f2"), ("Bob", "en-gb+m3"), ("Carol", "en-gb-scotland+f4"), ("Dave", "en-029+m1"),
                    ("Erin", "en-us+f4"), ("Frank", "en-gb-x-rp+m5"), ("Grace", "en-gb+f1"), ("Heidi", "en-us+m7"))
# A small closed vocabulary (about 200 words), lowercase and without punctuation, so a tiny model
# fine-tuned on a meeting sees every word many times and WER needs no text normalization.
_WORDS = {
    "verb": ("review", "send", "update", "check", "finish", "share", "test", "fix", "write", "move", "plan", "build",
             "approve", "discuss", "prepare", "schedule", "present", "measure", "deploy", "clean up"),
    "verb_past": ("reviewed", "sent", "updated", "checked", "finished", "shared", "tested", "fixed", "wrote", "moved",
                  "planned", "built", "approved", "discussed", "prepared", "scheduled", "presented", "measured"),
    "noun": ("report", "budget", "plan", "roadmap", "dashboard", "contract", "invoice", "schedule", "prototype",
             "database", "website", "backlog", "release", "survey", "slides", "server", "migration", "model",
             "benchmark", "demo", "feedback", "document", "pricing", "campaign", "audit", "app", "pipeline", "design",
             "timeline", "proposal", "summary", "checklist", "agenda", "budget report", "test results", "login page"),
    "adj": ("new", "old", "final", "weekly", "monthly", "draft", "second", "quarterly", "current", "simple", "big",
            "small", "internal", "public", "main", "short", "full"),
    "state": ("fine", "ready", "late", "good", "better", "worse", "done", "on track", "behind schedule", "almost ready",
              "too expensive", "a bit slow", "much faster now"),
    "day": ("monday", "tuesday", "wednesday", "thursday", "friday", "tomorrow", "next week", "the end of the month"),
    "team": ("sales", "design", "research", "support", "marketing", "product", "data", "finance", "legal", "platform"),
    "past": ("yesterday", "last week", "this morning", "on monday", "last month", "before lunch"),
    "when": ("today", "tomorrow", "next week", "after lunch", "this afternoon", "on friday", "later today"),
    "period": ("this week", "this month", "this quarter", "right now", "so far"),
    "opinion": ("good", "great", "fine", "reasonable", "risky", "expensive", "a little early", "like a good idea"),
}
_TEMPLATES = (
    "{name} will {verb} the {noun} by {day}",
    "we need to {verb} the {adj} {noun} before {day}",
    "the {noun} looks {state} {period}",
    "can you {verb} the {noun} for the {team} team",
    "i think the {adj} {noun} is {state}",
    "let us {verb} the {noun} {when}",
    "{name} {verb_past} the {noun} {past}",
    "the {team} team wants a {adj} {noun}",
    "that sounds {opinion} to me",
    "how is the {noun} going {period}",
    "i will {verb} the {adj} {noun} {when}",
    "did anyone {verb} the {noun} {past}",
    "okay thank you {name}",
    "the {adj} {noun} is {state} and the {noun} is {state}",
)
_ACTION_TEMPLATE = "{name} will {verb} the {adj} {noun} by {day}"
_RENDER_AHEAD = 8


@dataclass(kw_only=True, frozen=True)
class MeetingTurn:
    start_s: float
    end_s: float
    speaker: str
    text: str


@dataclass(kw_only=True)
class Meeting:
    """What `synth_meeting` wrote: the recording, its transcript file, and the truth behind both."""
    recording: Path
    transcript: Path
    notes: Path | None            # `<name>.json` with only `action_items`, beside a non-JSON transcript
    duration_s: float
    sample_rate_hz: int
    speakers: list[str]
    turns: list[MeetingTurn] = field(repr=False)
    action_items: list[str]


def _sentence(rng: random.Random, names: list[str], template: str | None = None) -> str:
    template = template or rng.choice(_TEMPLATES)
    values = {key: rng.choice(words) for key, words in _WORDS.items()}
    values["name"] = rng.choice(names)
    return template.format(**values)


def _espeak_pcm(text: str, voice: str, pitch: int, rate_wpm: int) -> tuple[np.ndarray, int]:
    """espeak-ng's int16 samples for `text` with the leading and trailing silence cut, and the sample rate."""
    result = subprocess.run([require("espeak-ng"), "-v", voice, "-p", str(pitch), "-s", str(rate_wpm), "--stdout", text],
                            capture_output=True)
    data = result.stdout
    if result.returncode != 0 or data[:4] != b"RIFF":
        raise RuntimeError(f"espeak-ng failed for voice {voice!r}: {result.stderr.decode(errors='replace').strip()}")
    rate_hz = int.from_bytes(data[24:28], "little")  # the canonical 44-byte header espeak-ng writes to stdout
    start = data.find(b"data", 36) + 8
    pcm = np.frombuffer(data[start: start + (len(data) - start) // 2 * 2], dtype="<i2")
    loud = np.flatnonzero(np.abs(pcm) > 64)
    if loud.size == 0:
        raise RuntimeError(f"espeak-ng produced no audio for voice {voice!r} on {text!r}")
    return pcm[loud[0]: loud[-1] + 1], rate_hz


@dataclass(kw_only=True, frozen=True)
class _PlannedTurn:
    speaker: int
    text: str      # the transcript: lowercase words
    spoken: str    # what espeak reads: sentences separated by '. ' so it pauses between them
    gap_s: float   # background noise before the turn


def _plan_turns(rng: random.Random, num_speakers: int, num_action_items: int,
                action_items: list[str]) -> Iterator[_PlannedTurn]:
    """Turns drawn from `rng` without looking at rendered lengths, so a seed always gives the same ones.

    `action_items` is filled as the wrap-up turns are drawn; the caller asks for them (by sending
    True) once the meeting is long enough. Ordinary turns are drawn until then.
    """
    names = [name for name, _ in MEETING_SPEAKERS[:num_speakers]]
    lower = [n.lower() for n in names]
    previous = -1
    while True:
        speaker = rng.choice([i for i in range(num_speakers) if i != previous] or [0])
        previous = speaker
        others = [n for i, n in enumerate(lower) if i != speaker] or lower  # nobody says "thank you" to themselves
        sentences = [_sentence(rng, others) for _ in range(rng.choice((1, 1, 2, 2, 3)))]
        # Mostly short gaps; now and then a long pause, which the folder mode reports as untranscribed.
        gap_s = rng.uniform(4.0, 8.0) if rng.random() < 0.05 else rng.uniform(0.2, 1.2)
        wrap_up = yield _PlannedTurn(speaker=speaker, text=" ".join(sentences), spoken=". ".join(sentences), gap_s=gap_s)
        if wrap_up:
            break
    yield None  # answers the send() that ended the meeting
    if num_action_items:
        chair = 0
        yield _PlannedTurn(speaker=chair, text="let us go over the action items", spoken="let us go over the action items",
                           gap_s=rng.uniform(0.5, 1.5))
        for _ in range(num_action_items):
            owner = rng.randrange(num_speakers)
            item = _sentence(rng, [lower[owner]], _ACTION_TEMPLATE)
            action_items.append(item)
            yield _PlannedTurn(speaker=owner, text=item, spoken=item, gap_s=rng.uniform(0.3, 1.0))


def _srt_time(seconds: float, sep: str = ",") -> str:
    ms = round(seconds * 1000)
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}{sep}{ms % 1000:03d}"


def write_transcript(path: Path, turns: list[MeetingTurn], action_items: list[str] | None = None) -> Path:
    """The turns as the extension's transcript: .srt ("Alice: text" cues), .vtt (<v Alice> cues), .json, .txt."""
    ext = path.suffix.lower()
    if ext == ".srt":
        text = "".join(f"{i}\n{_srt_time(t.start_s)} --> {_srt_time(t.end_s)}\n{t.speaker}: {t.text}\n\n"
                       for i, t in enumerate(turns, start=1))
    elif ext == ".vtt":
        text = "WEBVTT\n\n" + "".join(f"{_srt_time(t.start_s, '.')} --> {_srt_time(t.end_s, '.')}\n<v {t.speaker}>{t.text}\n\n"
                                       for t in turns)
    elif ext == ".json":
        record = {"transcript": " ".join(t.text for t in turns),
                  "segments": [{"start": round(t.start_s, 3), "end": round(t.end_s, 3), "speaker": t.speaker, "text": t.text}
                               for t in turns]}
        if action_items:
            record["action_items"] = action_items
        text = json.dumps(record, indent=1) + "\n"
    elif ext == ".txt":
        text = "".join(t.text + "\n" for t in turns)
    else:
        raise ValueError(f"transcript must be .srt, .vtt, .json or .txt, got {path.name}")
    path.write_text(text, encoding="utf-8")
    return path


def synth_meeting(out_dir: str | Path, minutes: float, *, num_speakers: int = 3, seed: int = 0, name: str = "meeting",
                  ext: str = "flac", transcript: str = "srt", num_action_items: int = 0, noise_dbfs: float = -50.0,
                  workers: int | None = None) -> Meeting:
    """A meeting of at least `minutes` with `num_speakers` espeak-ng voices, and its transcript beside it.

    Writes `<out_dir>/<name>.<ext>` (wav, flac, or the audio track of an mp4/mkv/webm with a tiny
    grey video track) and `<name>.<transcript>` (srt, vtt, json, txt) with one cue per turn. Turns
    are 1-3 short sentences from a ~200-word vocabulary, separated by background noise at
    `noise_dbfs` (RMS) that runs under the speech too, and now and then a pause of 4-8 s. With
    `num_action_items`, the meeting ends with the chair saying "let us go over the action items"
    and one turn per item, and the items are listed under `action_items` in the JSON transcript or,
    for the other transcript formats, in a `<name>.json` notes file holding only them.

    Deterministic for a seed. Turns render in a thread pool (espeak-ng processes) a few at a time
    and stream into a 16-bit WAV at espeak's 22.05 kHz, so memory does not grow with `minutes`.
    """
    out_dir = Path(out_dir)
    if not 1 <= num_speakers <= len(MEETING_SPEAKERS):
        raise ValueError(f"num_speakers must be in 1..{len(MEETING_SPEAKERS)}, got {num_speakers}")
    if ext not in ("wav", "flac", "mp4", "mkv", "webm"):
        raise ValueError(f"ext must be wav, flac, mp4, mkv or webm, got {ext!r}")
    if transcript not in ("srt", "vtt", "json", "txt"):
        raise ValueError(f"transcript must be srt, vtt, json or txt, got {transcript!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    speakers = [speaker for speaker, _ in MEETING_SPEAKERS[:num_speakers]]
    voices = [(voice, rng.randint(35, 65), rng.randint(150, 180), rng.uniform(0.6, 1.0))
              for _, voice in MEETING_SPEAKERS[:num_speakers]]  # (voice, pitch, words per minute, gain)
    action_items: list[str] = []
    plan = _plan_turns(rng, num_speakers, num_action_items, action_items)
    target_s = minutes * 60.0
    workers = workers or min(4, os.cpu_count() or 1)

    wav_path = out_dir / f"{name}.wav" if ext == "wav" else out_dir / f".{name}.render.wav"
    turns: list[MeetingTurn] = []
    position = 0  # samples written
    rate_hz = None
    noise_rms = 32768.0 * 10.0 ** (noise_dbfs / 20.0)
    # Threads suffice: each render is an espeak-ng process. A fixed window of futures keeps at most
    # _RENDER_AHEAD turns in memory however long the meeting is, and fixes how many turns are drawn
    # past the end (then dropped), so the output does not depend on `workers`.
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool, wave.open(str(wav_path), "wb") as wav:
        pending: collections.deque = collections.deque()
        wrapping_up, exhausted, index = False, False, 0

        def submit() -> None:
            nonlocal exhausted
            turn = next(plan, None)
            if turn is None:
                exhausted = True
                return
            voice, pitch, rate_wpm, _ = voices[turn.speaker]
            pending.append((turn, pool.submit(_espeak_pcm, turn.spoken, voice, pitch, rate_wpm)))

        while True:
            while not exhausted and len(pending) < _RENDER_AHEAD:
                submit()
            if not pending:
                break
            turn, future = pending.popleft()
            pcm, turn_rate_hz = future.result()
            if rate_hz is None:
                rate_hz = turn_rate_hz
                wav.setnchannels(1)
                wav.setsampwidth(2)
                wav.setframerate(rate_hz)
            assert turn_rate_hz == rate_hz, (turn_rate_hz, rate_hz)
            gap = round(turn.gap_s * rate_hz)
            noise = np.random.default_rng([seed, index]).standard_normal(gap + pcm.size) * noise_rms  # (gap + speech,)
            noise[gap:] += pcm * voices[turn.speaker][3]
            wav.writeframes(np.clip(np.round(noise), -32768, 32767).astype("<i2").tobytes())
            start = position + gap
            position = start + pcm.size
            turns.append(MeetingTurn(start_s=round(start / rate_hz, 3), end_s=round(position / rate_hz, 3),
                                     speaker=speakers[turn.speaker], text=turn.text))
            index += 1
            if not wrapping_up and position >= target_s * rate_hz:
                # Long enough: turns already in flight are dropped, then the wrap-up turns are drawn.
                wrapping_up = True
                for _, stale in pending:
                    stale.cancel()
                pending.clear()
                plan.send(True)
                exhausted = False
        tail = round(1.0 * rate_hz)
        tail_noise = np.random.default_rng([seed, index]).standard_normal(tail) * noise_rms
        wav.writeframes(np.clip(np.round(tail_noise), -32768, 32767).astype("<i2").tobytes())
        position += tail

    recording = out_dir / f"{name}.{ext}"
    if ext != "wav":
        _encode_meeting(wav_path, recording, position / rate_hz)
        wav_path.unlink()
    transcript_path = write_transcript(out_dir / f"{name}.{transcript}", turns,
                                       action_items if transcript == "json" else None)
    notes = None
    if action_items and transcript != "json":
        notes = out_dir / f"{name}.json"
        notes.write_text(json.dumps({"action_items": action_items}, indent=1) + "\n", encoding="utf-8")
    return Meeting(recording=recording, transcript=transcript_path, notes=notes, duration_s=position / rate_hz,
                   sample_rate_hz=rate_hz, speakers=speakers, turns=turns, action_items=action_items)


def _encode_meeting(wav_path: Path, path: Path, duration_s: float) -> None:
    """The rendered WAV as FLAC, or as the audio track of a video call (1 fps grey frames), bit-exact."""
    ext = path.suffix.lstrip(".")
    if ext == "flac":
        args = ["-i", str(wav_path), "-c:a", "flac"]
    else:
        video = {"mp4": ["-c:v", "libx264", "-pix_fmt", "yuv420p"], "mkv": ["-c:v", "libx264", "-pix_fmt", "yuv420p"],
                 "webm": ["-c:v", "libvpx-vp9", "-b:v", "20k"]}[ext]
        audio = ["-c:a", "libopus", "-b:a", "48k"] if ext == "webm" else ["-c:a", "aac", "-b:a", "96k"]
        args = ["-f", "lavfi", "-i", f"color=c=gray:s=64x64:r=1:d={duration_s:.3f}", "-i", str(wav_path),
                *video, *audio, "-map", "0:v", "-map", "1:a"]
    _ffmpeg([*args, "-threads", "1", "-fflags", "+bitexact", "-flags:v", "+bitexact", "-flags:a", "+bitexact",
             "-map_metadata", "-1", str(path)])
