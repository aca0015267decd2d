"""Is torch's int4 CPU kernel bound by memory or by arithmetic at one row? Times the raw
`_weight_int4pack_mm_for_cpu` call on the default model's layer shapes (as the serving runner
calls them: q/k/v and gate/up fused; kernel groups of 64, as K = 576 g128 runs) at 1 and 2
threads, against a read of the same packed bytes (`torch.sum` over them) in the same run:

    .venv/bin/python bench/int4_cpu_bound.py

A memory-bound kernel gains little from a second thread and reads near the `sum`'s rate; an
arithmetic-bound one gains about 2x and reads well below it.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import torch

SHAPES = {  # layer: (K, N)
    "q/k/v fused": (576, 960),
    "o_proj": (576, 576),
    "gate/up fused": (576, 3072),
    "down": (1536, 576),
    "lm_head": (576, 49152),
}


def _time_us(fn: Callable[[], object], rounds: int, calls: int) -> float:
    """Median over `rounds` of the mean time of `calls` back-to-back calls, in microseconds."""
    for _ in range(calls // 4 + 1):
        fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--group", type=int, default=64, help="kernel group size (32/64/128/256)")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(
        "| layer | K x N | MB | 1 thread us | 2 threads us | 1 / 2 threads | kernel GB/s"
        " | read GB/s (sum, 2 threads) | kernel / read |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, (k, n) in SHAPES.items():
        codes = torch.randint(0, 16, (n, k), dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        sz = torch.randn(k // args.group, n, 2).to(torch.bfloat16)
        x = torch.randn(1, k).to(torch.bfloat16)
        words = torch.randn(k * n // 8)  # as many bytes as the packed weight
        calls = max(4, int(2e5 // (k * n // 1000)))
        kernel = functools.partial(
            torch.ops.aten._weight_int4pack_mm_for_cpu, x, packed, args.group, sz
        )

        us = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            us[threads] = _time_us(kernel, args.rounds, calls)
        read = _time_us(words.sum, args.rounds, calls)
        mb = k * n / 2 / 1e6
        print(
            f"| {name} | {k}x{n} | {mb:.2f} | {us[1]:.0f} | {us[2]:.0f} | {us[1] / us[2]:.2f}x |"
            f" {mb * 1e3 / us[2]:.1f} | {mb * 1e3 / read:.1f} | {read / us[2]:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
