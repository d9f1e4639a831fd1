"""Faults a run survives: preemption signals, bad steps, and the injected failures that test both.

Preemption. SIGTERM (what a scheduler sends before it kills a job) and SIGUSR1 (what SLURM sends ahead of a
job's end with `--signal=USR1@90`) set a flag instead of killing the process. The loop reads it after each step,
the ranks agree on it in the step's own all-reduce, and every rank writes a checkpoint and returns: the process
exits 0, and `train.resume=auto` continues from there. Data loader workers ignore both signals (a scheduler
signals every process of the job); they end with their rank.

Bad steps (`train.nan_guard`, on by default). A step whose loss is not finite on some rank, whose gradient
norm is not finite, or (with `train.spike_guard: k`) whose mean loss exceeds k x the median of the last
`train.spike_window` good steps, makes no update on any rank: `BadStepGuard` decides before the last
micro-batch's backward (one all-reduce), and a step judged bad then sends a non-finite loss backward, so the
engine's one skip path handles it (`engine.Engine.train_step`). `train.max_bad_steps` bad steps in a row stop
the run with one line; the guard's state (the recent losses, the count) is checkpointed with the trainer's.

Injected faults (`OMNI_TRAIN_FAULTS`), for the reliability tests and for anyone who wants to see a recovery:
a `;`-separated list of `kind:key=value:...`, each firing once, in the first attempt of a torchrun job only
(`TORCHELASTIC_RESTART_COUNT` 0) unless `attempt=N` names another:

    OMNI_TRAIN_FAULTS="sigkill:rank=1:step=13"              # SIGKILL itself after step 13's backward
    OMNI_TRAIN_FAULTS="sigkill:rank=0:step=10:at=save"      # ... while writing step 10's checkpoint
    OMNI_TRAIN_FAULTS="sigterm:rank=1:step=6"               # a preemption signal during step 6
    OMNI_TRAIN_FAULTS="nan:rank=1:step=5"                   # step 5's loss becomes NaN on rank 1
    OMNI_TRAIN_FAULTS="spike:rank=0:step=9"                 # ... 1000 times what it was on rank 0
"""

from __future__ import annotations

import math
import os
import signal
import statistics
import threading
from dataclasses import dataclass
from typing import Any

from omni_train.errors import RunStopped

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
FAULT_KINDS = ("sigkill", "sigterm", "sigusr1", "nan", "spike")
SPIKE_FACTOR = 1000.0
FAULT_POINTS = ("step", "save")
ENV = "OMNI_TRAIN_FAULTS"


class Preemption:
    """Turns SIGTERM / SIGUSR1 into a flag the loop reads between steps (main thread only)."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def install(self) -> Preemption:
        """Take the signals over; a no-op outside the main thread (Python delivers signals only there)."""
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in PREEMPT_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signal = self.signal or signum

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal else ""

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


@dataclass(frozen=True)
class Fault:
    kind: str
    rank: int
    step: int
    at: str = "step"
    attempt: int = 0


def parse_faults(text: str | None) -> list[Fault]:
    """`OMNI_TRAIN_FAULTS` -> Faults, or ValueError naming the entry."""
    faults = []
    for entry in filter(None, (part.strip() for part in (text or "").split(";"))):
        kind, *fields = entry.split(":")
        try:
            values = dict(field.split("=", 1) for field in fields)
        except ValueError:
            raise ValueError(f"{ENV}: {entry!r} must look like kind:rank=R:step=S[:at=step|save][:attempt=N]") from None
        unknown = sorted(set(values) - {"rank", "step", "at", "attempt"})
        if kind not in FAULT_KINDS or unknown or not {"rank", "step"} <= set(values):
            raise ValueError(f"{ENV}: {entry!r} must be one of {', '.join(FAULT_KINDS)} with rank= and step= "
                             f"(and optionally at= {'|'.join(FAULT_POINTS)}, attempt=)")
        at = values.get("at", "step")
        if at not in FAULT_POINTS or (kind in ("nan", "spike") and at != "step"):
            raise ValueError(f"{ENV}: {entry!r}: at must be one of {', '.join(FAULT_POINTS)} (nan, spike: step)")
        try:
            faults.append(Fault(kind, int(values["rank"]), int(values["step"]), at, int(values.get("attempt", 0))))
        except ValueError:
            raise ValueError(f"{ENV}: {entry!r}: rank, step and attempt must be integers") from None
    return faults


class FaultInjector:
    """The faults of `OMNI_TRAIN_FAULTS` meant for this rank and attempt."""

    def __init__(self, rank: int, text: str | None = None):
        attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
        text = os.environ.get(ENV) if text is None else text
        self.faults = [f for f in parse_faults(text) if f.rank == rank and f.attempt == attempt]

    def _take(self, kind: str, step: int, at: str) -> bool:
        for fault in self.faults:
            if (fault.kind, fault.step, fault.at) == (kind, step, at):
                self.faults.remove(fault)
                return True
        return False

    def loss_factor(self, step: int) -> float:
        """What this rank's loss of `step` is multiplied by: NaN or SPIKE_FACTOR when a fault says so, else 1."""
        if self.faults and self._take("nan", step, "step"):
            return float("nan")
        if self.faults and self._take("spike", step, "step"):
            return SPIKE_FACTOR
        return 1.0

    def at(self, point: str, step: int) -> None:
        """Fire what is due at `point` of `step`: SIGKILL (no return) or a SIGTERM to this process."""
        if not self.faults:
            return
        if self._take("sigkill", step, point):
            os.kill(os.getpid(), signal.SIGKILL)
        if self._take("sigterm", step, point):
            os.kill(os.getpid(), signal.SIGTERM)
        if self._take("sigusr1", step, point):
            os.kill(os.getpid(), signal.SIGUSR1)


@dataclass
class Verdict:
    """What the ranks agreed about one step before its update."""
    mean_loss: float
    bad_ranks: list[int]          # ranks whose loss was not finite
    spike_limit: float | None     # k x median of the recent good losses, when the spike guard judged
    reason: str | None            # None: the step may update

    @property
    def bad(self) -> bool:
        return self.reason is not None


class BadStepGuard:
    """train.nan_guard / max_bad_steps / spike_guard: judges a step before its update, counts bad ones."""

    def __init__(self, cfg):
        self.enabled = cfg.nan_guard
        self.k, self.window, self.max_bad = cfg.spike_guard, cfg.spike_window, cfg.max_bad_steps
        self.recent: list[float] = []   # mean losses of the last `window` good steps
        self.in_a_row = 0
        self.skipped = 0

    def limit(self) -> float | None:
        """The loss above which a step counts as a spike, once the window holds enough good steps."""
        if not self.k or len(self.recent) < max(1, self.window // 2):
            return None
        return self.k * statistics.median(self.recent)

    def judge(self, local_losses: list[float], reduce, rank: int, world_size: int) -> Verdict:
        """Every rank calls this with its micro-batches' losses; `reduce` sums a list over ranks (one all-reduce)."""
        finite = all(math.isfinite(v) for v in local_losses)
        mine = sum(local_losses) / len(local_losses) if finite else 0.0
        flags = [0.0] * world_size
        flags[rank] = 0.0 if finite else 1.0
        total, *flags = reduce([mine, *flags])
        bad_ranks = [r for r, flag in enumerate(flags) if flag > 0]
        mean = total / world_size if not bad_ranks else float("nan")
        limit = self.limit()
        if bad_ranks:
            reason = f"non-finite loss on rank{'s' if len(bad_ranks) > 1 else ''} {', '.join(map(str, bad_ranks))}"
        elif limit is not None and mean > limit:
            reason = f"loss spike: {mean:.4g} > {self.k:g} x median {limit / self.k:.4g} of the last {len(self.recent)} steps"
        else:
            reason = None
        return Verdict(mean, bad_ranks, limit, reason)

    def record(self, step: int, reason: str | None, mean_loss: float) -> None:
        """After the step: count it; RunStopped after max_bad_steps bad ones in a row."""
        if reason is None:
            self.in_a_row = 0
            if self.k:
                self.recent = (self.recent + [mean_loss])[-self.window:]
            return
        self.in_a_row += 1
        self.skipped += 1
        if self.in_a_row >= self.max_bad:
            raise RunStopped(f"step {step}: {self.in_a_row} bad steps in a row (train.max_bad_steps={self.max_bad}), "
                             f"the last: {reason}; see bad_steps.jsonl for their samples")

    def state_dict(self) -> dict[str, Any]:
        return {"recent": list(self.recent), "in_a_row": self.in_a_row, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recent = [float(v) for v in state.get("recent", [])]
        self.in_a_row, self.skipped = int(state.get("in_a_row", 0)), int(state.get("skipped", 0))
