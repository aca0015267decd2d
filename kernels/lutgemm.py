"""LUT-GEMM for BCQ weights on the GPU (Triton), after Park et al., "LUT-GEMM" (arXiv 2206.09557).

For small M (decode), one kernel builds, for every run of MU consecutive activations, a lookup
table of all 2^MU signed sums ±x_0 ± … ± x_{MU-1}; the GEMM kernel then reads MU sign bits of a
weight plane at once as a table index, so y[n] = Σ_groups Σ_i α_i[n] · Σ_runs LUT[run][bits] (+
offset[n] · Σ x, which is the all-plus entry of the table). Weights stay packed; partial sums
over K slices (split-K) are atomically added into the output, which the table kernel zeroes.
Larger M runs the reference path (dequantize, matmul), where the GEMM is compute-bound anyway.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from bitserve.kernels.bcq_linear import (
    BCQ_BACKENDS,
    BCQBackend,
    BCQLinear,
    register_bcq_backend,
)

# Kernels run in Triton's CPU interpreter (tests without a GPU) when this was set at import.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MU = 8  # activations per lookup table (the paper's µ): 2^MU entries each
MAX_M = 16  # rows handled by LUT-GEMM; more go through the reference path
LUT_DTYPE = torch.float32  # table entries; float16 halves the bytes each lookup touches


@triton.jit
def _lut_kernel(
    x_ptr,
    lut_ptr,
    out_ptr,
    K,
    N,
    runs,
    zero_per_prog,
    stride_xm,
    stride_lm,
    stride_om,
    MU: tl.constexpr,
    BLOCK_R: tl.constexpr,
    ZERO_OUT: tl.constexpr,
):
    """LUT[m, r, idx] = Σ_t (bit t of idx ? +1 : -1) · x[m, r·MU + t] for BLOCK_R runs; also
    zeroes this program's slice of out[m] (the GEMM kernel accumulates into it)."""
    pid = tl.program_id(0)
    m = tl.program_id(1)
    table: tl.constexpr = 1 << MU
    offs_r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    idx = tl.arange(0, table)
    acc = tl.zeros([BLOCK_R, table], dtype=tl.float32)
    for t in tl.static_range(MU):
        k = offs_r * MU + t
        xv = tl.load(x_ptr + m * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
        sign = (((idx >> t) & 1) * 2 - 1).to(tl.float32)
        acc += xv[:, None] * sign[None, :]
    mask = (offs_r < runs)[:, None]
    entries = acc.to(lut_ptr.dtype.element_ty)
    tl.store(lut_ptr + m * stride_lm + offs_r[:, None] * table + idx[None, :], entries, mask=mask)
    if ZERO_OUT:
        for z0 in range(pid * zero_per_prog, (pid + 1) * zero_per_prog, 256):
            offs = z0 + tl.arange(0, 256)
            keep = (offs < N) & (offs < (pid + 1) * zero_per_prog)
            tl.store(out_ptr + m * stride_om + offs, tl.zeros([256], dtype=tl.float32), mask=keep)


@triton.jit
def _lutgemm_kernel(
    lut_ptr,
    q_ptr,
    a_ptr,
    z_ptr,
    bias_ptr,
    out_ptr,
    N,
    KW,
    words_per_split,
    group_words,
    stride_lm,
    stride_om,
    BITS: tl.constexpr,
    MU: tl.constexpr,
    HAS_OFFSET: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """out[m, n-block] += this K slice's Σ_i α_i · Σ LUT[run][sign byte] (+ offset · Σ x);
    program (n-block, K slice, row m). Weights: int32 words [BITS, KW, N], 32 signs each."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    chunks: tl.constexpr = 32 // MU
    table: tl.constexpr = 1 << MU
    w_start = pid_k * words_per_split
    w_end = tl.minimum(w_start + words_per_split, KW)
    lut_row = lut_ptr + m * stride_lm
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for w0 in range(w_start, w_end, BLOCK_W):
        offs_w = w0 + tl.arange(0, BLOCK_W)
        mask_w = offs_w < w_end
        mask = mask_w[:, None] & mask_n[None, :]
        g = offs_w // group_words
        for i in tl.static_range(BITS):
            word = tl.load(
                q_ptr + (i * KW + offs_w)[:, None] * N + offs_n[None, :], mask=mask, other=0
            )
            part = tl.zeros([BLOCK_W, BLOCK_N], dtype=tl.float32)
            for t in tl.static_range(chunks):
                idx = (word >> (t * MU)) & (table - 1)
                part += tl.load(
                    lut_row + (offs_w * chunks + t)[:, None] * table + idx, mask=mask, other=0.0
                ).to(tl.float32)
            alpha = tl.load(
                a_ptr + (g * BITS + i)[:, None] * N + offs_n[None, :], mask=mask, other=0.0
            )
            acc += tl.sum(alpha.to(tl.float32) * part, axis=0)
        if HAS_OFFSET:
            xsum = tl.zeros([BLOCK_W], dtype=tl.float32)
            for t in tl.static_range(chunks):
                xsum += tl.load(
                    lut_row + (offs_w * chunks + t) * table + (table - 1),
                    mask=mask_w,
                    other=0.0,
                ).to(tl.float32)
            z = tl.load(z_ptr + g[:, None] * N + offs_n[None, :], mask=mask, other=0.0)
            acc += tl.sum(z.to(tl.float32) * xsum[:, None], axis=0)
    if HAS_BIAS:  # added once, by the first K slice
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, bias, 0.0)
    tl.atomic_add(out_ptr + m * stride_om + offs_n, acc, mask=mask_n)


# (BLOCK_N, BLOCK_W, num_warps, programs per SM aimed at by split-K) tried per shape on the GPU.
CANDIDATES = [
    (32, 4, 2, 8),
    (64, 2, 4, 8),
    (64, 4, 4, 4),
    (64, 4, 4, 8),
    (64, 8, 4, 4),
    (128, 2, 4, 8),
    (128, 4, 4, 4),
    (128, 4, 8, 8),
    (256, 2, 8, 4),
    (256, 4, 8, 8),
]
INTERPRET_CONFIG = (32, 2, 4, 2)
Config = tuple[int, int, int, int]
_tuned: dict[tuple[int, ...], Config] = {}


def _splits(config: Config, m: int, n: int, kw: int, sms: int) -> int:
    """Words of K per program, so that about waves·sms programs run (whole BLOCK_W tiles)."""
    block_n, block_w, _, waves = config
    programs = triton.cdiv(n, block_n) * m
    split = max(1, min(triton.cdiv(kw, block_w), (waves * sms) // max(programs, 1)))
    return triton.cdiv(triton.cdiv(kw, split), block_w) * block_w


def _launch(
    layer: BCQLinear,
    x: torch.Tensor,
    out: torch.Tensor,
    config: Config,
    mu: int,
    lut_dtype: torch.dtype,
) -> None:
    """Build the tables (zeroing out), then accumulate the GEMM into out [M, N] (float32)."""
    m, k = x.shape
    n = layer.out_features
    kw = layer.qweight.shape[1]
    runs = kw * 32 // mu
    lut = torch.empty(m, runs, 1 << mu, dtype=lut_dtype, device=x.device)
    block_r = max(1, 1024 >> mu)
    lut_programs = triton.cdiv(runs, block_r)
    _lut_kernel[(lut_programs, m)](
        x,
        lut,
        out,
        k,
        n,
        runs,
        triton.cdiv(n, lut_programs),
        x.stride(0),
        lut.stride(0),
        out.stride(0),
        MU=mu,
        BLOCK_R=block_r,
        ZERO_OUT=True,
    )
    sms = 132 if INTERPRET else torch.cuda.get_device_properties(x.device).multi_processor_count
    words = _splits(config, m, n, kw, sms)
    group = layer.group_size
    group_words = kw if group == -1 or group >= layer.in_features else group // 32
    block_n, block_w, warps, _ = config
    bias = layer.bias if layer.bias is not None else layer.alpha
    offset = layer.offset if layer.offset is not None else layer.alpha
    grid = (triton.cdiv(n, block_n), triton.cdiv(kw, words), m)
    _lutgemm_kernel[grid](
        lut,
        layer.qweight,
        layer.alpha,
        offset,
        bias,
        out,
        n,
        kw,
        words,
        group_words,
        lut.stride(0),
        out.stride(0),
        BITS=layer.bits,
        MU=mu,
        HAS_OFFSET=layer.offset is not None,
        HAS_BIAS=layer.bias is not None,
        BLOCK_N=block_n,
        BLOCK_W=block_w,
        num_warps=warps,
    )


def _config(layer: BCQLinear, x: torch.Tensor, mu: int, lut_dtype: torch.dtype) -> Config:
    """The fastest candidate for this shape, timed once on the GPU and cached."""
    if INTERPRET:
        return INTERPRET_CONFIG
    key = (x.shape[0], layer.out_features, layer.in_features, layer.bits, mu, lut_dtype.itemsize)
    if key not in _tuned:
        out = torch.empty(x.shape[0], layer.out_features, dtype=torch.float32, device=x.device)
        times = [
            triton.testing.do_bench(
                lambda c=c: _launch(layer, x, out, c, mu, lut_dtype), warmup=5, rep=20
            )
            for c in CANDIDATES
        ]
        _tuned[key] = CANDIDATES[times.index(min(times))]
    return _tuned[key]


def lutgemm(
    layer: BCQLinear,
    x: torch.Tensor,
    out: torch.Tensor | None = None,
    config: Config | None = None,
    mu: int = MU,
    lut_dtype: torch.dtype = LUT_DTYPE,
) -> torch.Tensor:
    """y [M, N] = x [M, K] @ W.T + bias through the lookup tables (M ≤ MAX_M), written into
    `out` when given. Partial sums are added atomically into a float32 buffer (16-bit atomics
    measured slower), then cast."""
    m = x.shape[0]
    n = layer.out_features
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    direct = out.dtype == torch.float32 and out.is_contiguous()
    acc = out if direct else torch.empty(m, n, dtype=torch.float32, device=x.device)
    x = x.contiguous()
    _launch(layer, x, acc, config or _config(layer, x, mu, lut_dtype), mu, lut_dtype)
    if not direct:
        out.copy_(acc)
    return out


def _supports(layer: BCQLinear) -> str | None:
    if layer.qweight.device.type != "cuda" and not INTERPRET:
        return f"weights are on {layer.qweight.device.type}, not cuda"
    group = layer.group_size
    if group != -1 and group < layer.in_features and group % 32:
        return f"group size {group} is not a multiple of 32"
    return None


def _forward(layer: BCQLinear, x: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, layer.in_features)
    if rows.shape[0] > MAX_M:
        return BCQ_BACKENDS["reference"].forward(layer, x)
    y = lutgemm(layer, rows)
    return y.view(*x.shape[:-1], layer.out_features)


# Under the interpreter (tests) it runs on the CPU when named, but "auto" keeps the reference.
BACKEND = register_bcq_backend(
    BCQBackend("lutgemm", -1 if INTERPRET else 10, supports=_supports, forward=_forward)
)
