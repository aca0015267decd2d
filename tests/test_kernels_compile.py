"""Every Triton kernel variant compiles for Hopper (sm_90) and Ampere (sm_80) GPUs with Triton's
own ptxas, on a machine without one: the interpreter tests check what the kernels compute, this
checks what only the GPU compiler sees (inline PTX, types, layouts)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


def test_every_kernel_compiles_for_sm90() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "0"}  # the compiler, not the interpreter
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "compile_check.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    lines = done.stdout.splitlines()
    m = re.fullmatch(r"(\d+)/(\d+) kernels compiled \(sm_90, sm_80\)", lines[-1])
    assert m and m.group(1) == m.group(2) and int(m.group(1)) >= 40, lines[-1]
    for arch in (90, 80):
        for name in ("gemv lop3-pf W4", "dot-kjoin-lop3 M16", "decode attention (splits)"):
            assert any(line.startswith(f"ok   sm_{arch} {name}:") for line in lines), name
