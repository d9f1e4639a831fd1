"""Fine-tune an omni model from a run's checkpoint or from pretrained components, in full or with LoRA.

    torchrun --nproc_per_node=8 launch/finetune.py --recipe recipes/meeting-finetune.yaml init.run=runs/NAME [key=value ...]
    torchrun --nproc_per_node=2 launch/finetune.py --recipe recipes/meeting-finetune.yaml init.run=runs/demo   # CPU

Where the weights come from (at least one): `init.run` (+ `init.step`, default its latest
checkpoint) — an omni_train run, whose model, tokenizer and media settings the fine-tune inherits —
or local HF directories in `model.pretrained_*` (the Qwen backbone, ...). What trains:
`train.lora` (adapters on `targets`; the rest is frozen) or, without it, every module that
`train.modules` does not freeze, each at `train.lr` x its `lr_scale`. DeepSpeed ZeRO 2/3 with
`train.engine=deepspeed train.zero_stage=N`. The recipe, the shards and the resume target are checked
before any work starts and before anything in the run directory changes; a user's error exits 2 with
one line naming it (`OMNI_DEBUG=1` adds the traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from omni_train.errors import preflight, run_entry_point


def starting_point(cfg) -> str | None:
    """What the fine-tune starts from, in words, or None when the recipe names nothing."""
    pretrained = [f"model.{f.name}" for f in dataclasses.fields(cfg.model)
                  if f.name.startswith("pretrained") and getattr(cfg.model, f.name)]
    if cfg.init.run is not None:
        pretrained.insert(0, f"{cfg.init.run} step {cfg.init.step}")
    return ", ".join(pretrained) or None


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help="recipes/*.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. init.run=runs/demo train.lora.r=16")
    args = parser.parse_args(argv)
    from omni_train.config import load_recipe

    with preflight():
        cfg = load_recipe(args.recipe, args.overrides)
        start = starting_point(cfg)
        if start is None:
            raise ValueError("init.run: nothing to fine-tune from; set init.run=runs/NAME (an omni_train run) "
                             "or a model.pretrained / model.pretrained_* directory")
    from omni_train.train.loop import train

    if os.environ.get("RANK", "0") == "0":
        print(f"finetune: starting from {start}" + (f", LoRA r={cfg.train.lora.r} on {', '.join(cfg.train.lora.targets)}"
                                                     if cfg.train.lora else ", all parameters"), flush=True)
    train(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_entry_point("finetune", lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
