"""Instructions per packed weight word in the main loop of the M = 1 GEMV's variants and of the
dot kernel's (BLOCK_M 16 by default), without a GPU: compiles `_gemv_kernel` / `_dot_kernel` for
sm_90 with Triton's own ptxas (`compile_check.py`), disassembles them with nvdisasm and counts
the SASS of the loop over K-blocks. Small-M
matmuls are bound by instruction issue as much as by memory: at the 4.2 TB/s measured on an
H200 an SM has about 31 issue slots per 4-byte word.

    python bench/sass_count.py [--variants plain lop3 dot-kjoin-lop3] [--tiles 128x128]
        [--block-m 16] [--warps 4] [--top 5]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

import mma_gemv
import triton
from compile_check import DOT_VARIANTS, matmul_kernel


def _tool(name: str, cubin: bytes, *flags: str) -> str:
    """Output of Triton's bundled CUDA binary tool `name` run on `cubin`."""
    path = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin", name)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([path, *flags, f.name], capture_output=True, text=True).stdout


def registers(cubin: bytes) -> int:
    """Registers per thread (cuobjdump's resource usage): with 4 warps, 65536 / (128 x this)
    programs fit an SM."""
    m = re.search(r"REG:(\d+)", _tool("cuobjdump", cubin, "--dump-resource-usage"))
    return int(m.group(1)) if m else -1


def loop_counts(cubin: bytes) -> collections.Counter[str]:
    """Opcode counts of the largest backward-branch loop in the disassembly."""
    sass = _tool("nvdisasm", cubin, "-c")
    labels: dict[str, int] = {}
    code: list[tuple[int, str]] = []
    pending = None
    for line in sass.splitlines():
        if m := re.match(r"\s*\.L_x_(\d+):", line):
            pending = m.group(1)
        elif m := re.match(r"\s+/\*([0-9a-f]+)\*/\s+(.*?);", line):
            addr = int(m.group(1), 16)
            code.append((addr, m.group(2)))
            if pending is not None:
                labels[pending], pending = addr, None
    loops = []
    for addr, ins in code:
        m = re.search(r"BRA\s+`\(\.L_x_(\d+)\)", ins)
        if m and labels.get(m.group(1), addr) < addr:
            loops.append((labels[m.group(1)], addr))
    start, end = max(loops, key=lambda se: se[1] - se[0])
    ops = (re.sub(r"^@!?U?P\w+\s+", "", ins).split()[0] for a, ins in code if start <= a <= end)
    return collections.Counter(op.split(".")[0] for op in ops)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--variants",
        nargs="+",
        default=["plain", "h2", "pair", "lop3", "dot-zsub", "dot-kjoin", "dot-kjoin-lop3"],
        help=f"GEMV variants, the dot kernel at M = 16 as {', '.join(DOT_VARIANTS)}, or mma "
        "(bench/mma_gemv.py over one group of 128, 2 stages, M <= 8; mma-r2: M <= 16)",
    )
    ap.add_argument("--tiles", nargs="+", default=["128x128", "256x128"], help="BLOCK_NxBLOCK_K")
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--block-m", type=int, default=16, help="BLOCK_M of the dot-* variants")
    ap.add_argument(
        "--top", type=int, default=5, help="opcodes listed per row, most frequent first"
    )
    args = ap.parse_args()
    print(
        "| variant | tile (N x K) | loop instructions | words per thread | per word "
        "| registers | top opcodes |"
    )
    print("|---|---|---|---|---|---|---|")
    for tile in args.tiles:
        block_n, block_k = (int(v) for v in tile.split("x"))
        words = block_n * block_k // 8 // (32 * args.warps)
        for variant in args.variants:
            if variant.startswith("mma"):  # its own tiling: 64 x warps columns, 32 words a thread
                if tile != args.tiles[0]:
                    continue
                rows8 = 2 if variant == "mma-r2" else 1
                cubin = mma_gemv.compiled(args.warps, rows8, stages=2)
                shown, per_thread = f"{64 * args.warps}x128", 32
            else:
                cubin = matmul_kernel(variant, block_n, block_k, args.warps, args.block_m)
                shown, per_thread = tile, words
            ops = loop_counts(cubin)
            total = sum(ops.values())
            top = ", ".join(f"{op} {n}" for op, n in ops.most_common(args.top))
            print(
                f"| {variant} | {shown} | {total} | {per_thread} | {total / per_thread:.1f} "
                f"| {registers(cubin)} | {top} |"
            )


if __name__ == "__main__":
    main()
