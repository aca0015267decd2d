"""The integer grid every method shares: group-wise min/max (or absmax) scales and zero points,
rounding to codes and back. Methods differ in how they choose the weights and clipping that
go through these functions, not in the format they produce."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bitserve.kernels import QuantLinear
from bitserve.kernels.packing import dequantize, group_index, num_groups, pack_rows


@dataclass(frozen=True)
class QuantSpec:
    """What the user asked for one layer: bit width, group size along the input (-1 = per
    output channel), symmetric or asymmetric grid."""

    bits: int
    group_size: int
    sym: bool = False

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def label(self) -> str:
        g = "ch" if self.group_size == -1 else str(self.group_size)
        return f"w{self.bits}g{g}{'-sym' if self.sym else ''}"


@dataclass
class QuantizedWeight:
    """One linear layer's weight on the grid: codes q uint8 [K, N], scales fp16 [G, N], zero
    points uint8 [G, N]. Dequantized: w[n, k] = (q[k, n] - zeros[g(k), n]) * scales[g(k), n]."""

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    spec: QuantSpec

    def dequantize(self) -> torch.Tensor:
        """Weight [N, K] in float32, exactly as every backend must reproduce it."""
        return dequantize(self.q, self.scales, self.zeros, self.spec.group_size)

    def to_module(self, bias: torch.Tensor | None = None) -> QuantLinear:
        """Pack into a QuantLinear (reference backend) holding these codes."""
        k, n = self.q.shape
        layer = QuantLinear(
            k, n, self.spec.bits, self.spec.group_size, bias is not None, self.spec.sym
        )
        layer.qweight = pack_rows(self.q, self.spec.bits)
        layer.qzeros = pack_rows(self.zeros.t().contiguous(), self.spec.bits).t().contiguous()
        layer.scales = self.scales.half()
        if bias is not None:
            layer.bias = bias.detach().clone()
        return layer


def params_from_range(
    wmin: torch.Tensor, wmax: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (rounded to fp16, returned as float32) and integer zero point for a value range.

    The range is widened to include 0 so that the zero point is a code in [0, maxq]."""
    wmin, wmax = wmin.clamp(max=0), wmax.clamp(min=0)
    if spec.sym:
        amax = torch.maximum(wmin.abs(), wmax.abs())
        scale = amax / ((spec.maxq + 1) / 2 - 0.5)
        zero = torch.full_like(scale, (spec.maxq + 1) // 2)
    else:
        scale = (wmax - wmin) / spec.maxq
    scale = scale.clamp_min(1e-5).half().float()
    if not spec.sym:
        zero = torch.round(-wmin / scale).clamp(0, spec.maxq)
    return scale, zero


def group_range(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group min and max of w [N, K] -> two tensors [N, G] (handles a short last group)."""
    n, k = w.shape
    groups = num_groups(k, group_size)
    idx = group_index(k, group_size, w.device).expand(n, k)
    init = w.new_zeros(n, groups)
    wmin = init.scatter_reduce(1, idx, w, "amin", include_self=False)
    wmax = init.scatter_reduce(1, idx, w, "amax", include_self=False)
    return wmin, wmax


def quantize_to_grid(
    w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, spec: QuantSpec
) -> QuantizedWeight:
    """Round w [N, K] onto the given grid (scales/zeros [N, G], float) and keep the codes."""
    g = group_index(w.shape[1], spec.group_size, w.device)
    q = torch.clamp(torch.round(w.float() / scales[:, g]) + zeros[:, g], 0, spec.maxq)
    return QuantizedWeight(
        q=q.t().to(torch.uint8).contiguous(),
        scales=scales.t().half().contiguous(),
        zeros=zeros.t().to(torch.uint8).contiguous(),
        spec=spec,
    )


def quantize_rtn(
    w: torch.Tensor, spec: QuantSpec, clip: torch.Tensor | float = 1.0
) -> QuantizedWeight:
    """Round-to-nearest on min/max group ranges, optionally shrunk by `clip` ([N, G] or scalar)."""
    w = w.float()
    wmin, wmax = group_range(w, spec.group_size)
    scales, zeros = params_from_range(wmin * clip, wmax * clip, spec)
    return quantize_to_grid(w, scales, zeros, spec)


def fake_quantize(
    w: torch.Tensor, spec: QuantSpec, clip: torch.Tensor | float = 1.0
) -> torch.Tensor:
    """quantize_rtn then dequantize: the weight a W{bits} model will actually use."""
    return quantize_rtn(w, spec, clip).dequantize().to(w.dtype)
