"""The GPU machine's serve check (`bench/gpu_serve_check.py`), run here with `--device cpu`: a
GPU session has minutes, so the script it runs must not fail for reasons a CPU can show (the
quantize step, server start-up, the requests, the checks themselves)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_serve_check_passes_on_the_cpu(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_serve_check.py"), "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    lines = done.stdout.splitlines()
    assert lines[-1] == "serve check: PASS"
    assert "greedy text, cpu vs reference backend: same" in lines
    assert sum("seeded top-p:" in line and "again: same" in line for line in lines) == 2
