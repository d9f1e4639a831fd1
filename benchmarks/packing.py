"""Real-token fraction: best-fit packing (ours) vs padding each batch to its longest sample.

    python benchmarks/packing.py                      # a synthetic mixed-length corpus
    python benchmarks/packing.py --shards 'shards/demo/train-*.tar' --seq-len 2048

The synthetic corpus mixes the lengths a multimodal mixture has: short text pairs, spoken
utterances (25 tokens/s), images (64-256 tokens) and video clips (hundreds of tokens). With
`--shards`, the lengths come from real samples decoded by the training pipeline. Goal: >= 97%.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from omni_train.data.packing import Packer, pad_to_longest_fraction
from omni_train.data.sample import TokenizedSample


def synthetic_lengths(num_samples: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    kinds = rng.choice(4, size=num_samples, p=[0.35, 0.35, 0.2, 0.1])
    lengths = np.where(kinds == 0, rng.integers(20, 300, num_samples),          # text -> code, chat
             np.where(kinds == 1, 40 + (25 * rng.uniform(1, 30, num_samples)).astype(int),  # speech 1-30 s
             np.where(kinds == 2, rng.choice([64, 100, 144, 196, 256], num_samples) + rng.integers(10, 60, num_samples),
                      rng.integers(200, 1500, num_samples))))                  # video clips
    return lengths.tolist()


def shard_lengths(pattern: str, seq_len: int) -> list[int]:
    from omni_train.data.pipeline import DataConfig, DataPipeline, SourceConfig

    cfg = DataConfig(seq_len=seq_len, batch_size=1, num_workers=2, pack_pool=1, train=[SourceConfig(shards=pattern)])
    return [s["num_tokens"] for batch in DataPipeline(cfg, epochs=1) for s in batch["samples"]]


def packed_fraction(lengths: list[int], seq_len: int, pool: int) -> tuple[float, int]:
    packer = Packer(seq_len, pool)
    real = num_sequences = 0
    stream = iter(lengths)
    exhausted = False
    while True:
        while not packer.full() and not exhausted:
            n = next(stream, None)
            if n is None:
                exhausted = True
                break
            packer.add(TokenizedSample(input_ids=torch.zeros(n, dtype=torch.long), labels=torch.zeros(n, dtype=torch.long),
                                       modality_ids=torch.zeros(n, dtype=torch.int8), timestamps_s=torch.zeros(n)))
        sequence = packer.pop_sequence()
        if not sequence:
            break
        real += sum(len(s) for s in sequence)
        num_sequences += 1
    return real / (num_sequences * seq_len), num_sequences


def next_fit_fraction(lengths: list[int], seq_len: int) -> float:
    """In-order packing that closes a sequence when the next sample does not fit."""
    num_sequences, space = 1, seq_len
    for n in lengths:
        if n > space:
            num_sequences, space = num_sequences + 1, seq_len
        space -= n
    return sum(lengths) / (num_sequences * seq_len)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", default=None)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--num-samples", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=8, help="samples per batch for the pad-to-longest baseline")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    lengths = shard_lengths(args.shards, args.seq_len) if args.shards else synthetic_lengths(args.num_samples, args.seed)
    lengths = [n for n in lengths if n <= args.seq_len]
    print(f"corpus: {len(lengths)} samples, {sum(lengths):,} tokens, length min/median/max "
          f"{min(lengths)}/{int(np.median(lengths))}/{max(lengths)}, seq_len {args.seq_len}")
    baseline = pad_to_longest_fraction(lengths, args.batch_size)
    print(f"{'method':<34}{'real-token fraction':>20}{'time':>10}")
    print(f"{'pad to longest (batch ' + str(args.batch_size) + ')':<34}{baseline:>20.1%}{'':>10}")
    print(f"{'packed: next fit, in order':<34}{next_fit_fraction(lengths, args.seq_len):>20.1%}{'':>10}")
    for pool in (16, 64):
        start = time.perf_counter()
        fraction, _ = packed_fraction(lengths, args.seq_len, pool)
        name = f"best fit, pool {pool} (ours)"
        print(f"{'packed: ' + name:<34}{fraction:>20.1%}{time.perf_counter() - start:>9.2f}s")
    fraction, _ = packed_fraction(lengths, args.seq_len, 64)
    print(f"ratio packed(pool 64) / pad-to-longest: {fraction / baseline:.2f}x; goal >= 97% packed: "
          f"{'met' if fraction >= 0.97 else 'NOT met'}")


if __name__ == "__main__":
    main()
