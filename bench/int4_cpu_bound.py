"""Is torch's int4 CPU kernel bound by memory or by arithmetic at one row? Times the raw
`_weight_int4pack_mm_for_cpu` call on the default model's layer shapes (as the serving runner
calls them: q/k/v and gate/up fused; kernel groups of 64, as K = 576 g128 runs) at 1 and 2
threads, against a read of the same packed bytes (`torch.sum` over them) in the same run:

    .venv/bin/python bench/int4_cpu_bound.py

A memory-bound kernel gains little from a second thread and reads near the `sum`'s rate; an
arithmetic-bound one gains about 2x and reads well below it. Where bitserve's own kernel
(kernels/cpu_gemv.c) builds, it is timed in the same rounds on the same codes (fp32 x, its own
layout of the same bytes), as the last columns.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable

import torch
from kernels_cpu import SHAPES, interleaved  # bench/ is on the path when run as a script

from bitserve.kernels import cpu_native

LAYERS = ("q/o_proj", "q/k/v fused", "gate/up fused", "down", "lm_head")  # as the runner calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--group", type=int, default=64, choices=(32, 64), help="kernel group size")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    lib = cpu_native.library()
    print(
        "| layer | K x N | MB | 1 thread us | 2 threads us | 1 / 2 threads | kernel GB/s"
        " | read GB/s (sum, 2 threads) | kernel / read"
        + (" | ours, 2 threads us | ours GB/s | ours / read |" if lib else " |")
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if lib else ""))
    for name, k, n in (shape for shape in SHAPES if shape[0] in LAYERS):
        codes = torch.randint(0, 16, (n, k), dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        sz = torch.randn(k // args.group, n, 2).to(torch.bfloat16)
        x = torch.randn(1, k).to(torch.bfloat16)
        words = torch.randn(k * n // 8)  # as many bytes as the packed weight
        kernel = functools.partial(
            torch.ops.aten._weight_int4pack_mm_for_cpu, x, packed, args.group, sz
        )
        torch.set_num_threads(1)
        (one,) = interleaved([kernel], args.rounds)
        fns: list[Callable[[], object]] = [kernel, words.sum]
        if lib:
            groups = -(-k // args.group)
            ours = cpu_native.pack(
                lib, codes.t().to(torch.uint8), torch.rand(groups, n), torch.rand(groups, n), 4
            )
            fns.append(functools.partial(cpu_native.matmul, lib, ours, x.float(), args.group))
        torch.set_num_threads(2)
        two, read, *own = interleaved(fns, args.rounds)
        mb = k * n / 2 / 1e6
        cells = "".join(f" {t * 1e6:.0f} | {mb / 1e3 / t:.1f} | {read / t:.2f} |" for t in own)
        print(
            f"| {name} | {k}x{n} | {mb:.2f} | {one * 1e6:.0f} | {two * 1e6:.0f} | {one / two:.2f}x"
            f" | {mb / 1e3 / two:.1f} | {mb / 1e3 / read:.1f} | {read / two:.2f} |{cells}",
            flush=True,
        )


if __name__ == "__main__":
    main()
