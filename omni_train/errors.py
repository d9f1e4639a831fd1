"""How every entry point reports a user's error: one line on stderr and exit code 2; a traceback only for bugs.

    def main(argv=None) -> int:
        return run_entry_point("pretrain", lambda: _main(argv))

A user's error is one the user can fix from its message: a bad recipe key, a shard pattern that matches
nothing, a refused URL, an over-long sample, a missing or unreadable file, a checkpoint that is not one or
that would need unpickling, a bad export directory. The library raises these as `ValueError` (RecipeError,
ShardFormatError, ...) or `OSError` (FileNotFoundError, PermissionError, ...) with a message that names the
file, key or field; torch's `weights_only` refusals (`pickle.UnpicklingError`), safetensors' and tarfile's
errors count too. Anything else (TypeError, KeyError, AssertionError, RuntimeError, ...) is a bug and keeps
its traceback; `OMNI_DEBUG=1` prints the traceback of a user's error as well.

Under torchrun every rank runs the same checks before any collective (the recipe, the shards, the resume
target: `preflight` errors), so only rank 0 prints those; an error a rank meets later is printed by that rank,
prefixed with it; the ranks that lose their connection to it say so in one line of their own rather than
with a traceback. torchrun then adds its own failure summary, in which the root cause is this line (written
to the error file torchrun names in TORCHELASTIC_ERROR_FILE).
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import tarfile
import time
import traceback
from contextlib import contextmanager
from typing import Callable, Iterator


class PreflightError(ValueError):
    """A user's error found before any work, identically on every rank (wraps the original message)."""


class RunStopped(Exception):
    """The run stopped on purpose (too many bad steps in a row, a data loader worker lost), for a reason its
    message gives in one line. `every_rank`: every rank stops alike, so rank 0 alone says it."""

    def __init__(self, message: str, *, every_rank: bool = True):
        super().__init__(message)
        self.every_rank = every_rank


@contextmanager
def preflight() -> Iterator[None]:
    """Checks every rank makes alike before any work: their user errors become PreflightError (printed once)."""
    try:
        yield
    except PreflightError:
        raise
    except user_error_types() as e:
        raise PreflightError(one_line(e)) from e


def user_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [ValueError, OSError, pickle.UnpicklingError, tarfile.TarError, RunStopped]
    try:
        from safetensors import SafetensorError

        types.append(SafetensorError)
    except ImportError:  # older safetensors: its errors are OSError / ValueError
        pass
    return tuple(types)


def one_line(error: BaseException) -> str:
    """The error's message on one line: its first non-empty line (library messages put the reason first)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


# What a collective raises (a plain RuntimeError) on a rank whose peer has exited: under torchrun that peer
# printed its own error, so this rank's traceback would only bury it.
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def run_entry_point(prog: str, main: Callable[[], int | None]) -> int:
    """Call `main`; a user's error becomes `prog: error: <one line>` on stderr and exit code 2."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    debug = os.environ.get("OMNI_DEBUG") == "1"
    try:
        return int(main() or 0)
    except RuntimeError as e:
        if world_size == 1 or debug or not any(text in str(e) for text in PEER_LOST):
            raise
        print(f"{prog}: error (rank {rank}): another rank stopped (see its error above): {one_line(e)[:160]}",
              file=sys.stderr, flush=True)
    except user_error_types() as e:
        if debug:
            traceback.print_exc()
        preflight_error = isinstance(e, PreflightError) or (isinstance(e, RunStopped) and e.every_rank)
        if rank == 0 or not preflight_error:  # a preflight error is every rank's: rank 0 says it
            line = f"{prog}: error{'' if world_size == 1 or preflight_error else f' (rank {rank})'}: {one_line(e)}"
            print(line, file=sys.stderr, flush=True)
            _tell_torchrun(line)
    return 2


def _tell_torchrun(line: str) -> None:
    """torchrun's failure summary shows the error file's text as the rank's cause instead of 'enable traceback'."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"message": {"message": line, "extraInfo": {"py_callstack": line,
                                                                   "timestamp": str(int(time.time()))}}}, f)
    except OSError:
        pass
