"""Bit-packing of low-bit integer codes into int32 words, and group-wise dequantization.

Layout (see docs/checkpoint-format.md): codes are laid out as one little-endian bit stream
per column along dim 0, least-significant bit first, so 3-bit codes straddle word boundaries.
"""

from __future__ import annotations

import torch


def packed_rows(rows: int, bits: int) -> int:
    """Number of int32 words needed to hold `rows` codes of `bits` bits."""
    return (rows * bits + 31) // 32


def pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes `q` [R, C] (0 <= q < 2**bits) along dim 0 into int32 [words, C]."""
    if q.dim() != 2:
        raise ValueError(f"pack_rows expects a 2-D tensor, got shape {tuple(q.shape)}")
    rows, cols = q.shape
    q = q.to(torch.int64)
    if bool((q < 0).any()) or bool((q >= (1 << bits)).any()):
        raise ValueError(f"codes out of range for {bits}-bit packing")
    # Bit planes: [R, bits, C] -> one bit stream of R*bits bits per column.
    planes = (q.unsqueeze(1) >> torch.arange(bits).view(1, bits, 1)) & 1
    stream = planes.reshape(rows * bits, cols)
    words = packed_rows(rows, bits)
    pad = words * 32 - rows * bits
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad, cols)])
    weights = (torch.ones(32, dtype=torch.int64) << torch.arange(32)).view(1, 32, 1)
    packed = (stream.view(words, 32, cols) * weights).sum(dim=1)
    # Reinterpret the unsigned 32-bit value as int32 (two's complement).
    packed = torch.where(packed >= (1 << 31), packed - (1 << 32), packed)
    return packed.to(torch.int32)


def unpack_rows(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """Inverse of pack_rows: int32 [words, C] -> uint8 codes [rows, C]."""
    words, cols = packed.shape
    if words != packed_rows(rows, bits):
        raise ValueError(
            f"packed tensor has {words} words per column, expected {packed_rows(rows, bits)} "
            f"for {rows} rows of {bits} bits"
        )
    if 32 % bits == 0:  # whole codes per word: shift each out directly (no bit stream)
        per_word = 32 // bits
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
        codes = (packed.unsqueeze(1) >> shifts.view(1, per_word, 1)) & ((1 << bits) - 1)
        return codes.reshape(words * per_word, cols)[:rows].to(torch.uint8)
    p = packed.to(torch.int64) & 0xFFFFFFFF
    stream = (p.unsqueeze(1) >> torch.arange(32, device=p.device).view(1, 32, 1)) & 1
    stream = stream.reshape(words * 32, cols)[: rows * bits].view(rows, bits, cols)
    shifts = torch.arange(bits, device=p.device).view(1, bits, 1)
    return (stream << shifts).sum(dim=1).to(torch.uint8)


def num_groups(in_features: int, group_size: int) -> int:
    """Groups along the input dimension; -1 means one group (per output channel).

    A group size that does not divide `in_features` leaves a short last group.
    """
    if group_size == -1 or group_size >= in_features:
        return 1
    return (in_features + group_size - 1) // group_size


def group_index(
    in_features: int, group_size: int, device: torch.device | None = None
) -> torch.Tensor:
    """Group of every input channel: k // group_size (all zeros for per-channel)."""
    k = torch.arange(in_features, device=device)
    if group_size == -1 or group_size >= in_features:
        return torch.zeros_like(k)
    return k // group_size


def dequantize(
    q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Codes q [K, N], scales/zeros [G, N] -> weight [N, K] (nn.Linear layout) in scales' dtype
    promoted to float32: w = (q - zero) * scale."""
    k = q.shape[0]
    g = group_index(k, group_size, q.device)
    s = scales.float()[g]
    z = zeros.float()[g]
    return ((q.float() - z) * s).t().contiguous()
