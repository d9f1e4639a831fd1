"""ZeRO-3 models born partitioned (`zero3.build_partitioned`) and loaded partitioned (`zero3.load_state_partitioned`).

Two CPU ranks; the checks themselves are in tests/dist_zero_init.py.
"""

from __future__ import annotations

import pytest

from distributed import torchrun

pytestmark = pytest.mark.multiproc


def test_born_partitioned_model_equals_a_one_process_build_trains_the_same_and_loads_checkpoints(tmp_path, capsys):
    result = torchrun("tests/dist_zero_init.py", str(tmp_path), timeout_s=300)
    lines = [line for line in result.stdout.splitlines() if line.startswith("ok ")]
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    parts = [line.split(":")[0] for line in lines]
    assert parts == ["ok fp32", "ok bf16", "ok engine fp32", "ok engine bf16", "ok load"], result.stdout[-3000:]
