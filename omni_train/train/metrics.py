"""Where training numbers go: `metrics.jsonl`, a progress bar, and wandb (offline unless a key is set).

Only rank 0 writes; every method is a no-op on the other ranks.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
from pathlib import Path
from typing import Any

TRACKERS = ("wandb", "none")


def max_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (DataLoader workers are other processes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def drop_rows_after(path: Path, step: int) -> int:
    """Rewrite the JSONL file `path` without its rows of steps after `step` (atomically); how many went.

    A run resumed from step S repeats the steps after S: the rows a crashed attempt wrote for them go first,
    so every step has one row."""
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if not _after(line, step)]
    if len(kept) < len(lines):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)
    return len(lines) - len(kept)


def _after(line: str, step: int) -> bool:
    try:
        row = json.loads(line)
    except ValueError:
        return False
    return isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] > step


class MetricsLogger:
    def __init__(self, output_dir: Path, *, enabled: bool, total_steps: int, start_step: int, tracker: str,
                 run_name: str, config: dict[str, Any], progress: bool = True):
        self.enabled = enabled
        self.path = output_dir / "metrics.jsonl"
        self.bar = None
        self.wandb = None
        if not enabled:
            return
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc=run_name, unit="step", dynamic_ncols=True)
        if tracker == "wandb":
            import wandb

            mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
            os.environ.setdefault("WANDB_DIR", str(output_dir))
            os.environ.setdefault("WANDB_CACHE_DIR", str(output_dir / "wandb-cache"))
            self.wandb = wandb.init(project="omni_train", name=run_name, dir=str(output_dir), config=config, mode=mode,
                                    resume="allow", id=run_name.replace("/", "_"))

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(clean) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in clean.items() if isinstance(v, (int, float)) and k != "step"}, step=row["step"])

    def progress(self, step: int, row: dict[str, Any]) -> None:
        if self.bar is None:
            return
        self.bar.n = step
        postfix = {"loss": f"{row['loss']:.4f}"}
        if "tokens_per_s" in row:
            postfix["tok/s"] = f"{row['tokens_per_s']:.0f}"
        if "real_token_fraction" in row:
            postfix["real"] = f"{row['real_token_fraction']:.0%}"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.refresh()

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
