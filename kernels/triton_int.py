"""GPU backend: a Triton fused dequantize-GEMM for QuantLinear (W2/W3/W4/W8, A16).

`prepare` repacks once at load into a kernel-friendly layout: codes along K in int32 words
(32/bits codes per word, K padded to a multiple of 256; 3-bit as a 2-bit and a 1-bit plane, so
no code straddles a word), scales and zero points unpacked to [G, N]. One kernel serves both
regimes: small M runs GEMV-style with split-K (partial sums atomically added into a zeroed
output), large M runs tiled with tensor-core dots. Configs are autotuned per shape, cached.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl

from bitserve.kernels.packing import num_groups
from bitserve.kernels.quant_linear import Backend, QuantLinear, register_backend

K_ALIGN = 256  # K is padded to this, so every BLOCK_K up to 256 tiles it exactly
BIG_GROUP = 1 << 30  # "group size" of a per-channel layer: every k in group 0
# Kernels run in Triton's CPU interpreter (tests without a GPU) when this was set at import.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _unpack(w, BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Words [BLOCK_K * BITS / 32, BLOCK_N] -> codes [BLOCK_K, BLOCK_N]; each word is loaded once
    and split into its 32/BITS codes (row k = word * 32/BITS + position in word)."""
    per_word: tl.constexpr = 32 // BITS
    shifts = tl.arange(0, per_word) * BITS
    q = (w[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)
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
def _dot_block(
    acc,
    x_ptr,
    qw_ptr,
    qh_ptr,
    s_ptr,
    z_ptr,
    kb,
    offs_m,
    offs_n,
    mask_m,
    mask_n,
    N,
    K,
    G,
    stride_xm,
    stride_w,
    stride_h,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """acc + x[:, K-block kb] @ dequant(W)[K-block kb, :] with the codes unpacked to 2-D."""
    offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    x = tl.load(
        x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
        mask=mask_m[:, None] & (offs_k < K)[None, :],
        other=0.0,
    )
    q = _load_codes(qw_ptr, qh_ptr, kb, offs_n, mask_n, stride_w, stride_h, BITS, BLOCK_K, BLOCK_N)
    if BLOCK_K <= GROUP:
        g = tl.minimum((kb * BLOCK_K) // GROUP, G - 1)
        s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        w = (q.to(tl.float32) - z[None, :]) * s[None, :]
    else:
        g2 = tl.minimum(offs_k // GROUP, G - 1)[:, None] * N + offs_n[None, :]
        s2 = tl.load(s_ptr + g2, mask=mask_n[None, :], other=0.0).to(tl.float32)
        z2 = tl.load(z_ptr + g2, mask=mask_n[None, :], other=0.0).to(tl.float32)
        w = (q.to(tl.float32) - z2) * s2
    if DOT_F32:
        acc += tl.dot(x.to(tl.float32), w)
    else:
        acc += tl.dot(x, w.to(x.dtype))
    return acc


@triton.jit
def _int_matmul_kernel(
    x_ptr,
    qw_ptr,
    qh_ptr,
    s_ptr,
    z_ptr,
    out_ptr,
    M,
    N,
    K,
    G,
    stride_xm,
    stride_w,
    stride_h,
    stride_om,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    K_BLOCKS,
    DOT_F32: tl.constexpr,
    JSPLIT: tl.constexpr,
):
    """out[M, N] (+)= x[M, K] @ dequant(W)[K, N]; program (n, m, k-slice of SPLIT_K).

    JSPLIT (at least 16 words per K-block): the word tile is loaded once and split by code
    position j into per_word dots of x[:, word * per_word + j] with plane j, which keeps every
    tile in its 2-D layout; otherwise the codes are unpacked and reshaped to [BLOCK_K, BLOCK_N].
    """
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    per_word: tl.constexpr = 16 if BITS == 3 else 32 // BITS  # 3-bit: the 2-bit plane's words
    plane_bits: tl.constexpr = 2 if BITS == 3 else BITS
    words: tl.constexpr = BLOCK_K // per_word
    for kb in range(pid_k, K_BLOCKS, SPLIT_K):
        if JSPLIT:
            word_idx = tl.arange(0, words)
            rows = kb * words + word_idx
            wt = tl.load(qw_ptr + rows[:, None] * stride_w + offs_n[None, :], mask=mask_n[None, :])
            if BITS == 3:
                rows_hi = kb * (words // 2) + word_idx // 2
                h = tl.load(
                    qh_ptr + rows_hi[:, None] * stride_h + offs_n[None, :], mask=mask_n[None, :]
                )
                h = h >> ((word_idx % 2) * 16)[:, None]
            k0 = kb * BLOCK_K + word_idx * per_word
            if BLOCK_K <= GROUP:
                g = tl.minimum((kb * BLOCK_K) // GROUP, G - 1)
                sc = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
                zr = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            for j in tl.static_range(per_word):
                qj = (wt >> (j * plane_bits)) & ((1 << plane_bits) - 1)
                if BITS == 3:
                    qj = qj | (((h >> j) & 1) << 2)
                if BLOCK_K <= GROUP:
                    wj = (qj.to(tl.float32) - zr[None, :]) * sc[None, :]
                else:
                    gj = tl.minimum((k0 + j) // GROUP, G - 1)[:, None] * N + offs_n[None, :]
                    sj = tl.load(s_ptr + gj, mask=mask_n[None, :], other=0.0).to(tl.float32)
                    zj = tl.load(z_ptr + gj, mask=mask_n[None, :], other=0.0).to(tl.float32)
                    wj = (qj.to(tl.float32) - zj) * sj
                xj = tl.load(
                    x_ptr + offs_m[:, None] * stride_xm + (k0 + j)[None, :],
                    mask=mask_m[:, None] & (k0 + j < K)[None, :],
                    other=0.0,
                )
                if DOT_F32:
                    acc += tl.dot(xj.to(tl.float32), wj)
                else:
                    acc += tl.dot(xj, wj.to(xj.dtype))
        else:
            acc = _dot_block(
                acc,
                x_ptr,
                qw_ptr,
                qh_ptr,
                s_ptr,
                z_ptr,
                kb,
                offs_m,
                offs_n,
                mask_m,
                mask_n,
                N,
                K,
                G,
                stride_xm,
                stride_w,
                stride_h,
                BITS,
                GROUP,
                BLOCK_K,
                BLOCK_N,
                DOT_F32,
            )
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gemv_kernel(
    x_ptr,
    qw_ptr,
    qh_ptr,
    s_ptr,
    z_ptr,
    out_ptr,
    N,
    K,
    G,
    stride_w,
    stride_h,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    K_BLOCKS,
):
    """out[N] (+)= x[K] @ dequant(W)[K, N] for one row (decode). Each word tile [words,
    BLOCK_N] is loaded once; an unrolled loop over the code position j inside the words takes
    plane j out with a shift and meets it with x[word * per_word + j]. Everything stays in the
    tile's own 2-D layout (no reshape, no broadcast loads); one reduction at the end."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    per_word: tl.constexpr = 16 if BITS == 3 else 32 // BITS  # 3-bit: the 2-bit plane's words
    plane_bits: tl.constexpr = 2 if BITS == 3 else BITS
    words: tl.constexpr = BLOCK_K // per_word
    word_idx = tl.arange(0, words)
    acc = tl.zeros((words, BLOCK_N), dtype=tl.float32)
    for kb in range(pid_k, K_BLOCKS, SPLIT_K):
        rows = kb * words + word_idx
        w = tl.load(qw_ptr + rows[:, None] * stride_w + offs_n[None, :], mask=mask_n[None, :])
        if BITS == 3:  # code k = 16 * row + j; its high bit is bit k % 32 of plane word k // 32
            rows_hi = kb * (words // 2) + word_idx // 2
            h = tl.load(
                qh_ptr + rows_hi[:, None] * stride_h + offs_n[None, :], mask=mask_n[None, :]
            )
            h = h >> ((word_idx % 2) * 16)[:, None]
        k0 = kb * BLOCK_K + word_idx * per_word
        if BLOCK_K <= GROUP:
            g = tl.minimum((kb * BLOCK_K) // GROUP, G - 1)
            sc = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            zr = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        for j in tl.static_range(per_word):
            q = (w >> (j * plane_bits)) & ((1 << plane_bits) - 1)
            if BITS == 3:
                q = q | (((h >> j) & 1) << 2)
            xj = tl.load(x_ptr + k0 + j, mask=k0 + j < K, other=0.0).to(tl.float32)
            if BLOCK_K <= GROUP:
                acc += xj[:, None] * ((q.to(tl.float32) - zr[None, :]) * sc[None, :])
            else:
                g2 = tl.minimum((k0 + j) // GROUP, G - 1)[:, None] * N + offs_n[None, :]
                s2 = tl.load(s_ptr + g2, mask=mask_n[None, :], other=0.0).to(tl.float32)
                z2 = tl.load(z_ptr + g2, mask=mask_n[None, :], other=0.0).to(tl.float32)
                acc += xj[:, None] * ((q.to(tl.float32) - z2) * s2)
    y = tl.sum(acc, axis=0)
    if SPLIT_K == 1:
        tl.store(out_ptr + offs_n, y.to(out_ptr.dtype.element_ty), mask=mask_n)
    else:
        tl.atomic_add(out_ptr + offs_n, y.to(out_ptr.dtype.element_ty), mask=mask_n)


def _supports(layer: QuantLinear) -> str | None:
    if layer.qweight.device.type != "cuda":
        return f"weights are on {layer.qweight.device.type}, not cuda"
    if layer.bits not in (2, 3, 4, 8):
        return f"{layer.bits}-bit weights are not supported"
    return None


def _pack_words(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [K, N] (K a multiple of 32) -> int32 [K * bits / 32, N], 32/bits per word."""
    per_word = 32 // bits
    k, n = q.shape
    q = q.to(torch.int64).view(k // per_word, per_word, n)
    shifts = (torch.arange(per_word, device=q.device) * bits).view(1, per_word, 1)
    words = (q << shifts).sum(dim=1)
    return torch.where(words >= (1 << 31), words - (1 << 32), words).to(torch.int32)


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


# (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages) candidates per M regime.
SMALL_M = [
    (1, 64, 256, 8, 4, 1),
    (1, 128, 256, 4, 4, 1),
    (1, 128, 256, 8, 4, 1),
    (1, 64, 256, 16, 4, 1),
    (1, 128, 128, 16, 4, 1),
    (1, 64, 128, 32, 2, 1),
    (1, 256, 256, 4, 8, 1),
    (1, 256, 128, 8, 4, 1),
]
MID_M = [
    (16, 64, 128, 8, 4, 3),
    (16, 64, 128, 16, 4, 3),
    (16, 32, 128, 16, 4, 3),
    (16, 64, 64, 32, 4, 2),
    (16, 64, 256, 8, 4, 3),
    (16, 128, 128, 4, 4, 3),
    (16, 64, 256, 4, 4, 3),
    (16, 128, 64, 8, 4, 4),
    (32, 128, 128, 4, 4, 3),
    (16, 64, 128, 1, 4, 4),
    (64, 64, 128, 4, 4, 3),
]
LARGE_M = [
    (64, 128, 64, 1, 4, 4),
    (128, 128, 256, 1, 8, 2),
    (64, 128, 256, 1, 4, 2),
    (128, 128, 64, 1, 8, 3),
    (128, 256, 64, 1, 8, 3),
    (64, 256, 64, 1, 8, 3),
    (128, 128, 128, 1, 8, 3),
    (64, 128, 128, 1, 4, 3),
    (64, 64, 128, 2, 4, 3),
]
INTERPRET_CONFIGS = {1: (1, 32, 64, 2, 4, 1), 16: (16, 32, 64, 2, 4, 1), 64: (32, 32, 32, 1, 4, 1)}
_TUNED: dict[tuple[Any, ...], tuple[int, ...]] = {}


def _regime(m: int) -> int:
    """1: GEMV (M=1), 16: split-K dots (M <= 32), 64: tiled (larger M)."""
    return 1 if m == 1 else 16 if m <= 32 else 64


def _launch(
    layer: QuantLinear, x: torch.Tensor, out: torch.Tensor, cfg: tuple[int, ...]
) -> torch.Tensor:
    block_m, block_n, block_k, split_k, warps, stages = cfg
    m, n, k = x.shape[0], layer.out_features, layer.in_features
    qw = layer.prepared["qweight"]
    qh = layer.prepared.get("qhigh", qw)
    k_blocks = (k + block_k - 1) // block_k
    result = out
    if split_k > 1:
        # Partial sums are atomically added into a zeroed output; the interpreter has no
        # 16-bit atomics, so there they go through a float32 buffer.
        out = torch.zeros_like(out, dtype=torch.float32) if INTERPRET else out.zero_()
    group = BIG_GROUP if layer.group_size == -1 or layer.group_size >= k else layer.group_size
    if block_m == 1:
        _gemv_kernel[(triton.cdiv(n, block_n), split_k)](
            x,
            qw,
            qh,
            layer.prepared["scales"],
            layer.prepared["zeros"],
            out,
            n,
            k,
            num_groups(k, layer.group_size),
            qw.stride(0),
            qh.stride(0),
            BITS=layer.bits,
            GROUP=group,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            SPLIT_K=split_k,
            K_BLOCKS=k_blocks,
            num_warps=warps,
            num_stages=stages,
        )
        return result.copy_(out) if out is not result else result
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m), split_k)
    _int_matmul_kernel[grid](
        x,
        qw,
        qh,
        layer.prepared["scales"],
        layer.prepared["zeros"],
        out,
        m,
        n,
        k,
        num_groups(k, layer.group_size),
        x.stride(0),
        qw.stride(0),
        qh.stride(0),
        out.stride(0),
        BITS=layer.bits,
        GROUP=group,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        SPLIT_K=split_k,
        K_BLOCKS=k_blocks,
        # The interpreter's bf16 dot is wrong (numpy has no bf16): it takes the fp32 dot there.
        DOT_F32=x.dtype == torch.float32 or (INTERPRET and x.dtype == torch.bfloat16),
        JSPLIT=block_k // (16 if layer.bits == 3 else 32 // layer.bits) >= 16,
        num_warps=warps,
        num_stages=stages,
    )
    return result.copy_(out) if out is not result else result


def _config(layer: QuantLinear, x: torch.Tensor, out: torch.Tensor) -> tuple[int, ...]:
    """The fastest candidate config for this shape and M regime, timed once and cached."""
    m = x.shape[0]
    regime = _regime(m)
    if INTERPRET:
        return INTERPRET_CONFIGS[regime]
    bucket = 1 << (m - 1).bit_length()  # tuned per power-of-two M
    key = (layer.in_features, layer.out_features, layer.bits, layer.group_size, bucket, x.dtype)
    if key not in _TUNED:
        candidates = {1: SMALL_M, 16: MID_M, 64: LARGE_M}[regime]
        if regime == 16 and m > 16:
            candidates = [(32, *c[1:]) for c in candidates]
        times = []
        for cfg in candidates:
            try:
                t = triton.testing.do_bench(
                    lambda c=cfg: _launch(layer, x, out, c), warmup=5, rep=20
                )
            except Exception:  # a config out of resources on this card
                t = float("inf")
            times.append(t)
        _TUNED[key] = candidates[min(range(len(times)), key=times.__getitem__)]
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
