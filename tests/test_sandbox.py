"""Execution match's OS sandbox (probes/metrics.py): the escapes of issue 11 run through the real bubblewrap
sandbox and have no effect outside it; the arithmetic fast path prints what the interpreter prints; without a
working bwrap, execution match is refused with one line.

The escapes skip `check_code` (check=False) so that the OS layer is what is tested, and reach `os` the three
ways the allowlist let through. What they aim at is open to any uid (a 1777 directory under /tmp, a
world-readable secret, a loopback listener), so the sandbox is the only thing in the way: against the previous
runner (rlimits and `nobody`, no namespaces) these tests fail. Never run these snippets unconfined as root
(outside this file's guard): `os.kill(-1, 9)` there kills every process of the machine.
"""

from __future__ import annotations

import json
import random
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest
import torch

from omni_train.data import demo
from omni_train.probes.metrics import (SandboxUnavailable, arithmetic_print, check_code, execution_matches, run_code,
                                       run_many)

REPO = Path(__file__).resolve().parents[1]
ROUTES = {  # each leaves `os` in the snippet's namespace
    "statistics.sys.modules": "import statistics\nos = statistics.sys.modules['os']\n",
    "operator.attrgetter": "import operator\nos = operator.attrgetter('__import__')(__builtins__)('os')\n",
    "string.Formatter": "import string\nos = string.Formatter().get_field('0.__import__', [__builtins__], {})[0]('os')\n",
}
TRY = "try:\n    {}\n    print('done')\nexcept OSError as e:\n    print(type(e).__name__)\n"  # one attempt, one line


@pytest.fixture
def exposed():
    """A directory any uid may enter, write and read (unlike tmp_path's 0700 parents)."""
    path = Path(tempfile.mkdtemp(prefix="omni_sandbox_test_"))
    path.chmod(0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def escape(route: str, *attempts: str, timeout_s: float = 5.0):
    result = run_code(ROUTES[route] + "".join(TRY.format(a) for a in attempts), check=False, timeout_s=timeout_s)
    return result, result.stdout.splitlines()


@pytest.mark.parametrize("route", ROUTES)
def test_routes_reach_os_but_only_as_nobody_without_processes(route):
    result, lines = escape(route, "print(os.getuid(), os.getgid())", "os.fork()", "os.setuid(0)")
    assert lines[:3] == ["65534 65534", "done", "PermissionError"], result  # ids dropped, no new process (seccomp)
    assert lines[3] != "done", result  # no way back to root (uid 0 is not even mapped in the sandbox)
    assert check_code(ROUTES["statistics.sys.modules"] + "os.kill(-1, 9)") is None  # why the allowlist is no boundary


@pytest.mark.parametrize("route", ROUTES)
def test_files_and_directories_outside_stay_untouched(route, exposed):
    target = exposed / "from_sandbox"
    in_repo = REPO / f"made_by_{exposed.name}"
    result, lines = escape(route, f"os.makedirs({str(target)!r})",
                           f"os.close(os.open({str(exposed / 'file')!r}, os.O_CREAT | os.O_WRONLY, 0o644))",
                           f"os.makedirs({str(in_repo)!r})", f"os.rename({str(exposed)!r}, {str(exposed) + '.moved'!r})")
    assert result.ok and len(lines) == 4, result
    assert list(exposed.iterdir()) == [] and not in_repo.exists() and exposed.exists()


@pytest.mark.parametrize("route", ROUTES)
def test_execv_runs_a_program_that_reaches_nothing(route, exposed):
    marker = exposed / "touched"
    result, _ = escape(route, f"os.execv('/usr/bin/touch', ['touch', {str(marker)!r}])")
    assert not marker.exists()
    assert not result.ok and "touch" in result.error, result  # touch ran, inside the sandbox
    who = run_code(ROUTES[route] + "os.execv('/usr/bin/id', ['id'])", check=False)
    assert who.ok and who.stdout.startswith("uid=65534"), who  # a program started this way keeps the dropped ids


@pytest.mark.parametrize("route", ROUTES)
def test_no_connection_reaches_a_loopback_listener(route):
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        result, lines = escape(route, "sock = os.sys.modules['builtins'].__import__('socket')",
                               f"sock.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'x')")
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):  # nothing waiting to be accepted
            listener.accept()
    assert result.ok and lines[0] == "done" and lines[1] != "done", result


@pytest.mark.parametrize("route", ROUTES)
def test_a_secret_file_cannot_be_read(route, exposed, tmp_path):
    secret = f"secret-{random.getrandbits(64):x}"
    for path in (exposed / "secret.txt", tmp_path / "secret.txt"):
        path.write_text(secret)
        path.chmod(0o644)
        result, lines = escape(route, f"print(os.read(os.open({str(path)!r}, os.O_RDONLY), 100).decode())")
        assert result.ok and lines == ["FileNotFoundError"] and secret not in result.stdout, result


def test_kill_everything_leaves_sibling_snippets_intact():
    sleeper = "import statistics\nstatistics.sys.modules['time'].sleep(1.5)\nprint({})"
    # passes check_code, as run_many asks. The pid guard keeps a broken sandbox from killing every process of
    # the machine: unconfined and root, kill(-1, 9) does exactly that.
    killer = ROUTES["statistics.sys.modules"] + (
        "os.sys.modules['time'].sleep(0.3)\n"
        "if os.getpid() > 2:\n    print('not in a PID namespace of its own: not killing')\n"
        "else:\n    try:\n        os.kill(-1, 9)\n    except ProcessLookupError:\n        print('alone')\n")
    codes = [sleeper.format(i) for i in range(3)] + [killer] + [sleeper.format(i) for i in range(3, 6)]
    results = run_many(codes, timeout_s=20.0, num_workers=len(codes))
    siblings = results[:3] + results[4:]
    assert [(r.ok, r.stdout) for r in siblings] == [(True, f"{i}\n") for i in range(6)], results
    assert results[3].stdout == "alone\n", results[3]  # nothing else to signal in its own PID namespace


def test_timeout_ends_everything_the_snippet_started():
    seconds = f"{random.randint(1000, 9999)}.{random.randint(10, 99)}"
    result = run_code(f"import statistics\nstatistics.sys.modules['os'].execv('/usr/bin/sleep', ['sleep', '{seconds}'])",
                      timeout_s=1.0)
    assert result.error.startswith("timeout"), result
    deadline = time.monotonic() + 5.0
    while _processes_with(seconds) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _processes_with(seconds)


def _processes_with(argument: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if argument.encode() in cmdline.read_bytes().split(b"\0"):
                found.append(cmdline.parent.name)
        except OSError:  # the process ended while we looked
            pass
    return found


# ------------------------------------------------------------------------------------------ fast path


EDGE_CASES = ["print(1 / 0)", "print(5 // (3 - 3))", "print(2 % 0)", "print(0 ** -1)", "print(0.0 ** -1)",
              "print(10.0 ** 400)", "print(1e308 * 10)", "print(-1e308 * 10 - 1e308 * 10)", "print(2 ** 1023)",
              "print(2 ** 1024)", "print(-2 ** 0.5)", "print((-2) ** 0.5)", "print(0.1 + 0.2)", "print(-0.0)",
              "print(7 // -2, -7 % 3, 7.5 // 2, -7.5 % 2)", "print()", "print(1e16, 1e-5, 123456789012345678.0)",
              "print(2 ** -1074, 2 ** -1075)", "print(10 ** 300 / 10 ** 299)", "print(10 ** 308 * 10 ** 10 / 3)",
              "print(3 + +-4 - -(5))", "print((((((1))))))", "print(1_000 * 0x10)", "print(True + 1)", "print('a')",
              "print(3 + 5", "x = 3\nprint(x)", "print(3, sep='-')", "print(5e-324 * 1)",
              "print(2.2250738585072014e-308 - 2.2250738585072009e-308)", "print(1e-200 * 1e-200)",
              "print(1e-300 / 1e300)", "print(0.5 - 0.5, 1.5 + -1.5, 0.0 * 3.5)", "print(1e-400, 0e5, 0.000)"]


def random_expression(rng: random.Random, depth: int = 0) -> str:
    if depth > 2 or rng.random() < 0.3:
        return rng.choice([str(rng.randint(0, 99)), str(rng.randint(0, 9)), f"{rng.uniform(0, 100):.{rng.randint(0, 3)}f}",
                           repr(rng.uniform(-1e3, 1e3)), f"{rng.randint(1, 9)}e{rng.randint(-20, 20)}", "0", "0.0"])
    op = rng.choice(["+", "-", "*", "/", "//", "%", "**"])
    left, right = random_expression(rng, depth + 1), random_expression(rng, depth + 1)
    if op == "**" and rng.random() < 0.5:
        right = str(rng.randint(0, 60))
    text = f"{left} {op} {right}"
    return rng.choice([text, f"({text})", f"-({text})", f"-{text}"])


@pytest.mark.parametrize("flush_denormal", [False, True], ids=["plain", "trainer-flushes-subnormals"])
def test_fast_path_prints_what_the_sandbox_prints(flush_denormal):
    """Also in a process that flushes subnormal floats to zero, as every training rank on a CPU does
    (engine.init_distributed): the sandbox's fresh interpreter does not, so the fast path must leave
    whatever that could change to the sandbox."""
    import torch

    plan = demo.plan_corpus(demo.demo_config("tiny"))
    targets = sorted({s.target() for split in plan.values() for s in split if demo.TASKS[s.task][2] == "code"})
    rng = random.Random(0)
    generated = [f"print({random_expression(rng)})" for _ in range(160)]
    codes = targets + generated + EDGE_CASES
    torch.set_flush_denormal(flush_denormal)
    try:
        fast = [arithmetic_print(code) for code in codes]
    finally:
        torch.set_flush_denormal(False)
    assert all(f is not None for f in fast[:len(targets)])  # every demo target takes the fast path
    answered = [(code, f) for code, f in zip(codes, fast) if f is not None]
    assert len(answered) > 0.9 * (len(targets) + len(generated))
    assert not any(f.ok for code, f in answered if code in EDGE_CASES[:6])  # division by zero, overflow: mismatches
    declined = {"print(2 ** 1024)", "print((-2) ** 0.5)", "print(10 ** 308 * 10 ** 10 / 3)", "print(True + 1)",
                "print('a')", "print(3 + 5", "x = 3\nprint(x)", "print(3, sep='-')",
                # subnormal floats and zeros from underflow: what FTZ/DAZ would change
                "print(2 ** -1074, 2 ** -1075)", "print(5e-324 * 1)", "print(2.2250738585072014e-308 - 2.2250738585072009e-308)",
                "print(1e-200 * 1e-200)", "print(1e-300 / 1e300)", "print(1e-400, 0e5, 0.000)"}
    assert {code for code, f in zip(codes, fast) if f is None and code in EDGE_CASES} == declined
    sandboxed = run_many([code for code, _ in answered], timeout_s=10.0, fast=False)
    assert [(f.ok, f.stdout) for _, f in answered] == [(s.ok, s.stdout) for s in sandboxed]


def test_huge_powers_are_left_to_the_sandbox_and_its_limits():
    start = time.perf_counter()
    assert arithmetic_print("print(9 ** 9 ** 9)") is None and arithmetic_print("print(2 ** 10 ** 10 % 7)") is None
    assert time.perf_counter() - start < 0.1
    assert not run_code("print(9 ** 9 ** 9)", timeout_s=1.0).ok


# ------------------------------------------------------------------------------------- no sandbox, no run


@pytest.mark.parametrize("bwrap,reason", [(None, "no bwrap on PATH"),
                                          ("echo 'bwrap: No permissions to create new namespace' >&2; exit 1",
                                           "failed its self-check: exit status 1: bwrap: No permissions")])
def test_without_a_working_bwrap_execution_match_is_refused_with_one_line(bwrap, reason, tmp_path, monkeypatch):
    (tmp_path / "bin").mkdir()
    if bwrap is not None:  # a bwrap that cannot start a sandbox, as where user namespaces are off
        (tmp_path / "bin" / "bwrap").write_text(f"#!/bin/sh\n{bwrap}\n")
        (tmp_path / "bin" / "bwrap").chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    for attempt in (lambda: execution_matches(["print(3 + 5)"], ["print(8)"]), lambda: run_code("print(1)")):
        with pytest.raises(SandboxUnavailable) as error:
            attempt()
        message = str(error.value)
        assert message.startswith("execution match needs bubblewrap (apt-get install -y bubblewrap)") and "\n" not in message
        assert "refusing to run generated code unconfined" in message and reason in message, message


def test_a_code_probe_stops_before_generating_unless_execution_is_left_out(tmp_path, monkeypatch):
    from omni_train.cli import main
    from omni_train.data.pipeline import DataConfig
    from omni_train.data.text import Tokenizer
    from omni_train.model.backbone import BackboneConfig
    from omni_train.model.omni import OmniConfig, OmniModel
    from omni_train.probes import ProbeConfig, run_probes
    from omni_train.train.engine import Dist

    entries = [{"messages": [{"role": "user", "content": f"{x}\nWrite the code."}, {"role": "assistant", "content": y}],
                "meta": {"task": "text2code", "language": "en"}} for x, y in (("3 plus 5", "print(3 + 5)"),
                                                                              ("7 minus 2", "print(7 - 2)"))]
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    assert main(["shards", "build", "--manifest", str(tmp_path / "manifest.jsonl"), "--media-root", str(tmp_path),
                 "--out", str(tmp_path / "shards")]) == 0
    tokenizer = Tokenizer.byte_level()
    torch.manual_seed(0)
    model = OmniModel(OmniConfig(backbone=BackboneConfig(vocab_size=tokenizer.vocab_size, dim=32, num_layers=1,
                                                         num_heads=2, num_kv_heads=1, ffn_dim=64)))
    shards = str(tmp_path / "shards" / "train-*.tar")
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap there
    run = lambda probe: run_probes(model, [probe], data_cfg=DataConfig(), tokenizer=tokenizer,  # noqa: E731
                                   dist=Dist(0, 1, 0, torch.device("cpu"), None), step=0, output_dir=tmp_path / "run")
    with pytest.raises(SandboxUnavailable):
        run(ProbeConfig(name="code", shards=shards, max_new_tokens=4))
    assert not (tmp_path / "run" / "probes.jsonl").exists()
    rows = run(ProbeConfig(name="code", shards=shards, max_new_tokens=4, metrics=["exact"]))
    assert {(r["task"], r["metric"]) for r in rows} >= {("text2code", "exact")}
    assert not any(r["metric"] == "execution" for r in rows)
