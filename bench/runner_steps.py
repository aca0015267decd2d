"""The serving runner's step times against another version of server/runner.py, or of the C
kernels (`--kernel REV`: kernels/cpu_*.c as of git revision REV), interleaved in one process
(the VM's noise is larger than the changes it checks): decode steps of 1, 4 and 16 rows of
other lengths (20-200 positions, or --context each), and prefills of 1 x 200, 8 x 8-30 and
4 x 30-59 tokens (right-padded).

    git show bbb33a6:server/runner.py > /tmp/runner_base.py
    OMP_NUM_THREADS=2 .venv/bin/python bench/runner_steps.py /tmp/runner_base.py \
        [--checkpoint checkpoints/rtn-w4g128] [--context 1000 --batches 1 4] [--long 1536]
    OMP_NUM_THREADS=2 .venv/bin/python bench/runner_steps.py --kernel 15bf9d9
    OMP_NUM_THREADS=2 .venv/bin/python bench/runner_steps.py --kv-dtype float16 --context 2000
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from kernels_cpu import with_library  # bench/, the script's own folder

from bitserve.kernels import cpu_native
from bitserve.models import load_model
from bitserve.server import runner as current


def load_module(path: str) -> Any:
    spec = importlib.util.spec_from_file_location("runner_base", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["runner_base"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def kernel_at(rev: str) -> cpu_native.Library:
    """The C kernels as of git revision `rev`, built as `cpu_native.build` builds the current
    ones (a library of its own: the cache key is the sources)."""
    saved, tmp = cpu_native.SOURCES, Path(tempfile.mkdtemp())
    for src in saved:
        got = subprocess.run(["git", "show", f"{rev}:kernels/{src.name}"], capture_output=True)
        if got.returncode:
            sys.exit(f"--kernel {rev}: no kernels/{src.name} at that revision in this checkout")
        (tmp / src.name).write_bytes(got.stdout)
    cpu_native.SOURCES = [tmp / src.name for src in saved]
    try:
        lib = cpu_native.build()
    finally:
        cpu_native.SOURCES = saved
    if lib is None:
        sys.exit(f"the kernels of {rev} do not build here")
    return lib


LIBS: dict[str, cpu_native.Library] = {}  # the runners' kernels, where not this checkout's


def kernel(lib: cpu_native.Library | None) -> contextlib.AbstractContextManager[None]:
    """Inside, `lib` is this machine's kernel (None: this checkout's, unchanged)."""
    return contextlib.nullcontext() if lib is None else with_library(lib)


def median_ms(runners: dict[str, Any], call: Any, reps: int) -> dict[str, float]:
    """Median time of call(runner) per runner, the runners alternated call by call (each with
    its own kernel: a layer of many rows looks the kernel up at every call)."""
    times: dict[str, list[float]] = {k: [] for k in runners}
    for i in range(reps):
        for k, r in runners.items():
            with kernel(LIBS.get(k)):
                t0 = time.perf_counter()
                call(r, i)
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("baseline", nargs="?", help="another server/runner.py (e.g. from `git show`)")
    ap.add_argument("--kernel", metavar="REV", help="the baseline's C kernels: those of REV")
    ap.add_argument(
        "--kv-dtype",
        choices=["float32", "float16"],
        help="the current runner's K/V cache (the baseline keeps the model's fp32)",
    )
    ap.add_argument("--checkpoint", default="checkpoints/rtn-w4g128")
    ap.add_argument("--context", type=int, default=0, help="positions each decode row attends to")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16], help="decode rows")
    ap.add_argument(
        "--long",
        type=int,
        default=0,
        help="also prefill one prompt of this many tokens, "
        "in chunks of 256 (as `serve` does), each chunk timed",
    )
    args = ap.parse_args()
    if not 0 <= args.context <= 8192 or not all(1 <= b <= 16 for b in args.batches):
        ap.error("--context takes 0-8192 positions, --batches 1-16 rows")
    if not 0 <= args.long <= 8192:
        ap.error("--long takes 0-8192 tokens")
    if not args.baseline and not args.kernel and not args.kv_dtype:
        ap.error("give a baseline runner, --kernel REV, --kv-dtype, or some of them")
    base = load_module(args.baseline) if args.baseline else current
    if args.kernel:
        LIBS["baseline"] = kernel_at(args.kernel)
    max_len = max(512, args.context + 128, args.long)
    runners = {}
    for k, m in (("baseline", base), ("current", current)):
        with kernel(LIBS.get(k)):
            model = load_model(args.checkpoint).model
            kv = (
                {"kv_dtype": getattr(torch, args.kv_dtype)}
                if args.kv_dtype and k == "current"
                else {}
            )
            runners[k] = m.LlamaRunner(model, 16, max_len, torch.bfloat16, **kv)
    g = torch.Generator().manual_seed(0)
    print("| step | baseline ms | current ms | baseline / current |")
    print("|---|---|---|---|")
    for b, lo, hi in ((1, 200, 200), (8, 8, 30), (4, 30, 59)):
        lens = torch.randint(lo, hi + 1, (b,), generator=g)
        ids = torch.randint(0, 1000, (b, int(lens.max())), generator=g)
        pre = (ids, torch.arange(b), torch.zeros(b, dtype=torch.long), lens - 1)
        m = median_ms(runners, lambda r, i, pre=pre: r.forward(*pre), 7)
        ratio = m["baseline"] / m["current"]
        print(
            f"| prefill {b} x {lo}-{hi} | {m['baseline']:.0f} | {m['current']:.0f} | {ratio:.2f}x |"
        )
    prompt = torch.randint(0, 1000, (1, args.long), generator=g)
    for start in range(0, args.long, 256):
        chunk = (prompt[:, start : start + 256], torch.tensor([0]), torch.tensor([start]))
        m = median_ms(runners, lambda r, i, c=chunk: r.forward(*c), 3)
        ratio = m["baseline"] / m["current"]
        span = f"{start}-{min(start + 256, args.long)}"
        print(f"| prompt chunk {span} | {m['baseline']:.0f} | {m['current']:.0f} | {ratio:.2f}x |")
    for b in args.batches:
        lens = torch.randint(20, 200, (b,), generator=g)
        if args.context:
            lens = torch.full((b,), args.context)
        ids = torch.randint(0, 1000, (b, int(lens.max())), generator=g)
        for k, r in runners.items():
            with kernel(LIBS.get(k)):
                r.forward(ids, torch.arange(b), torch.zeros(b, dtype=torch.long), lens - 1)
        nxt = torch.ones(b, 1, dtype=torch.long)
        a = (nxt, torch.arange(b), lens)
        m = median_ms(runners, lambda r, i, a=a: r.forward(a[0], a[1], a[2] + i), 60)
        ratio = m["baseline"] / m["current"]
        at = f", {args.context} positions" if args.context else ""
        print(f"| decode {b} rows{at} | {m['baseline']:.1f} | {m['current']:.1f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
