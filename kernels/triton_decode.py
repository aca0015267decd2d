"""GPU kernels for the serving runner's one-token decode step: the work between the matmuls,
fused, so that a layer runs 9-10 kernels (at batch 1; 4 are matmuls) instead of 4 matmuls and
~15 others, each launched with programmatic dependent launch where the GPU has it (`use_pdl`).
Inside a CUDA graph each small kernel still costs a few microseconds; on Llama-3-8B shapes the
ops between the matmuls took about 1.5 ms of a 3.8 ms W4 step (docs/kernels.md).

- `add_rms_norm`: h += delta, then x = RMSNorm(h) * weight (residual add and the next norm).
- `rope_to_cache`: rotary embedding of q and k (HF llama's rotate-half convention), k and v
  written into each row's cache slot at its position, q returned.
- `decode_attention`: each row's query heads against its own slot of the cache, up to its own
  length, split over the length (flash-decoding) with a second kernel merging the splits when
  there is more than one. It reads the cache in place: no gathered copy, no mask tensor, and
  nothing past a row's length (a stale NaN there cannot leak in).
- `silu_mul`: SiLU(gate) * up on the fused gate/up projection's output.

The runner checks them against its torch ops (tests/test_decode_kernels.py, in Triton's
interpreter)."""

from __future__ import annotations

import functools
from typing import Any

import torch
import triton
import triton.language as tl

from bitserve.kernels.triton_int import pdl_enter, pdl_launch, use_pdl

# decode_attention splits each row's length so that a step has about this many programs per
# SM on a GPU (ATTN_PROGRAMS in all where there are no SMs: the interpreter), into at most
# ATTN_MAX_SPLITS splits (the merge kernel holds them all in one tile).
ATTN_PROGRAMS_PER_SM, ATTN_PROGRAMS, ATTN_MAX_SPLITS = 2, 128, 64
ATTN_BLOCK_L = 64  # keys per inner-loop step


def _pdl(t: torch.Tensor) -> dict[str, Any]:
    """The PDL constexpr and launch option for a kernel on t's device (`use_pdl`)."""
    pdl = use_pdl(t.device)
    return {"PDL": pdl, **pdl_launch(pdl)}


@triton.jit
def _add_rms_norm_kernel(
    h_ptr,
    d_ptr,
    w_ptr,
    x_ptr,
    n,
    eps,
    HAS_DELTA: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    """Row r: h[r] += d[r] (rounded to h's dtype, as the unfused add is), then
    x[r] = (h[r] / rms(h[r])).to(dtype) * w, the norm's statistics in fp32 (HF's LlamaRMSNorm)."""
    pdl_enter(PDL)
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    h = tl.load(h_ptr + row * n + offs, mask=mask, other=0.0)
    if HAS_DELTA:
        h = h + tl.load(d_ptr + row * n + offs, mask=mask, other=0.0)
        tl.store(h_ptr + row * n + offs, h, mask=mask)
    hf = h.to(tl.float32)
    inv = tl.rsqrt(tl.sum(hf * hf, axis=0) / n + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    tl.store(x_ptr + row * n + offs, (hf * inv).to(h.dtype) * w, mask=mask)


def add_rms_norm(
    h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float, x: torch.Tensor
) -> None:
    """In place: h [B, n] += delta (if given); x [B, n] = RMSNorm(h) * weight."""
    rows, n = h.shape
    assert h.is_contiguous() and x.is_contiguous() and (delta is None or delta.is_contiguous())
    _add_rms_norm_kernel[(rows,)](
        h,
        h if delta is None else delta,
        weight,
        x,
        n,
        eps,
        HAS_DELTA=delta is not None,
        BLOCK=triton.next_power_of_2(n),
        num_warps=4 if n <= 2048 else 8,
        **_pdl(h),
    )


@triton.jit
def _rope_cache_kernel(
    qkv_ptr,
    cos_ptr,
    sin_ptr,
    pos_ptr,
    slot_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    stride_qkv,
    stride_cos,
    stride_slot,
    stride_head,
    stride_pos,
    H,
    HKV,
    HALF: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    """Program (row b, head j of the H + 2 HKV heads of qkv): q heads rotated into q, k heads
    rotated into the k cache, v heads copied into the v cache (slot and position of row b).
    Rotation with sin's first half negated (`signed_sin`): y1 = x1 cos1 + x2 ssin1,
    y2 = x2 cos2 + x1 ssin2, in fp32."""
    pdl_enter(PDL)
    b = tl.program_id(0)
    j = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    mask = offs < HALF
    pos = tl.load(pos_ptr + b)
    slot = tl.load(slot_ptr + b)
    src = qkv_ptr + b * stride_qkv + j * (2 * HALF) + offs
    x1 = tl.load(src, mask=mask, other=0.0)
    x2 = tl.load(src + HALF, mask=mask, other=0.0)
    cache = slot * stride_slot + pos * stride_pos + offs
    if j < H + HKV:
        c1 = tl.load(cos_ptr + pos * stride_cos + offs, mask=mask, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + pos * stride_cos + HALF + offs, mask=mask, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + pos * stride_cos + offs, mask=mask, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + pos * stride_cos + HALF + offs, mask=mask, other=0.0).to(tl.float32)
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        y1 = (f1 * c1 + f2 * s1).to(x1.dtype)
        y2 = (f2 * c2 + f1 * s2).to(x1.dtype)
        if j < H:
            dst = q_ptr + (b * H + j) * (2 * HALF) + offs
        else:
            dst = k_ptr + cache + (j - H) * stride_head
        tl.store(dst, y1, mask=mask)
        tl.store(dst + HALF, y2, mask=mask)
    else:
        dst = v_ptr + cache + (j - H - HKV) * stride_head
        tl.store(dst, x1, mask=mask)
        tl.store(dst + HALF, x2, mask=mask)


def rope_to_cache(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    signed_sin: torch.Tensor,
    pos: torch.Tensor,
    slots: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    heads: int,
) -> torch.Tensor:
    """qkv [B, (H + 2 Hkv) D] (q, k, v heads side by side) at positions pos [B] of slots [B]:
    writes rotated k and v into k_cache / v_cache [slots, Hkv, max_len, D] (one layer's);
    returns the rotated q [B, H, D]."""
    b = qkv.shape[0]
    kv_heads, d = k_cache.shape[1], k_cache.shape[3]
    q = torch.empty(b, heads, d, device=qkv.device, dtype=qkv.dtype)
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1
    assert cos.stride() == signed_sin.stride() and qkv.stride(1) == 1
    _rope_cache_kernel[(b, heads + 2 * kv_heads)](
        qkv,
        cos,
        signed_sin,
        pos,
        slots,
        q,
        k_cache,
        v_cache,
        qkv.stride(0),
        cos.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        heads,
        kv_heads,
        HALF=d // 2,
        BLOCK=triton.next_power_of_2(d // 2),
        num_warps=1,
        **_pdl(qkv),
    )
    return q


@triton.jit
def _attn_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    slot_ptr,
    pos_ptr,
    out_ptr,
    o_ws,
    m_ws,
    l_ws,
    stride_slot,
    stride_head,
    stride_pos,
    scale_log2,
    H,
    GROUP,
    CHUNK,
    SPLITS,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GP: tl.constexpr,
    BLOCK_L: tl.constexpr,
    PRECISION: tl.constexpr,
    PDL: tl.constexpr,
):
    """Program (row b, kv head, split): the GROUP query heads of this kv head against keys
    [split * CHUNK, min((split + 1) * CHUNK, pos[b] + 1)) of row b's slot, online softmax (base
    2) in fp32 (fp32 q/k/v: PRECISION "ieee", not TF32). One split: the normalized output goes
    to out [B, H, D]; else the unnormalized
    sum, max and denominator go to the workspaces for `_merge_kernel` (an empty split leaves
    max -inf, denominator 0)."""
    pdl_enter(PDL)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    g = tl.arange(0, GP)
    d = tl.arange(0, BLOCK_D)
    heads = kvh * GROUP + g
    hmask = g < GROUP
    dmask = d < D
    qmask = hmask[:, None] & dmask[None, :]
    q = tl.load(q_ptr + (b * H + heads)[:, None] * D + d[None, :], mask=qmask, other=0.0)
    length = tl.load(pos_ptr + b) + 1
    start = sp * CHUNK
    end = tl.minimum(start + CHUNK, length)
    base = tl.load(slot_ptr + b) * stride_slot + kvh * stride_head
    m = tl.full((GP,), float("-inf"), dtype=tl.float32)
    den = tl.zeros((GP,), dtype=tl.float32)
    acc = tl.zeros((GP, BLOCK_D), dtype=tl.float32)
    for l0 in range(start, end, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        lmask = offs_l < end
        kv = base + offs_l[:, None] * stride_pos + d[None, :]
        kvmask = lmask[:, None] & dmask[None, :]
        k = tl.load(k_ptr + kv, mask=kvmask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        s = tl.where(lmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        den = den * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + kv, mask=kvmask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    rows = b * H + heads
    if SPLITS == 1:
        out = out_ptr + rows[:, None] * D + d[None, :]
        tl.store(out, (acc / den[:, None]).to(out_ptr.dtype.element_ty), mask=qmask)
    else:
        at = rows * SPLITS + sp
        tl.store(o_ws + at[:, None] * BLOCK_D + d[None, :], acc, mask=hmask[:, None])
        tl.store(m_ws + at, m, mask=hmask)
        tl.store(l_ws + at, den, mask=hmask)


@triton.jit
def _merge_kernel(
    o_ws,
    m_ws,
    l_ws,
    out_ptr,
    SPLITS,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    PDL: tl.constexpr,
):
    """Row r (= b * H + head): the splits' partial sums rescaled to their common max, over the
    rescaled denominators, into out [B * H, D]."""
    pdl_enter(PDL)
    r = tl.program_id(0)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    smask = s < SPLITS
    m = tl.load(m_ws + r * SPLITS + s, mask=smask, other=float("-inf"))
    den = tl.load(l_ws + r * SPLITS + s, mask=smask, other=0.0)
    w = tl.exp2(m - tl.max(m, axis=0))  # split 0 always holds key 0: the max is finite
    o = tl.load(
        o_ws + (r * SPLITS + s)[:, None] * BLOCK_D + d[None, :], mask=smask[:, None], other=0.0
    )
    total = tl.sum(w[:, None] * o, axis=0) / tl.sum(w * den, axis=0)
    tl.store(out_ptr + r * D + d, total.to(out_ptr.dtype.element_ty), mask=d < D)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def attention_splits(batch: int, kv_heads: int, kv_len: int, device: torch.device) -> int:
    """How many length splits `decode_attention` uses: enough for ATTN_PROGRAMS_PER_SM
    programs per SM in a step, at least one BLOCK_L of keys per split, ATTN_MAX_SPLITS at
    most."""
    programs = ATTN_PROGRAMS
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        programs = ATTN_PROGRAMS_PER_SM * _sm_count(index)
    want = min(triton.cdiv(programs, batch * kv_heads), ATTN_MAX_SPLITS)
    return max(1, min(want, triton.cdiv(kv_len, ATTN_BLOCK_L)))


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    pos: torch.Tensor,
    kv_len: int,
    scale: float,
) -> torch.Tensor:
    """Attention of q [B, H, D] (one token per row, at position pos[b]) over keys 0..pos[b] of
    cache slot slots[b] (k_cache / v_cache: one layer's [slots, Hkv, max_len, D]); kv_len bounds
    pos + 1 and sets the split count (a CUDA graph captures one). Returns [B, H * D]."""
    b, heads, d = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    splits = attention_splits(b, kv_heads, kv_len, q.device)
    chunk = triton.cdiv(triton.cdiv(kv_len, splits), ATTN_BLOCK_L) * ATTN_BLOCK_L
    block_d = triton.next_power_of_2(d)
    out = torch.empty(b, heads * d, device=q.device, dtype=q.dtype)
    # Workspaces for the splits' partials; with one split only their pointer types matter.
    rows = b * heads * splits if splits > 1 else 1
    ws = [
        torch.empty(rows, *shape, device=q.device, dtype=torch.float32)
        for shape in ((block_d,), (), ())
    ]
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1
    _attn_kernel[(b, kv_heads, splits)](
        q,
        k_cache,
        v_cache,
        slots,
        pos,
        out,
        *ws,
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        scale * 1.4426950408889634,  # log2(e): exp(x) = exp2(x log2 e)
        heads,
        group,
        chunk,
        splits,
        D=d,
        BLOCK_D=block_d,
        GP=max(16, triton.next_power_of_2(group)),  # tl.dot needs 16 rows
        BLOCK_L=ATTN_BLOCK_L,
        PRECISION="ieee" if q.dtype == torch.float32 else None,  # None: the backend's default
        num_warps=4,
        **_pdl(q),
    )
    if splits > 1:
        _merge_kernel[(b * heads,)](
            *ws,
            out,
            splits,
            D=d,
            BLOCK_D=block_d,
            BLOCK_S=triton.next_power_of_2(splits),
            num_warps=4,
            **_pdl(q),
        )
    return out


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, F, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """out[b, i] = SiLU(gate) * up for gate = gu[b, i], up = gu[b, F + i]; SiLU rounded to the
    dtype before the product, as torch's two ops do."""
    pdl_enter(PDL)
    b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < F
    g = tl.load(gu_ptr + b * 2 * F + offs, mask=mask, other=0.0)
    u = tl.load(gu_ptr + b * 2 * F + F + offs, mask=mask, other=0.0)
    gf = g.to(tl.float32)
    tl.store(out_ptr + b * F + offs, (gf / (1.0 + tl.exp(-gf))).to(g.dtype) * u, mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [B, 2F] (gate, then up; contiguous) -> SiLU(gate) * up [B, F]."""
    b, f = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(b, f, device=gate_up.device, dtype=gate_up.dtype)
    block = 1024
    grid = (b, triton.cdiv(f, block))
    _silu_mul_kernel[grid](gate_up, out, f, BLOCK=block, num_warps=4, **_pdl(gate_up))
    return out
