"""A tiny real sweep through `omni-train sweep`, built once per test session (test_sweep.py, test_notebook.py).

2 variants (train.lr=1e-3,2e-3) x 2 seeds of the smoke recipe on the conftest corpus (audio and text shards), one
process each under torchrun, 2 steps, held-out loss and a 2-item generative probe at the end.
"""

from __future__ import annotations

import os
from pathlib import Path

from distributed import REPO

GRID = "train.lr=1e-3,2e-3"
SEEDS = (0, 1)
VARIANTS = ("1e-3", "2e-3")
_built: dict[str, tuple[Path, list[str]]] = {}


def sweep_args(corpus: dict, out: Path) -> list[str]:
    """The `omni-train sweep` arguments of the tiny sweep (the extra overrides after --)."""
    shards = corpus["shards"]
    probe = (f"[{{name: asr, kind: generative, shards: {shards[1]}, tasks: [asr], max_new_tokens: 2, max_items: 2, "
             "num_examples: 0}]")
    extra = {"data.train.0.shards": f"{shards[0]} {shards[1]} {shards[3]}", "data.eval.0.shards": shards[3],
             "data.seq_len": 512, "data.num_workers": 0, "train.engine": "single", "train.steps": 2,
             "train.eval_every": 2, "train.eval_batches": 1, "train.checkpoint_every": 2, "train.progress": "false",
             "probes": probe}
    return ["sweep", "--recipe", "recipes/smoke.yaml", "--grid", GRID, "--seeds", ",".join(map(str, SEEDS)),
            "--name", "tiny", "--out", str(out), "--", *(f"{k}={v}" for k, v in extra.items())]


def tiny_sweep(corpus: dict, tmp_path_factory) -> tuple[Path, list[str]]:
    """(sweep directory, the progress lines the first invocation printed); runs the sweep on the first call only."""
    if "tiny" not in _built:
        import contextlib
        import io

        from omni_train.cli import main

        out = tmp_path_factory.mktemp("sweep") / "tiny"
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
        previous = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "WANDB_MODE")}
        os.environ.update({"OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"})
        cwd = os.getcwd()
        stdout = io.StringIO()
        try:
            os.chdir(REPO)
            with contextlib.redirect_stdout(stdout):
                code = main(sweep_args(corpus, out))
        finally:
            os.chdir(cwd)
            for k, v in previous.items():
                if v is None:
                    os.environ.pop(k)
                else:
                    os.environ[k] = v
        assert code == 0, stdout.getvalue() + "".join(p.read_text()[-3000:] for p in out.glob("*/sweep.log"))
        _built["tiny"] = (out, stdout.getvalue().splitlines())
    return _built["tiny"]
