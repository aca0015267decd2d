"""Prototype for issue 5's small-M targets: a W4 matmul for 1-16 rows of fp16 x on the tensor
cores' `mma.sync.m16n8k16`, with the codes packed offline in the instruction's fragment order
(Marlin's idea, written in Triton), so a thread's loaded word already holds its A fragment: one
`lop3` and one f16x2 subtraction or FMA per pair of codes turn it into exact fp16 q - z, and the
dot runs on the tensor cores instead of f16x2 FMAs. No shared memory, no barrier, no layout
conversion; up to 8 rows cost what one row does (the instruction's N side is the batch).

Not yet used by `QuantLinear`: its packing differs from the Triton backend's, so it is measured
here first (`main`: correctness against torch, then timing in CUDA graphs over rotating copies
against fp16 cuBLAS and the backend's tuned kernels), and adopted once a GPU run shows it faster.

How a word maps to the instruction. For n-tile j (16 output columns) and k-step s (16 k), lane
l = 4 g + t of a warp holds one word with the 8 codes (rows are n, columns k, relative to
(16 j, 16 s)): nibble 0 (g, 2t), 4 (g, 2t+1) | 1 (g+8, 2t), 5 (g+8, 2t+1) | 2 (g, 2t+8),
6 (g, 2t+9) | 3 (g+8, 2t+8), 7 (g+8, 2t+9). Masks 0x000F000F / 0x00F000F0 of the word and of
the word >> 8 give these four pairs, which are A's four registers. Words sit in memory as
[k-step][n-tile // 4][lane][n-tile % 4]: Triton's 16-byte loads of a contiguous run of 128 x
warps words give lane l of warp w the 4 n-tiles 4 (program's first quad + w) + 0..3 (checked on
the GPU by `lane_probe`, and in every sm_90 / sm_80 compile of bench/compile_check.py, which
tests/test_kernels_compile.py runs).

    python bench/mma_gemv.py [--budget-s 120]    # on a GPU
"""

from __future__ import annotations

import argparse
import itertools
import re
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import triton
import triton.language as tl

from bitserve.kernels.triton_int import INTERPRET_JIT, _finish, _h2

# Nibble p of a word holds the code at (n offset, k offset) SLOT[p] from (16 j + g, 16 s + 2 t).
SLOT = [(0, 0), (8, 0), (0, 8), (8, 8), (0, 1), (8, 1), (0, 9), (8, 9)]


def pack_mma(q: torch.Tensor) -> torch.Tensor:
    """Codes q [K, N] (0..15; K % 16 == 0, N % 64 == 0) as int32 words in fragment order."""
    k, n = q.shape
    if k % 16 or n % 64:
        raise ValueError(f"K must be a multiple of 16 and N of 64, not {k} x {n}")
    q5 = q.to(torch.int64).view(k // 16, 16, n // 16, 16).permute(0, 2, 3, 1)  # [s, j, n, k]
    g, t = torch.arange(8), torch.arange(4)
    dn = torch.tensor([d[0] for d in SLOT])
    dk = torch.tensor([d[1] for d in SLOT])
    nn = (g[:, None, None] + dn[None, None, :]).expand(8, 4, 8)
    kk = (2 * t[None, :, None] + dk[None, None, :]).expand(8, 4, 8)
    codes = q5[:, :, nn, kk]  # [s, j, g, t, nibble]
    words = (codes << (4 * torch.arange(8))).sum(-1)  # [s, j, g, t]
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    words = words.view(k // 16, n // 64, 4, 8, 4).permute(0, 1, 3, 4, 2)  # [s, quad, g, t, r]
    return words.contiguous().view(-1)


# One k-step for rows 0-7 (and 8-15: `_MMA2_PTX`): the word's four pairs as exact fp16 q - z
# ($5: 1024 + z of row g in both halves, $6: -(64 + z) of row g + 8, the high nibbles' pairs
# being 1024 + 16 q), then D = A B + C with B = x's k-step for the 8 rows, fp32 accumulators.
_DEQ = """
.reg .b32 w8, p, a0, a1, a2, a3, k16;
mov.b32 k16, 0x2C002C00;
lop3.b32 p, {w}, 0x000F000F, 0x64006400, 0xEA;
sub.f16x2 a0, p, {zl};
lop3.b32 p, {w}, 0x00F000F0, 0x64006400, 0xEA;
fma.rn.f16x2 a1, p, k16, {zh};
shr.u32 w8, {w}, 8;
lop3.b32 p, w8, 0x000F000F, 0x64006400, 0xEA;
sub.f16x2 a2, p, {zl};
lop3.b32 p, w8, 0x00F000F0, 0x64006400, 0xEA;
fma.rn.f16x2 a3, p, k16, {zh};
"""
_MMA = "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {{{d}}}, {{a0, a1, a2, a3}}, {{{b}}}, {{{c}}};\n"
_MMA1_PTX = tl.constexpr(
    "{\n"
    + _DEQ.format(w="$4", zl="$5", zh="$6")
    + _MMA.format(d="$0, $1, $2, $3", b="$7, $8", c="$9, $10, $11, $12")
    + "}"
)
_MMA2_PTX = tl.constexpr(
    "{\n"
    + _DEQ.format(w="$8", zl="$9", zh="$10")
    + _MMA.format(d="$0, $1, $2, $3", b="$11, $12", c="$15, $16, $17, $18")
    + _MMA.format(d="$4, $5, $6, $7", b="$13, $14", c="$19, $20, $21, $22")
    + "}"
)


@triton.jit
def _frag(v0, v1, W: tl.constexpr):
    """Per-lane values at columns 2t, 2t + 1 of row g as [W, 4 (r), 8 (g), 8 (2t + c)]."""
    v = tl.reshape(tl.join(v0, v1), (W, 8, 4, 4, 2))  # w, g, t, r, c
    return tl.reshape(tl.permute(v, (0, 3, 1, 2, 4)), (W, 4, 8, 8))


@triton.jit
def _rows(a0, a1, a4, a5, W: tl.constexpr):
    """Rows g (or g + 8) of every tile, [W, 4, 8, 16 k]: columns 2t, 2t+1 from a0, a1 and
    2t+8, 2t+9 from a4, a5."""
    v = tl.join(_frag(a0, a1, W), _frag(a4, a5, W))  # k half last
    return tl.reshape(tl.permute(v, (0, 1, 2, 4, 3)), (W, 4, 8, 16))


@triton.jit
def _mma_emulated(a0, a1, a2, a3, a4, a5, a6, a7, x0, x1, x2, x3, c0, c1, c2, c3, W: tl.constexpr):
    """What `mma.sync.m16n8k16` computes for every warp and n-tile, in Triton ops on the whole
    tensor (the interpreter's path: it has no inline PTX and no lanes). a0..a7: the A values of
    each element (fp32, fragment order), x0..x3: B at k = 2t, 2t+1, 2t+8, 2t+9 for row g,
    c0..c3: the accumulators. Rebuilds each [16 n, 16 k] tile from its 32 lanes, multiplies,
    and hands every lane back its 4 results, so the packing and fragment maps are checked."""
    v = tl.join(_rows(a0, a1, a4, a5, W), _rows(a2, a3, a6, a7, W))  # n half last
    A = tl.reshape(tl.permute(v, (0, 1, 4, 2, 3)), (W, 4, 16, 16))  # [W, r, n, k]
    lo = tl.max(tl.max(tl.reshape(tl.join(x0, x1), (W, 8, 4, 4, 2)), axis=3), axis=0)
    hi = tl.max(tl.max(tl.reshape(tl.join(x2, x3), (W, 8, 4, 4, 2)), axis=3), axis=0)
    B = tl.join(tl.reshape(lo, (8, 8)), tl.reshape(hi, (8, 8)))  # [m, k % 8, k half]
    B = tl.reshape(tl.permute(B, (0, 2, 1)), (8, 16))  # [m, k]
    D = tl.sum(A[:, :, :, None, :] * B[None, None, None, :, :], axis=4)  # [W, r, n, m]
    D = tl.reshape(D, (W, 4, 2, 8, 4, 2))  # w, r, n half, g, t, c
    D = tl.reshape(tl.permute(D, (0, 3, 4, 1, 2, 5)), (W * 128, 2, 2))
    d_c0, d_c1 = tl.split(D)
    d0, d2 = tl.split(d_c0)
    d1, d3 = tl.split(d_c1)
    return c0 + d0, c1 + d1, c2 + d2, c3 + d3


@triton.jit
def _x_frag(x_ptr, row, M, K, kx, MODE: tl.constexpr):
    """B of one k-step for batch row `row` (per lane): x[row, kx .. kx + 1] and
    x[row, kx + 8 .. kx + 9] as two int32s of fp16 pairs (MODE 2) or four fp32s (MODE 1); rows
    past M give zeros."""
    ok = row < M
    if MODE == 2:  # row and kx per thread ([32 W]): each thread loads once for its 4 words
        xw = x_ptr.to(tl.pointer_type(tl.int32)) + (row * K + kx) // 2
        return _per_word(tl.load(xw, mask=ok, other=0)), _per_word(
            tl.load(xw + 4, mask=ok, other=0)
        )
    else:
        p = x_ptr + row * K + kx
        return (
            tl.load(p, mask=ok, other=0.0).to(tl.float32),
            tl.load(p + 1, mask=ok, other=0.0).to(tl.float32),
            tl.load(p + 8, mask=ok, other=0.0).to(tl.float32),
            tl.load(p + 9, mask=ok, other=0.0).to(tl.float32),
        )


@triton.jit
def _per_word(v):
    """A value per thread [32 W] as the value of each of the thread's 4 words [128 W]."""
    return tl.reshape(tl.broadcast_to(v[:, None], (v.shape[0], 4)), (v.shape[0] * 4,))


@triton.jit
def _nib(w, P: tl.constexpr, z):
    """Nibble P of each word minus z, fp32."""
    return ((w >> (4 * P)) & 15).to(tl.float32) - z


@triton.jit
def _step(x_ptr, w, z_lo, z_hi, M, K, step, c, W: tl.constexpr, ROWS8: tl.constexpr):
    """One k-step: c (8 accumulators; 4 used when ROWS8 is 1) += the tiles' A times x's B."""
    if not INTERPRET_JIT:
        lane = tl.arange(0, 32 * W) % 32  # per thread
        g = lane // 4
        kx = step * 16 + 2 * (lane % 4)
        b0, b1 = _x_frag(x_ptr, g, M, K, kx, 2)
        zl, zh = _h2(z_lo + 1024.0), _h2(-(z_hi + 64.0))
        if ROWS8 == 1:
            c0, c1, c2, c3 = tl.inline_asm_elementwise(
                _MMA1_PTX,
                "=f,=f,=f,=f,r,r,r,r,r,f,f,f,f",
                [w, zl, zh, b0, b1, c[0], c[1], c[2], c[3]],
                dtype=(tl.float32,) * 4,
                is_pure=True,
                pack=1,
            )
            return c0, c1, c2, c3, c[4], c[5], c[6], c[7]
        else:
            b2, b3 = _x_frag(x_ptr, g + 8, M, K, kx, 2)
            return tl.inline_asm_elementwise(
                _MMA2_PTX,
                "=f,=f,=f,=f,=f,=f,=f,=f,r,r,r,r,r,r,r,f,f,f,f,f,f,f,f",
                [w, zl, zh, b0, b1, b2, b3, c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]],
                dtype=(tl.float32,) * 8,
                is_pure=True,
                pack=1,
            )
    else:
        lane = (tl.arange(0, 128 * W) // 4) % 32  # per word
        g = lane // 4
        kx = step * 16 + 2 * (lane % 4)
        a0, a1 = _nib(w, 0, z_lo), _nib(w, 4, z_lo)
        a2, a3 = _nib(w, 1, z_hi), _nib(w, 5, z_hi)
        a4, a5 = _nib(w, 2, z_lo), _nib(w, 6, z_lo)
        a6, a7 = _nib(w, 3, z_hi), _nib(w, 7, z_hi)
        x0, x1, x2, x3 = _x_frag(x_ptr, g, M, K, kx, 1)
        c0, c1, c2, c3 = _mma_emulated(
            a0, a1, a2, a3, a4, a5, a6, a7, x0, x1, x2, x3, c[0], c[1], c[2], c[3], W
        )
        c4, c5, c6, c7 = c[4], c[5], c[6], c[7]
        if ROWS8 == 2:
            x0, x1, x2, x3 = _x_frag(x_ptr, g + 8, M, K, kx, 1)
            c4, c5, c6, c7 = _mma_emulated(
                a0, a1, a2, a3, a4, a5, a6, a7, x0, x1, x2, x3, c4, c5, c6, c7, W
            )
        return c0, c1, c2, c3, c4, c5, c6, c7


@triton.jit
def mma_gemv_kernel(
    x_ptr,
    qw_ptr,
    s_ptr,
    z_ptr,
    out_ptr,
    ws_ptr,
    cnt_ptr,
    M,
    N,
    K,
    n_groups,
    split_k,
    GROUP: tl.constexpr,
    W: tl.constexpr,
    ROWS8: tl.constexpr,
    STAGES: tl.constexpr,
):
    """out[M, N] = x[M, K] @ ((q - z) * s) for M <= 8 * ROWS8; program (quads of n-tiles,
    k-slice). Each thread holds 4 words per k-step (4 n-tiles, one per register of its 16-byte
    load); a group's 16-k steps chain their MMAs from zero in fp32, and the group's scales are
    applied to the result (4 FMAs per lane, group and 8 rows). STAGES > 1: Triton's pipeliner
    copies the next groups' words (and x) to shared memory while this one computes (`cp.async`);
    without it, ptxas spreads a group's word loads between its MMAs and waits on each. On the
    GPU the steps are PTX (`_MMA1_PTX`, `_MMA2_PTX`); the interpreter runs the same in Triton
    ops (`_mma_emulated`)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    e = tl.arange(0, 128 * W)
    lane = (e // 4) % 32
    g = lane // 4
    t = lane % 4
    n_lo = 16 * ((pid_n * W + e // 128) * 4 + e % 4) + g
    n_hi = n_lo + 8
    steps: tl.constexpr = GROUP // 16
    words = (N // 64) * 128  # one k-step's words
    zero = tl.zeros((128 * W,), dtype=tl.float32)
    acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7 = zero, zero, zero, zero, zero, zero, zero, zero
    for gi in tl.range(pid_k, n_groups, split_k, num_stages=STAGES):
        z_lo = tl.load(z_ptr + gi * N + n_lo).to(tl.float32)
        z_hi = tl.load(z_ptr + gi * N + n_hi).to(tl.float32)
        c = (zero, zero, zero, zero, zero, zero, zero, zero)
        for s in tl.static_range(steps):
            step = gi * steps + s
            w = tl.load(qw_ptr + step * words + pid_n * 128 * W + e)
            c = _step(x_ptr, w, z_lo, z_hi, M, K, step, c, W, ROWS8)
        s_lo = tl.load(s_ptr + gi * N + n_lo).to(tl.float32)
        s_hi = tl.load(s_ptr + gi * N + n_hi).to(tl.float32)
        acc0 += c[0] * s_lo
        acc1 += c[1] * s_lo
        acc2 += c[2] * s_hi
        acc3 += c[3] * s_hi
        if ROWS8 == 2:
            acc4 += c[4] * s_lo
            acc5 += c[5] * s_lo
            acc6 += c[6] * s_hi
            acc7 += c[7] * s_hi
    # Lane (g, t)'s results: rows (of x) 2t, 2t + 1 (+ 8 in the second block), columns n_lo, n_hi.
    m = tl.join(tl.join(2 * t, 2 * t + 1), tl.join(2 * t, 2 * t + 1))
    n = tl.join(tl.join(n_lo, n_lo), tl.join(n_hi, n_hi))
    y = tl.join(tl.join(acc0, acc1), tl.join(acc2, acc3))
    if ROWS8 == 2:
        m = tl.join(m, m + 8)
        n = tl.join(n, n)
        y = tl.join(y, tl.join(tl.join(acc4, acc5), tl.join(acc6, acc7)))
    at = m * N + n
    _finish(y, out_ptr + at, m < M, ws_ptr + at, M * N, cnt_ptr + pid_n, pid_k, split_k, 0)


def mma_gemv(
    x: torch.Tensor,
    qw: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group: int,
    warps: int = 4,
    split_k: int = 1,
    stages: int = 2,
    out: torch.Tensor | None = None,
    ws: torch.Tensor | None = None,
    counters: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M, K] fp16 (M <= 16, contiguous) @ the layer packed by `pack_mma`, scales and zero
    codes [K / group, N] fp16 (integer zero codes: the GPU path rounds them). Buffers may be
    passed in (graph capture)."""
    m, k = x.shape
    n = scales.shape[1]
    problems = [
        f"x is {x.dtype}, not float16" if x.dtype != torch.float16 else "",
        "x is not contiguous" if not x.is_contiguous() else "",
        f"M={m} rows, more than 16" if m > 16 else "",
        f"warps={warps}, not 1, 2, 4 or 8" if warps not in (1, 2, 4, 8) else "",
        f"N={n} is not a multiple of 64 x warps" if n % (64 * warps) else "",
        f"group={group} is not a positive multiple of 16 dividing K={k}"
        if group <= 0 or group % 16 or k % group
        else "",
    ]
    if not any(problems):
        g = k // group
        if scales.shape != (g, n) or zeros.shape != (g, n):
            problems.append(
                f"scales {tuple(scales.shape)}, zeros {tuple(zeros.shape)}, not {(g, n)}"
            )
        if qw.numel() != k * n // 8:
            problems.append(f"{qw.numel()} words, not K x N / 8 = {k * n // 8}")
    if any(problems):
        raise ValueError("mma_gemv: " + "; ".join(p for p in problems if p))
    n_groups = k // group
    split_k = max(1, min(split_k, n_groups))
    out = torch.empty(m, n, dtype=x.dtype, device=x.device) if out is None else out
    if ws is None:
        ws = torch.empty(split_k * m * n, dtype=torch.float32, device=x.device)
    if counters is None:
        counters = torch.zeros(n // (64 * warps), dtype=torch.int32, device=x.device)
    grid = (n // (64 * warps), split_k)
    mma_gemv_kernel[grid](
        x, qw, scales, zeros, out, ws, counters, m, n, k, n_groups, split_k,
        GROUP=group, W=warps, ROWS8=1 if m <= 8 else 2, STAGES=stages, num_warps=warps,
    )  # fmt: skip
    return out


SPLITS = (2, 4, 8, 16, 32, 64)  # split-K factors the benchmark tries (run 16: up to 32)
WORD_LAYOUT = "sizePerThread = [4], threadsPerWarp = [32], warpsPerCTA = [{w}], order = [0]"


def asm_layouts(ttgir: str) -> set[str | None]:
    """The blocked layouts that the inline-asm ops of a kernel's TTGIR run in."""
    names = dict(re.findall(r"^(#blocked\d*) = #ttg\.blocked<\{(.*?)\}>", ttgir, re.M))
    asm = [line for line in ttgir.splitlines() if "elementwise_inline_asm" in line]
    return {names.get(lay) for line in asm for lay in re.findall(r"#blocked\d*", line)}


def compiled(warps: int, rows8: int, stages: int = 2, arch: int = 90) -> bytes:
    """The sm_`arch` cubin of `mma_gemv_kernel` (g128), compiled without a GPU; raises if an
    MMA does not run in the word load's layout (element e in lane (e // 4) % 32 of warp
    e // 128), which the fragment order assumes, or if the MMAs are not in the PTX."""
    from compile_check import INT_KERNEL_TYPES, compile_asm

    consts = dict(GROUP=128, W=warps, ROWS8=rows8, STAGES=stages)
    asm = compile_asm(mma_gemv_kernel, INT_KERNEL_TYPES, consts, warps, stages, arch)
    want = WORD_LAYOUT.format(w=warps)
    if asm_layouts(asm["ttgir"]) != {want}:
        raise AssertionError(f"MMA steps in layouts {asm_layouts(asm['ttgir'])}, not {want}")
    mmas = 8 * 4 * rows8  # 8 k-steps of a group, 4 n-tiles a thread, rows8 blocks of rows
    found = asm["ptx"].count("mma.sync.aligned.m16n8k16")
    if found != mmas:
        raise AssertionError(f"{found} MMAs in the PTX, not {mmas}")
    return asm["cubin"]


@triton.jit
def lane_probe_kernel(qw_ptr, out_ptr, W: tl.constexpr):
    """out[e] = 32 * warp + lane of the thread that holds element e of a 16-byte-vector load
    of 128 * W words, the load `mma_gemv_kernel` makes (GPU only: the device's own answer,
    where `compiled` reads the compiler's layout)."""
    e = tl.arange(0, 128 * W)
    w = tl.load(qw_ptr + e)
    who = tl.inline_asm_elementwise(
        "{\n.reg .b32 l, wp;\nmov.u32 l, %laneid;\nmov.u32 wp, %tid.x;\n"
        "shr.u32 wp, wp, 5;\nshl.b32 wp, wp, 5;\nadd.u32 $0, wp, l;\n}",
        "=r,r",
        [w],
        dtype=tl.int32,
        is_pure=True,
        pack=1,
    )
    tl.store(out_ptr + e, who)


def lane_probe(warps: int) -> bool:
    """True if element e of the word load sits in lane (e // 4) % 32 of warp e // 128."""
    qw = torch.zeros(128 * warps, dtype=torch.int32, device="cuda")
    out = torch.full_like(qw, -1)
    lane_probe_kernel[(1,)](qw, out, W=warps, num_warps=warps)
    e = torch.arange(128 * warps, device="cuda")
    return bool((out == (e // 128) * 32 + (e // 4) % 32).all())


def reference(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, group: int):
    """x @ ((q - z) * s) in fp32 (q [K, N] codes; s, z [G, N])."""
    gidx = torch.arange(q.shape[0], device=q.device) // group
    w = (q.float() - z.float()[gidx]) * s.float()[gidx]
    return x.float() @ w


def random_case(k: int, n: int, group: int, device: str, seed: int = 0):
    """Codes, scales and zero codes of a random asymmetric W4 layer."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.int32)
    z = torch.randint(0, 16, (k // group, n), generator=gen).half()
    s = (torch.rand(k // group, n, generator=gen) * 0.02 + 0.005).half()
    return q.to(device), s.to(device), z.to(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget-s", type=float, default=120.0)
    args = ap.parse_args()
    deadline = time.perf_counter() + args.budget_s
    import kernels_gpu as kg  # the layer benchmark's timing helpers (same folder)

    from bitserve.kernels import triton_int

    print("## mma GEMV prototype (bench/mma_gemv.py)")
    print("lane map of a 16-byte load, warps 1/2/4/8:", [lane_probe(w) for w in (1, 2, 4, 8)])
    print("| K x N | M | warps | split | stages | rel err |")
    print("|---|---|---|---|---|---|")
    ok = True
    for k, n, group, m, warps, split, stages in [
        (576, 1024, 64, 1, 4, 3, 1),
        (1024, 512, 128, 3, 2, 1, 2),
        (1024, 512, 128, 8, 1, 4, 3),
        (2048, 1024, 128, 11, 4, 2, 3),
        (2048, 1024, 32, 16, 8, 5, 2),
        (4096, 1024, 128, 1, 2, 3, 3),
    ]:
        q, s, z = random_case(k, n, group, "cuda", seed=m)
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        y = mma_gemv(x, pack_mma(q.cpu()).cuda(), s, z, group, warps, split, stages)
        ref = reference(x, q, s, z, group)
        err = float((y.float() - ref).norm() / ref.norm())
        print(f"| {k}x{n} g{group} | {m} | {warps} | {split} | {stages} | {err:.2e} |", flush=True)
        if err >= 2e-3:  # where it goes wrong: by column within a 16-wide tile, and by row
            ok = False
            d = (y.float() - ref).abs()
            print("  by n % 16:", [f"{v:.2g}" for v in d.view(m, -1, 16).mean((0, 1)).tolist()])
            print("  by row:", [f"{v:.2g}" for v in d.mean(1).tolist()])
    print("PASS" if ok else "FAIL")
    if not ok:
        return
    bw = kg.copy_bandwidth()
    print(
        f"\n## mma GEMV timing (CUDA graphs, rotating copies), copy bandwidth {bw / 1e12:.2f} TB/s"
    )
    print(
        "| K x N | M | fp16 us | backend W4 us (x fp16) | mma us (x fp16) | mma x backend "
        "| best (warps, split, stages) | mma, 1 stage us | W4 limit us |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for k, n in kg.SHAPES:
        g = k // 128  # random words: speed does not depend on the codes (zero points 8)
        qw = torch.randint(-(2**31), 2**31 - 1, (k * n // 8,), dtype=torch.int32, device="cuda")
        s = (torch.rand(g, n, device="cuda") * 0.002 + 0.001).half()
        z = torch.full((g, n), 8.0, device="cuda").half()
        nbytes = qw.numel() * 4 + s.numel() * 4
        copies = [qw] + [qw.clone() for _ in range(kg.copies_for(nbytes) - 1)]
        w16 = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
        w16s = [w16] + [w16.clone() for _ in range(kg.copies_for(w16.numel() * 2) - 1)]
        layers = kg.synthetic_copies(k, n, 4)
        for m in (1, 4, 8, 16):
            if time.perf_counter() > deadline:
                print("(budget: timing stopped)")
                return
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            t16 = kg.graph_time([partial(torch.nn.functional.linear, x, w) for w in w16s])
            tb = kg.graph_time([partial(triton_int.matmul, layer, x) for layer in layers])
            times: dict[tuple[int, int, int], float] = {}
            depths = (1, 2, 3, 4) if m == 1 else (1, 2, 3)  # run 16: 1-3 (stages paid at M = 1)
            for warps, split, stages in itertools.product((1, 2, 4, 8), SPLITS, depths):
                if n % (64 * warps) == 0 and split <= g:
                    out = torch.empty(m, n, device="cuda", dtype=torch.float16)
                    ws = torch.empty(split * m * n, device="cuda", dtype=torch.float32)
                    cnt = torch.zeros(n // (64 * warps), device="cuda", dtype=torch.int32)
                    calls: list[Callable[[], Any]] = [
                        partial(mma_gemv, x, c, s, z, 128, warps, split, stages, out, ws, cnt)
                        for c in copies
                    ]
                    try:
                        times[warps, split, stages] = kg.graph_time(calls, budget_s=0.04)
                    except Exception as exc:  # a config that fails to compile or launch
                        print(f"({warps}, {split}, {stages}: {type(exc).__name__}: {exc})")
            cfg = min(times, key=times.__getitem__)
            tm = times[cfg]
            t1 = min(t for c, t in times.items() if c[2] == 1)
            lim = (nbytes + (m * k + m * n) * 2) / bw
            print(
                f"| {k}x{n} | {m} | {t16 * 1e6:.1f} | {tb * 1e6:.1f} ({t16 / tb:.2f}x) "
                f"| {tm * 1e6:.1f} ({t16 / tm:.2f}x) | {tb / tm:.2f}x | {cfg} | {t1 * 1e6:.1f} "
                f"| {lim * 1e6:.1f} |",
                flush=True,
            )
        del copies, w16s, layers
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
