"""Compile every Triton kernel variant for sm_90 (Hopper, with programmatic dependent launch as
served there) and sm_80 (Ampere) with Triton's own ptxas, without a GPU: catches what the CPU
interpreter cannot see (inline PTX, grid dependency control, types that only the GPU compiler
checks, layouts) before a GPU run spends its minutes on it. tests/test_kernels_compile.py runs
it in CI; `bench/sass_count.py` uses its `matmul_kernel`.

    python bench/compile_check.py [--archs 90 80]
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from functools import partial
from typing import Any

import mma_gemv
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from bitserve.kernels import triton_decode, triton_int

# Argument types of the matmul kernels (fp16 activations); the other arguments are i32.
INT_KERNEL_TYPES = dict(
    x_ptr="*fp16",
    qw_ptr="*i32",
    qh_ptr="*i32",
    s_ptr="*fp16",
    z_ptr="*fp16",
    out_ptr="*fp16",
    w_ptr="*fp16",
    ws_ptr="*fp32",
    cnt_ptr="*i32",
)
# Arguments Triton specializes as multiples of 16 at launch on the benchmark shapes.
ALIGNED = (*INT_KERNEL_TYPES, "stride_w", "stride_h", "stride_xm", "stride_om", "N", "K")
# The dot kernel's variants as (DEQ, KJOIN, SWAP).
DOT_VARIANTS = {
    "dot-fma": (0, 0, 0),
    "dot-raw": (1, 0, 0),
    "dot-zsub": (2, 0, 0),
    "dot-kjoin": (2, 1, 0),
    "dot-kjoin-lop3": (2, 2, 0),
    "dot-kjoin-lop3-swap": (2, 2, 1),
}


def compile_asm(
    fn: Any,
    types: dict[str, str],
    consts: dict[str, Any],
    warps: int,
    stages: int = 1,
    arch: int = 90,
) -> dict[str, Any]:
    """Jit function `fn` compiled for sm_`arch` (its TTGIR, PTX, cubin, ...): arguments typed by
    `types` (else i32), constexprs from `consts` (PDL, unless given, on from sm_90, as `use_pdl` launches them),
    the ALIGNED ones marked divisible by 16."""
    names = fn.arg_names
    if "PDL" in names and "PDL" not in consts:
        consts = consts | {"PDL": int(arch >= 90)}
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in ALIGNED if n in names}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    options = dict(num_warps=warps, num_stages=stages, launch_pdl=bool(consts.get("PDL")))
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options).asm


def compile_sm(*args: Any) -> bytes:
    """The cubin of `compile_asm` (same arguments)."""
    return bytes(compile_asm(*args)["cubin"])


def matmul_kernel(
    variant: str,
    block_n: int,
    block_k: int,
    warps: int,
    block_m: int = 16,
    bits: int = 4,
    atomic: int = 0,
    arch: int = 90,
) -> bytes:
    """`_gemv_kernel` with a GEMV variant (plain, h2, pair, lop3; "-pf" appended: prefetching;
    "-l2": L2 prefetch before the PDL wait; "-r2" / "-r4": over 2 / 4 rows; "-odd": masked
    loads, for shapes that are not multiples of the tile, else EVEN as the benchmark's),
    or `_dot_kernel` with a dot-* variant at this BLOCK_M, for g128 fp16."""
    common = dict(BITS=bits, GROUP=128, BLOCK_N=block_n, BLOCK_K=block_k, ATOMIC=atomic)
    if variant in DOT_VARIANTS:
        deq, kjoin, swap = DOT_VARIANTS[variant]
        dot = dict(BLOCK_M=block_m, DEQ=deq, KJOIN=kjoin, SWAP=swap)
        dot["DOT_DTYPE"] = triton_int.tl.float16
        dot["PDL"] = int(arch >= 90 and block_m < 64 and not swap)  # as `_config_pdl` does
        fn = triton_int._dot_kernel
        return compile_sm(fn, INT_KERNEL_TYPES, common | dot, warps, 3, arch)
    # e.g. lop3-pf: with the next block's loads early; lop3-r4: over 4 rows (ROWS)
    base, *mods = variant.split("-")
    lop3 = {"lop3": 2, "pair": 1}.get(base, 0)
    rows = next((int(m[1:]) for m in mods if re.fullmatch(r"r\d+", m)), 1)
    gemv = dict(H2=int(base == "h2"), LOP3=lop3, PREFETCH=int("pf" in mods), ROWS=rows)
    gemv["L2"] = int("l2" in mods)
    gemv["EVEN"] = int("odd" not in mods)
    return compile_sm(triton_int._gemv_kernel, INT_KERNEL_TYPES, common | gemv, warps, 1, arch)


def decode_kernels() -> dict[str, tuple[Any, dict[str, str], dict[str, Any], int]]:
    """The fused decode kernels at Llama-3-8B sizes (hidden 4096, head_dim 128, fp16)."""
    f16, f32, i64 = "*fp16", "*fp32", "*i64"
    attn = dict(q_ptr=f16, k_ptr=f16, v_ptr=f16, slot_ptr=i64, pos_ptr=i64, out_ptr=f16)
    attn |= dict(o_ws=f32, m_ws=f32, l_ws=f32, scale_log2="fp32")
    rope = dict(qkv_ptr=f16, cos_ptr=f16, sin_ptr=f16, pos_ptr=i64, slot_ptr=i64)
    rope |= dict(q_ptr=f16, k_ptr=f16, v_ptr=f16)
    norm = dict(h_ptr=f16, d_ptr=f16, w_ptr=f16, x_ptr=f16, eps="fp32")
    merge = dict(o_ws=f32, m_ws=f32, l_ws=f32, out_ptr=f16)
    attn_consts = dict(D=128, BLOCK_D=128, GP=16, BLOCK_L=triton_decode.ATTN_BLOCK_L)
    attn_consts["PRECISION"] = None
    td = triton_decode
    return {
        "add_rms_norm": (td._add_rms_norm_kernel, norm, dict(HAS_DELTA=1, BLOCK=4096), 8),
        "rms_norm": (td._add_rms_norm_kernel, norm, dict(HAS_DELTA=0, BLOCK=4096), 8),
        "rope_to_cache": (td._rope_cache_kernel, rope, dict(HALF=64, BLOCK=64), 1),
        "attention (splits)": (td._attn_kernel, attn, attn_consts, 4),
        "attention (one split)": (td._attn_kernel, attn, attn_consts | {"SPLITS": 1}, 4),
        "merge": (td._merge_kernel, merge, dict(D=128, BLOCK_D=128, BLOCK_S=8), 4),
        "silu_mul": (td._silu_mul_kernel, dict(gu_ptr=f16, out_ptr=f16), {"BLOCK": 1024}, 4),
    }


def jobs(arch: int) -> list[tuple[str, Any]]:
    """(name, compile) for every kernel variant the backends launch, and the mma GEMV
    prototype's (bench/mma_gemv.py), on sm_`arch`."""
    mm = partial(matmul_kernel, arch=arch)
    out: list[tuple[str, Any]] = []
    for v in ("plain", "h2", "pair", "lop3", "lop3-pf", "plain-pf", "lop3-l2", "lop3-pf-l2"):
        out.append((f"gemv {v} W4", partial(mm, v, 128, 128, 4)))
    for bits in (2, 3, 8):
        out.append((f"gemv plain W{bits}", partial(mm, "plain", 128, 128, 4, bits=bits)))
    out.append(("gemv lop3 W4 red", partial(mm, "lop3", 128, 128, 4, atomic=1)))
    for v in ("lop3-r2", "lop3-pf-r4", "pair-r4"):
        out.append((f"gemv {v} W4", partial(mm, v, 128, 128, 4)))
    out.append(("gemv lop3-r4 W4 atomic", partial(mm, "lop3-r4", 128, 64, 4, atomic=2)))
    out.append(("gemv plain-pf W3", partial(mm, "plain-pf", 128, 128, 4, bits=3)))
    for tile in ((256, 64), (256, 128)):  # BLOCK_N = 128 x warps: no barriers in the loop
        out.append((f"gemv lop3 W4 {tile[0]}x{tile[1]} 2 warps", partial(mm, "lop3", *tile, 2)))
    for v in ("lop3-odd", "lop3-pf-r4-odd", "h2-odd"):
        out.append((f"gemv {v} W4", partial(mm, v, 128, 128, 4)))
    out.append(("gemv plain-odd W3", partial(mm, "plain-odd", 128, 128, 4, bits=3)))
    for v in DOT_VARIANTS:
        out.append((f"{v} M16", partial(mm, v, 128, 128, 4)))
    out.append(("dot-kjoin-lop3 M128", partial(mm, "dot-kjoin-lop3", 128, 128, 8, 128)))
    out.append(("dot-kjoin-lop3-swap M64", partial(mm, "dot-kjoin-lop3-swap", 128, 128, 4, 64)))
    out.append(("dot-fma M128 W3", partial(mm, "dot-fma", 128, 64, 8, 128, bits=3)))
    out.append(("dot-zsub M16 atomic", partial(mm, "dot-zsub", 128, 64, 4, atomic=2)))
    for warps, rows8, st in ((1, 1, 1), (4, 1, 2), (4, 2, 3), (8, 1, 3)):  # mma GEMV prototype
        name = f"mma gemv {warps} warps M<={8 * rows8} {st} stages"
        out.append((name, partial(mma_gemv.compiled, warps, rows8, st, arch)))
    i32 = {"qw_ptr": "*i32", "out_ptr": "*i32"}
    probe = partial(compile_sm, mma_gemv.lane_probe_kernel, i32, {"W": 4}, 4, 1, arch)
    out.append(("mma gemv lane probe", probe))
    deq = dict(BITS=4, GROUP=128, BLOCK_N=128, BLOCK_K=64)
    dequant = triton_int._dequant_kernel
    out.append(("dequant", partial(compile_sm, dequant, INT_KERNEL_TYPES, deq, 4, 1, arch)))
    for name, (fn, types, consts, warps) in decode_kernels().items():
        out.append((f"decode {name}", partial(compile_sm, fn, types, consts, warps, 1, arch)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", type=int, nargs="+", default=[90, 80], help="sm_XX targets")
    args = ap.parse_args()
    failed = total = 0
    for arch in args.archs:
        for name, job in jobs(arch):
            t0 = time.perf_counter()
            total += 1
            try:
                size = len(job())
                took = time.perf_counter() - t0
                print(f"ok   sm_{arch} {name}: {size} bytes of cubin, {took:.1f} s", flush=True)
            except Exception as e:
                failed += 1
                print(f"FAIL sm_{arch} {name}: {type(e).__name__}: {str(e)[:2000]}", flush=True)
    archs = ", ".join(f"sm_{a}" for a in args.archs)
    print(f"{total - failed}/{total} kernels compiled ({archs})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
