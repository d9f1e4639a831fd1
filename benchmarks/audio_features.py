"""Log-mel throughput on one core: omni_train.data.audio.log_mel vs transformers' WhisperFeatureExtractor.

    python benchmarks/audio_features.py [--repeats 5] [--num-mel-bins 128]

A few minutes of espeak-ng speech (several voices) is generated and decoded to 16 kHz tensors
in memory first, so only feature extraction is timed. Clips of 2 to 30 s are cut from it, plus one
10-minute recording, which Whisper's extractor can only take as 30 s chunks (timed both as one
batched call and as a loop, and the faster is kept). Each clip is one call, as in a data loader.
Times are the best of --repeats runs, because other processes may share the machine.
Goals: ours >= 5x the HF extractor and >= 1000x realtime per core.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from omni_train.data import synth
from omni_train.data.audio import AudioConfig, decode_audio, log_mel

SAMPLE_RATE_HZ = 16000
SENTENCES = {
    "en-us": ["Three plus five, times two, is sixteen.", "Please write the code that prints the result.",
              "The meeting starts at nine thirty tomorrow morning.", "Seven minus four equals three."],
    "de": ["Drei plus fünf mal zwei ist sechzehn.", "Bitte schreibe den Code, der das Ergebnis ausgibt."],
    "fr": ["Trois plus cinq, fois deux, font seize.", "Écris le code qui affiche le résultat, s'il te plaît."],
    "es": ["Tres más cinco, por dos, es dieciséis.", "Escribe el código que imprime el resultado."],
}
CLIP_LENGTHS_S = (2, 5, 10, 20, 30)
CLIPS_PER_LENGTH = 6
LONG_RECORDING_S = 600


def speech_pool(num_seconds: float, workdir: Path) -> torch.Tensor:
    """espeak utterances in several voices and rates, with short pauses, until num_seconds of 16 kHz audio."""
    cfg = AudioConfig()
    utterances = []
    for voice, sentences in SENTENCES.items():
        for i, text in enumerate(sentences):
            for rate_wpm in (140, 175):
                path = synth.speech(workdir / f"{voice}-{i}-{rate_wpm}.wav", text, voice=voice, rate_wpm=rate_wpm)
                utterances.append(decode_audio(path, cfg))
    generator = torch.Generator().manual_seed(0)
    parts, total = [], 0
    while total < num_seconds * SAMPLE_RATE_HZ:
        utterance = utterances[int(torch.randint(len(utterances), (1,), generator=generator))]
        pause = torch.zeros(int(torch.randint(1600, 8000, (1,), generator=generator)))
        parts += [utterance, pause]
        total += utterance.shape[0] + pause.shape[0]
    pool = torch.cat(parts)
    return pool + 1e-3 * torch.randn(pool.shape[0], generator=generator)  # room noise: no exact-zero pauses


def best_time_s(fn, repeats: int) -> float:
    fn()  # warm-up: caches, allocator
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--num-mel-bins", type=int, default=128, choices=(80, 128))
    args = parser.parse_args()
    torch.set_num_threads(1)
    from transformers import WhisperFeatureExtractor

    cfg = AudioConfig(num_mel_bins=args.num_mel_bins)
    extractor = WhisperFeatureExtractor(feature_size=args.num_mel_bins)

    def hf(waveforms: list[np.ndarray]):
        return extractor(waveforms, sampling_rate=SAMPLE_RATE_HZ, return_tensors="np")["input_features"]

    with tempfile.TemporaryDirectory() as tmp:
        pool = speech_pool(200.0, Path(tmp))
    generator = torch.Generator().manual_seed(1)
    groups: list[tuple[str, list[torch.Tensor]]] = []
    for length_s in CLIP_LENGTHS_S:
        starts = torch.randint(pool.shape[0] - length_s * SAMPLE_RATE_HZ, (CLIPS_PER_LENGTH,), generator=generator)
        groups.append((f"{CLIPS_PER_LENGTH} x {length_s} s clips",
                       [pool[s : s + length_s * SAMPLE_RATE_HZ].clone() for s in starts.tolist()]))
    recording = pool.repeat(LONG_RECORDING_S * SAMPLE_RATE_HZ // pool.shape[0] + 1)[: LONG_RECORDING_S * SAMPLE_RATE_HZ]
    groups.append((f"1 x {LONG_RECORDING_S // 60} min recording", [recording]))

    # The two must compute the same thing before their speed is compared.
    clip = groups[1][1][0]
    difference = np.abs(log_mel(clip, cfg).numpy() - hf([clip.numpy()])[0][:, : clip.shape[0] // 160]).max()
    print(f"pool: {pool.shape[0] / SAMPLE_RATE_HZ:.0f} s of espeak speech; parity on a 5 s clip: max |ours - HF| = {difference:.1e}")
    print(f"threads: {torch.get_num_threads()}, mel bins: {args.num_mel_bins}, best of {args.repeats}\n")

    header = f"{'input':<24}{'audio s':>9}{'ours s/s':>12}{'HF s/s':>10}{'ours/HF':>9}"
    print(header + "\n" + "-" * len(header))
    total_audio_s = total_ours_s = total_hf_s = 0.0
    for name, clips in groups:
        audio_s = sum(c.shape[0] for c in clips) / SAMPLE_RATE_HZ
        arrays = [c.numpy() for c in clips]
        ours_s = best_time_s(lambda: [log_mel(c, cfg) for c in clips], args.repeats)
        if len(clips) == 1 and clips[0].shape[0] > 30 * SAMPLE_RATE_HZ:
            chunks = np.split(arrays[0], range(30 * SAMPLE_RATE_HZ, arrays[0].shape[0], 30 * SAMPLE_RATE_HZ))
            hf_s = min(best_time_s(lambda: hf(chunks), args.repeats),
                       best_time_s(lambda: [hf([c]) for c in chunks], args.repeats))
        else:
            hf_s = best_time_s(lambda: [hf([a]) for a in arrays], args.repeats)
        total_audio_s, total_ours_s, total_hf_s = total_audio_s + audio_s, total_ours_s + ours_s, total_hf_s + hf_s
        print(f"{name:<24}{audio_s:>9.0f}{audio_s / ours_s:>11.0f}x{audio_s / hf_s:>9.0f}x{hf_s / ours_s:>8.1f}x")
    print("-" * len(header))
    print(f"{'all':<24}{total_audio_s:>9.0f}{total_audio_s / total_ours_s:>11.0f}x"
          f"{total_audio_s / total_hf_s:>9.0f}x{total_hf_s / total_ours_s:>8.1f}x")
    print("\ns/s = seconds of audio per second on one core (x realtime); goals: ours/HF >= 5x, ours >= 1000x")


if __name__ == "__main__":
    main()
