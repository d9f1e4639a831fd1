"""Pretrain an omni model from shards.

    torchrun --nproc_per_node=8 launch/pretrain.py --recipe recipes/R.yaml [key=value ...]
    torchrun --nproc_per_node=2 launch/pretrain.py --recipe recipes/smoke.yaml train.steps=50   # CPU

Multi-node: see launch/README.md. The recipe (and any dotted override) is validated before any
work starts; a bad key or value exits with one line naming it.
"""

from __future__ import annotations

import argparse
import sys

from omni_train.config import RecipeError, load_recipe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help="recipes/*.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=200 model.fusion=interleave")
    args = parser.parse_args(argv)
    try:
        cfg = load_recipe(args.recipe, args.overrides)
    except RecipeError as e:
        print(f"pretrain: error: {e}", file=sys.stderr)
        return 2
    from omni_train.train.loop import train

    train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
