"""GPU backend: Triton fused dequantize-GEMM kernels for QuantLinear (W2/W3/W4/W8, A16).

`prepare` repacks once at load into a kernel-friendly layout: codes along K in int32 words
(32/bits codes per word, K padded to a multiple of 256; 3-bit as a 2-bit and a 1-bit plane, so
no code straddles a word), scales and zero points unpacked to [G, N].

Three kernels, picked per M bucket by a short autotune (cached per shape and bucket, in memory
and on disk):

- `_gemv_kernel` (M = 1, decode): CUDA-core FMAs, split-K over many programs.
- `_dot_kernel` (M >= 2): tensor-core `tl.dot` tiles, split-K for small M.
- `_dequant_kernel` + cuBLAS (large M): a dense fp16/bf16 copy of W, then `torch.mm`; the
  fallback candidate when the fused tiles lose to cuBLAS on compute-bound shapes.

Two tricks keep the integer work per code small (an int->float conversion runs at a quarter of
the FMA rate): codes become floats by OR-ing them into the mantissa of a float with a fixed
exponent (`_plane_f32`, `_codes_f32`, `_codes_f16`), and where a K-block lies in one group the
scale and zero are applied once per block, not per code: sum_k x_k (q_k - z) s =
s (sum_k x_k (OFF + q_k) - (OFF + z) sum_k x_k).

Split-K partial sums go to a workspace; the program that finishes a tile last (a per-tile
arrival counter) adds them up in a fixed order, writes the output and re-arms the counter, so
there is no zero-filled output, no atomics on data and no second kernel (`_finish`). Config
variants (autotune candidates, so the GPU picks) also try fp32 atomic adds into one zeroed
slice ("red"), atomic adds into the zeroed output ("atomic", the earlier kernels' finish), the
dot on exact fp16 q - z ("zsub": no row sums of x) or on FMA-dequantized weights ("fma"), and a
GEMV that dequantizes and multiplies in fp16 ("h2"), 4-bit GEMVs on packed fp16 pairs of
codes ("lop3" in PTX, "pair" in Triton ops; 4-bit words interleave their codes for it), the
same GEMV with a register double buffer of weight words ("pf"), and the dot on a K-major tile
whose codes are joined in-thread ("kjoin", with "lop3" made in PTX). On sm_90+ every kernel
launches with programmatic dependent launch (`use_pdl`, `pdl_enter`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from bitserve.kernels.packing import num_groups
from bitserve.kernels.quant_linear import CACHE_DIR, Backend, QuantLinear, register_backend

K_ALIGN = 256  # K is padded to this, so every BLOCK_K up to 256 tiles it exactly
BIG_GROUP = 1 << 30  # "group size" of a per-channel layer: every k in group 0
# Kernels run in Triton's CPU interpreter (tests without a GPU) when this was set at import.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
INTERPRET_JIT = tl.constexpr(INTERPRET)  # the same, as a constant inside kernels
log = logging.getLogger("bitserve.kernels")
try:  # grid dependency control, for programmatic dependent launch (Hopper and later)
    from triton.backends.nvidia.compiler import CUDAOptions
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    if "launch_pdl" not in CUDAOptions.__dataclass_fields__:  # no launch option for it
        gdc_launch_dependents = gdc_wait = None
except ImportError:  # a Triton without it: kernels launch as usual
    gdc_launch_dependents = gdc_wait = None
# Programmatic dependent launch where the GPU has it (BITSERVE_PDL=0: off; benchmarks flip it).
PDL_ENABLED = os.environ.get("BITSERVE_PDL", "1") != "0"


@functools.cache
def _sm_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def use_pdl(device: torch.device) -> bool:
    """Whether kernels on `device` launch with programmatic dependent launch: each may be
    scheduled while the kernel before it in the stream finishes, so a decode step's chain of
    short kernels (in a CUDA graph too) overlaps their launch latencies."""
    if not PDL_ENABLED or INTERPRET or gdc_wait is None or device.type != "cuda":
        return False
    if torch.version.hip is not None:  # ROCm reports its own capabilities (9.4 for MI300)
        return False
    return _sm_major(torch.cuda.current_device() if device.index is None else device.index) >= 9


def pdl_launch(pdl: bool) -> dict[str, bool]:
    """The launch option for PDL, given only when on (a Triton without PDL has no such option)."""
    return {"launch_pdl": True} if pdl else {}


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """With PDL: wait until the previous kernel in the stream has finished and its writes are
    visible, then let the next kernel be scheduled. Every program of a PDL kernel calls this
    before any global write and any read of data another kernel may write (only the packed
    weights may be read before it): the wait is what orders it after its predecessor (and,
    through the predecessor's own wait, after everything before)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


# ---- codes -> floats -------------------------------------------------------------------------


@triton.jit
def _shift(w, S: tl.constexpr):
    """w << S for S >= 0, else w >> -S (arithmetic; callers mask the bits they keep)."""
    if S >= 0:
        return w << S
    else:
        return w >> (-S)


@triton.jit
def _plane_f32(w, h, J: tl.constexpr, BITS: tl.constexpr):
    """Code J of every word of `w` as float32 2**BITS + code, exactly, in 2 integer ops: the
    code is moved to the top of the mantissa of a float whose exponent is BITS. 3-bit: the low
    two bits are code J of the 2-bit plane `w`, the high bit is bit J of `h`."""
    if BITS == 3:
        v = (_shift(w, 20 - 2 * J) & (3 << 20)) | (_shift(h, 22 - J) & (1 << 22)) | (130 << 23)
    else:
        mant: tl.constexpr = 23 - BITS
        P: tl.constexpr = (J % 2) * 4 + J // 2 if BITS == 4 else J  # the code's slot (_slots)
        v = (_shift(w, mant - P * BITS) & (((1 << BITS) - 1) << mant)) | ((127 + BITS) << 23)
    return v.to(tl.float32, bitcast=True)


@triton.jit
def _codes_f32(q):
    """Integer codes (0 <= q < 2**23) as float32 without a conversion instruction."""
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _codes_f16(q):
    """Integer codes (0 <= q < 1024) as float16 1024 + q without a conversion instruction."""
    return (q | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _unpack(w, BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Words [BLOCK_K * BITS / 32, BLOCK_N] -> codes [BLOCK_K, BLOCK_N]; each word is loaded once
    and split into its 32/BITS codes (row k = word * 32/BITS + j, code j at slot `_slots`[j])."""
    per_word: tl.constexpr = 32 // BITS
    j = tl.arange(0, per_word)
    slot = (j % 2) * 4 + j // 2 if BITS == 4 else j  # see _slots
    q = (w[:, None, :] >> (slot * BITS)[None, :, None]) & ((1 << BITS) - 1)
    return tl.reshape(q, (BLOCK_K, BLOCK_N))


@triton.jit
def _load_codes(
    qw_ptr,
    qh_ptr,
    kb,
    offs_n,
    mask_n,
    stride_w,
    stride_h,
    BITS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Codes [BLOCK_K, BLOCK_N] (int32) of K-block kb, columns offs_n."""
    if BITS == 3:
        rows_lo = kb * (BLOCK_K // 16) + tl.arange(0, BLOCK_K // 16)
        rows_hi = kb * (BLOCK_K // 32) + tl.arange(0, BLOCK_K // 32)
        lo = tl.load(
            qw_ptr + rows_lo[:, None] * stride_w + offs_n[None, :], mask=mask_n[None, :], other=0
        )
        hi = tl.load(
            qh_ptr + rows_hi[:, None] * stride_h + offs_n[None, :], mask=mask_n[None, :], other=0
        )
        q = _unpack(lo, 2, BLOCK_K, BLOCK_N) | (_unpack(hi, 1, BLOCK_K, BLOCK_N) << 2)
    else:
        words: tl.constexpr = BLOCK_K * BITS // 32
        rows = kb * words + tl.arange(0, words)
        w = tl.load(
            qw_ptr + rows[:, None] * stride_w + offs_n[None, :], mask=mask_n[None, :], other=0
        )
        q = _unpack(w, BITS, BLOCK_K, BLOCK_N)
    return q


@triton.jit
def _h2(v):
    """v (exact in fp16) as an fp16 pair in both halves of an int32."""
    h = v.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return h | (h << 16)


@triton.jit
def _half(v, HI: tl.constexpr):
    """The low (HI 0) or high fp16 half of int32 `v`, as float32."""
    if HI:
        v = v >> 16
    return (v & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


# A 4-bit word's codes as fp16 pairs in PTX (`_pairs_dequant`): masks and ORs (lop3) put codes
# 2i and 2i + 1 into the halves of a register as 1024 + q (or 1024 + 16 q); one f16x2 FMA per
# pair makes them (q - z) / 16, exactly.
_DEQUANT_PTX = tl.constexpr("""
{
.reg .b32 w8, p, c0, c1;
mov.b32 c0, 0x2C002C00;
mov.b32 c1, 0x1C001C00;
lop3.b32 p, $4, 0x000F000F, 0x64006400, 0xEA;
fma.rn.f16x2 $0, p, c0, $5;
lop3.b32 p, $4, 0x00F000F0, 0x64006400, 0xEA;
fma.rn.f16x2 $1, p, c1, $6;
shr.u32 w8, $4, 8;
lop3.b32 p, w8, 0x000F000F, 0x64006400, 0xEA;
fma.rn.f16x2 $2, p, c0, $5;
lop3.b32 p, w8, 0x00F000F0, 0x64006400, 0xEA;
fma.rn.f16x2 $3, p, c1, $6;
}
""")
# Four such pairs met with four x pairs (`_pairs_dot4`): products and sums in f16x2, the two
# halves summed in fp32.
_DOT4_PTX = tl.constexpr("""
{
.reg .b32 acc;
.reg .b16 lo, hi;
.reg .f32 flo, fhi, fs;
mul.rn.f16x2 acc, $1, $5;
fma.rn.f16x2 acc, $2, $6, acc;
fma.rn.f16x2 acc, $3, $7, acc;
fma.rn.f16x2 acc, $4, $8, acc;
mov.b32 {lo, hi}, acc;
cvt.f32.f16 flo, lo;
cvt.f32.f16 fhi, hi;
add.f32 fs, flo, fhi;
mov.b32 $0, fs;
}
""")


@triton.jit
def _pairs_dequant(w, nz_lo, nz_hi, MODE: tl.constexpr):
    """The 8 codes of each 4-bit word (slots as in `_slots`) as four int32s holding fp16 pairs
    ((q_2i - z) / 16, (q_2i+1 - z) / 16), i = 0..3. nz_lo, nz_hi: -(64 + z / 16) and
    -(4 + z / 16) as fp16 pairs: (1024 + q) / 16 - (64 + z / 16) = (q - z) / 16 exactly in fp16,
    as is (1024 + 16 q) / 256 - (4 + z / 16). MODE 2: inline PTX (GPU only). MODE 1 (Triton
    ops, what the interpreter runs): the pairs 1024 + q (or 1024 + 16 q) only, which
    `_pairs_dot4` finishes in fp32."""
    if MODE == 2 and not INTERPRET_JIT:
        d0, d1, d2, d3 = tl.inline_asm_elementwise(
            _DEQUANT_PTX,
            "=r,=r,=r,=r,r,r,r",
            [w, nz_lo, nz_hi],
            dtype=(tl.int32,) * 4,
            is_pure=True,
            pack=1,
        )
    else:
        d0 = (w & 0x000F000F) | 0x64006400
        d1 = (w & 0x00F000F0) | 0x64006400
        d2 = ((w >> 8) & 0x000F000F) | 0x64006400
        d3 = ((w >> 8) & 0x00F000F0) | 0x64006400
    return d0, d1, d2, d3


@triton.jit
def _pairs_dot4(d0, d1, d2, d3, x0, x1, x2, x3, nz_lo, nz_hi, MODE: tl.constexpr):
    """sum_i d_i . x_i over the four pairs of `_pairs_dequant`, float32 (x_i: x[2i], x[2i + 1]
    as the fp16 halves of an int32). MODE 2: inline PTX, products and sums in fp16 (the / 16 in
    d keeps a word's partial below 65504 for |x| < 8000). MODE 1: dequantizes the pairs here
    (nz_lo, nz_hi as for `_pairs_dequant`), products and sums in fp32; the interpreter tests
    check the layout and the exact (q - z) / 16, tests/test_ptx.py and the GPU run the PTX's
    fp16 rounding."""
    if MODE == 2 and not INTERPRET_JIT:
        out = tl.inline_asm_elementwise(
            _DOT4_PTX,
            "=r,r,r,r,r,r,r,r,r",
            [d0, d1, d2, d3, x0, x1, x2, x3],
            dtype=tl.int32,
            is_pure=True,
            pack=1,
        )
        return out.to(tl.float32, bitcast=True)
    else:
        part = tl.zeros(d0.shape, dtype=tl.float32)
        for i in tl.static_range(4):
            p = d0 if i == 0 else d1 if i == 1 else d2 if i == 2 else d3
            xi = x0 if i == 0 else x1 if i == 1 else x2 if i == 2 else x3
            c = 0.0625 if i % 2 == 0 else 0.00390625
            nz = nz_lo if i % 2 == 0 else nz_hi
            for hi in tl.static_range(2):
                part += (_half(p, hi) * c + _half(nz, hi)) * _half(xi, hi)
        return part


# A 4-bit word's 8 codes as fp16 q - z in PTX, 9 instructions: the `_DEQUANT_PTX` masks put the
# codes 2i, 2i + 1 into the halves of a register as 1024 + q (or 1024 + 16 q); one f16x2
# subtraction of 1024 + z (or FMA by 1/16 with -(64 + z)) per pair leaves q - z, exact.
_CODES_PTX = tl.constexpr("""
{
.reg .b32 w8, p, d0, d1, d2, d3, c;
mov.b32 c, 0x2C002C00;
lop3.b32 p, $8, 0x000F000F, 0x64006400, 0xEA;
sub.f16x2 d0, p, $9;
lop3.b32 p, $8, 0x00F000F0, 0x64006400, 0xEA;
fma.rn.f16x2 d1, p, c, $10;
shr.u32 w8, $8, 8;
lop3.b32 p, w8, 0x000F000F, 0x64006400, 0xEA;
sub.f16x2 d2, p, $9;
lop3.b32 p, w8, 0x00F000F0, 0x64006400, 0xEA;
fma.rn.f16x2 d3, p, c, $10;
mov.b32 {$0, $1}, d0;
mov.b32 {$2, $3}, d1;
mov.b32 {$4, $5}, d2;
mov.b32 {$6, $7}, d3;
}
""")


@triton.jit
def _codes_kmajor(
    qw_ptr, kb, offs_n, mask_n, stride_w, z, BLOCK_K: tl.constexpr, BLOCK_N, MODE: tl.constexpr
):
    """fp16 q - z of 4-bit K-block kb as a K-major [BLOCK_N, BLOCK_K] tile (z: fp16 zero codes
    [BLOCK_N, 1]). Each of a word's 8 codes becomes fp16 while the tile is still [N, words];
    joining the 8 planes (in k order) as the minor dimension keeps a word's codes in one thread,
    so the tile reaches shared memory in 16-byte stores: `bench/sass_count.py` counts 8 STS per
    8 words per thread here against 64 for the [words, 8, N] unpack of `_load_codes`. MODE 2:
    the codes come from `_CODES_PTX` (GPU only; the interpreter runs MODE 1, the same values
    from Triton ops)."""
    rows = kb * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
    w = tl.load(qw_ptr + rows[None, :] * stride_w + offs_n[:, None], mask=mask_n[:, None], other=0)
    if MODE == 2 and not INTERPRET_JIT:
        p0, p1, p2, p3, p4, p5, p6, p7 = tl.inline_asm_elementwise(
            _CODES_PTX,
            "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r",
            [w, _h2(z + 1024.0), _h2(-(z + 64.0))],
            dtype=(tl.float16,) * 8,
            is_pure=True,
            pack=1,
        )
    else:
        zz = z + 1024.0  # code j of a word sits in slot (j % 2) * 4 + j // 2
        p0 = _codes_f16((w >> 0) & 15) - zz
        p1 = _codes_f16((w >> 16) & 15) - zz
        p2 = _codes_f16((w >> 4) & 15) - zz
        p3 = _codes_f16((w >> 20) & 15) - zz
        p4 = _codes_f16((w >> 8) & 15) - zz
        p5 = _codes_f16((w >> 24) & 15) - zz
        p6 = _codes_f16((w >> 12) & 15) - zz
        p7 = _codes_f16((w >> 28) & 15) - zz
    # Nested joins index [.., a, b, c] as p[4a + 2b + c]: flattened, k order.
    b = tl.join(
        tl.join(tl.join(p0, p4), tl.join(p2, p6)), tl.join(tl.join(p1, p5), tl.join(p3, p7))
    )
    return tl.reshape(b, (BLOCK_N, BLOCK_K))


# ---- split-K epilogue ------------------------------------------------------------------------


@triton.jit
def _finish(acc, out_ptrs, mask, ws_ptrs, ws_stride, cnt_ptr, pid_k, split_k, ATOMIC: tl.constexpr):
    """Store the tile `acc`. With split-K and ATOMIC 0, slice pid_k goes to the workspace; the
    program whose arrival makes the tile's counter reach split_k adds the slices (in order:
    deterministic), stores the output and re-arms the counter to 0 for the next call. ATOMIC 1:
    the same, but every slice is atomically added (fp32) into one zeroed workspace slice, which
    the last program reads once. ATOMIC 2: atomic adds straight into the zeroed output (no
    counter; the caller zeroes `out`, which is float32 where out's dtype has no atomics)."""
    if split_k == 1:
        tl.store(out_ptrs, acc.to(out_ptrs.dtype.element_ty), mask=mask)
    elif ATOMIC == 2:
        tl.atomic_add(out_ptrs, acc.to(out_ptrs.dtype.element_ty), mask=mask, sem="relaxed")
    else:
        if ATOMIC == 1:
            tl.atomic_add(ws_ptrs, acc, mask=mask, sem="relaxed")
        else:
            tl.store(ws_ptrs + pid_k * ws_stride, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial is written before the release below
        arrived = tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu")
        if arrived == split_k - 1:
            if ATOMIC == 1:
                total = tl.load(ws_ptrs, mask=mask, other=0.0, cache_modifier=".cg")
            else:
                total = tl.zeros_like(acc)
                for p in range(0, split_k):  # .cg: read from L2, never a stale L1 line
                    total += tl.load(
                        ws_ptrs + p * ws_stride, mask=mask, other=0.0, cache_modifier=".cg"
                    )
            tl.store(out_ptrs, total.to(out_ptrs.dtype.element_ty), mask=mask)
            tl.atomic_xchg(cnt_ptr, 0)


# ---- kernels ---------------------------------------------------------------------------------


@triton.jit
def _below(k, K, EVEN: tl.constexpr):
    """The mask k < K; where EVEN says that every k is (the shape is a multiple of the tile), a
    constant true mask, which Triton drops from the loads (no predicates, no zero fills)."""
    if EVEN:
        return tl.full(k.shape, 1, tl.int1)
    else:
        return k < K


@triton.jit
def _gemv_words(qw_ptr, qh_ptr, kb, row, offs_n, mask, stride_w, stride_h, BITS: tl.constexpr):
    """The GEMV's word tile [words, BLOCK_N] of K-block kb, and for 3-bit the matching words of
    the 1-bit plane, shifted so that bit j of the result is the high bit of code j (code
    k = 16 * row + j; its high bit is bit k % 32 of plane word k // 32)."""
    rows = kb * row.shape[0] + row
    w = tl.load(qw_ptr + rows[:, None] * stride_w + offs_n[None, :], mask=mask[None, :], other=0)
    h = w
    if BITS == 3:
        h = tl.load(
            qh_ptr + (rows // 2)[:, None] * stride_h + offs_n[None, :], mask=mask[None, :], other=0
        )
        h = h >> ((row % 2) * 16)[:, None]
    return w, h


@triton.jit
def _prefetch_l2(
    qw_ptr, pid_k, pid_n, k_blocks, split_k, N, stride_w, WORDS: tl.constexpr, BLOCK_N: tl.constexpr
):
    """Ask L2 for every 128-byte line of this program's packed words (its n-block in each of its
    K-blocks), one `prefetch.global.L2` per line: issued before the PDL wait, these reads run
    while the kernel before finishes, and the loop's loads then find the lines in L2 (or in
    flight). GPU only (the interpreter has no inline PTX)."""
    if not INTERPRET_JIT:
        cols = tl.minimum(pid_n * BLOCK_N + tl.arange(0, BLOCK_N // 32) * 32, N - 1)
        for kb in range(pid_k, k_blocks, split_k):
            rows = kb * WORDS + tl.arange(0, WORDS)
            tl.inline_asm_elementwise(
                "prefetch.global.L2 [$1];\nmov.u32 $0, 0;",
                "=r,l",
                [qw_ptr + rows[:, None] * stride_w + cols[None, :]],
                dtype=tl.int32,
                is_pure=False,
                pack=1,
            )


@triton.jit
def _gemv_kernel(
    x_ptr,
    qw_ptr,
    qh_ptr,
    s_ptr,
    z_ptr,
    out_ptr,
    ws_ptr,
    cnt_ptr,
    M,
    N,
    K,
    G,
    stride_w,
    stride_h,
    k_blocks,
    split_k,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    H2: tl.constexpr,
    LOP3: tl.constexpr,
    ATOMIC: tl.constexpr,
    PREFETCH: tl.constexpr,
    L2: tl.constexpr,
    PDL: tl.constexpr,
    ROWS: tl.constexpr,
    EVEN: tl.constexpr,
):
    """out[M, N] = x[M, K] @ dequant(W)[K, N] for M <= ROWS rows (decode; x and out
    contiguous); program (n-block, k-slice).

    The word tile [words, BLOCK_N] is loaded once; an unrolled loop over the code position j
    turns plane j into floats 2**BITS + code (`_plane_f32`: shift, mask, FMA per code) and meets
    it with x[word * per_word + j]. Scales and zeros are applied once per word row and block
    (every word lies in one group: `_supports` asks for group sizes that are multiples of 32).
    Everything stays in the tile's 2-D layout; one reduction at the end.

    H2 (fp16 x, BITS 2 or 4): half precision inner loop. The codes in slots j and
    j + per_word / 2 of a word (k = 2j, 2j + 1 at 4 bits, `_slots`) are masked out together
    (mask 0x000F000F for 4-bit) and OR-ed with 0x64006400: two fp16 1024 + code in the word's
    halves, minus 1024 + z (exact: q - z in fp16), times x / 16
    (the 1/16 keeps the fp16 partial of one word row below 65504 for |x| < 8000), summed in
    fp16 over the word row, then once per row and block to fp32 with the scale (times 16).

    LOP3 (fp16 x, BITS 4, K a multiple of 8): packed fp16 pairs, 5 integer ops per word
    instead of 16 (`_pairs_dequant`, `_pairs_dot4`; 2: inline PTX, products and sums in fp16;
    1: the same dequantization in Triton ops, products and sums in fp32).

    ROWS 2 or 4 (LOP3 only): each word is dequantized once and met with every row's x (4 f16x2
    FMAs and a conversion per row and word), for decode batches of 2-4 rows; rows past M read
    zeros and are not stored.

    PREFETCH: each iteration issues the next K-block's word loads before its arithmetic, so a
    program keeps a tile of loads in flight while it computes (a register double buffer); the
    first block's words are loaded before the PDL wait (no kernel writes packed weights), so
    that load overlaps the end of the kernel before.

    L2: before the PDL wait, every line of the program's words is asked into L2
    (`_prefetch_l2`), so all of its reads are in flight at once and start while the kernel
    before still runs."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = _below(offs_n, N, EVEN)
    per_word: tl.constexpr = 16 if BITS == 3 else 32 // BITS  # 3-bit: the 2-bit plane's words
    words: tl.constexpr = BLOCK_K // per_word
    off: tl.constexpr = 1 << BITS
    row = tl.arange(0, words)
    acc = tl.zeros((words, BLOCK_N), dtype=tl.float32)
    if ROWS >= 2:
        acc1 = tl.zeros((words, BLOCK_N), dtype=tl.float32)
    if ROWS >= 4:
        acc2 = tl.zeros((words, BLOCK_N), dtype=tl.float32)
        acc3 = tl.zeros((words, BLOCK_N), dtype=tl.float32)
    if PREFETCH:
        first = mask_n & (offs_n * 0 + pid_k < k_blocks)  # always, as launched (split_k <= blocks)
        w_next, h_next = _gemv_words(
            qw_ptr, qh_ptr, pid_k, row, offs_n, first, stride_w, stride_h, BITS
        )
    if L2:
        _prefetch_l2(qw_ptr, pid_k, pid_n, k_blocks, split_k, N, stride_w, words, BLOCK_N)
    pdl_enter(PDL)
    for kb in range(pid_k, k_blocks, split_k):
        if PREFETCH:  # this block's words came with the last one; load the next block's now
            w, h = w_next, h_next
            more = mask_n & (offs_n * 0 + kb + split_k < k_blocks)  # nothing past the last block
            w_next, h_next = _gemv_words(
                qw_ptr, qh_ptr, kb + split_k, row, offs_n, more, stride_w, stride_h, BITS
            )
        else:
            w, h = _gemv_words(qw_ptr, qh_ptr, kb, row, offs_n, mask_n, stride_w, stride_h, BITS)
        k0 = kb * BLOCK_K + row * per_word
        if BLOCK_K <= GROUP:  # the block lies in one group: one scale row
            g = tl.minimum((kb * BLOCK_K) // GROUP, G - 1)
            s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        else:  # a group per word row
            g2 = tl.minimum(k0 // GROUP, G - 1)[:, None] * N + offs_n[None, :]
            s = tl.load(s_ptr + g2, mask=mask_n[None, :], other=0.0).to(tl.float32)
            z = tl.load(z_ptr + g2, mask=mask_n[None, :], other=0.0).to(tl.float32)
        if H2:
            half: tl.constexpr = per_word // 2
            pair_mask: tl.constexpr = ((1 << BITS) - 1) * 0x10001
            zz = (z + 1024.0).to(tl.float16)
            p16 = tl.zeros((words, BLOCK_N), dtype=tl.float16)
            for j in tl.static_range(half):
                v = (_shift(w, -j * BITS) & pair_mask) | 0x64006400
                lo = v.to(tl.int16).to(tl.float16, bitcast=True) - zz
                hi = (v >> 16).to(tl.int16).to(tl.float16, bitcast=True) - zz
                k_lo = k0 + (2 * j if BITS == 4 else j)  # slots j, j + half hold these k (_slots)
                k_hi = k_lo + (1 if BITS == 4 else half)
                x_lo = tl.load(x_ptr + k_lo, mask=_below(k_lo, K, EVEN), other=0.0) * 0.0625
                x_hi = tl.load(x_ptr + k_hi, mask=_below(k_hi, K, EVEN), other=0.0) * 0.0625
                p16 += x_lo[:, None] * lo + x_hi[:, None] * hi
            acc += p16.to(tl.float32) * (s * 16.0)
        elif LOP3:
            nz = (_h2(-(z * 0.0625 + 64.0)), _h2(-(z * 0.0625 + 4.0)))
            d = _pairs_dequant(w, nz[0], nz[1], LOP3)
            s16 = s * 16.0
            acc += _row_dot(x_ptr, 0, M, K, k0, d, nz, LOP3, EVEN) * s16
            if ROWS >= 2:
                acc1 += _row_dot(x_ptr, 1, M, K, k0, d, nz, LOP3, EVEN) * s16
            if ROWS >= 4:
                acc2 += _row_dot(x_ptr, 2, M, K, k0, d, nz, LOP3, EVEN) * s16
                acc3 += _row_dot(x_ptr, 3, M, K, k0, d, nz, LOP3, EVEN) * s16
        else:
            xj = tl.load(x_ptr + k0, mask=_below(k0, K, EVEN), other=0.0).to(tl.float32)
            part = xj[:, None] * _plane_f32(w, h, 0, BITS)
            xsum = xj
            for j in tl.static_range(1, per_word):
                xj = tl.load(x_ptr + k0 + j, mask=_below(k0 + j, K, EVEN), other=0.0).to(tl.float32)
                part += xj[:, None] * _plane_f32(w, h, j, BITS)
                xsum += xj
            acc += tl.fma(part, s, -xsum[:, None] * ((z + off) * s))
    y = tl.sum(acc, axis=0)
    cnt = cnt_ptr + pid_n
    if ROWS == 1:
        _finish(y, out_ptr + offs_n, mask_n, ws_ptr + offs_n, N, cnt, pid_k, split_k, ATOMIC)
    else:
        if ROWS == 2:  # [BLOCK_N, ROWS]: column r is row r
            y = tl.join(y, tl.sum(acc1, axis=0))
        else:
            y1, y2, y3 = tl.sum(acc1, axis=0), tl.sum(acc2, axis=0), tl.sum(acc3, axis=0)
            y = tl.reshape(tl.join(tl.join(y, y2), tl.join(y1, y3)), (BLOCK_N, ROWS))
        r = tl.arange(0, ROWS)[None, :]
        at = r * N + offs_n[:, None]
        mask = mask_n[:, None] & (r < M)
        _finish(y, out_ptr + at, mask, ws_ptr + at, M * N, cnt, pid_k, split_k, ATOMIC)


@triton.jit
def _row_dot(x_ptr, r: tl.constexpr, M, K, k0, d, nz, MODE: tl.constexpr, EVEN: tl.constexpr):
    """Row r of x (contiguous [M, K], fp16) against a word row's pairs d (`_pairs_dequant`, with
    its zero terms nz): x[r, k0 + 2i], x[r, k0 + 2i + 1] are read as one int32 each, so K is even
    and x 4-byte aligned; rows past M read zeros (EVEN: every k0 lies inside K)."""
    xw = x_ptr.to(tl.pointer_type(tl.int32)) + (r * K + k0) // 2
    # K % 8 == 0: a word row's 8 x lie all inside K or all past it; a row past M reads none
    xm = _below(k0, K, EVEN) if r == 0 else k0 < tl.where(r < M, K, 0)
    x0 = tl.load(xw, mask=xm, other=0)[:, None]
    x1 = tl.load(xw + 1, mask=xm, other=0)[:, None]
    x2 = tl.load(xw + 2, mask=xm, other=0)[:, None]
    x3 = tl.load(xw + 3, mask=xm, other=0)[:, None]
    return _pairs_dot4(d[0], d[1], d[2], d[3], x0, x1, x2, x3, nz[0], nz[1], MODE)


@triton.jit
def _dot_kernel(
    x_ptr,
    qw_ptr,
    qh_ptr,
    s_ptr,
    z_ptr,
    out_ptr,
    ws_ptr,
    cnt_ptr,
    M,
    N,
    K,
    G,
    stride_xm,
    stride_w,
    stride_h,
    stride_om,
    k_blocks,
    split_k,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DEQ: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    ATOMIC: tl.constexpr,
    KJOIN: tl.constexpr,
    SWAP: tl.constexpr,
    PDL: tl.constexpr,
):
    """out[M, N] = x[M, K] @ dequant(W)[K, N] with tensor-core dots; program (n, m, k-slice).

    DEQ 0: each code is dequantized to (q - z) * s (one FMA, gathered scales when the block
    spans groups) in DOT_DTYPE and accumulated by the dot. The others need fp16 x and a block
    inside one group. DEQ 1 (raw): the dot runs on fp16 1024 + code (`_codes_f16`: no
    conversion, no per-code scale); the block's scale and zero (with the row sums of x) are
    applied to the [BLOCK_M, BLOCK_N] result. DEQ 2 (zsub): the dot runs on fp16
    (1024 + q) - (1024 + z) = q - z, exact (no row sums of x); the scale is applied to the
    result. KJOIN (with DEQ 2, 4-bit): the same on a K-major tile (`_codes_kmajor`; 2: its
    codes from PTX). SWAP (with KJOIN): the dot is W^T x^T, [BLOCK_N, BLOCK_K] by
    [BLOCK_K, BLOCK_M], so a few rows of x take the instruction's N side and the weight tile
    its M side (Hopper's wgmma needs 64 rows there, and can read that operand from registers);
    the result tile is transposed once at the end. ATOMIC: how split-K slices are added up
    (`_finish`)."""
    pdl_enter(PDL)
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_N, BLOCK_M) if SWAP else (BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(pid_k, k_blocks, split_k):
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
            mask=mask_m[:, None] & (offs_k < K)[None, :],
            other=0.0,
        )
        if BLOCK_K <= GROUP:
            g = tl.minimum((kb * BLOCK_K) // GROUP, G - 1)
            s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        else:
            g2 = tl.minimum(offs_k // GROUP, G - 1)[:, None] * N + offs_n[None, :]
            s = tl.load(s_ptr + g2, mask=mask_n[None, :], other=0.0).to(tl.float32)
            z = tl.load(z_ptr + g2, mask=mask_n[None, :], other=0.0).to(tl.float32)
        if KJOIN:  # DEQ 2 on a K-major tile (4-bit, the block inside one group)
            zt = tl.trans(z.to(tl.float16))  # [BLOCK_N, 1]
            b = _codes_kmajor(qw_ptr, kb, offs_n, mask_n, stride_w, zt, BLOCK_K, BLOCK_N, KJOIN)
            if SWAP:
                acc += tl.dot(b, tl.trans(x)) * tl.trans(s)
            else:
                acc += tl.dot(x, tl.trans(b)) * s
        else:
            q = _load_codes(
                qw_ptr, qh_ptr, kb, offs_n, mask_n, stride_w, stride_h, BITS, BLOCK_K, BLOCK_N
            )
            if DEQ == 1:
                d = tl.dot(x, _codes_f16(q))
                xsum = tl.sum(x.to(tl.float32), axis=1)
                acc += (d - xsum[:, None] * (z + 1024.0)) * s
            elif DEQ == 2:
                acc += tl.dot(x, _codes_f16(q) - (z + 1024.0).to(tl.float16)) * s
            else:
                w = tl.fma(_codes_f32(q), s, -z * s)
                acc = tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), acc)
    if SWAP:
        acc = tl.trans(acc)
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    ws_ptrs = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
    cnt = cnt_ptr + pid_m * tl.num_programs(0) + pid_n
    mask = mask_m[:, None] & mask_n[None, :]
    _finish(acc, out_ptrs, mask, ws_ptrs, M * N, cnt, pid_k, split_k, ATOMIC)


@triton.jit
def _dequant_kernel(
    qw_ptr,
    qh_ptr,
    s_ptr,
    z_ptr,
    w_ptr,
    N,
    K,
    G,
    stride_w,
    stride_h,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):
    """Dense w[K, N] = (q - z) * s in w's dtype, one [BLOCK_K, BLOCK_N] tile per program."""
    pdl_enter(PDL)
    pid_n = tl.program_id(0)
    kb = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    q = _load_codes(qw_ptr, qh_ptr, kb, offs_n, mask_n, stride_w, stride_h, BITS, BLOCK_K, BLOCK_N)
    g2 = tl.minimum(offs_k // GROUP, G - 1)[:, None] * N + offs_n[None, :]
    s = tl.load(s_ptr + g2, mask=mask_n[None, :], other=0.0).to(tl.float32)
    z = tl.load(z_ptr + g2, mask=mask_n[None, :], other=0.0).to(tl.float32)
    w = (_codes_f32(q) - z) * s
    mask = (offs_k < K)[:, None] & mask_n[None, :]
    tl.store(w_ptr + offs_k[:, None] * N + offs_n[None, :], w.to(w_ptr.dtype.element_ty), mask=mask)


# ---- backend ---------------------------------------------------------------------------------


def _supports(layer: QuantLinear) -> str | None:
    if layer.qweight.device.type != "cuda":
        return f"weights are on {layer.qweight.device.type}, not cuda"
    if layer.bits not in (2, 3, 4, 8):
        return f"{layer.bits}-bit weights are not supported"
    g, k = layer.group_size, layer.in_features
    if g != -1 and g < k and g % 32:
        return f"group size {g} is not a multiple of 32"
    return None


def _slots(bits: int) -> torch.Tensor:
    """Where code j of a word sits (in units of `bits`). 4-bit words interleave k as
    0, 2, 4, 6, 1, 3, 5, 7 from the low nibble, so that one mask picks the pair of adjacent codes
    (2i, 2i + 1) into the two fp16 halves of a register (0x000F000F, 0x00F000F0, and the same
    after a shift by 8): the `lop3` GEMV meets them with x[2i], x[2i + 1] read as one int32."""
    j = torch.arange(32 // bits)
    return (j % 2) * 4 + j // 2 if bits == 4 else j


def _pack_words(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [K, N] (K a multiple of 32) -> int32 [K * bits / 32, N], 32/bits per word."""
    per_word = 32 // bits
    k, n = q.shape
    q = q.to(torch.int64).view(k // per_word, per_word, n)
    shifts = (_slots(bits).to(q.device) * bits).view(1, per_word, 1)
    words = (q << shifts).sum(dim=1)
    return torch.where(words >= (1 << 31), words - (1 << 32), words).to(torch.int32)


def _counters(n: int, device: torch.device) -> torch.Tensor:
    """Split-K arrival counters, one per output tile: enough for every split-K config (BLOCK_N
    >= 32, and BLOCK_M >= 16 with M <= 64). Kernels leave them at zero."""
    return torch.zeros(triton.cdiv(n, 8) + 4, dtype=torch.int32, device=device)


def _prepare(layer: QuantLinear) -> None:
    """Repack codes along K into whole words (3-bit as two planes); unpack scales and zeros."""
    k, n = layer.in_features, layer.out_features
    k_pad = (k + K_ALIGN - 1) // K_ALIGN * K_ALIGN
    codes = torch.zeros(k_pad, n, dtype=torch.int32, device=layer.qweight.device)
    codes[:k] = layer.codes().to(torch.int32)
    if layer.bits == 3:
        layer.prepared["qweight"] = _pack_words(codes & 3, 2).contiguous()
        layer.prepared["qhigh"] = _pack_words(codes >> 2, 1).contiguous()
    else:
        layer.prepared["qweight"] = _pack_words(codes, layer.bits).contiguous()
    layer.prepared["scales"] = layer.scales.half().contiguous()
    layer.prepared["zeros"] = layer.zero_codes().half().contiguous()
    layer.prepared["counters"] = _counters(n, layer.qweight.device)


class Config(NamedTuple):
    """One launch configuration. kind: "gemv" (`_gemv_kernel`, M <= block_m, its ROWS), "dot"
    (`_dot_kernel`) or "cublas" (`_dequant_kernel` tiles of BLOCK_K x BLOCK_N, then torch.mm).
    variant: flags joined by "+": "fma" / "zsub" (the dot's DEQ 0 / 2; default: 1 where it
    applies), "h2" (the GEMV's half precision loop), "lop3" / "pair" (the GEMV's packed-pair
    loop, PTX / Triton ops), "pf" (the GEMV loads the next K-block before computing this one),
    "l2" (the GEMV asks L2 for all its words before the PDL wait), "kjoin" (zsub on a K-major
    tile; with "lop3" its codes from PTX; with "swap" the dot computes out^T = W^T x^T, the
    weight tile as its left operand), "red" / "atomic" (split-K finish ATOMIC 1 / 2; default
    0), "odd" (the GEMV's masked loads even on whole tiles, `_even`: benchmarks compare)."""

    kind: str
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    warps: int
    stages: int
    variant: str = ""

    def flags(self) -> set[str]:
        return set(filter(None, self.variant.split("+")))


def _configs(kind: str, block_m: int, rows: list[tuple[Any, ...]]) -> list[Config]:
    return [Config(kind, block_m, *r) for r in rows]


def _small_batch(rows: int) -> list[Config]:
    """Candidates for M = 2..`rows`: `_gemv_kernel` with ROWS = `rows` (4-bit fp16 only, where
    `_applies`), and dot tiles for the other layers and in case they are faster."""
    # Tiles of 8 words a thread (BLOCK_K 64, or 8 warps) keep 4 rows at 119-146 registers
    # where 16 words take 226-235 (`bench/sass_count.py` registers), at 59-65 instructions a
    # word against 57.6 (`bench/sass_count.py`); 2 rows fit either way. The first tile, 16
    # words a thread, stays a candidate for 4 rows too, to compare.
    gemv = [
        (128, 128, 8, 4, 1, "lop3"),
        (128, 64, 16, 4, 1, "lop3"),
        (256, 64, 8, 8, 1, "lop3"),
        (128, 128, 8, 8, 1, "lop3"),
        (128, 64, 16, 4, 1, "lop3+pf"),
    ]
    if rows == 2:
        gemv += [(128, 128, 16, 4, 1, "lop3"), (256, 128, 8, 4, 1, "lop3")]
        gemv += [(128, 128, 8, 4, 1, "lop3+pf")]
    else:
        gemv += [(64, 64, 32, 2, 1, "lop3"), (128, 128, 8, 8, 1, "lop3+pf")]
    dot = [
        (64, 128, 8, 4, 3),
        (128, 128, 4, 4, 3),
        (64, 128, 16, 4, 3),
        (128, 64, 8, 4, 4, "zsub"),
        (128, 128, 8, 4, 3, "zsub"),
        (128, 64, 8, 4, 4, "zsub+atomic"),
        (128, 128, 8, 4, 3, "zsub+kjoin+lop3+swap"),
    ]
    return _configs("gemv", rows, gemv) + _configs("dot", 16, dot)


# Candidates per M bucket (the bucket's upper end): (BLOCK_N, BLOCK_K, SPLIT_K, warps, stages).
# M = 1 streams the weights: the grid (N / BLOCK_N x SPLIT_K programs) must put several
# programs on each of ~132 SMs for N from 4096 to 28672 and K from 4096 to 14336.
CANDIDATES: dict[int, list[Config]] = {
    1: _configs(
        "gemv",
        1,
        [
            (128, 128, 8, 4, 1),
            (128, 256, 8, 4, 1),
            (64, 128, 32, 2, 2),
            (128, 256, 8, 4, 1, "h2"),
            (128, 128, 8, 4, 1, "lop3"),
            (256, 128, 8, 4, 1, "lop3"),
            (64, 128, 16, 2, 1, "lop3"),
            (128, 128, 16, 4, 1, "lop3"),
            (128, 128, 8, 4, 2, "lop3"),
            (128, 128, 8, 4, 1, "lop3+pf"),
            # BLOCK_N = 128 x warps: a warp per 128 columns, so the scales and zeros need no
            # layout change through shared memory (no barriers in the loop; bench/sass_count.py)
            (256, 64, 16, 2, 1, "lop3"),
            (256, 128, 16, 2, 1, "lop3"),
            (128, 128, 16, 4, 1, "lop3+l2"),
            (256, 128, 8, 4, 1, "lop3+l2"),
            # k-slice counts that led the chain sweep of GPU runs 13-14 (bench_m1_chain)
            (256, 128, 16, 4, 1, "lop3"),
            (128, 128, 4, 4, 1, "lop3"),
        ],
    ),
    # Decode batches of 2-4 rows (`_small_batch`): the packed-pair GEMV over every row, or the
    # M = 16 path's tiles that GPU runs 6-12 tuned most often.
    2: _small_batch(2),
    4: _small_batch(4),
    16: _configs(
        "dot",
        16,
        [
            (64, 128, 8, 4, 3),
            (128, 128, 8, 4, 3),
            (128, 64, 8, 4, 4),
            (64, 128, 16, 4, 3),
            (128, 128, 4, 4, 3),
            (128, 64, 8, 4, 4, "zsub"),
            (128, 128, 8, 4, 3, "zsub"),
            (64, 128, 8, 4, 3, "zsub"),
            (128, 64, 8, 4, 4, "fma+atomic"),
            (128, 64, 8, 4, 4, "zsub+atomic"),
            (128, 128, 4, 4, 3, "zsub+red"),
            (128, 128, 8, 4, 3, "zsub+kjoin+lop3"),
            (64, 128, 8, 4, 3, "zsub+kjoin+lop3+swap"),
            (128, 128, 8, 4, 3, "zsub+kjoin+lop3+swap"),
            (128, 64, 8, 4, 4, "zsub+kjoin+lop3+swap"),
            (128, 128, 4, 8, 3, "zsub+kjoin+lop3+swap"),
        ],
    ),
    64: [
        *_configs("dot", 16, [(64, 128, 8, 4, 3), (128, 128, 4, 4, 3)]),
        *_configs("dot", 32, [(128, 128, 4, 4, 3, "zsub")]),
        *_configs("dot", 64, [(64, 128, 4, 4, 3, "zsub")]),
        *_configs("dot", 32, [(128, 128, 4, 4, 3, "zsub+kjoin+lop3")]),
        *_configs("dot", 32, [(128, 128, 4, 4, 3, "zsub+kjoin+lop3+swap")]),
        *_configs(
            "dot",
            64,
            [
                (128, 128, 4, 4, 3, "zsub+kjoin+lop3+swap"),
                (64, 128, 4, 4, 3, "zsub+kjoin+lop3+swap"),
            ],
        ),
        *_configs("dot", 64, [(64, 128, 4, 4, 3, "zsub+kjoin+lop3")]),
        *_configs("dot", 32, [(64, 128, 8, 4, 3), (128, 128, 4, 4, 3)]),
        *_configs(
            "dot",
            64,
            [
                (64, 128, 4, 4, 3),
                (128, 64, 4, 4, 4),
                (128, 128, 2, 4, 3),
                (256, 64, 2, 8, 3),
                (128, 128, 1, 8, 3),
            ],
        ),
    ],
    256: [
        *_configs("dot", 64, [(128, 64, 1, 4, 4), (256, 64, 1, 8, 3), (128, 128, 1, 4, 3)]),
        *_configs("dot", 64, [(64, 128, 1, 4, 3), (128, 64, 1, 4, 4, "zsub")]),
        *_configs("dot", 64, [(128, 128, 1, 4, 3, "zsub+kjoin+lop3")]),
        *_configs("dot", 128, [(128, 128, 1, 8, 3, "zsub+kjoin+lop3")]),
        *_configs("dot", 128, [(128, 128, 1, 8, 3, "zsub+kjoin+lop3+swap")]),
        *_configs("dot", 64, [(256, 128, 1, 8, 3, "zsub+kjoin+lop3+swap")]),
        *_configs(
            "dot",
            128,
            [(128, 64, 1, 8, 3), (256, 64, 1, 8, 3), (128, 128, 1, 8, 3), (64, 64, 1, 4, 4)],
        ),
        Config("cublas", 0, 128, 64, 1, 4, 1),
    ],
    1024: [
        *_configs(
            "dot",
            128,
            [(128, 64, 1, 8, 3), (256, 64, 1, 8, 3), (128, 128, 1, 8, 3), (128, 64, 1, 4, 4)],
        ),
        *_configs("dot", 256, [(128, 64, 1, 8, 3)]),
        *_configs("dot", 64, [(256, 64, 1, 8, 4)]),
        *_configs("dot", 128, [(256, 128, 1, 8, 2)]),
        *_configs(
            "dot",
            128,
            [(128, 128, 1, 8, 3, "zsub+kjoin+lop3"), (256, 64, 1, 8, 3, "zsub+kjoin+lop3")],
        ),
        Config("cublas", 0, 128, 64, 1, 4, 1),
    ],
}
# In the interpreter (CPU tests) every bucket runs one small config of the same kind.
INTERPRET_CONFIGS = {
    1: Config("gemv", 1, 32, 64, 2, 4, 1),
    2: Config("dot", 16, 32, 64, 2, 4, 1),
    4: Config("dot", 16, 32, 64, 2, 4, 1),
    16: Config("dot", 16, 32, 64, 2, 4, 1),
    64: Config("dot", 32, 32, 64, 2, 4, 1),
    256: Config("dot", 32, 32, 32, 1, 4, 1),
    1024: Config("cublas", 0, 32, 64, 1, 4, 1),
}
_TUNED: dict[tuple[Any, ...], Config] = {}


def bucket(m: int) -> int:
    """The M bucket that a config is tuned for: 1, 2, <=4, <=16, <=64, <=256, larger."""
    return next(b for b in (1, 2, 4, 16, 64, 256) if m <= b) if m <= 256 else 1024


def _group(layer: QuantLinear) -> int:
    g = layer.group_size
    return BIG_GROUP if g == -1 or g >= layer.in_features else g


def _applies(cfg: Config, layer: QuantLinear, dtype: torch.dtype) -> bool:
    """Whether cfg's variant runs as itself for this layer and activation dtype (else it runs
    as the plain kernel): "h2" needs fp16 and 2- or 4-bit codes; "lop3" and "pair" fp16,
    4-bit codes and K a multiple of 8 (and, at launch, x 4-byte aligned: `_pairs_mode`);
    "zsub" fp16 and a K-block inside one group; "kjoin" that and 4-bit codes (and, for tiles
    of 64+ rows or "swap", N a multiple of 16). A GEMV of several rows runs only as "lop3" /
    "pair"."""
    flags = cfg.flags()
    fp16 = dtype == torch.float16
    if cfg.kind == "gemv" and cfg.block_m > 1 and not flags & {"lop3", "pair"}:
        return False  # a GEMV of several rows has only the packed-pair loop
    if flags & {"zsub", "kjoin"}:
        inside = fp16 and cfg.block_k <= _group(layer)
        wide = cfg.block_m >= 64 or "swap" in flags  # swap: the weights are wgmma's M side
        if "kjoin" in flags and wide and layer.out_features % 16:
            return False  # Triton (3.6, 3.9) fails to compile them for a row stride N % 16 != 0
        return inside and ("kjoin" not in flags or layer.bits == 4)
    if flags & {"lop3", "pair"}:
        return fp16 and layer.bits == 4 and layer.in_features % 8 == 0
    if "h2" in flags:
        return fp16 and layer.bits in (2, 4)
    return True


def _kjoin_mode(cfg: Config, layer: QuantLinear, dtype: torch.dtype) -> int:
    """The dot's KJOIN constant: 2 for "zsub+kjoin+lop3", 1 for "zsub+kjoin", else 0."""
    flags = cfg.flags()
    if not {"zsub", "kjoin"} <= flags or not _applies(cfg, layer, dtype):
        return 0
    return 2 if "lop3" in flags else 1


def _pairs_mode(cfg: Config, layer: QuantLinear, x: torch.Tensor) -> int:
    """The GEMV's LOP3 constant: 2 for "lop3", 1 for "pair", 0 where it does not apply (x is
    read as int32 pairs, so it must also start on a 4-byte boundary)."""
    flags = cfg.flags()
    if not _applies(cfg, layer, x.dtype) or x.data_ptr() % 4:
        return 0
    return 2 if "lop3" in flags else 1 if "pair" in flags else 0


def _even(cfg: Config, n: int, k: int) -> bool:
    """Whether an [n, k] layer is whole tiles of cfg (the GEMV's EVEN: its loads need no masks),
    unless cfg asks for the masked kernel ("odd")."""
    return n % cfg.block_n == 0 and k % cfg.block_k == 0 and "odd" not in cfg.flags()


def _config_pdl(cfg: Config, device: torch.device) -> bool:
    """PDL for a launch of `cfg` (`use_pdl`), except the dot kernel's tiles of 64+ rows and its
    "swap" tiles (wgmma): back to back, the former ran 27-31% slower with it on two of four
    shapes, within 1.3% on the others (GPU runs 9 and 10), the latter 10-18% slower at M = 16
    on the two shapes where the tuner picked them (runs 13 and 14; docs/kernels.md)."""
    wgmma = cfg.block_m >= 64 or "swap" in cfg.flags()
    return use_pdl(device) and not (cfg.kind == "dot" and wgmma)


def _launch(
    layer: QuantLinear, x: torch.Tensor, out: torch.Tensor, cfg: Config, warmup: bool = False
) -> torch.Tensor:
    """Run `cfg` on x [M, K] into out [M, N] (contiguous). warmup: only compile the kernel."""
    m, n, k = x.shape[0], layer.out_features, layer.in_features
    if m == 0:
        return out
    p = layer.prepared
    qw = p["qweight"]
    qh = p.get("qhigh", qw)
    group, groups = _group(layer), num_groups(k, layer.group_size)
    pdl = _config_pdl(cfg, x.device)
    common = dict(BITS=layer.bits, GROUP=group, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, PDL=pdl)
    launch: dict[str, Any] = dict(num_warps=cfg.warps, num_stages=cfg.stages, warmup=warmup)
    launch |= pdl_launch(pdl)
    # kernel.run(..., grid=, warmup=) is kernel[grid](...) that can also only compile.
    if cfg.kind == "cublas":
        w = torch.empty(k, n, device=x.device, dtype=x.dtype)
        grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(k, cfg.block_k))
        _dequant_kernel.run(
            qw,
            qh,
            p["scales"],
            p["zeros"],
            w,
            n,
            k,
            groups,
            qw.stride(0),
            qh.stride(0),
            grid=grid,
            **common,
            **launch,
        )
        return out if warmup else torch.mm(x, w, out=out)
    k_blocks = triton.cdiv(k, cfg.block_k)
    split_k = min(cfg.split_k, k_blocks)
    grid_n = triton.cdiv(n, cfg.block_n)
    grid_m = 1 if cfg.kind == "gemv" else triton.cdiv(m, cfg.block_m)
    if "counters" not in p:  # layers built without `prepare` (benchmarks): before any capture
        p["counters"] = _counters(n, x.device)
    cnt = p["counters"]
    flags = cfg.flags()
    atomic = 0 if split_k == 1 else 2 if "atomic" in flags else 1 if "red" in flags else 0
    if atomic != 2 and split_k > 1 and grid_m * grid_n > cnt.numel():
        raise ValueError(f"{cfg} needs {grid_m * grid_n} split-K counters, have {cnt.numel()}")
    f32, dev = torch.float32, x.device
    ws, target = out, out
    if warmup:  # only the pointer types (the same as below) matter
        if split_k > 1 and atomic != 2:
            ws = torch.empty(1, device=dev, dtype=f32)
        if atomic == 2 and (INTERPRET or out.dtype == torch.bfloat16):
            target = torch.empty(1, device=dev, dtype=f32)
    elif atomic == 0 and split_k > 1:
        ws = torch.empty(split_k, m, n, device=dev, dtype=f32)
    elif atomic == 1:
        ws = torch.zeros(m, n, device=dev, dtype=f32)
    elif atomic == 2:  # into the zeroed output; no 16-bit atomics in the interpreter, no bf16
        fp32_sum = INTERPRET or out.dtype == torch.bfloat16
        target = torch.zeros(m, n, device=dev, dtype=f32) if fp32_sum else out.zero_()
    args = (x, qw, qh, p["scales"], p["zeros"], target, ws, cnt)
    if cfg.kind == "gemv":
        lop3 = _pairs_mode(cfg, layer, x)
        if cfg.block_m > 1 and not lop3 and x.data_ptr() % 4:  # x read as int32 pairs
            x = x.clone()  # an aligned copy (a few KB)
            args = (x, *args[1:])
            lop3 = _pairs_mode(cfg, layer, x)
        if m > cfg.block_m or (cfg.block_m > 1 and not lop3):
            raise ValueError(f"{cfg} cannot take {m} rows of {x.dtype} x for {layer}")
        _gemv_kernel.run(
            *args,
            m,
            n,
            k,
            groups,
            qw.stride(0),
            qh.stride(0),
            k_blocks,
            split_k,
            H2="h2" in flags and _applies(cfg, layer, x.dtype),
            LOP3=lop3,
            ATOMIC=atomic,
            PREFETCH="pf" in flags,
            L2="l2" in flags,
            ROWS=cfg.block_m,
            EVEN=_even(cfg, n, k),
            grid=(grid_n, split_k),
            **common,
            **launch,
        )
    else:
        # The interpreter's bf16 dot is wrong (numpy has no bf16): bf16 takes the fp32 dot.
        fp32_dot = x.dtype == torch.float32 or (INTERPRET and x.dtype == torch.bfloat16)
        dot_dtype = (
            tl.float32 if fp32_dot else {torch.float16: tl.float16}.get(x.dtype, tl.bfloat16)
        )
        # DEQ 1 and 2 need fp16 x and a block inside one group; the default variant takes DEQ 1
        # up to BLOCK_M 64 only (larger tiles keep DEQ 0 unless a flag asks for zsub / kjoin).
        one_group = x.dtype == torch.float16 and cfg.block_k <= group
        deq = 0 if not one_group or "fma" in flags else 2 if "zsub" in flags else 1
        kjoin = _kjoin_mode(cfg, layer, x.dtype) if one_group else 0
        _dot_kernel.run(
            *args,
            m,
            n,
            k,
            groups,
            x.stride(0),
            qw.stride(0),
            qh.stride(0),
            target.stride(0),
            k_blocks,
            split_k,
            BLOCK_M=cfg.block_m,
            DEQ=0 if deq == 1 and cfg.block_m > 64 else deq,
            DOT_DTYPE=dot_dtype,
            ATOMIC=atomic,
            KJOIN=kjoin,
            SWAP=bool(kjoin) and "swap" in flags,
            grid=(grid_n, grid_m, split_k),
            **common,
            **launch,
        )
    if target is not out and not warmup:
        out.copy_(target)
    return out


def _precompile(
    layer: QuantLinear, x: torch.Tensor, out: torch.Tensor, cands: list[Config]
) -> None:
    """Compile all candidates in parallel threads (triton's AsyncCompileMode, where this
    triton has it); best effort: a candidate that fails here fails again, and is skipped, when
    timed."""
    mode = getattr(triton, "AsyncCompileMode", None)
    if mode is None:
        return
    try:
        pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
        with pool, mode(pool, ignore_errors=True):
            for cfg in cands:
                try:
                    _launch(layer, x, out, cfg, warmup=True)
                except Exception:
                    continue
    except Exception:  # an older AsyncCompileMode signature or a failed compile: time serially
        return


def autotune(
    candidates: list[Config],
    run: Callable[[Config], Any],
    timer: Callable[[Callable[[], Any]], float],
    finalists: int = 3,
) -> Config:
    """The candidate with the smallest `timer(lambda: run(cfg))`; a candidate that raises
    (fails to compile on this card, out of resources) is skipped, never fatal. The fastest
    `finalists` are timed once more and keep their better time: one timing of a 10-20 us kernel
    can be off by more than the configs differ (GPU runs 6 and 7 picked different configs for
    the same layers, docs/kernels.md)."""
    times: dict[Config, float] = {}
    for cfg in candidates:
        try:
            times[cfg] = timer(partial(run, cfg))
        except Exception:
            continue
    if not times:
        raise RuntimeError(f"no kernel config ran: {candidates}")
    best = sorted(times, key=times.__getitem__)[:finalists]
    if len(best) > 1:
        for cfg in best:
            with contextlib.suppress(Exception):  # its first time stands
                times[cfg] = min(times[cfg], timer(partial(run, cfg)))
    return min(best, key=times.__getitem__)


def _do_bench(fn: Callable[[], Any], reps: int = 8, replays: int = 5) -> float:
    """GPU milliseconds of one fn() with a cold L2: a CUDA graph of `reps` pairs (an L2 flush,
    fn) is timed against a graph of the `reps` flushes alone, median of `replays` replays
    each. In a graph the host's launch cost drops out: `triton.testing.do_bench`, launching
    eagerly, timed `_launch`'s ~50 us of Python, not an 8 us GEMV (GPU run 13: 53-68 us for
    every M = 1 config of 4096x4096), so it ranked small kernels by noise. The flush reads (never writes) a buffer
    of twice the L2, leaving no dirty lines for fn's loads to write back. Where capture fails,
    `triton.testing.do_bench` times it."""
    dev = torch.device("cuda", torch.cuda.current_device())
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0) or 64 << 20
    buf = torch.empty(max(2 * l2, 64 << 20) // 2, dtype=torch.float16, device=dev).fill_(1)
    fn()  # compiled and warm, split-K counters made, before any capture

    def timed(with_fn: bool) -> float:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm the ops on a side stream, as capture asks
            buf.amax()
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                buf.amax()
                if with_fn:
                    fn()
        graph.replay()
        times = []
        for _ in range(replays):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[replays // 2]

    try:
        return max(timed(True) - timed(False), 0.0) / reps
    except RuntimeError as e:  # a capture this torch or driver refuses: time eagerly instead
        log.warning("kernel tuning without CUDA graphs (%s)", e)
        return float(triton.testing.do_bench(fn, return_mode="median"))


TUNE_LOG: list[tuple[tuple[Any, ...], float]] = []  # (key, seconds spent tuning it)


# Tuned configs also persist across processes, in one JSON file per (GPU model, Triton version,
# this module's source), so a restarted server skips tuning. BITSERVE_CACHE_DIR moves it;
# BITSERVE_TUNE_CACHE=0 turns it off.
TUNE_CACHE_DIR = CACHE_DIR
TUNE_CACHE = os.environ.get("BITSERVE_TUNE_CACHE", "1") != "0"


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def _tune_file(device: torch.device) -> Path:
    """The tuning cache file for this GPU model, Triton version and kernel source."""
    ident = Path(__file__).read_bytes() + f"{_device_name(device)} {triton.__version__}".encode()
    return TUNE_CACHE_DIR / f"triton-tune-{hashlib.sha1(ident).hexdigest()[:16]}.json"


def _read_tuned(path: Path) -> dict[str, Config]:
    """The configs saved in `path` (nothing if it is missing or unreadable)."""
    try:
        raw = json.loads(path.read_text())
        return {k: Config(*v) for k, v in raw.items()}
    except (OSError, ValueError, TypeError, AttributeError):
        return {}


def _write_tuned(path: Path, key: str, cfg: Config) -> None:
    """Add key -> cfg to `path`, merged with what other processes saved meanwhile; best effort
    (a read-only home only loses the cache)."""
    try:
        entries = _read_tuned(path) | {key: cfg}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({k: list(c) for k, c in sorted(entries.items())}, indent=1))
        tmp.replace(path)
    except OSError as e:
        log.warning("tuned kernel configs not saved to %s: %s", path, e)


def _config(layer: QuantLinear, x: torch.Tensor, out: torch.Tensor) -> Config:
    """The fastest candidate for this shape and M bucket, tuned once (on the first M seen in the
    bucket) and cached in memory and on disk (`_tune_file`); a saved config is used only if
    it is still a candidate."""
    b = bucket(x.shape[0])
    if INTERPRET:
        return INTERPRET_CONFIGS[b]
    key = (layer.in_features, layer.out_features, layer.bits, layer.group_size, b, x.dtype)
    if key not in _TUNED:
        t0 = time.perf_counter()
        cands = [c for c in CANDIDATES[b] if _applies(c, layer, x.dtype)]  # no plain GEMV twice
        path, name = _tune_file(x.device) if TUNE_CACHE else None, ",".join(map(str, key))
        saved = _read_tuned(path).get(name) if path else None
        if saved in cands:
            _TUNED[key] = saved
        else:
            _precompile(layer, x, out, cands)
            _TUNED[key] = autotune(cands, lambda c: _launch(layer, x, out, c), _do_bench)
            if path:
                _write_tuned(path, name, _TUNED[key])
        TUNE_LOG.append((key, time.perf_counter() - t0))
    return _TUNED[key]


def matmul(layer: QuantLinear, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (contiguous, fp16/bf16/fp32) @ dequant(W).T -> [M, N] in x's dtype (into
    `out` if given, contiguous [M, N])."""
    if out is None:
        out = torch.empty(x.shape[0], layer.out_features, device=x.device, dtype=x.dtype)
    return _launch(layer, x, out, _config(layer, x, out))


def _forward(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    shape = x.shape
    y = matmul(layer, x.reshape(-1, shape[-1]).contiguous())
    if layer.bias is not None:
        y = y + layer.bias.to(y.dtype)
    return y.reshape(*shape[:-1], layer.out_features)


BACKEND = register_backend(
    Backend(name="triton", priority=20, supports=_supports, prepare=_prepare, forward=_forward)
)
