"""Peak RSS while loading a packed checkpoint, against the checkpoint's size and the bytes of
the loaded model's tensors (the runtime buffers), plus the seconds the load and the serving
runner's start (fusing q/k/v and gate/up) take, and the tensors left once the runner has taken
the model over (KV cache excluded). Each load runs in a fresh process.

    python bench/load_memory.py checkpoints/rtn-w4g128 [models/SmolLM2-135M-Instruct]
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, threading, time, psutil, torch
from bitserve.models import load_model
proc = psutil.Process()
peak = [0]
def sample():
    while True:
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.001)
threading.Thread(target=sample, daemon=True).start()
time.sleep(0.05)
before = proc.memory_info().rss
peak[0] = before
t0 = time.perf_counter()
loaded = load_model(sys.argv[1])
load_s = time.perf_counter() - t0
time.sleep(0.05)
model = loaded.model
def tensor_bytes():
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    for m in model.modules():
        for t in getattr(m, "prepared", {}).values():
            tensors[id(t)] = t
    return sum(t.numel() * t.element_size() for t in tensors.values())
runtime = tensor_bytes()
after = proc.memory_info().rss
from bitserve.server.runner import LlamaRunner
t0 = time.perf_counter()
LlamaRunner(model, 1, 64)
runner_s = time.perf_counter() - t0
print(json.dumps({"before": before, "peak": peak[0], "after": after, "runtime_bytes": runtime,
                  "served_bytes": tensor_bytes(), "load_s": load_s, "runner_s": runner_s}))
"""


def measure(path: str) -> dict[str, float]:
    """Load `path` in a child process and return its memory figures in MiB."""
    out = subprocess.run(
        [sys.executable, "-c", CHILD, path], capture_output=True, text=True, check=True
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    files = [p for p in Path(path).iterdir() if p.suffix == ".safetensors"]
    mib = 2**20
    return {
        "file_mib": sum(p.stat().st_size for p in files) / mib,
        "runtime_mib": r["runtime_bytes"] / mib,
        "served_mib": r["served_bytes"] / mib,
        "peak_delta_mib": (r["peak"] - r["before"]) / mib,
        "after_delta_mib": (r["after"] - r["before"]) / mib,
        "load_s": r["load_s"],
        "runner_s": r["runner_s"],
    }


def main() -> None:
    print(
        "| model | safetensors MiB | loaded tensors MiB | peak RSS increase MiB "
        "| peak / (file + tensors) | load s | runner start s | tensors once served MiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for path in sys.argv[1:]:
        m = measure(path)
        ratio = m["peak_delta_mib"] / (m["file_mib"] + m["runtime_mib"])
        print(
            f"| {path} | {m['file_mib']:.0f} | {m['runtime_mib']:.0f} | {m['peak_delta_mib']:.0f} "
            f"| {ratio:.2f} | {m['load_s']:.1f} | {m['runner_s']:.1f} | {m['served_mib']:.0f} |"
        )


if __name__ == "__main__":
    main()
