"""Pretrain an omni model from shards.

    torchrun --nproc_per_node=8 launch/pretrain.py --recipe recipes/R.yaml [key=value ...]
    torchrun --nproc_per_node=2 launch/pretrain.py --recipe recipes/smoke.yaml train.steps=50   # CPU

Multi-node: see launch/README.md. The recipe (and any dotted override), the shards and the resume
target are checked before any work starts and before anything in the run directory changes; a
user's error (bad key or value, a shard pattern matching nothing, a refused URL, an over-long
sample, a bad checkpoint) exits 2 with one line naming it (`OMNI_DEBUG=1` adds the traceback).
"""

from __future__ import annotations

import argparse
import sys

from omni_train.errors import preflight, run_entry_point


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help="recipes/*.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=200 model.fusion=interleave")
    args = parser.parse_args(argv)
    from omni_train.config import load_recipe

    with preflight():
        cfg = load_recipe(args.recipe, args.overrides)
    from omni_train.train.loop import train

    train(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_entry_point("pretrain", lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
