"""Training speed of the demo model: the framework against a bare PyTorch re-creation of the calibration prototype.

    python benchmarks/demo_speed.py                                   # about 3-4 min on 2 cores
    python benchmarks/demo_speed.py --steps 150 --proto-steps 150    # longer windows, steadier numbers
    python benchmarks/demo_speed.py --recipe recipes/demo.yaml model.transfer.kind=none   # extra recipe overrides

Goal (issue 4): the framework trains the demo model at least as fast as the calibration prototype
did, about 200 s of audio per second at 2M parameters on this 2-core CPU (TRANSFER-CALIBRATION.md).
Both are measured here, one after the other in one run, on the same corpus (`shards/demo`, built
by `omni-train shards demo --out shards/demo --size demo`; when it is missing, a `--size tiny`
corpus is built in a temp dir and the table says so).

The prototype, as TRANSFER-CALIBRATION.md describes it and written from that description (the
`Prototype*` classes below): 80-bin log-mel via torch.stft, two stride-2 convs (x4 subsampling),
3 transformer layers at d=160, an MLP projector, a 3-layer causal RoPE decoder at d=160 over
characters, layout `[audio or text prefix] <task token> target <eos>` with `<tr>` and `<code>`;
every step one speech -> transcript batch and one text -> code batch (the corpus's `asr` and
`text2code` samples), padded to the longest item, one AdamW step (lr 2e-3), one process with
torch.set_num_threads(2). Its features are computed once, up front, in memory (not timed), as a
bare prototype holding 105 minutes of audio would.

The framework: `torchrun --nproc_per_node=2 launch/pretrain.py --recipe R train.steps=N ...` with
OMP_NUM_THREADS=1 as `make demo` runs it, probes, eval and the tracker switched off, a metrics row
per step. What it trained is read back by replaying its data pipeline (same recipe, seed, ranks
and workers: `DataPipeline` is deterministic) and checked against the run: the replay's real tokens
must add up to the run's `tokens_seen`. From the replay: seconds of audio per step (the batches'
`audio_window_frames`), decoder positions, samples per task.

Steady state: the prototype's first --warmup steps are run but not timed (and its timing stops
after --proto-max-s on a busy machine); the framework's first --skip steps are left out and its
time is the sum of the remaining rows' `step_s` (loader wait + optimizer step + the loop's metric
all-reduce, per step), so process start-up, DeepSpeed set-up, the first batches of the DataLoader
workers and the final checkpoint are not counted; the table also gives the whole torchrun's wall time.

A second measure hardly depends on other processes: the CPU time one thread spends per step
(--cpu-steps of each, after the timed runs): the prototype's step, and the framework's model step
on rank 0's batches (its model and an AdamW step, without DeepSpeed and the all-reduce), without
and with its data loading. It is printed as audio seconds per CPU-second; two idle cores give at
most twice that per second.

Run it on an idle machine: the 1-minute load average is printed, with a warning when other
processes shared the cores. Under load the prototype's two OpenMP threads slow down far more than
the framework's single-threaded ranks (every parallel region waits for a descheduled thread), so
the ratio then flatters the framework; the line against the calibration's 200 s/s does not.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import wave
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
DEMO_SHARDS = REPO / "shards" / "demo"

# The prototype, from TRANSFER-CALIBRATION.md
SAMPLE_RATE_HZ = 16000
N_FFT = 400             # 25 ms window
HOP_LENGTH = 160        # 10 ms per frame
NUM_MEL_BINS = 80
DIM = 160
NUM_HEADS = 4
NUM_ENCODER_LAYERS = 3
NUM_DECODER_LAYERS = 3
LR = 2e-3
CALIBRATION_AUDIO_S_PER_S = 200.0  # what the prototype trained on this CPU, idle (2.9 steps/s, 2 threads)
SPECIALS = ("<pad>", "<tr>", "<code>", "<eos>")
PAD, TR, CODE, EOS = range(len(SPECIALS))


# ---------------------------------------------------------------------------------------------
# The corpus


def ensure_corpus(shards: Path, tmp: Path) -> tuple[Path, str]:
    """(shard dir, what it is): the demo corpus if present, else a tiny one built in `tmp`."""
    if sorted(shards.glob("train-*.tar")):
        info = json.loads((shards / "corpus.json").read_text()) if (shards / "corpus.json").is_file() else {}
        return shards, f"{shards} (size {info.get('size', 'unknown')}, seed {info.get('seed', 'unknown')})"
    out = tmp / "tiny"
    print(f"{shards} has no train-*.tar: building a tiny demo corpus in {out} "
          f"(build the real one with `omni-train shards demo --out shards/demo --size demo`)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "omni_train.cli", "shards", "demo", "--out", str(out), "--size", "tiny"],
                   cwd=REPO, check=True, capture_output=True)
    return out, f"{out} (size tiny, built because {shards} is missing: numbers are not the demo's)"


def read_wav(data: bytes) -> torch.Tensor:
    """16-bit PCM mono WAV bytes -> (num_samples,) float32 at SAMPLE_RATE_HZ (the demo corpus writes these)."""
    try:
        with wave.open(io.BytesIO(data)) as w:
            ok = w.getsampwidth() == 2 and w.getnchannels() == 1 and w.getframerate() == SAMPLE_RATE_HZ
            pcm = w.readframes(w.getnframes()) if ok else b""
    except wave.Error:
        ok = False
    if ok:
        return torch.frombuffer(bytearray(pcm), dtype=torch.int16).float() / 32768.0
    from torchcodec.decoders import AudioDecoder  # other codecs or rates

    return AudioDecoder(data, sample_rate=SAMPLE_RATE_HZ).get_all_samples().data.mean(dim=0)


def read_prototype_corpus(shard_dir: Path) -> tuple[list[tuple[torch.Tensor, str]], list[tuple[str, str]]]:
    """The training shards' speech -> transcript pairs (waveform, transcript) and text -> code pairs (text, code)."""
    speech, text = [], []
    for path in sorted(shard_dir.glob("train-*.tar")):
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(path) as tar:
            for info in tar:
                if info.isfile():
                    key, _, suffix = info.name.partition(".")
                    members.setdefault(key, {})[suffix] = tar.extractfile(info).read()
        for parts in members.values():
            sample = json.loads(parts["json"])
            task = sample["meta"].get("task")
            user, assistant = sample["messages"][0]["content"], sample["messages"][-1]["content"][0]["text"]
            if task == "asr":
                speech.append((read_wav(parts[user[0]["member"]]), assistant))
            elif task == "text2code":
                text.append((user[0]["text"], assistant))
    return speech, text


def mel_filterbank(num_bins: int = NUM_MEL_BINS, n_fft: int = N_FFT, sample_rate_hz: int = SAMPLE_RATE_HZ) -> torch.Tensor:
    """(n_fft // 2 + 1, num_bins) triangular filters, equally spaced on the HTK mel scale."""
    to_mel = lambda hz: 2595.0 * torch.log10(1.0 + hz / 700.0)  # noqa: E731
    to_hz = lambda mel: 700.0 * (10.0 ** (mel / 2595.0) - 1.0)  # noqa: E731
    fft_hz = torch.linspace(0, sample_rate_hz / 2, n_fft // 2 + 1)
    edges = to_hz(torch.linspace(0.0, float(to_mel(torch.tensor(sample_rate_hz / 2))), num_bins + 2))
    lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (fft_hz[:, None] - lower) / (center - lower)
    falling = (upper - fft_hz[:, None]) / (upper - center)
    return torch.minimum(rising, falling).clamp(min=0.0)


def log_mel(waveform: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """(num_samples,) -> (num_mel_bins, num_samples // HOP_LENGTH), log10 power with an 8-decade floor, scaled."""
    spec = torch.stft(waveform, N_FFT, HOP_LENGTH, window=torch.hann_window(N_FFT), return_complex=True)
    power = spec[:, : waveform.shape[0] // HOP_LENGTH].abs().square()     # (F, T)
    mel = (bank.T @ power).clamp(min=1e-10).log10()                       # (M, T)
    return (torch.maximum(mel, mel.max() - 8.0) + 4.0) / 4.0


# ---------------------------------------------------------------------------------------------
# The prototype model


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def rope_tables(length: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.arange(length).float()[:, None] * inv_freq               # (L, head_dim / 2)
    angles = torch.cat([angles, angles], dim=-1)                            # (L, head_dim)
    return angles.cos(), angles.sin()


class PrototypeBlock(nn.Module):
    """Pre-norm transformer block with rotary positions: bidirectional (encoder, padding masked) or causal (decoder)."""

    def __init__(self, dim: int, num_heads: int, causal: bool):
        super().__init__()
        self.num_heads, self.causal = num_heads, causal
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None):
        batch, length, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # (B, H, L, Dh)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal)
        x = x + self.out(attended.transpose(1, 2).reshape(batch, length, dim))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class Prototype(nn.Module):
    """Audio encoder (2 stride-2 convs + 3 layers) -> MLP projector -> prefix of a 3-layer causal character decoder."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.conv1 = nn.Conv1d(NUM_MEL_BINS, DIM, 3, stride=2, padding=1)
        self.conv2 = nn.Conv1d(DIM, DIM, 3, stride=2, padding=1)
        self.encoder = nn.ModuleList(PrototypeBlock(DIM, NUM_HEADS, causal=False) for _ in range(NUM_ENCODER_LAYERS))
        self.encoder_norm = nn.LayerNorm(DIM)
        self.projector = nn.Sequential(nn.Linear(DIM, DIM), nn.GELU(), nn.Linear(DIM, DIM))
        self.embed = nn.Embedding(vocab_size, DIM)
        self.decoder = nn.ModuleList(PrototypeBlock(DIM, NUM_HEADS, causal=True) for _ in range(NUM_DECODER_LAYERS))
        self.decoder_norm = nn.LayerNorm(DIM)
        nn.init.normal_(self.embed.weight, std=0.02)  # also the output layer: logits start near zero

    def audio_prefix(self, mel: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, mels, T) + (B,) valid encoder positions -> (B, T / 4, DIM) projected audio vectors."""
        x = F.gelu(self.conv2(F.gelu(self.conv1(mel)))).transpose(1, 2)     # (B, T / 4, DIM)
        mask = (torch.arange(x.shape[1]) < lengths[:, None])[:, None, None, :]  # (B, 1, 1, T / 4): valid keys
        cos, sin = rope_tables(x.shape[1], DIM // NUM_HEADS)
        for block in self.encoder:
            x = block(x, cos, sin, mask)
        return self.projector(self.encoder_norm(x))

    def decode_loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, L, DIM) input vectors, (B, L) next-token targets (-100: none) -> mean cross-entropy."""
        cos, sin = rope_tables(x.shape[1], DIM // NUM_HEADS)
        for block in self.decoder:
            x = block(x, cos, sin)
        logits = self.decoder_norm(x) @ self.embed.weight.T                  # (B, L, V), tied output
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)

    def speech_loss(self, batch: dict) -> torch.Tensor:
        audio = self.audio_prefix(batch["mel"], batch["audio_lengths"])      # (B, A, DIM)
        tokens = self.embed(batch["tokens"])                                 # (B, T, DIM): <tr> target <eos>
        rows = [torch.cat([audio[i, :a], tokens[i, :t]]) for i, (a, t) in
                enumerate(zip(batch["audio_lengths"].tolist(), batch["token_lengths"].tolist()))]
        return self.decode_loss(nn.utils.rnn.pad_sequence(rows, batch_first=True), batch["labels"])

    def text_loss(self, batch: dict) -> torch.Tensor:
        return self.decode_loss(self.embed(batch["tokens"]), batch["labels"])


def encoder_length(num_frames: int) -> int:
    return math.ceil(math.ceil(num_frames / 2) / 2)  # two stride-2 convs, kernel 3, padding 1


def shifted_labels(prefix_len: int, tokens: list[int], length: int) -> torch.Tensor:
    """Targets for [prefix] <task> target <eos>: the positions from <task> on predict the next token."""
    labels = torch.full((length,), -100, dtype=torch.long)
    labels[prefix_len: prefix_len + len(tokens) - 1] = torch.tensor(tokens[1:])
    return labels


def speech_batch(items: list[tuple[torch.Tensor, list[int], float]]) -> dict:
    """[(mel (M, T), [<tr>, target..., <eos>], audio_s)] -> padded tensors."""
    frames = [mel.shape[1] for mel, _, _ in items]
    mel = torch.zeros(len(items), NUM_MEL_BINS, max(frames))
    for i, (m, _, _) in enumerate(items):
        mel[i, :, : m.shape[1]] = m
    audio_lengths = [encoder_length(n) for n in frames]
    lengths = [a + len(t) for a, (_, t, _) in zip(audio_lengths, items)]
    return {"mel": mel, "audio_lengths": torch.tensor(audio_lengths), "token_lengths": torch.tensor([len(t) for _, t, _ in items]),
            "tokens": nn.utils.rnn.pad_sequence([torch.tensor(t) for _, t, _ in items], batch_first=True, padding_value=PAD),
            "labels": torch.stack([shifted_labels(a, t, max(lengths)) for a, (_, t, _) in zip(audio_lengths, items)]),
            "audio_s": sum(s for _, _, s in items), "positions": len(items) * max(lengths), "real": sum(lengths)}


def text_batch(items: list[tuple[list[int], list[int]]]) -> dict:
    """[(prefix ids, [<code>, target..., <eos>])] -> padded tensors."""
    rows = [p + t for p, t in items]
    length = max(map(len, rows))
    return {"tokens": nn.utils.rnn.pad_sequence([torch.tensor(r) for r in rows], batch_first=True, padding_value=PAD),
            "labels": torch.stack([shifted_labels(len(p), t, length) for p, t in items]),
            "positions": len(items) * length, "real": sum(map(len, rows))}


def run_prototype(shard_dir: Path, args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    speech, text = read_prototype_corpus(shard_dir)
    if not speech or not text:
        raise SystemExit(f"{shard_dir}: no asr or no text2code samples in train-*.tar")
    chars = sorted({c for _, t in speech for c in t} | {c for p, t in text for c in p + t})
    vocab = {c: i for i, c in enumerate(chars, start=len(SPECIALS))}
    ids = lambda s: [vocab[c] for c in s]  # noqa: E731
    bank = mel_filterbank()
    read_s = time.perf_counter() - start
    speech_items = [(log_mel(w, bank), [TR, *ids(t), EOS], w.shape[0] / SAMPLE_RATE_HZ) for w, t in speech]
    text_items = [(ids(p), [CODE, *ids(t), EOS]) for p, t in text]
    features_s = time.perf_counter() - start - read_s
    model = Prototype(len(SPECIALS) + len(chars))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)

    def draws(num_items: int):  # shuffled epochs, batch_size indices at a time
        while True:
            order = torch.randperm(num_items).tolist()
            for i in range(0, num_items - args.batch_size + 1, args.batch_size):
                yield order[i: i + args.batch_size]
            if num_items < args.batch_size:  # a tiny corpus: batches with repeats
                yield torch.randint(num_items, (args.batch_size,)).tolist()

    speech_draws, text_draws = draws(len(speech_items)), draws(len(text_items))
    losses = []

    def train_step() -> dict:
        s = speech_batch([speech_items[i] for i in next(speech_draws)])  # padding is part of the step, as in the loop
        t = text_batch([text_items[i] for i in next(text_draws)])
        loss = model.speech_loss(s) + model.text_loss(t)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        return {"audio_s": s["audio_s"], "positions": s["positions"] + t["positions"], "real": s["real"] + t["real"],
                "asr": args.batch_size, "text2code": args.batch_size, "asr_positions": s["real"], "text2code_positions": t["real"]}

    for _ in range(args.warmup):
        train_step()
    totals, timed_steps = Counter(), 0
    timed_start = time.perf_counter()
    while timed_steps < args.proto_steps and (timed_steps == 0 or time.perf_counter() - timed_start < args.proto_max_s):
        totals.update(train_step())  # a busy machine stops at proto_max_s: the rate is over the steps timed
        timed_steps += 1
    elapsed_s = time.perf_counter() - timed_start
    torch.set_num_threads(1)
    cpu = Counter()
    for _ in range(args.cpu_steps):
        start_cpu_s = time.process_time()
        done = train_step()
        cpu.update({"step_cpu_s": time.process_time() - start_cpu_s, "audio_s": done["audio_s"]})
    return {"cpu": cpu, "params": sum(p.numel() for p in model.parameters()), "elapsed_s": elapsed_s, "steps": timed_steps,
            "totals": totals, "losses": (losses[0], losses[-1]), "num_speech": len(speech_items), "num_text": len(text_items),
            "corpus_audio_s": sum(s for _, _, s in speech_items), "read_s": read_s, "features_s": features_s,
            "vocab": len(SPECIALS) + len(chars)}


# ---------------------------------------------------------------------------------------------
# The framework


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def framework_overrides(args: argparse.Namespace, shard_dir: Path, run_dir: Path) -> list[str]:
    overrides = [f"name={run_dir.name}", f"output_dir={run_dir}", f"train.steps={args.steps}", "probes=[]",
                 "train.eval_every=0", f"train.checkpoint_every={args.steps}", "train.log_every=1", "train.tracker=none",
                 "train.progress=false", "train.resume=never"]
    if shard_dir.resolve() != DEMO_SHARDS.resolve():  # the recipe names shards/demo: point it at the corpus used
        from omni_train.config import load_recipe

        data = load_recipe(args.recipe, list(args.overrides)).data
        overrides += [f"data.train.{i}.shards={shard_dir / 'train-*.tar'}" for i in range(len(data.train))]
        overrides += [f"data.eval.{i}.shards={shard_dir / 'eval-000000.tar'}" for i in range(len(data.eval))]
        tokenizer = Path(data.tokenizer)
        if tokenizer.parent.resolve() == DEMO_SHARDS.resolve() or tokenizer.parent == DEMO_SHARDS.relative_to(REPO):
            overrides.append(f"data.tokenizer={shard_dir / tokenizer.name}")  # the corpus ships its tokenizer
    return overrides + list(args.overrides)


def replay(cfg, num_steps: int, world_size: int) -> list[dict]:
    """What each step trained, summed over ranks: the recipe's data pipeline again, with the run's seed and ranks."""
    from omni_train.data.pipeline import DataPipeline
    from omni_train.data.text import Tokenizer

    tokenizer = Tokenizer.from_path(cfg.data.tokenizer)
    audio = cfg.data.audio
    steps = [Counter() for _ in range(num_steps)]
    for rank in range(world_size):
        batches = iter(DataPipeline(cfg.data, tokenizer=tokenizer, rank=rank, world_size=world_size, seed=cfg.seed))
        for step in steps:
            for _ in range(cfg.train.grad_accum):
                batch = next(batches)
                frames = int(batch["audio_window_frames"].sum()) if "audio_window_frames" in batch else 0
                step.update({"audio_s": frames * audio.hop_length / audio.sample_rate_hz,
                             "positions": batch["input_ids"].numel(), "real": batch["num_real_tokens"]})
                for sample in batch["samples"]:
                    step.update({sample["task"]: 1, f"{sample['task']}_positions": sample["num_tokens"]})
    return steps


def framework_cpu_work(cfg, num_steps: int, world_size: int) -> Counter:
    """Rank 0's work per step in one thread, as CPU time, which other processes on the machine hardly change.

    The recipe's model (build_model, as the loop) and a plain AdamW step, without DeepSpeed's partitions or the
    gradient all-reduce; `load_cpu_s` is decoding and packing, done here in-process (in the run, by its
    DataLoader worker). Two warm-up steps first.
    """
    import dataclasses

    from omni_train.data.pipeline import DataPipeline
    from omni_train.data.text import Tokenizer
    from omni_train.model.omni import build_model

    torch.set_num_threads(1)
    tokenizer = Tokenizer.from_path(cfg.data.tokenizer)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, vocab_size=tokenizer.vocab_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2),
                                  weight_decay=cfg.train.weight_decay)
    batches = iter(DataPipeline(dataclasses.replace(cfg.data, num_workers=0), tokenizer=tokenizer, rank=0,
                                world_size=world_size, seed=cfg.seed))
    audio = cfg.data.audio
    cpu = Counter()
    for step in range(2 + num_steps):
        start_cpu_s = time.process_time()
        micro_batches = [next(batches) for _ in range(cfg.train.grad_accum)]
        loaded_cpu_s = time.process_time()
        for batch in micro_batches:
            (model(batch).loss / len(micro_batches)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= 2:
            frames = sum(int(b["audio_window_frames"].sum()) for b in micro_batches if "audio_window_frames" in b)
            cpu.update({"load_cpu_s": loaded_cpu_s - start_cpu_s, "step_cpu_s": time.process_time() - loaded_cpu_s,
                        "audio_s": frames * audio.hop_length / audio.sample_rate_hz})
    return cpu


def run_framework(shard_dir: Path, args: argparse.Namespace, tmp: Path) -> dict:
    from omni_train.config import load_recipe
    from omni_train.data.text import Tokenizer
    from omni_train.model.omni import build_model

    run_dir = tmp / "framework-run"
    overrides = framework_overrides(args, shard_dir, run_dir)
    cfg = load_recipe(args.recipe, overrides)  # a bad override stops here, before torchrun starts
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "launch/pretrain.py", "--recipe", str(args.recipe), *overrides]
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall_s = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"torchrun exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    rows = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    missing = [s for s in range(1, args.steps + 1) if s not in rows]
    assert not missing, f"metrics.jsonl lacks steps {missing[:5]}: train.log_every=1 did not apply"

    replay_start = time.perf_counter()
    steps = replay(cfg, args.steps, args.nproc)
    replay_s = time.perf_counter() - replay_start
    replayed_tokens = sum(s["real"] for s in steps)
    if replayed_tokens != rows[args.steps]["tokens_seen"]:
        raise RuntimeError(f"the replayed data ({replayed_tokens} real tokens) is not what the run trained "
                           f"(tokens_seen {rows[args.steps]['tokens_seen']}): the audio seconds would be wrong")
    timed = range(args.skip + 1, args.steps + 1)
    totals = Counter()
    for s in timed:
        totals.update(steps[s - 1])
    cpu = framework_cpu_work(cfg, args.cpu_steps, args.nproc) if args.cpu_steps else Counter()
    model = build_model(cfg.model, vocab_size=Tokenizer.from_path(cfg.data.tokenizer).vocab_size)
    by_module = Counter()
    for name, p in model.named_parameters():
        by_module[name.split(".")[0]] += p.numel()
    return {"cpu": cpu, "params": sum(by_module.values()), "by_module": by_module, "elapsed_s": sum(rows[s]["step_s"] for s in timed),
            "steps": len(timed), "totals": totals, "wall_s": wall_s, "replay_s": replay_s, "cfg": cfg,
            "losses": (rows[1]["loss"], rows[args.steps]["loss"]),
            "loader_wait_s": sum(rows[s]["loader_wait_s"] for s in timed)}


# ---------------------------------------------------------------------------------------------
# The table


def print_table(proto: dict, frame: dict, corpus: str, args: argparse.Namespace) -> None:
    cfg = frame["cfg"]
    print(f"\ncorpus: {corpus}")
    print(f"prototype: {proto['params'] / 1e6:.2f}M parameters (vocabulary of {proto['vocab']} characters), "
          f"{proto['num_speech']} clips ({proto['corpus_audio_s'] / 60:.0f} min) + {proto['num_text']} text -> code pairs; "
          f"read {proto['read_s']:.0f} s, log-mel up front {proto['features_s']:.1f} s (not timed); 1 process, "
          f"{args.threads} threads, batches of {args.batch_size} + {args.batch_size}; {args.warmup} warm-up + "
          f"{proto['steps']} timed steps in {proto['elapsed_s']:.1f} s, loss {proto['losses'][0]:.2f} -> {proto['losses'][1]:.2f}")
    modules = ", ".join(f"{name} {n / 1e6:.2f}M" for name, n in frame["by_module"].most_common())
    engine = f"{cfg.train.engine} (ZeRO {cfg.train.zero_stage})" if cfg.train.engine == "deepspeed" else cfg.train.engine
    print(f"framework: {args.recipe}, {frame['params'] / 1e6:.2f}M parameters ({modules}); {args.nproc} ranks x "
          f"OMP_NUM_THREADS=1, engine {engine}, {cfg.data.num_workers} loader "
          f"worker(s) per rank, {cfg.data.batch_size} x {cfg.data.seq_len} packed tokens per rank and step, transfer "
          f"{cfg.model.transfer.kind if cfg.model.transfer else 'none'}; {args.steps} steps, the first {args.skip} "
          f"left out, loss {frame['losses'][0]:.2f} -> {frame['losses'][1]:.2f}; torchrun wall {frame['wall_s']:.0f} s "
          f"(start-up and final checkpoint included), replay {frame['replay_s']:.0f} s")
    print(f"framework steady state: {frame['steps']} steps in {frame['elapsed_s']:.1f} s, of which waiting for the "
          f"loader {frame['loader_wait_s']:.1f} s\n")

    def rate(result: dict, key: str) -> float:
        return result["totals"][key] / result["elapsed_s"]

    lines = [("audio s per s", rate(proto, "audio_s"), rate(frame, "audio_s"), "%.0f"),
             ("decoder positions/s (padded)", rate(proto, "positions"), rate(frame, "positions"), "%.0f"),
             ("decoder positions/s (real)", rate(proto, "real"), rate(frame, "real"), "%.0f"),
             ("steps/s", proto["steps"] / proto["elapsed_s"], frame["steps"] / frame["elapsed_s"], "%.2f"),
             ("parameters (M)", proto["params"] / 1e6, frame["params"] / 1e6, "%.2f")]
    tasks = sorted({key for key in (*proto["totals"], *frame["totals"]) if key not in ("audio_s", "positions", "real")
                    and not key.endswith("_positions")}, key=lambda t: (t not in ("asr", "text2code"), t))
    lines += [(f"{task} samples/s", rate(proto, task), rate(frame, task), "%.1f") for task in tasks]
    for task in ("asr", "text2code"):  # what one sample costs: prefix, task token or chat template, target
        per_sample = [r["totals"][f"{task}_positions"] / r["totals"][task] if r["totals"][task] else 0.0 for r in (proto, frame)]
        lines.append((f"positions per {task} sample", *per_sample, "%.0f"))
    header = f"{'':<30}{'prototype':>11}{'framework':>11}{'framework/prototype':>21}"
    print(header + "\n" + "-" * len(header))
    for name, p, f, fmt in lines:
        ratio = f"{f / p:.2f}" if p else "-"
        print(f"{name:<30}{fmt % p if p else '-':>11}{fmt % f:>11}{ratio:>21}")
    if proto["cpu"] and frame["cpu"]:  # audio seconds per CPU-second of one thread
        p_cpu, f_cpu = proto["cpu"], frame["cpu"]
        lines = [("audio s per CPU-s, 1 thread", p_cpu["audio_s"] / p_cpu["step_cpu_s"], f_cpu["audio_s"] / f_cpu["step_cpu_s"]),
                 ("  with data loading", p_cpu["audio_s"] / p_cpu["step_cpu_s"],
                  f_cpu["audio_s"] / (f_cpu["step_cpu_s"] + f_cpu["load_cpu_s"]))]
        for name, p, f in lines:
            print(f"{name:<30}{p:>11.1f}{f:>11.1f}{f / p:>21.2f}")
    ratio = rate(frame, "audio_s") / rate(proto, "audio_s")
    print("-" * len(header))
    print(f"goal: framework audio s/s >= prototype's: ratio {ratio:.2f} ({'met' if ratio >= 1 else 'not met'}); against "
          f"the calibration's {CALIBRATION_AUDIO_S_PER_S:.0f} s/s (TRANSFER-CALIBRATION.md, 2.0M parameters, idle machine): "
          f"{rate(frame, 'audio_s') / CALIBRATION_AUDIO_S_PER_S:.2f}")
    print("The framework's step also trains the recipe's other tasks (the samples/s rows); the prototype trains only "
          "asr and text2code.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/demo.yaml")
    parser.add_argument("--shards", type=Path, default=DEMO_SHARDS, help="demo corpus dir (train-*.tar); tiny if missing")
    parser.add_argument("--steps", type=int, default=100, help="framework training steps")
    parser.add_argument("--skip", type=int, default=10, help="framework steps left out of the timing (start-up)")
    parser.add_argument("--proto-steps", type=int, default=100, help="prototype timed steps")
    parser.add_argument("--proto-max-s", type=float, default=120.0, help="stop timing the prototype after this long")
    parser.add_argument("--warmup", type=int, default=10, help="prototype steps run before the timing")
    parser.add_argument("--batch-size", type=int, default=32, help="prototype items per task batch")
    parser.add_argument("--threads", type=int, default=2, help="prototype torch threads")
    parser.add_argument("--cpu-steps", type=int, default=10, help="steps of each measured in CPU time, 1 thread (0: skip)")
    parser.add_argument("--nproc", type=int, default=2, help="framework ranks")
    parser.add_argument("--keep", type=Path, default=None, help="keep the framework's run dir here")
    parser.add_argument("overrides", nargs="*", help="extra recipe overrides for the framework run (key=value)")
    args = parser.parse_args()
    if args.steps <= args.skip or args.skip < 0 or args.proto_steps < 1 or args.warmup < 0:
        parser.error("need --steps > --skip >= 0, --proto-steps >= 1, --warmup >= 0")

    with tempfile.TemporaryDirectory(prefix="demo_speed_") as name:
        tmp = Path(args.keep) if args.keep else Path(name)
        tmp.mkdir(parents=True, exist_ok=True)
        shard_dir, corpus = ensure_corpus(args.shards, Path(name))
        loads = [os.getloadavg()[0]]
        start = time.perf_counter()
        proto = run_prototype(shard_dir, args)
        loads.append(os.getloadavg()[0])
        print(f"prototype: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        start = time.perf_counter()
        frame = run_framework(shard_dir, args, tmp)
        loads.append(os.getloadavg()[0])
        print(f"framework: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    print_table(proto, frame, corpus, args)
    # Our own runs load the CPU by about 2; much more means other processes took turns on the cores. The
    # prototype's two OpenMP threads suffer most: every parallel region waits (spinning) for a descheduled
    # thread; measured at load 6 on 2 cores: 0.10 steps/s with 2 threads, 0.32 with 1, 0.33 with 2 and
    # OMP_WAIT_POLICY=PASSIVE (2.9 on the idle machine). The framework's ranks run one thread each.
    print(f"1-minute load average at start, after the prototype, after the framework: "
          f"{', '.join(f'{x:.1f}' for x in loads)} on {os.cpu_count()} cores"
          + ("" if loads[0] < 1.0 and max(loads) < os.cpu_count() + 1.0 else
             " -- other processes shared the CPU; rerun on an idle machine before trusting the ratio"))


if __name__ == "__main__":
    main()
