"""Probe metrics: exact match, execution match in an OS sandbox, WER / CER, item lists, recall@k.

Execution match compares what generated and reference code print. The model's output is untrusted
code, so every snippet that is not plain arithmetic (see the fast path below) runs in its own
bubblewrap (`bwrap`) sandbox, which is the boundary:
- its own user, PID, network, IPC, UTS and cgroup namespaces (`--unshare-all`): no network beyond
  an empty loopback of its own, and no process outside the sandbox to see or signal
  (`os.kill(-1, 9)` reaches only its own sandbox);
- a mount namespace with read-only binds of /usr (/lib*, /etc/ld.so.cache) and the interpreter's
  own installation, a private empty tmpfs as /tmp (the working directory, gone afterwards) and a
  minimal /dev: the trainer's files, runs and repository are not there to read or write;
- uid and gid 65534 (`nobody`) inside, no capabilities, and a seccomp filter (built once with
  libseccomp) under which fork, vfork, clone, clone3, unshare and setns fail: no new process and
  no new namespace. Started by root, the sandbox is root to the kernel outside (bwrap maps its
  caller's uid), which RLIMIT_NPROC would not hold; the filter does;
- limits set by the interpreter's first lines (`_LAUNCHER`): CPU seconds, address space, no file
  data written anywhere (RLIMIT_FSIZE 0), no core dumps; `python -I -S -B` in an empty
  environment, stdin /dev/null, stdout and stderr read here up to a cap; a wall-clock timeout
  kills bwrap, and `--die-with-parent` takes the whole sandbox down with it.
Where there is no working sandbox (no `bwrap` on PATH, or bwrap failing a one-time self-check, e.g.
without user namespaces), execution match raises `SandboxUnavailable`, one line, and runs nothing:
generated code never runs unconfined. A probe can leave `execution` out of its metrics instead.
`check_code`'s allowlist still refuses imports and builtins that arithmetic never needs (defence in
depth; it is known to leak `os`, which is why the sandbox is the boundary).

Fast path: a snippet that is `print(...)` of arithmetic on int and float literals (+ - * / // % **,
unary minus and plus, parentheses), as every demo target is, is evaluated here by
`arithmetic_print` with Python's own operators, without a process; it prints byte for byte what the
interpreter would. Anything else, any int beyond MAX_FAST_INT_BITS (`9 ** 9 ** 9`) or a complex
result goes to the sandbox.
"""

from __future__ import annotations

import ast
import ctypes
import ctypes.util
import errno
import functools
import math
import operator
import os
import re
import selectors
import shutil
import signal
import struct
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
SANDBOX_ID = 65534                      # uid and gid inside the sandbox (`nobody`)
DENIED_SYSCALLS = ("fork", "vfork", "clone", "clone3", "unshare", "setns")
SELF_CHECK_TIMEOUT_S = 30.0             # generous: the first start may share the CPUs with a training step
MAX_FAST_INT_BITS = 1024                # ~309 digits: far below the int -> str limit at any setting (640 at least)
MAX_FAST_NODES = 256                    # bigger expressions go to the sandbox (keeps the evaluator's recursion short)
MAX_FAST_CODE_CHARS = 4096


@dataclass(frozen=True)
class ExecResult:
    ok: bool          # exited 0 within the limits
    stdout: str
    error: str = ""   # why not ok: refused, timeout, exit status, stderr's last line


class SandboxUnavailable(ValueError):
    """There is no working OS sandbox here, so execution match refuses to run generated code."""


def exact_match(prediction: str, reference: str) -> bool:
    return prediction.strip() == reference.strip()


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


# ------------------------------------------------------------------------------------------ fast path


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


class _NotFast(Exception):
    """The snippet is not one `arithmetic_print` answers: run it in the sandbox."""


def arithmetic_print(code: str) -> ExecResult | None:
    """What `code` prints when it is `print(...)` of int/float arithmetic (module docstring), computed here with
    Python's own operators; a ZeroDivisionError or OverflowError is a failed run, as it would be in the child.
    None for anything else."""
    if len(code) > MAX_FAST_CODE_CHARS:
        return None
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # the sandbox reports it as the interpreter does
        return None
    if len(tree.body) != 1 or sum(1 for _ in ast.walk(tree)) > MAX_FAST_NODES:
        return None
    call = tree.body[0].value if isinstance(tree.body[0], ast.Expr) else None
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "print"
            and not call.keywords):
        return None
    if any(_flushed_literal(code, node) for node in ast.walk(call)):
        return None
    try:
        values = [_evaluate(arg) for arg in call.args]  # print evaluates every argument before writing any
    except _NotFast:
        return None
    except ArithmeticError as e:
        return ExecResult(False, "", f"{type(e).__name__}: {e}")
    return ExecResult(True, " ".join(map(str, values)) + "\n")


# The trainer flushes subnormal floats to zero (`engine.init_distributed`: x86's FTZ/DAZ, which Python's own
# float arithmetic and comparisons obey too), the sandbox's fresh interpreter does not: a float in the
# subnormal range, and a zero that an underflow may have made, go to the sandbox, so both paths print the same.
def _subnormal(value: int | float) -> bool:
    """From the bits (a comparison would see zero under DAZ): exponent field 0, mantissa not."""
    if type(value) is not float:
        return False
    bits = struct.unpack("<Q", struct.pack("<d", value))[0]
    return (bits >> 52) & 0x7FF == 0 and bits & ((1 << 52) - 1) != 0


def _flushed_literal(code: str, node: ast.AST) -> bool:
    """A float literal that parsed to 0.0 although its digits are not all zero: a subnormal literal in a process
    that flushes them (the parse itself ends in float arithmetic), or one below the smallest subnormal."""
    if not (isinstance(node, ast.Constant) and type(node.value) is float and node.value == 0.0):
        return False
    text = (ast.get_source_segment(code, node) or "").lower()
    return any(digit in "123456789" for digit in text.split("e")[0])


def _may_have_underflowed(op: ast.operator, left: int | float, right: int | float, value: int | float) -> bool:
    """A float zero from nonzero operands that is not an exact cancellation (x - x, x + -x): FTZ may have made it.
    (Operands are never subnormal: `_evaluate` refuses those where they are made.)"""
    return (type(value) is float and value == 0.0 and left != 0 and right != 0
            and not ((isinstance(op, ast.Add) and left == -right) or (isinstance(op, ast.Sub) and left == right)))


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):  # not bool, complex or str
        value = node.value
    elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        value = _UNARY[type(node.op)](_evaluate(node.operand))
    elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)  # left first, as Python raises the first error
        if (isinstance(node.op, ast.Pow) and type(left) is int and type(right) is int and abs(left) > 1
                and (right > MAX_FAST_INT_BITS or right * math.log2(abs(left)) > MAX_FAST_INT_BITS)):
            raise _NotFast  # computing it could take minutes; the sandbox's limits cut it short
        value = _BINARY[type(node.op)](left, right)
        if _may_have_underflowed(node.op, left, right, value):
            raise _NotFast
    else:
        raise _NotFast
    if _subnormal(value):
        raise _NotFast
    if type(value) not in (int, float) or (type(value) is int and value.bit_length() > MAX_FAST_INT_BITS):
        raise _NotFast
    return value


# -------------------------------------------------------------------------------------------- sandbox


@dataclass(frozen=True)
class _Sandbox:
    options: tuple[str, ...]   # bwrap and its options
    command: tuple[str, ...]   # the interpreter, its flags and the launcher
    seccomp: bytes             # BPF program that bwrap installs right before it starts the command


def require_sandbox() -> _Sandbox:
    """The sandbox that `bwrap` on PATH gives, checked once per process and path; `SandboxUnavailable` when none."""
    sandbox = _sandbox(shutil.which("bwrap"))
    if isinstance(sandbox, str):
        raise SandboxUnavailable("execution match needs bubblewrap (apt-get install -y bubblewrap), or leave "
                                 f"`execution` out of the probe's metrics: refusing to run generated code unconfined "
                                 f"({sandbox})")
    return sandbox


@functools.cache
def _sandbox(bwrap: str | None) -> _Sandbox | str:
    """The sandbox around `bwrap` once it has run a snippet correctly, else why not (one line)."""
    if bwrap is None:
        return "no bwrap on PATH"
    try:
        seccomp = _seccomp_program(DENIED_SYSCALLS)
    except OSError as e:
        return f"libseccomp: {e}"
    interpreter = os.path.realpath(getattr(sys, "_base_executable", "") or sys.executable)  # not a venv's link
    sandbox = _Sandbox(tuple(_bwrap_options(bwrap, interpreter)), (interpreter, "-I", "-S", "-B", "-c", _LAUNCHER),
                       seccomp)
    check = _run_sandboxed(sandbox, "print(6 * 7)", SELF_CHECK_TIMEOUT_S)
    if not (check.ok and check.stdout == "42\n"):
        return f"{bwrap} failed its self-check: {check.error or repr(check.stdout)}"
    return sandbox


def _bwrap_options(bwrap: str, interpreter: str) -> list[str]:
    """Namespaces, identity and the file system the interpreter needs (read-only), nothing else."""
    options = [bwrap, "--unshare-all", "--unshare-user", "--uid", str(SANDBOX_ID), "--gid", str(SANDBOX_ID),
               "--cap-drop", "ALL", "--die-with-parent", "--new-session",
               "--tmpfs", "/tmp", "--dev", "/dev", "--chdir", "/tmp"]
    bound: list[str] = []
    for top in ("/usr", "/lib", "/lib64", "/lib32"):  # merged-/usr systems have links here, others directories
        if os.path.islink(top):
            options += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            options += ["--ro-bind", top, top]
            bound.append(top)
    if os.path.isfile("/etc/ld.so.cache"):
        options += ["--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    # the installation the interpreter runs from: a pyenv under /root, a conda prefix, or under /usr already
    for path in dict.fromkeys(os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix,
                                                               os.path.dirname(interpreter))):
        if not any(path == b or path.startswith(b + "/") for b in bound):
            options += ["--ro-bind", path, path]
            bound.append(path)
    return options


def _seccomp_program(denied: Sequence[str]) -> bytes:
    """A BPF filter under which the `denied` system calls fail with EPERM, built by libseccomp (which also
    kills calls made through another ABI, such as 32-bit `int 0x80`)."""
    lib = ctypes.CDLL(ctypes.util.find_library("seccomp") or "libseccomp.so.2")
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.c_void_p]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    allow, fail_eperm = 0x7FFF0000, 0x00050000 | errno.EPERM  # SCMP_ACT_ALLOW, SCMP_ACT_ERRNO(EPERM)
    ctx = lib.seccomp_init(allow)
    if not ctx:
        raise OSError("seccomp_init failed")
    try:
        for name in denied:
            number = lib.seccomp_syscall_resolve_name(name.encode())
            if number == -1:  # __NR_SCMP_ERROR: unknown to this libseccomp (clone3 in old ones)
                continue
            if (rc := lib.seccomp_rule_add_array(ctx, fail_eperm, number, 0, None)) < 0:
                raise OSError(-rc, f"seccomp_rule_add({name}): {os.strerror(-rc)}")
        with tempfile.TemporaryFile() as f:
            if (rc := lib.seccomp_export_bpf(ctx, f.fileno())) < 0:
                raise OSError(-rc, f"seccomp_export_bpf: {os.strerror(-rc)}")
            f.seek(0)
            return f.read()
    finally:
        lib.seccomp_release(ctx)


# The interpreter's first lines inside the sandbox (trusted): the limits bwrap cannot set, then the
# snippet in a fresh namespace. argv = [-c, cpu_s, address_bytes, code].
_LAUNCHER = """
import resource, sys
cpu_s, address_bytes, code = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
for limit, value in ((resource.RLIMIT_CPU, cpu_s), (resource.RLIMIT_AS, address_bytes), (resource.RLIMIT_FSIZE, 0),
                     (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(limit, (value, value))
sys.argv = ["-c"]
exec(compile(code, "<snippet>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
"""


def run_code(code: str, *, timeout_s: float = 2.0, check: bool = True, fast: bool = True) -> ExecResult:
    """One snippet: refused by `check_code` (when `check`), answered by `arithmetic_print` (when `fast`), else run
    in the sandbox; its stdout and whether it succeeded. Raises `SandboxUnavailable` without a sandbox, whatever
    the snippet, so that whether execution match runs does not depend on what the model wrote."""
    sandbox = require_sandbox()
    if check and (reason := check_code(code)) is not None:
        return ExecResult(False, "", f"refused: {reason}")
    if fast and (result := arithmetic_print(code)) is not None:
        return result
    return _run_sandboxed(sandbox, code, timeout_s)


def _run_sandboxed(sandbox: _Sandbox, code: str, timeout_s: float) -> ExecResult:
    read_fd, write_fd = os.pipe()
    try:
        os.write(write_fd, sandbox.seccomp)  # a few hundred bytes: within the pipe's buffer
    finally:
        os.close(write_fd)
    cpu_s = max(1, int(timeout_s + 0.999))
    try:
        proc = subprocess.Popen(
            [*sandbox.options, "--seccomp", str(read_fd), *sandbox.command, str(cpu_s), str(ADDRESS_SPACE_BYTES), code],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={}, start_new_session=True,
            pass_fds=(read_fd,))
    finally:
        os.close(read_fd)
    stdout, stderr, why = _collect(proc, timeout_s)
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


def run_many(codes: Sequence[str], *, timeout_s: float = 2.0, num_workers: int | None = None,
             fast: bool = True) -> list[ExecResult]:
    """run_code over many snippets, each distinct snippet once, several sandboxes at a time."""
    require_sandbox()  # raised here rather than from a worker thread, before anything runs
    unique = list(dict.fromkeys(codes))
    workers = num_workers or max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = dict(zip(unique, pool.map(lambda c: run_code(c, timeout_s=timeout_s, fast=fast), unique)))
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
