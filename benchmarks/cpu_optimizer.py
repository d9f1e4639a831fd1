"""The optimizer step on the CPU: torch's per-tensor AdamW loop against its fused kernel, on the demo's model.

    python benchmarks/cpu_optimizer.py [--repeats 50] [--recipe recipes/demo.yaml]

`Engine` (train/engine.py) gives single and DDP runs on the CPU torch's fused AdamW. This builds the recipe's model
(the demo's: the tiny preset with its convolution blocks, a 1,000-token vocabulary, 141 tensors, 1.77M parameters),
gives every parameter the same random gradients in both optimizers, and times `step()` on one core, side by side in
one process: the best of --repeats after a few warm-up steps, because other processes may share the machine. It also
prints how far the two optimizers' weights lie apart after the same steps (the same update, summed in another order).
"""

from __future__ import annotations

import argparse
import time

import torch

from omni_train.config import load_recipe
from omni_train.model.omni import build_model

VOCAB_SIZE = 1000  # the demo corpus's tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--recipe", default="recipes/demo.yaml")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_recipe(args.recipe)
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size=VOCAB_SIZE)
    start = [p.detach().clone() for p in model.parameters()]
    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=generator) * 1e-2 for p in start]
    times, weights = {}, {}
    for name, options in (("loop", {"foreach": False}), ("fused", {"fused": True})):
        params = [w.clone().requires_grad_() for w in start]
        for p, g in zip(params, grads):
            p.grad = g
        optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2), eps=1e-8,
                                      weight_decay=cfg.train.weight_decay, **options)
        for _ in range(3):
            optimizer.step()
        best = float("inf")
        for _ in range(args.repeats):
            begin = time.perf_counter()
            optimizer.step()
            best = min(best, time.perf_counter() - begin)
        times[name], weights[name] = 1000 * best, params
    apart = max(float((a - b).detach().abs().max()) for a, b in zip(weights["loop"], weights["fused"]))
    print(f"AdamW step, {len(start)} tensors, {sum(w.numel() for w in start):,} parameters, one core: "
          f"per-tensor loop {times['loop']:.2f} ms, fused {times['fused']:.2f} ms: x{times['loop'] / times['fused']:.1f}; "
          f"weights {apart:.1e} apart after {3 + args.repeats} steps")


if __name__ == "__main__":
    main()
