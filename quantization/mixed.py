"""Salience-driven mixed precision (the SliM-LLM idea): within each decoder block, groups of
input channels whose rounding hurts the output most get more bits, the others fewer, so that
the block's average code width is exactly `avg_bits`.

Salience of a group at width b is its activation-weighted rounding error,
sum_k E[x_k^2] * sum_n (W - Q_b(W))_nk^2 (|W| * ||x|| measured through the grid); an exact
multiple-choice knapsack over the groups picks the widths. Each layer is stored as a
MixedLinear (one packed QuantLinear per width over its columns). `base="gptq"` rounds each
width's columns with GPTQ, coarsest first, and moves their error onto the finer columns still
to be quantized (the optimal update under the layer's input Hessian)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from functools import reduce
from typing import Any

import torch

from bitserve.errors import UsageError
from bitserve.kernels.mixed_linear import MixedLinear, mixed_from_entry
from bitserve.kernels.packing import num_groups
from bitserve.quantization.base import (
    BlockContext,
    Method,
    Quantized,
    input_power,
    register_method,
)
from bitserve.quantization.checkpoint import LAYER_FORMATS
from bitserve.quantization.grid import QuantizedWeight, QuantSpec, quantize_rtn

DEFAULTS: dict[str, Any] = {
    "avg_bits": None,  # None: the --bits asked for
    "widths": "2,3,4",  # bit widths a group may get
    "scope": "layer",  # where the average is kept exactly: per "layer" or per "block"
    "base": "rtn",  # how each width's columns are rounded: "rtn" or "gptq"
    "damp": 0.01,  # GPTQ damping (base="gptq")
}

LAYER_FORMATS["mixed"] = mixed_from_entry


@dataclass
class MixedWeight:
    """A layer quantized at several widths: (input columns, their QuantizedWeight) per width."""

    parts: list[tuple[torch.Tensor, QuantizedWeight]]
    in_features: int

    def dequantize(self) -> torch.Tensor:
        """The full weight [N, K] in float32."""
        n = self.parts[0][1].q.shape[1]
        w = torch.zeros(n, self.in_features)
        for cols, qw in self.parts:
            w[:, cols] = qw.dequantize()
        return w

    def to_module(self, bias: torch.Tensor | None = None) -> MixedLinear:
        """Pack every width into a MixedLinear."""
        n = self.parts[0][1].q.shape[1]
        spec = self.parts[0][1].spec
        layer = MixedLinear(
            self.in_features,
            n,
            [(qw.spec.bits, len(cols)) for cols, qw in self.parts],
            spec.group_size,
            bias is not None,
            spec.sym,
        )
        for cols, qw in self.parts:
            packed = qw.to_module()
            part = layer.parts[f"w{qw.spec.bits}"]
            part.qweight, part.qzeros, part.scales = packed.qweight, packed.qzeros, packed.scales
            part.cols = cols.to(torch.int32)
        if bias is not None:
            layer.bias = bias.detach().clone()
        return layer

    def code_bits(self) -> Fraction:
        """Exact average code width per weight."""
        total = sum(qw.spec.bits * len(cols) for cols, qw in self.parts)
        return Fraction(total, self.in_features)


@dataclass
class _Unit:
    """One quantization group of one layer, the thing a width is chosen for."""

    layer: str
    cols: torch.Tensor
    weights: int  # rows x columns
    errors: list[float]  # salience-weighted rounding error at each candidate width


def _options(ctx: BlockContext) -> tuple[Fraction, list[int], str, str, float]:
    a = ctx.args
    try:
        avg = Fraction(str(a["avg_bits"] if a.get("avg_bits") is not None else ctx.spec.bits))
        widths = sorted({int(w) for w in str(a["widths"]).split(",")})
        damp = float(a["damp"])
    except ValueError as e:
        raise UsageError(f"mixed: bad option value ({e})") from None
    if not set(widths) <= {2, 3, 4, 8}:
        raise UsageError(f"mixed: widths must be among 2, 3, 4, 8, got {a['widths']!r}")
    if not widths[0] <= avg <= widths[-1]:
        raise UsageError(f"mixed: avg_bits {float(avg)} is outside the widths {widths}")
    if a["scope"] not in ("block", "layer") or a["base"] not in ("rtn", "gptq"):
        raise UsageError("mixed: scope must be block or layer, base must be rtn or gptq")
    return avg, widths, str(a["scope"]), str(a["base"]), damp


def _group_cols(k: int, group_size: int) -> list[torch.Tensor]:
    g = k if group_size == -1 else group_size
    return [torch.arange(j * g, min((j + 1) * g, k)) for j in range(num_groups(k, group_size))]


def _units(
    name: str, w: torch.Tensor, power: torch.Tensor, spec: QuantSpec, widths: list[int]
) -> list[_Unit]:
    """The layer's groups with their rounding error at every width (RTN on min/max ranges)."""
    sq = [
        (w - quantize_rtn(w, QuantSpec(b, spec.group_size, spec.sym)).dequantize()).pow(2).sum(0)
        * power
        for b in widths
    ]
    return [
        _Unit(name, cols, w.shape[0] * len(cols), [float(e[cols].sum()) for e in sq])
        for cols in _group_cols(w.shape[1], spec.group_size)
    ]


def allocate(units: list[_Unit], widths: list[int], avg: Fraction) -> list[int]:
    """The width of every unit minimising the summed error with the weighted average width
    exactly `avg` (dynamic programme over the budget in multiples of the gcd of unit sizes)."""
    quantum = reduce(math.gcd, [u.weights for u in units])
    total = sum(u.weights for u in units)
    extra = (avg - widths[0]) * total / quantum
    if extra.denominator != 1:
        raise UsageError(
            f"mixed: avg_bits {float(avg)} cannot be met exactly over groups of "
            f"{sorted({u.weights for u in units})} weights (try another avg_bits or scope=block)"
        )
    cap = int(extra)
    inf = float("inf")
    best = torch.full((cap + 1,), inf, dtype=torch.float64)
    best[0] = 0.0
    choices = []
    for u in units:
        new = torch.full_like(best, inf)
        arg = torch.zeros(cap + 1, dtype=torch.long)
        for i, b in enumerate(widths):
            shift = u.weights // quantum * (b - widths[0])
            if shift > cap:
                continue
            cand = torch.full_like(best, inf)
            cand[shift:] = best[: cap + 1 - shift] + u.errors[i]
            better = cand < new
            new = torch.where(better, cand, new)
            arg = torch.where(better, torch.full_like(arg, i), arg)
        best = new
        choices.append(arg)
    if math.isinf(float(best[cap])):
        raise UsageError(f"mixed: no assignment of widths {widths} averages {float(avg)}")
    picked = [0] * len(units)
    left = cap
    for j in range(len(units) - 1, -1, -1):
        i = int(choices[j][left])
        picked[j] = widths[i]
        left -= units[j].weights // quantum * (widths[i] - widths[0])
    return picked


def _rtn_parts(
    w: torch.Tensor, by_width: dict[int, torch.Tensor], spec: QuantSpec
) -> list[tuple[torch.Tensor, QuantizedWeight]]:
    return [
        (cols, quantize_rtn(w[:, cols], QuantSpec(b, spec.group_size, spec.sym)))
        for b, cols in sorted(by_width.items())
    ]


def _gptq_parts(
    w: torch.Tensor,
    hessian: torch.Tensor,
    by_width: dict[int, torch.Tensor],
    spec: QuantSpec,
    damp: float,
) -> list[tuple[torch.Tensor, QuantizedWeight]]:
    """GPTQ on each width's columns, coarsest first; the rounding error of those columns is
    compensated on the columns not yet quantized: W_R += E_S H_SR H_RR^-1."""
    from bitserve.quantization.gptq import gptq_quantize

    w = w.float().clone()
    order = sorted(by_width)
    parts = []
    for i, b in enumerate(order):
        s = by_width[b]
        qw = gptq_quantize(
            w[:, s], hessian[s][:, s], QuantSpec(b, spec.group_size, spec.sym), damp=damp
        )
        parts.append((s, qw))
        if i + 1 < len(order):
            r = torch.cat([by_width[c] for c in order[i + 1 :]])
            err = w[:, s] - qw.dequantize()
            h_rr = hessian[r][:, r].clone()
            h_rr.diagonal().add_(damp * float(h_rr.diagonal().mean()) + 1e-8)
            w[:, r] += err @ torch.linalg.solve(h_rr, hessian[r][:, s]).t()
    return parts


def quantize_block(ctx: BlockContext) -> dict[str, Quantized]:
    """Pick every group's width by salience (exact average), then round each width's columns."""
    avg, widths, scope, base, damp = _options(ctx)
    if base == "gptq":
        from bitserve.quantization.gptq import collect_stats, input_groups

        groups = input_groups(ctx)
        stats = collect_stats(ctx, [g[0] for g in groups], stop_early=False)
        first = {n: g[0] for g in groups for n in g}
        hessians = {n: stats[first[n]].hessian for n in ctx.linears}
        power = {n: h.diagonal() / 2 for n, h in hessians.items()}
    else:
        power = input_power(ctx)
    weights = {n: lin.weight.data.float() for n, lin in ctx.linears.items()}
    units = {n: _units(n, weights[n], power[n], ctx.spec, widths) for n in ctx.linears}
    if scope == "block":
        # Layers' output errors are not on one scale: compare each relative to its own total
        # at the middle width, so bits move between layers only for large relative gains.
        mid = len(widths) // 2
        for us in units.values():
            norm = sum(u.errors[mid] for u in us) or 1.0
            for u in us:
                u.errors = [e / norm for e in u.errors]
    picked: dict[str, list[int]] = {}
    scopes = [list(units)] if scope == "block" else [[n] for n in units]
    for names in scopes:
        flat = [u for n in names for u in units[n]]
        widths_of = iter(allocate(flat, widths, avg))
        for n in names:
            picked[n] = [next(widths_of) for _ in units[n]]
    result: dict[str, Quantized] = {}
    for n, w in weights.items():
        by_width: dict[int, list[torch.Tensor]] = {}
        # Full groups first, the short last group last, so each part's groups stay aligned.
        for u, b in sorted(
            zip(units[n], picked[n], strict=True), key=lambda t: len(t[0].cols) < _full(ctx.spec)
        ):
            by_width.setdefault(b, []).append(u.cols)
        cols = {b: torch.cat(c) for b, c in by_width.items()}
        if base == "gptq":
            parts = _gptq_parts(w, hessians[n], cols, ctx.spec, damp)
        else:
            parts = _rtn_parts(w, cols, ctx.spec)
        # One width over every column (in natural order): a plain integer layer.
        result[n] = parts[0][1] if len(parts) == 1 else MixedWeight(parts, w.shape[1])
    return result


def _full(spec: QuantSpec) -> int:
    return 1 << 30 if spec.group_size == -1 else spec.group_size


METHOD = register_method(
    Method(
        name="mixed",
        needs_calibration=True,
        quantize_block=quantize_block,
        description="salience-driven mixed precision: 2/3/4-bit groups at an exact average",
        defaults=DEFAULTS,
    )
)
