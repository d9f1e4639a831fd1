"""Run under torchrun (2 ranks) by tests/test_zero_init.py: a model born partitioned under ZeRO-3, and loaded partitioned.

1. `zero3.build_partitioned`: every parameter is an empty ZeRO-3 partition right after the build, and
   the gathered weights equal a one-process build from the same seed bit for bit (fp32, and bf16:
   the fp32 build cast), also for initializers that write through `.data`, slices and `nn.init`.
2. The engine over it trains exactly as over a model built whole and partitioned by DeepSpeed (fp32, bf16).
3. `zero3.load_state_partitioned` writes a 2-file safetensors checkpoint exactly into a model built
   partitioned without random initialization (`random_init=False`), and refuses
   a stream with missing, unexpected and mis-shaped names with one error naming them (on every rank,
   without hanging).
Prints one `ok ...` line per part on rank 0.
"""

from __future__ import annotations

import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from omni_train.config import load_recipe
from omni_train.data.packing import collate_packed
from omni_train.data.text import Tokenizer, render_chat
from omni_train.model.omni import build_model
from omni_train.train.engine import Engine, init_distributed, shutdown
from omni_train.train.zero3 import build_partitioned, iter_safetensors, load_state_partitioned

TOKENIZER = Tokenizer.byte_level()


class ParentInitializes(nn.Module):
    """Initializer idioms other code uses, each writing a child's weight after the child was partitioned."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(32, 48)
        self.table = nn.Embedding(20, 32)
        with torch.no_grad():
            self.fc.weight.data.normal_(0.0, 0.5)         # through .data
            self.fc.weight[:3] = 1.0                      # a slice
            nn.init.trunc_normal_(self.table.weight, std=0.3)
            self.fc.bias.copy_(torch.arange(48.0))


def gathered(model: nn.Module) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {name: p.detach().clone() for name, p in params.items()}


def build(cfg, *, partitioned: bool, seed: int = 0, random_init: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    return build_partitioned(lambda: build_model(cfg.model, vocab_size=TOKENIZER.vocab_size), cfg.train,
                             micro_batch_size=1, enabled=partitioned, random_init=random_init)


def text_batch(question: str, answer: str) -> dict:
    sample = render_chat([{"role": "user", "content": [{"type": "text", "text": question}]},
                          {"role": "assistant", "content": [{"type": "text", "text": answer}]}], [], TOKENIZER)
    return collate_packed([[sample]], 64, TOKENIZER.pad_id, load_recipe("recipes/smoke.yaml").data.audio)


def main(out: str) -> None:
    out = Path(out)
    # weight decay on: the optimizer's decay groups go by each parameter's real (not partition) shape
    cfg = load_recipe("recipes/smoke.yaml", ["train.zero_stage=3", "train.precision=fp32", "train.warmup_steps=0",
                                             "train.weight_decay=0.1", f"output_dir={out}/run"])
    d = init_distributed("deepspeed")

    # 1. born partitioned, initialized exactly as in one process
    model = build(cfg, partitioned=True)
    sizes = {name: (p.numel(), p.ds_tensor.numel(), p.ds_numel) for name, p in model.named_parameters()}
    assert all(held == 0 and part == -(-full // 2) for held, part, full in sizes.values()), sizes
    weights = gathered(model)
    torch.manual_seed(0)
    idioms = gathered(build_partitioned(ParentInitializes, cfg.train, micro_batch_size=1))
    if d.rank == 0:
        reference = build(cfg, partitioned=False)
        unequal = [name for name, p in reference.named_parameters() if not torch.equal(p.detach(), weights[name])]
        assert not unequal and len(weights) == len(dict(reference.named_parameters())), unequal
        torch.manual_seed(0)
        idioms_reference = ParentInitializes()
        assert all(torch.equal(p.detach(), idioms[name]) for name, p in idioms_reference.named_parameters())
        print(f"ok fp32: {len(weights)} tensors, {sum(full for _, _, full in sizes.values()):,} parameters born "
              f"partitioned (rank 0 holds {sum(part for _, part, _ in sizes.values()):,}) equal a one-process build "
              f"exactly; so do {len(idioms)} tensors written through .data, a slice, nn.init and copy_", flush=True)

    bf16_cfg = load_recipe("recipes/smoke.yaml", ["train.zero_stage=3", "train.precision=bf16", "train.warmup_steps=0",
                                                  "train.weight_decay=0.1"])
    bf16 = gathered(build(bf16_cfg, partitioned=True))
    if d.rank == 0:  # drawn in fp32 and cast, as DeepSpeed casts a model built whole
        unequal = [name for name, p in reference.named_parameters() if not torch.equal(p.detach().bfloat16(), bf16[name])]
        assert not unequal and all(w.dtype == torch.bfloat16 for w in bf16.values()), unequal
        print(f"ok bf16: {len(bf16)} bf16 tensors born partitioned equal the one-process fp32 build cast to bf16 exactly",
              flush=True)

    # 2. the engine trains a born-partitioned model exactly as one built whole
    batches = [text_batch("print 3 plus 5", "print(3 + 5)"), text_batch("print 2 times 4", "print(2 * 4)")]
    for precision_cfg in (cfg, bf16_cfg):
        runs = {}
        for partitioned in (True, False):
            engine = Engine(build(precision_cfg, partitioned=partitioned), precision_cfg.train, d, micro_batch_size=1)
            losses = [engine.train_step([batches[d.rank]])["loss"] for _ in range(3)]
            runs[partitioned] = (losses, gathered(engine.module))
            engine.wrapped.destroy()
        assert runs[True][0] == runs[False][0], (runs[True][0], runs[False][0])
        assert all(torch.equal(runs[True][1][n], runs[False][1][n]) for n in runs[False][1])
        if d.rank == 0:
            print(f"ok engine {precision_cfg.train.precision}: 3 ZeRO-3 steps from a born-partitioned model, losses "
                  f"{[round(x, 4) for x in runs[True][0]]}, equal to those of a model built whole (and every trained "
                  f"weight)", flush=True)

    # 3. a checkpoint written into the partitions, one tensor at a time
    files = [out / "part-1.safetensors", out / "part-2.safetensors"]
    expected = {name: p.detach().clone() for name, p in build(cfg, partitioned=False, seed=123).named_parameters()}
    names = sorted(expected)
    if d.rank == 0:
        save_file({n: expected[n] for n in names[::2]}, str(files[0]))
        save_file({n: expected[n].to(torch.bfloat16) for n in names[1::2]}, str(files[1]))  # cast on the way in
    expected.update({n: expected[n].to(torch.bfloat16).float() for n in names[1::2]})
    dist.barrier()
    model = build(cfg, partitioned=True, random_init=False)  # weights about to be loaded: no initialization
    load_state_partitioned(model, iter_safetensors(files), where="two files")
    loaded = gathered(model)
    assert all(p.numel() == 0 for p in model.parameters())  # partitioned again
    assert all(torch.equal(loaded[n], expected[n]) for n in names), [n for n in names if not torch.equal(loaded[n], expected[n])]

    def damaged():
        for name, tensor in iter_safetensors(files):
            if name == names[0]:
                continue                                   # missing
            if name == names[1]:
                tensor = tensor[:-1]                       # mis-shaped
            yield name, tensor
        yield "backbone.extra.weight", torch.zeros(3)     # unexpected

    try:
        load_state_partitioned(model, damaged(), where="damaged stream")
    except ValueError as e:
        message = str(e)
    else:
        raise AssertionError("a damaged stream was loaded")
    assert message.startswith("damaged stream: checkpoint does not match the model: missing (1): " + names[0]), message
    assert "unexpected (1): backbone.extra.weight" in message and f"shape checkpoint vs model (1): {names[1]} " in message
    dist.barrier()  # both ranks got here: nobody waits in a gather
    if d.rank == 0:
        print(f"ok load: {len(names)} tensors from 2 safetensors files into the partitions of a model built without "
              f"random initialization, exactly; a damaged stream "
              f"is refused on every rank with: {message[:160]}...", flush=True)
    shutdown(None, d)


if __name__ == "__main__":
    main(sys.argv[1])
