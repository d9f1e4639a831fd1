"""Memory of a Qwen2.5-Omni-sized model on CPU: building it under ZeRO-3, and its 151,936-word loss.

    python benchmarks/qwen_omni_memory.py                  # both parts: 3 minutes on 2 cores, 11 GB of RAM at most
    python benchmarks/qwen_omni_memory.py --parts loss --loss-tokens 4096 --chunk-tokens 512 --json out.jsonl

1. Build. The 0.5b preset (configs/model/0.5b.yaml: Qwen2.5-0.5B's backbone with its 151,936-word
   tied embedding, a Whisper-small-sized audio and a ViT-B-sized vision encoder; 0.67B parameters)
   under `train.engine=deepspeed train.zero_stage=3`, fp32, on 2 CPU ranks (gloo), one torchrun
   per way of building it:
     whole               `build_model`, then `Engine` (deepspeed.initialize partitions it): how
                         every ZeRO-3 run was built before, each rank holding the whole fp32 model
     zero.Init           `zero3.build_partitioned`: born partitioned, randomly initialized exactly
                         as in one process (each parameter a parent module initializes is gathered
                         once more, the 545 MB embedding last, when every other partition exists)
     zero.Init, to load  `build_partitioned(random_init=False)`: the same without the parents'
                         initialization, for weights `load_state_partitioned` writes next (a
                         Qwen2.5-Omni checkpoint)
   Per rank: resident memory at start (interpreter, torch, DeepSpeed, process group), peak
   resident memory (`getrusage`) once the model is built, and once `Engine` has wrapped it.
   Goal: the build's peak with zero.Init at most 0.6x the whole build's. On 2 ranks the Engine's
   own state (partitions, their flat copy, fp32 master weights, gradient partitions: about 4 x
   model / 2) is larger than the whole model, so the peak once wrapped is the same either way; the
   build's saving is what lets more ranks start a model that would not fit whole.
2. Loss. The next-token loss (forward + backward) of `--loss-tokens` target positions through the
   (151,936 x 896) output projection of that model, fp32, in one process each: unchunked (the
   model's default expression) and `train.loss_chunk_tokens=--chunk-tokens` (model/loss.py).
   Memory: peak resident memory during the loss minus resident memory just before it (hidden
   states, weight and targets already allocated), so it counts the logits, their gradients and
   the weight's gradient (which any loss makes). Goal: chunked at most 0.3x unchunked.

Each measurement runs in a fresh process, with glibc's mmap threshold fixed at 64 KiB
(MALLOC_MMAP_THRESHOLD_): by default glibc raises it to 32 MB after the first large free, so the
per-layer tensors of zero.Init's build (full leaf, partition, gather buffers of 9-17 MB) land in a
fragmenting heap that keeps freed memory resident, and RSS would follow allocation history
(measured with the default: whole 2,915 MB, zero.Init 3,612 MB, to load 2,286 MB) rather than
what torch holds. `--glibc-default` measures that way.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VOCAB = 151_936  # Qwen2.5 / Qwen2.5-Omni
MB = 2**20
BUILDS = {"whole": (False, True), "zero.Init": (True, True), "zero.Init, to load": (True, False)}  # (enabled, random_init)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def current_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# ---------------------------------------------------------------------------------------------
# 1. one rank of one build, started by torchrun


def build_worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as torch_dist

    from omni_train.config import load_recipe
    from omni_train.data.text import Tokenizer
    from omni_train.model.omni import build_model
    from omni_train.train.engine import Engine, init_distributed, shutdown
    from omni_train.train.zero3 import build_partitioned

    cfg = load_recipe(REPO / "recipes" / "smoke.yaml", [
        "model.preset=0.5b", f"model.backbone.vocab_size={VOCAB}", "train.engine=deepspeed", "train.zero_stage=3",
        "train.precision=fp32", "data.batch_size=1", f"output_dir={args.out}/run"])
    dist = init_distributed("deepspeed")
    rss_start = current_rss_bytes()
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    enabled, random_init = BUILDS[args.build]
    model = build_partitioned(lambda: build_model(cfg.model, vocab_size=Tokenizer.byte_level().vocab_size), cfg.train,
                              micro_batch_size=1, enabled=enabled, random_init=random_init)
    build_s = time.perf_counter() - start
    peak_build = peak_rss_bytes()
    num_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    start = time.perf_counter()
    engine = Engine(model, cfg.train, dist, micro_batch_size=1)
    wrap_s = time.perf_counter() - start
    row = {"rank": dist.rank, "rss_start": rss_start, "peak_build": peak_build, "peak_engine": peak_rss_bytes(),
           "rss_engine": current_rss_bytes(), "build_s": build_s, "wrap_s": wrap_s}
    rows = [None] * dist.world_size
    torch_dist.all_gather_object(rows, row)
    if dist.is_main:
        print(json.dumps({"part": "build", "build": args.build, "num_params": num_params, "ranks": rows}), flush=True)
    shutdown(engine, dist)


# ---------------------------------------------------------------------------------------------
# 2. one loss, in its own process


def loss_worker(args: argparse.Namespace) -> None:
    import torch
    import torch.nn.functional as F

    from omni_train.model.loss import linear_cross_entropy

    torch.manual_seed(0)
    dim = 896  # Qwen2.5-0.5B's hidden size
    hidden = torch.randn(args.loss_tokens, dim, requires_grad=True)
    weight = (0.02 * torch.randn(VOCAB, dim)).requires_grad_()
    targets = torch.randint(0, VOCAB, (args.loss_tokens,))
    rss_before = current_rss_bytes()
    start = time.perf_counter()
    if args.chunk_tokens:
        loss = linear_cross_entropy(hidden, weight, targets, chunk_tokens=args.chunk_tokens).mean()
    else:  # OmniModel.next_token_loss's default expression
        loss = F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="none").mean()
    loss.backward()
    elapsed_s = time.perf_counter() - start
    print(json.dumps({"part": "loss", "chunk_tokens": args.chunk_tokens, "tokens": args.loss_tokens,
                      "loss_bytes": peak_rss_bytes() - rss_before, "loss": float(loss), "seconds": elapsed_s,
                      "grad_norm": float(weight.grad.norm())}), flush=True)


# ---------------------------------------------------------------------------------------------
# the parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], env: dict) -> dict:
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    for line in result.stdout.splitlines():
        if line.startswith('{"part"'):
            return json.loads(line)
    raise RuntimeError(f"{' '.join(cmd[-6:])}: no result (exit {result.returncode})\n{result.stdout[-3000:]}\n"
                       f"{result.stderr[-6000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="build,loss", help="comma-separated: build, loss")
    parser.add_argument("--loss-tokens", type=int, default=2048, help="target positions in the loss")
    parser.add_argument("--chunk-tokens", type=int, default=256, help="train.loss_chunk_tokens of the chunked loss")
    parser.add_argument("--json", default=None, help="also write every result to this JSONL file")
    parser.add_argument("--glibc-default", action="store_true", help="leave glibc's dynamic mmap threshold on")
    parser.add_argument("--worker", choices=["build", "loss"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--build", choices=list(BUILDS), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "build":
        return build_worker(args)
    if args.worker == "loss":
        return loss_worker(args)
    parts = args.parts.split(",")
    if set(parts) - {"build", "loss"} or args.loss_tokens < 1 or args.chunk_tokens < 1:
        parser.error("--parts takes build and/or loss; --loss-tokens and --chunk-tokens must be >= 1")

    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))  # DeepSpeed's shm op builds once
    env.update({"WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"})
    if not args.glibc_default:  # tensors above 64 KiB are mmap'ed and unmapped when freed (module docstring)
        env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    script = str(Path(__file__).resolve())
    results, start = [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qwen_omni_memory_") as tmp:
        if "build" in parts:
            for build in BUILDS:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                       f"--master_port={free_port()}", script, "--worker", "build", "--build", build, "--out", tmp]
                results.append(run(cmd, {**env, "OMP_NUM_THREADS": "1"}))
                print(f"build {build}: done", file=sys.stderr, flush=True)
        if "loss" in parts:
            for chunk in (0, args.chunk_tokens):
                cmd = [sys.executable, script, "--worker", "loss", "--loss-tokens", str(args.loss_tokens),
                       "--chunk-tokens", str(chunk)]
                results.append(run(cmd, {**env, "OMP_NUM_THREADS": str(os.cpu_count() or 1)}))
                print(f"loss chunk_tokens={chunk}: done", file=sys.stderr, flush=True)
    if args.json:
        Path(args.json).write_text("".join(json.dumps(r) + "\n" for r in results))
    report(results, time.perf_counter() - start, args.glibc_default)


def report(results: list[dict], elapsed_s: float, default_malloc: bool) -> None:
    builds = {r["build"]: r for r in results if r["part"] == "build"}
    losses = {r["chunk_tokens"]: r for r in results if r["part"] == "loss"}
    if builds:
        worst = lambda r, key: max(rank[key] for rank in r["ranks"]) / MB  # noqa: E731 - the rank holding more
        first = next(iter(builds.values()))
        print(f"\n1. ZeRO-3 build of the 0.5b preset at vocabulary {VOCAB:,} ({first['num_params'] / 1e9:.2f}B parameters, "
              f"fp32 = {first['num_params'] * 4 / MB:,.0f} MB), 2 CPU ranks (gloo); MB per rank, the rank holding more")
        print(f"   {'build':<18} {'RSS at start':>12} {'peak, built':>12} {'peak, wrapped':>14} {'built - start':>14} "
              f"{'build s':>8} {'wrap s':>7}")
        for name, r in builds.items():
            print(f"   {name:<18} {worst(r, 'rss_start'):>12,.0f} {worst(r, 'peak_build'):>12,.0f} "
                  f"{worst(r, 'peak_engine'):>14,.0f} {worst(r, 'peak_build') - worst(r, 'rss_start'):>14,.0f} "
                  f"{max(x['build_s'] for x in r['ranks']):>8.1f} {max(x['wrap_s'] for x in r['ranks']):>7.1f}")
        if "whole" in builds:
            whole = builds["whole"]
            for name in (n for n in builds if n != "whole"):
                r = builds[name]
                ratio = worst(r, "peak_build") / worst(whole, "peak_build")
                above = ((worst(r, "peak_build") - worst(r, "rss_start"))
                         / (worst(whole, "peak_build") - worst(whole, "rss_start")))
                wrapped = worst(r, "peak_engine") / worst(whole, "peak_engine")
                print(f"   {name} / whole: peak once built {ratio:.2f} (goal <= 0.6: {'met' if ratio <= 0.6 else 'not met'}); "
                      f"above the start {above:.2f}; peak once wrapped by Engine {wrapped:.2f}")
        print(f"   malloc: {'glibc default' if default_malloc else 'mmap threshold 64 KiB'}")
    if losses:
        first = next(iter(losses.values()))
        print(f"\n2. Next-token loss, forward + backward, {first['tokens']:,} target positions x {VOCAB:,} words, fp32, "
              f"one process; MB above the inputs")
        for chunk, r in sorted(losses.items()):
            name = "unchunked" if chunk == 0 else f"train.loss_chunk_tokens={chunk}"
            print(f"   {name:<32} {r['loss_bytes'] / MB:>8,.0f} MB  {r['seconds']:>6.1f} s  loss {r['loss']:.6f}  "
                  f"|grad W| {r['grad_norm']:.6e}")
        if len(losses) == 2:
            chunked = max(losses)
            ratio = losses[chunked]["loss_bytes"] / losses[0]["loss_bytes"]
            print(f"   chunked / unchunked: {ratio:.2f} (goal <= 0.3: {'met' if ratio <= 0.3 else 'not met'}); the weight's "
                  f"gradient alone is {VOCAB * 896 * 4 / MB:,.0f} MB")
    print(f"\n{elapsed_s:.0f} s in all")


if __name__ == "__main__":
    main()
