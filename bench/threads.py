"""A CPU decode step's time by which threads loaded the model and which one steps it: why
`bitserve serve` loads on a short-lived thread (docs/serving.md, "Threads"). One mode per
process, since torch's OpenMP thread teams live as long as their threads:

    for m in main server-now load-thread; do OMP_NUM_THREADS=2 .venv/bin/python bench/threads.py $m; done

- main: load and step on the main thread;
- server-now: load on the main thread, step on another (the server before the fix);
- load-thread: load on a thread that exits, step on another (the server now).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

MODES = ("main", "server-now", "load-thread")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=MODES)
    ap.add_argument("--checkpoint", default="checkpoints/rtn-w4g128")
    ap.add_argument("--steps", type=int, default=80)
    args = ap.parse_args()
    box: dict[str, Any] = {}

    def load() -> None:
        from bitserve.models import load_model
        from bitserve.server.runner import LlamaRunner

        runner = LlamaRunner(load_model(args.checkpoint).model, 1, 512, torch.bfloat16)
        runner.forward(torch.randint(0, 1000, (1, 30)), torch.tensor([0]), torch.tensor([0]))
        box["runner"] = runner

    def steps() -> None:
        runner, slot, times = box["runner"], torch.tensor([0]), []
        for i in range(args.steps):
            t0 = time.perf_counter()
            runner.forward(torch.ones(1, 1, dtype=torch.long), slot, torch.tensor([30 + i]))
            times.append(time.perf_counter() - t0)
        box["ms"] = statistics.median(times) * 1e3

    def on_thread(fn: Callable[[], None]) -> None:
        thread = threading.Thread(target=fn)
        thread.start()
        thread.join()

    if args.mode == "load-thread":
        on_thread(load)
    else:
        load()
    if args.mode == "main":
        steps()
    else:
        on_thread(steps)
    print(f"{args.mode}: decode step {box['ms']:.2f} ms (median of {args.steps})")


if __name__ == "__main__":
    main()
