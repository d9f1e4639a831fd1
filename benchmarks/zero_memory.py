"""Per-rank memory and speed of DDP and DeepSpeed ZeRO stages 0, 2 and 3 on 2 CPU ranks.

    python benchmarks/zero_memory.py                   # fp32: ddp, zero0, zero2, zero3 (2-3 min on 2 cores)
    python benchmarks/zero_memory.py --bf16            # + the DeepSpeed configs in bf16 (several minutes more)
    python benchmarks/zero_memory.py --configs zero0,zero1,zero3 --timed-steps 5 --json results.jsonl

The parent builds a small multimodal shard set with `omni-train shards build` (espeak-ng speech
in 8 languages, images, videos, text -> code) in a temp dir, then runs one 2-rank torchrun per
configuration on free local ports. Each worker builds the model and `Engine` the way
`train.loop.train` does (the tiny preset scaled to 39M parameters), reads real packed batches
through `DataPipeline`, runs one warmup step and `--timed-steps` timed steps, and measures on
every rank:

  params      the model parameters this rank holds: under ZeRO-3 each partition (`p.ds_tensor`)
              plus the parameters kept gathered (those below stage3_param_persistence_threshold),
              otherwise the full parameters
  optimizer   fp32 master weights (DeepSpeed's `single_partition_of_fp32_groups` at stage 1/2,
              `fp32_partitioned_groups_flat` at stage 3, `fp32_groups_flat` for bf16 at stage 0)
              and AdamW's exp_avg / exp_avg_sq / step
  grads       gradient memory alive when AdamW steps (`.grad` of parameters and master weights,
              `averaged_gradients`, `grad_partitions_flat_buffer`, `fp32_groups_gradients_flat`),
              taken in a step pre-hook on the torch optimizer
  buckets     DeepSpeed's reduce buckets (`ipg_buckets`, reduce_bucket_size elements whatever the
              model size; on CPU only their written pages become resident)
  RSS         at start (after imports and the process group), at the end, and the peak
              (`resource.getrusage`)
  tokens/s    real (non-padding) tokens of both ranks per second over the timed steps

Memory is counted by address range, so views into DeepSpeed's flat buffers count once and a
buffer counted as parameters is not counted again as optimizer state. DDP's own gradient
buckets live in its C++ reducer and are not counted. Goal: ZeRO-3 params + optimizer per rank
about half of ZeRO-0's on 2 ranks. CPU bf16 matmuls without AVX512-BF16/AMX are ~20x slower
than fp32, so bf16 runs are shorter (--bf16-seq-len, --bf16-timed-steps); their memory columns
do not depend on the sequence length.
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
# tiny preset scaled up so that parameters and optimizer state dominate what a rank holds
MODEL_OVERRIDES = ["model.backbone.dim=512", "model.backbone.num_layers=12", "model.backbone.ffn_dim=1536"]
CONFIGS = {  # name -> (engine, zero_stage)
    "ddp": ("ddp", 0), "zero0": ("deepspeed", 0), "zero1": ("deepspeed", 1), "zero2": ("deepspeed", 2),
    "zero3": ("deepspeed", 3),
}
MB = 2**20


# ---------------------------------------------------------------------------------------------
# The worker: one rank of one configuration, started by torchrun


class AddressLedger:
    """Bytes of (contiguous) tensors by address range, each byte counted once however many views point at it."""

    def __init__(self):
        self.ranges: list[tuple[int, int]] = []  # disjoint [start, end)

    def claim(self, tensor) -> int:
        """Add `tensor`'s memory; return how many of its bytes were not claimed before."""
        if tensor is None or tensor.numel() == 0 or tensor.device.type == "meta":
            return 0
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        covered = sum(max(0, min(end, e) - max(start, s)) for s, e in self.ranges)
        overlapping = [(s, e) for s, e in self.ranges if s < end and e > start]
        merged = (min([start] + [s for s, _ in overlapping]), max([end] + [e for _, e in overlapping]))
        self.ranges = [r for r in self.ranges if r not in overlapping] + [merged]
        return end - start - covered


def tensors_in(value) -> list:
    """Every tensor in a nested list / tuple / dict (DeepSpeed keeps its buffers in all three)."""
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in tensors_in(item)]
    return []


def basic_optimizer(engine):
    """The torch AdamW that Engine built; DeepSpeed wraps it and keeps it as `basic_optimizer`."""
    return getattr(engine.wrapped, "basic_optimizer", engine.optimizer)


def param_tensors(model) -> list:
    """What each parameter holds on this rank: the ZeRO-3 partition and any gathered copy, else the tensor."""
    out = []
    for p in model.parameters():
        if hasattr(p, "ds_tensor"):
            out += [p.ds_tensor, p.data]  # p.data is empty unless the parameter is persistent (kept gathered)
        else:
            out.append(p.data)
    return out


def master_tensors(engine) -> list:
    """fp32 master weights: the tensors the torch optimizer updates (model params without a DeepSpeed wrapper)."""
    wrapper, opt = engine.optimizer, basic_optimizer(engine)
    found = [p for g in opt.param_groups for p in g["params"]] + list(opt.state.keys())
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat",
                 "fp32_groups_flat_partition"):
        found += tensors_in(getattr(wrapper, name, None))
    return found


def state_tensors(engine) -> list:
    return [t for state in basic_optimizer(engine).state.values() for t in tensors_in(state)]


def grad_tensors(engine) -> list[tuple[str, object]]:
    """(where, tensor) for every gradient buffer this rank may hold."""
    wrapper = engine.optimizer
    found = [("param.grad", p.grad) for p in engine.module.parameters()]
    found += [("master.grad", t.grad) for t in master_tensors(engine)]
    for name in ("averaged_gradients", "grad_partitions_flat_buffer", "fp32_groups_gradients_flat"):
        found += [(name, t) for t in tensors_in(getattr(wrapper, name, None))]
    return [(where, t) for where, t in found if t is not None]


def bucket_tensors(engine) -> list:
    buckets = getattr(engine.optimizer, "ipg_buckets", None) or {}
    return [t for bucket in buckets.values() for t in tensors_in(getattr(bucket, "buffer", None))]


def measure_state(engine) -> dict:
    """Bytes held now: params, then master weights and optimizer state not already counted as params."""
    ledger = AddressLedger()
    params = sum(ledger.claim(t) for t in param_tensors(engine.module))
    master = sum(ledger.claim(t) for t in master_tensors(engine))
    states = sum(ledger.claim(t) for t in state_tensors(engine))
    return {"params": params, "master": master, "adam_states": states, "ledger": ledger}


def current_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as torch_dist

    from omni_train.config import load_recipe
    from omni_train.data.pipeline import DataPipeline
    from omni_train.data.text import Tokenizer
    from omni_train.model.omni import build_model
    from omni_train.train.engine import Engine, all_reduce, barrier, init_distributed, shutdown

    engine_name, stage = CONFIGS[args.config]
    num_steps = 1 + args.timed_steps
    cfg = load_recipe(REPO / "recipes" / "smoke.yaml", [
        *MODEL_OVERRIDES, f"data.train.0.shards={args.shards}", "data.num_workers=0", f"data.seq_len={args.seq_len}",
        f"data.batch_size={args.batch_size}", f"train.engine={engine_name}", f"train.zero_stage={stage}",
        f"train.precision={args.precision}", f"train.steps={num_steps}", "train.warmup_steps=0",
        f"output_dir={args.out}/run"])
    dist = init_distributed(cfg.train.engine)
    rss_start = current_rss_bytes()  # interpreter, torch, DeepSpeed, process group: before any model memory
    tokenizer = Tokenizer.from_path(cfg.data.tokenizer)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank, as in train.loop.train
    model = build_model(cfg.model, vocab_size=tokenizer.vocab_size)
    num_params = sum(p.numel() for p in model.parameters())
    engine = Engine(model, cfg.train, dist, micro_batch_size=cfg.data.batch_size)
    data = iter(DataPipeline(cfg.data, tokenizer=tokenizer, rank=dist.rank, world_size=dist.world_size, seed=cfg.seed))
    # decode every batch first: tokens/s is the training step's rate, not the loader's
    steps = [[next(data) for _ in range(cfg.train.grad_accum)] for _ in range(num_steps)]

    peak = {"grads": 0, "buckets": 0, "grads_by_source": {}}

    def at_optimizer_step(optimizer, *_):  # every gradient this rank keeps is alive now
        ledger = AddressLedger()
        ledger.ranges = list(measure_state(engine)["ledger"].ranges)  # memory already counted as params or state
        by_source: dict[str, int] = {}
        for where, t in grad_tensors(engine):
            by_source[where] = by_source.get(where, 0) + ledger.claim(t)
        buckets = sum(ledger.claim(t) for t in bucket_tensors(engine))
        if sum(by_source.values()) >= peak["grads"]:
            peak.update(grads=sum(by_source.values()), grads_by_source={k: v for k, v in by_source.items() if v})
        peak["buckets"] = max(peak["buckets"], buckets)

    basic_optimizer(engine).register_step_pre_hook(at_optimizer_step)

    losses = [engine.train_step(steps[0])["loss"]]  # warmup: allocates optimizer state and buffers
    barrier(dist)
    start = time.perf_counter()
    for micro_batches in steps[1:]:
        losses.append(engine.train_step(micro_batches)["loss"])
    barrier(dist)
    elapsed_s = time.perf_counter() - start
    real_tokens = sum(b["num_real_tokens"] for micro_batches in steps[1:] for b in micro_batches)
    (real_tokens_all,) = all_reduce([real_tokens], dist)

    held = measure_state(engine)
    row = {"rank": dist.rank, "params_bytes": held["params"], "master_bytes": held["master"],
           "adam_state_bytes": held["adam_states"], "optimizer_bytes": held["master"] + held["adam_states"],
           "grads_bytes": peak["grads"], "grads_bytes_by_source": peak["grads_by_source"], "bucket_bytes": peak["buckets"],
           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux reports KiB
           "rss_start_bytes": rss_start, "rss_end_bytes": current_rss_bytes(),
           "optimizer": type(engine.optimizer).__name__, "losses": losses}
    rows = [None] * dist.world_size
    torch_dist.all_gather_object(rows, row)
    if dist.is_main:
        print(json.dumps({"config": args.config, "precision": args.precision, "world_size": dist.world_size,
                          "num_params": num_params, "tokens_per_s": real_tokens_all / elapsed_s, "seq_len": args.seq_len,
                          "timed_steps": args.timed_steps, "elapsed_s": elapsed_s, "ranks": rows}), flush=True)
    shutdown(engine, dist)


# ---------------------------------------------------------------------------------------------
# The parent: shards, one torchrun per configuration, the table


SPEECH = [("en-us", "three plus five, times two"), ("de", "sieben minus vier mal drei"),
          ("fr-fr", "neuf plus deux divisé par trois"), ("es", "seis por ocho menos uno"),
          ("it", "quattro più cinque per due"), ("pt", "oito menos três vezes dois"),
          ("nl", "twaalf gedeeld door vier plus zeven"), ("pl", "dwa plus dwa razy pięć")]


def build_shards(root: Path) -> str:
    """Generate media, write a ShareGPT manifest and build shards with the real CLI; returns the shard pattern."""
    from omni_train.data import synth

    media = root / "media"
    media.mkdir(parents=True)
    entries = []
    for i, (voice, words) in enumerate(SPEECH):
        synth.speech(media / f"speech{i}.flac", words, voice=voice)
        entries.append({"messages": [{"role": "user", "content": "<audio>Transcribe."},
                                     {"role": "assistant", "content": words}],
                        "audios": [f"speech{i}.flac"], "meta": {"task": "asr", "language": voice.split("-")[0]}})
    for i, (w, h) in enumerate([(224, 224), (320, 160), (160, 320), (200, 120)]):
        synth.pattern_image(media / f"image{i}.png", w, h, seed=i)
        entries.append({"messages": [{"role": "user", "content": "<image>Describe the picture."},
                                     {"role": "assistant", "content": f"coloured bands, pattern {i}"}],
                        "images": [f"image{i}.png"], "meta": {"task": "caption", "language": "en"}})
    for i in range(2):
        synth.test_pattern_video(media / f"video{i}.mp4", 2.0 + i, fps=10, width=160, height=120)
        entries.append({"messages": [{"role": "user", "content": "<video>What happens?"},
                                     {"role": "assistant", "content": "a test pattern with a moving counter"}],
                        "videos": [f"video{i}.mp4"], "meta": {"task": "video", "language": "en"}})
    for i in range(8):
        entries.append({"messages": [{"role": "user", "content": f"Write code that prints ({i} + {i + 3}) * {i + 1}."},
                                     {"role": "assistant", "content": f"print(({i} + {i + 3}) * {i + 1})"}],
                        "meta": {"task": "text2code", "language": "en"}})
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries))
    out = root / "shards"
    subprocess.run([sys.executable, "-m", "omni_train.cli", "shards", "build", "--manifest", str(manifest),
                    "--media-root", str(media), "--out", str(out), "--max-samples", "6"], check=True, cwd=REPO)
    shards = sorted(out.glob("train-*.tar"))
    return str(out / ("train-{%06d..%06d}.tar" % (0, len(shards) - 1)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(config: str, precision: str, seq_len: int, timed_steps: int, shards: str, out: Path,
               args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))  # DeepSpeed's shm op builds once
    env.update({"OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(Path(__file__).resolve()), "--worker", "--config", config,
           "--precision", precision, "--shards", shards, "--out", str(out / f"{config}-{precision}"),
           "--seq-len", str(seq_len), "--batch-size", str(args.batch_size), "--timed-steps", str(timed_steps)]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    for line in result.stdout.splitlines():
        if line.startswith('{"config"'):
            return json.loads(line)
    raise RuntimeError(f"{config} {precision}: no result (exit {result.returncode})\n{result.stdout[-3000:]}\n"
                       f"{result.stderr[-6000:]}")


def worst(result: dict, key: str) -> float:
    """MB of `key` on the rank holding the most (ZeRO's partitions differ only by padding)."""
    return max(r[key] for r in result["ranks"]) / MB


def params_and_optimizer(result: dict) -> float:
    return max(r["params_bytes"] + r["optimizer_bytes"] for r in result["ranks"]) / MB


def print_table(results: list[dict]) -> None:
    baseline = {r["precision"]: params_and_optimizer(r) for r in results if r["config"] == "zero0"}
    header = ["config", "precision", "params MB/rank", "optimizer MB/rank", "params+opt MB/rank", "ratio to zero0",
              "grads MB/rank", "buckets MB/rank", "RSS start MB", "RSS end MB", "peak RSS MB", "tokens/s", "seq_len",
              "timed steps"]
    lines = [header]
    for r in results:
        total = params_and_optimizer(r)
        ratio = f"{total / baseline[r['precision']]:.2f}" if r["precision"] in baseline else "-"
        lines.append([r["config"], r["precision"], f"{worst(r, 'params_bytes'):.1f}", f"{worst(r, 'optimizer_bytes'):.1f}",
                      f"{total:.1f}", ratio, f"{worst(r, 'grads_bytes'):.1f}", f"{worst(r, 'bucket_bytes'):.1f}",
                      f"{worst(r, 'rss_start_bytes'):.0f}", f"{worst(r, 'rss_end_bytes'):.0f}",
                      f"{worst(r, 'peak_rss_bytes'):.0f}", f"{r['tokens_per_s']:.0f}", str(r["seq_len"]),
                      str(r["timed_steps"])])
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    for row in lines:
        print("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))))


def print_goal(results: list[dict]) -> None:
    print("goal: ZeRO-3 params+optimizer per rank about 1/2 of ZeRO-0's on 2 ranks")
    for precision in ("fp32", "bf16"):
        by_config = {r["config"]: r for r in results if r["precision"] == precision}
        if "zero0" not in by_config or "zero3" not in by_config:
            continue
        zero3 = by_config["zero3"]["ranks"][0]
        ratio = params_and_optimizer(by_config["zero3"]) / params_and_optimizer(by_config["zero0"])
        line = f"  {precision}: measured {ratio:.2f} ({'met' if ratio <= 0.55 else 'not met'})"
        if zero3["master_bytes"] > 0 and precision == "fp32":
            # stage3.py compares tensor.device with a device *name* string, which is never equal, so the
            # fp32 master partition is a copy even when it could be the fp32 parameter partition itself
            line += (f"; DeepSpeed keeps a separate fp32 master partition ({zero3['master_bytes'] / MB:.1f} MB) beside "
                     f"the fp32 parameter partition: (4/2 + 4/2 + 8/2) / (4 + 8) bytes per parameter = 0.67")
        print(line)
    if not any(r["precision"] == "bf16" for r in results):
        print("  bf16: not run (--bf16 measures DeepSpeed's bf16 layout: bf16 parameters, fp32 master weights)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="ddp,zero0,zero2,zero3", help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--bf16", action="store_true", help="also run the DeepSpeed configs in bf16 (slow on CPU)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=1, help="packed sequences per rank and step")
    parser.add_argument("--timed-steps", type=int, default=3, help="fp32 steps timed after one warmup step")
    # without AVX512-BF16 or AMX, CPU bf16 matmuls run about 20x slower than fp32: shorter bf16 runs keep the
    # benchmark within minutes, and the memory columns do not depend on the sequence length
    parser.add_argument("--bf16-seq-len", type=int, default=192)
    parser.add_argument("--bf16-timed-steps", type=int, default=1, help="bf16 steps timed after one warmup step")
    parser.add_argument("--json", default=None, help="also write every run's result to this JSONL file")
    # worker side (set by the parent)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--shards", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    configs = args.configs.split(",")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"--configs: unknown {', '.join(unknown)} (known: {', '.join(CONFIGS)})")
    if min(args.timed_steps, args.bf16_timed_steps) < 1:
        parser.error("--timed-steps and --bf16-timed-steps must be >= 1")
    runs = [(c, "fp32", args.seq_len, args.timed_steps) for c in configs]
    if args.bf16:  # DDP's bf16 is autocast over fp32 parameters: the same memory as its fp32 run
        runs += [(c, "bf16", args.bf16_seq_len, args.bf16_timed_steps) for c in configs if CONFIGS[c][0] == "deepspeed"]
    start = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="zero_memory_") as tmp:
        shards = build_shards(Path(tmp))
        for config, precision, seq_len, timed_steps in runs:
            run_start = time.perf_counter()
            result = run_config(config, precision, seq_len, timed_steps, shards, Path(tmp), args)
            results.append(result)
            print(f"{config} {precision}: {time.perf_counter() - run_start:.0f} s, losses "
                  f"{[round(x, 3) for x in result['ranks'][0]['losses']]}", file=sys.stderr, flush=True)
    if args.json:
        Path(args.json).write_text("".join(json.dumps(r) + "\n" for r in results))

    print(f"\n{results[0]['num_params'] / 1e6:.1f}M parameters (tiny preset with {' '.join(MODEL_OVERRIDES)}), "
          f"2 ranks on CPU (gloo), {args.batch_size} packed sequence(s) per rank and step, 1 warmup step; "
          f"{time.perf_counter() - start:.0f} s in all. Memory: the rank holding more; MB = 2^20 bytes.")
    print_table(results)
    print_goal(results)


if __name__ == "__main__":
    main()
