"""Instructions per packed weight word in the main loop of the M = 1 GEMV's variants and of the
M = 16 dot kernel's, without a GPU: compiles `_gemv_kernel` / `_dot_kernel` for sm_90 with
Triton's own ptxas (integer arguments marked divisible by 16, as Triton specializes them at
launch), disassembles them with nvdisasm and counts the SASS of the loop over K-blocks. Small-M
matmuls are bound by instruction issue as much as by memory: at the 4.2 TB/s measured on an
H200 an SM has about 31 issue slots per 4-byte word.

    python bench/sass_count.py [--variants plain h2 pair lop3] [--tiles 128x128 256x128]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from bitserve.kernels import triton_int

TYPES = dict(
    x_ptr="*fp16",
    qw_ptr="*i32",
    qh_ptr="*i32",
    s_ptr="*fp16",
    z_ptr="*fp16",
    out_ptr="*fp16",
    ws_ptr="*fp32",
    cnt_ptr="*i32",
)
INTS = ("N", "K", "G", "stride_w", "stride_h", "k_blocks", "split_k")


DOT_VARIANTS = {
    "dot-fma": (0, 0),
    "dot-raw": (1, 0),
    "dot-zsub": (2, 0),
    "dot-kjoin": (2, 1),
    "dot-kjoin-lop3": (2, 2),
}


def compile_gemv(variant: str, block_n: int, block_k: int, warps: int, block_m: int = 16) -> bytes:
    """The cubin of `_gemv_kernel` (or, for a dot-* variant, `_dot_kernel` with this BLOCK_M)
    for W4 g128 fp16 with this variant's flags."""
    common = dict(BITS=4, GROUP=128, BLOCK_N=block_n, BLOCK_K=block_k, ATOMIC=0)
    if variant in DOT_VARIANTS:
        fn = triton_int._dot_kernel
        deq, kjoin = DOT_VARIANTS[variant]
        dot = dict(BLOCK_M=block_m, DEQ=deq, KJOIN=kjoin, DOT_DTYPE=triton_int.tl.float16)
        consts = dict(common, **dot)
    else:
        fn = triton_int._gemv_kernel
        lop3 = {"lop3": 2, "pair": 1}.get(variant, 0)
        consts = dict(common, H2=int(variant == "h2"), LOP3=lop3)
    names = fn.arg_names
    ints = (*INTS, "M", "stride_xm", "stride_om")
    sig = {n: TYPES.get(n, "i32" if n in ints else "constexpr") for n in names}
    aligned = (*TYPES, "stride_w", "stride_h", "stride_xm", "stride_om", "N", "K")
    aligned = tuple(n for n in aligned if n in names)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    stages = 3 if variant in DOT_VARIANTS else 1
    options = dict(num_warps=warps, num_stages=stages)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["cubin"]


def loop_counts(cubin: bytes) -> collections.Counter[str]:
    """Opcode counts of the largest backward-branch loop in the disassembly."""
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True).stdout
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
        help=f"GEMV variants, or the dot kernel at M = 16 as {', '.join(DOT_VARIANTS)}",
    )
    ap.add_argument("--tiles", nargs="+", default=["128x128", "256x128"], help="BLOCK_NxBLOCK_K")
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--block-m", type=int, default=16, help="BLOCK_M of the dot-* variants")
    args = ap.parse_args()
    print(
        "| variant | tile (N x K) | loop instructions | words per thread | per word | top opcodes |"
    )
    print("|---|---|---|---|---|---|")
    for tile in args.tiles:
        block_n, block_k = (int(v) for v in tile.split("x"))
        words = block_n * block_k // 8 // (32 * args.warps)
        for variant in args.variants:
            ops = loop_counts(compile_gemv(variant, block_n, block_k, args.warps, args.block_m))
            total = sum(ops.values())
            top = ", ".join(f"{op} {n}" for op, n in ops.most_common(5))
            print(f"| {variant} | {tile} | {total} | {words} | {total / words:.1f} | {top} |")


if __name__ == "__main__":
    main()
