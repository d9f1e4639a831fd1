"""Run under torchrun (2 ranks) by tests/test_diagnostics.py: diagnostics under DDP and DeepSpeed ZeRO 1-3
equal one process's over the same global batch.

    torchrun --nproc_per_node=2 tests/dist_diagnostics.py OUT zero2,zero3     # engines: ddp, zero1, zero2, zero3

Rank 0's batch holds a video with audio, an image and text; rank 1's an utterance and text (no vision).
For each engine, every rank measures modality reliance on its own batch and then takes one training step
with gradient norms on it; rank 0 then runs the single engine on both batches (two micro-batches: the same
global batch) and compares per-module and per-feature gradient norms, loss shares and reliance.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from omni_train.config import load_recipe
from omni_train.data import synth
from omni_train.data.audio import encode_audio
from omni_train.data.image import encode_image
from omni_train.data.packing import collate_packed
from omni_train.data.text import Tokenizer, render_chat
from omni_train.data.video import encode_video
from omni_train.model.omni import build_model
from omni_train.train.diagnostics import loss_share_metrics, measure_reliance
from omni_train.train.engine import Engine, init_distributed, shutdown

TOLERANCE = 1e-5  # relative for gradient norms and loss shares, absolute (nats) for reliance
ENGINES = {"ddp": ("ddp", 0), "zero1": ("deepspeed", 1), "zero2": ("deepspeed", 2), "zero3": ("deepspeed", 3)}


def text(role: str, value: str) -> dict:
    return {"role": role, "content": [{"type": "text", "text": value}]}


def mixed_batches(cfg, tokenizer, root: Path, *, vision: bool = True) -> list[dict | None]:
    """[rank 0's batch (video + audio, code text packed in one row; an image), rank 1's (code text; speech)],
    each sample with its meta.task; rank 0's is None without `vision` (its video's decoding takes seconds)."""
    root.mkdir(parents=True, exist_ok=True)
    audio = encode_audio(synth.speech(root / "s.flac", "three plus five").read_bytes(), cfg.data.audio)

    def sample(task, content, answer, media):
        rendered = render_chat([{"role": "user", "content": content}, text("assistant", answer)], media, tokenizer)
        rendered.meta = {"task": task}
        return rendered

    code = sample("code", [{"type": "text", "text": "print 3 plus 5"}], "print(3 + 5)", [])
    asr = sample("asr", [{"type": "audio", "member": "audio_0.flac"}], "three plus five", [audio])
    seq_len = cfg.data.seq_len
    batches = [None, collate_packed([[code], [asr]], seq_len, tokenizer.pad_id, cfg.data.audio)]
    if vision:
        video = encode_video(synth.test_pattern_video(root / "v.mp4", 2.0, fps=10, width=160, height=120).read_bytes(),
                             cfg.data.video, cfg.data.image)
        image = encode_image(synth.pattern_image(root / "i.png", 96, 64).read_bytes(), cfg.data.image)
        av = sample("av", [{"type": "video", "member": "video_0.mp4"}, {"type": "audio", "member": "audio_0.flac"}],
                    "a clock and a voice", [video, audio])
        caption = sample("caption", [{"type": "image", "member": "image_0.png"}], "bands", [image])
        batches[0] = collate_packed([[av, code], [caption]], seq_len, tokenizer.pad_id, cfg.data.audio)
    return batches


def measure(engine: Engine, micro_batches: list[dict], d) -> dict[str, float]:
    """Reliance on the batches (the initial weights: an Adam step would magnify summation-order rounding),
    then one training step with every diagnostic: the metrics row's values."""
    row = measure_reliance(engine, micro_batches, d)
    result = engine.train_step(micro_batches, grad_norms=True)
    row["grad_norm"] = result["grad_norm"]
    row.update({f"grad_norm/{k}": v for k, v in result["module_grad_norms"].items()})
    row.update({f"grad_norm/features/{k}": v for k, v in result["feature_grad_norms"].items()})
    row.update(loss_share_metrics(result["task_losses"], d))
    return row


def difference(key: str, value: float, reference: float) -> float:
    """Relative for norms and shares; absolute (nats) for reliance, a small difference of two ~5-nat losses."""
    if key.startswith(("reliance/", "modality_loss/")):
        return abs(value - reference)
    return abs(value - reference) / max(abs(reference), 1e-12)


def recipe(out: str, engine: str, stage: int):
    return load_recipe("recipes/smoke.yaml", [f"train.engine={engine}", f"train.zero_stage={stage}", "train.precision=fp32",
                                              "train.warmup_steps=0", "train.diagnostics.loss_share=true", "data.seq_len=192",
                                              f"output_dir={out}/run"])


def main(out: str, engines: str) -> None:
    tokenizer = Tokenizer.byte_level()
    d = init_distributed("deepspeed")  # the process group DDP uses too
    both = mixed_batches(recipe(out, "ddp", 0), tokenizer, Path(out) / f"media{d.rank}", vision=d.rank == 0)
    rows = {}
    for name in engines.split(","):
        engine_kind, stage = ENGINES[name]
        cfg = recipe(out, engine_kind, stage)
        torch.manual_seed(0)
        engine = Engine(build_model(cfg.model, vocab_size=tokenizer.vocab_size), cfg.train, d, micro_batch_size=2)
        rows[name] = measure(engine, [both[d.rank]], d)
        if engine_kind == "deepspeed":
            engine.wrapped.destroy()
        dist.barrier()
    if d.rank == 0:
        cfg = recipe(out, "single", 0)
        torch.manual_seed(0)
        single = Engine(build_model(cfg.model, vocab_size=tokenizer.vocab_size), dataclasses.replace(cfg.train, grad_accum=2),
                        dataclasses.replace(d, backend=None, world_size=1), micro_batch_size=2)
        reference = measure(single, both, dataclasses.replace(d, backend=None, world_size=1))
        print("single " + " ".join(f"{k}={v:.6g}" for k, v in sorted(reference.items())), flush=True)
        worst = 0.0
        for name, row in rows.items():
            assert set(row) == set(reference), (name, sorted(set(row) ^ set(reference)))
            diffs = {k: difference(k, row[k], reference[k]) for k in reference}
            key = max(diffs, key=diffs.get)
            print(f"{name}: max difference {diffs[key]:.2e} ({key})", flush=True)
            assert diffs[key] < TOLERANCE, (name, key, row[key], reference[key])
            worst = max(worst, diffs[key])
        print(f"consistent: diagnostics of {engines} equal one process's within {worst:.2e}", flush=True)
    dist.barrier()
    shutdown(None, d)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])  # out folder, engines: a comma-separated subset of ENGINES
