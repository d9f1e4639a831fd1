"""Probe metrics: exact match, execution match in a sandboxed subprocess, WER / CER, item lists, recall@k.

Execution match runs generated and reference code with `python -I -S -B -c CODE` and compares
what each prints. The model's output is untrusted text, so every snippet runs in its own child:
- an empty environment, `-I` (no user site, no PYTHON* variables, no cwd on sys.path), `-S`;
- a fresh temporary working directory, removed afterwards; stdin is /dev/null;
- run as `nobody` when this process is root (so it cannot touch files that root owns);
- resource limits set in the child before the snippet runs: CPU seconds, address space, no file
  data written anywhere (RLIMIT_FSIZE 0; stdout is a pipe, read here up to a cap), no new
  processes (RLIMIT_NPROC 0, so `os.system` and `subprocess` fail; root is exempt from it,
  hence the switch to `nobody`);
- a wall-clock timeout that kills the child's whole process group.
Before any of that, `check_code` refuses snippets that import modules outside a small
arithmetic allowlist or call `open`, `exec`, `eval`, ... (defence in depth, not the boundary).
The snippet can still read world-readable files. This contains mistakes of a model trained on
arithmetic; it is not a hardened sandbox against hostile code (no namespaces or seccomp).
"""

from __future__ import annotations

import ast
import os
import pwd
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

SAFE_MODULES = frozenset({"math", "cmath", "statistics", "fractions", "decimal", "itertools", "functools", "operator",
                          "collections", "string", "re", "datetime", "random", "heapq", "bisect", "numbers"})
FORBIDDEN_NAMES = frozenset({"open", "exec", "eval", "compile", "__import__", "globals", "locals", "vars", "getattr",
                             "setattr", "delattr", "input", "breakpoint", "exit", "quit", "memoryview", "help"})
MAX_OUTPUT_BYTES = 64 * 1024
ADDRESS_SPACE_BYTES = 1 << 30


@dataclass(frozen=True)
class ExecResult:
    ok: bool          # exited 0 within the limits
    stdout: str
    error: str = ""   # why not ok: refused, timeout, exit status, stderr's last line


def exact_match(prediction: str, reference: str) -> bool:
    return prediction.strip() == reference.strip()


def _imported_modules(code: str) -> list[str]:
    """Top-level names of the modules `code` imports (none when it does not parse)."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return []
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module.split(".")[0])
    return names


def check_code(code: str) -> str | None:
    """None when `code` parses and stays inside the allowlist, else the reason it is refused."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError) as e:
        return f"syntax error: {e}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules = [(node.module or "").split(".")[0]] if node.level == 0 else ["<relative>"]
        else:
            modules = []
        bad = [m for m in modules if m not in SAFE_MODULES]
        if bad:
            return f"imports {bad[0]!r}"
        if isinstance(node, ast.Name) and node.id in FORBIDDEN_NAMES:
            return f"uses {node.id!r}"
        if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            return f"accesses attribute {node.attr!r}"
    return None


def _sandbox_user() -> tuple[int, int] | None:
    """(uid, gid) of `nobody` when running as root, else None (stay as we are)."""
    if os.getuid() != 0:
        return None
    try:
        entry = pwd.getpwnam("nobody")
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        return 65534, 65534


# The child's own first lines (trusted): pre-import the allowed modules the snippet imports, set
# the limits, drop to `nobody` if root, then run the snippet in a fresh namespace. Dropping
# privileges inside the child rather than with Popen(user=...) lets the interpreter and its
# standard library live where `nobody` may not go (a pyenv under /root); the snippet gets only
# what is pre-imported.
# Not `preexec_fn`, which can deadlock the child of a threaded parent (torch, the pool below).
# argv = [-c, cpu_s, address_bytes, uid, gid, code, modules to pre-import]; uid -1: stay as we are.
_LAUNCHER = """
import builtins, os, resource, sys
for module in filter(None, sys.argv[6].split(",")):
    __import__(module)
cpu_s, address_bytes, uid, gid, code = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
for limit, value in ((resource.RLIMIT_CPU, cpu_s), (resource.RLIMIT_AS, address_bytes), (resource.RLIMIT_FSIZE, 0),
                     (resource.RLIMIT_NPROC, 0), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(limit, (value, value))
if uid >= 0:
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
sys.argv = ["-c"]
del builtins, os, resource, cpu_s, address_bytes, uid, gid, limit, value
exec(compile(code, "<snippet>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
"""


def run_code(code: str, *, timeout_s: float = 2.0, check: bool = True) -> ExecResult:
    """Run one snippet in the sandbox (module docstring); its stdout and whether it succeeded."""
    if check and (reason := check_code(code)) is not None:
        return ExecResult(False, "", f"refused: {reason}")
    user = _sandbox_user()
    workdir = tempfile.mkdtemp(prefix="omni_exec_")
    try:
        if user is not None:
            os.chown(workdir, *user)
        cpu_s = max(1, int(timeout_s + 0.999))
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-B", "-c", _LAUNCHER, str(cpu_s), str(ADDRESS_SPACE_BYTES),
             *(map(str, user) if user else ("-1", "-1")), code,
             ",".join(sorted(SAFE_MODULES.intersection(_imported_modules(code))))],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=workdir, env={},
            start_new_session=True, close_fds=True)
        stdout, stderr, why = _collect(proc, timeout_s)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = stdout.decode("utf-8", errors="replace")
    if why:
        return ExecResult(False, text, why)
    if proc.returncode != 0:
        last = stderr.decode("utf-8", errors="replace").strip().splitlines()[-1:] or [""]
        return ExecResult(False, text, f"exit status {proc.returncode}: {last[0][:200]}")
    return ExecResult(True, text)


def _collect(proc: subprocess.Popen, timeout_s: float) -> tuple[bytes, bytes, str]:
    """Read stdout/stderr until exit, the deadline or the output cap; kill the process group when cut short."""
    out, err = bytearray(), bytearray()
    why = ""
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ, out)
        selector.register(proc.stderr, selectors.EVENT_READ, err)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                why = f"timeout after {timeout_s:g} s"
                break
            for key, _ in selector.select(remaining):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                key.data.extend(chunk)
            if len(out) > MAX_OUTPUT_BYTES or len(err) > MAX_OUTPUT_BYTES:
                why = f"more than {MAX_OUTPUT_BYTES} bytes of output"
                break
    if why:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=max(deadline - time.monotonic(), 0) + 1.0)
    except subprocess.TimeoutExpired:  # closed its pipes but kept running
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        why = why or f"timeout after {timeout_s:g} s"
    proc.stdout.close()
    proc.stderr.close()
    if not why and proc.returncode == -signal.SIGXCPU:
        why = "CPU time limit"
    return bytes(out[:MAX_OUTPUT_BYTES]), bytes(err[:MAX_OUTPUT_BYTES]), why


def run_many(codes: Sequence[str], *, timeout_s: float = 2.0, num_workers: int | None = None) -> list[ExecResult]:
    """run_code over many snippets, each distinct snippet once, several children at a time."""
    unique = list(dict.fromkeys(codes))
    workers = num_workers or max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = dict(zip(unique, pool.map(lambda c: run_code(c, timeout_s=timeout_s), unique)))
    return [results[c] for c in codes]


def execution_matches(predictions: Sequence[str], references: Sequence[str], *, timeout_s: float = 2.0) -> list[bool]:
    """Per item: both snippets run without error and print the same thing (a crash or timeout is a mismatch)."""
    assert len(predictions) == len(references)
    results = run_many([*predictions, *references], timeout_s=timeout_s)
    n = len(predictions)
    return [p.ok and r.ok and p.stdout == r.stdout for p, r in zip(results[:n], results[n:])]


def word_error_rate(references: Sequence[str], predictions: Sequence[str]) -> float:
    """Corpus WER: word edits over reference words, all items together (jiwer)."""
    import jiwer

    refs, hyps = _nonempty_references(references, predictions)
    return float(jiwer.wer(refs, hyps)) if refs else 0.0


def char_error_rate(references: Sequence[str], predictions: Sequence[str]) -> float:
    """Corpus CER: character edits over reference characters (jiwer)."""
    import jiwer

    refs, hyps = _nonempty_references(references, predictions)
    return float(jiwer.cer(refs, hyps)) if refs else 0.0


def _nonempty_references(references: Sequence[str], predictions: Sequence[str]) -> tuple[list[str], list[str]]:
    # An empty reference has no words to get wrong: it would divide by zero, so it is left out.
    pairs = [(r.strip(), p.strip()) for r, p in zip(references, predictions, strict=True) if r.strip()]
    return [r for r, _ in pairs], [p for _, p in pairs]


ITEM_MARKER = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s+")


def list_items(text: str) -> list[str]:
    """The items of a list answer, one per line ("- item", "* item", "1. item"), normalized for matching:
    lower case, punctuation dropped, whitespace collapsed. Lines without a marker count as items too."""
    items = []
    for line in text.splitlines():
        line = ITEM_MARKER.sub("", line)
        words = re.sub(r"[^\w\s]", " ", line.lower()).split()
        if words:
            items.append(" ".join(words))
    return items


def item_matches(prediction: str, reference: str) -> tuple[int, int, int]:
    """(found, predicted, reference) item counts: a predicted item is found when it equals a reference item not
    matched yet (after `list_items`' normalization). Precision = found / predicted, recall = found / reference."""
    predicted, expected = list_items(prediction), list_items(reference)
    remaining = list(expected)
    found = 0
    for item in predicted:
        if item in remaining:
            remaining.remove(item)
            found += 1
    return found, len(predicted), len(expected)


def recall_at_k(similarity: torch.Tensor, relevant: Sequence[set[int] | int], k: int) -> float:
    """Fraction of queries (rows of `similarity`, (Q, G)) with a relevant gallery item among their k best."""
    assert similarity.dim() == 2 and similarity.shape[0] == len(relevant), (similarity.shape, len(relevant))
    if similarity.shape[0] == 0:
        return 0.0
    top = similarity.topk(min(k, similarity.shape[1]), dim=1).indices.tolist()
    hits = sum(bool(set(row) & ({rel} if isinstance(rel, int) else rel)) for row, rel in zip(top, relevant))
    return hits / similarity.shape[0]
