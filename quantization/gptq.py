"""GPTQ / OPTQ: layer-wise second-order quantization. Each linear's columns are rounded one at a
time and the rounding error is spread over the not-yet-quantized columns through the inverse
Hessian H = 2 X X^T of its calibration inputs (Cholesky form, lazy block updates). Linears that
share an input (q/k/v, gate/up) are solved together; with `sequential` each group sees the
inputs produced by the already quantized groups before it. `act_order` visits columns by
decreasing Hessian diagonal but keeps static groups (k // G), so checkpoints load into the same
kernels as RTN ones."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bitserve.errors import UsageError
from bitserve.kernels.packing import group_index, num_groups
from bitserve.quantization.base import BlockContext, Method, Quantized, register_method
from bitserve.quantization.grid import (
    QuantizedWeight,
    QuantSpec,
    params_from_range,
    quantize_to_grid,
)

DEFAULTS: dict[str, Any] = {
    "damp": 0.1,  # added to H's diagonal, as a fraction of its mean
    "block_size": 128,  # columns per lazy batch update
    "act_order": True,  # visit columns by decreasing H diagonal (static groups)
    "sequential": True,  # re-collect inputs after each quantized group of the block
    "clip_grid": 20,  # > 0: search each group's range shrink on this many steps (0: min/max)
}


class _Stop(Exception):
    """Raised from a hook to end a block forward once the inputs we want are recorded."""


@dataclass
class InputStats:
    """Calibration statistics of one linear's input: H = 2/n X^T X and mean |x| per channel."""

    hessian: torch.Tensor
    mean_abs: torch.Tensor


def collect_stats(
    ctx: BlockContext, names: Sequence[str], stop_early: bool = True
) -> dict[str, InputStats]:
    """Run the block on every captured call with the current weights and accumulate the input
    statistics of the linears `names`; with `stop_early` each call ends once all have fired."""
    sums: dict[str, torch.Tensor] = {}
    abs_sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    fired: set[str] = set()

    def hook_for(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            if name not in sums:
                sums[name] = torch.zeros(x.shape[1], x.shape[1])
                abs_sums[name] = torch.zeros(x.shape[1])
                rows[name] = 0
            sums[name].addmm_(x.t(), x)
            abs_sums[name] += x.abs().sum(0)
            rows[name] += x.shape[0]
            fired.add(name)
            if stop_early and fired.issuperset(names):
                raise _Stop

        return hook

    handles = [ctx.linears[n].register_forward_pre_hook(hook_for(n)) for n in names]
    try:
        with torch.no_grad():
            for call in ctx.inputs:
                fired.clear()
                with contextlib.suppress(_Stop):
                    ctx.run(call)
    finally:
        for h in handles:
            h.remove()
    return {
        n: InputStats(sums[n].mul_(2 / rows[n]), abs_sums[n] / rows[n]) for n in names if n in sums
    }


_GROUP_CACHE: dict[tuple[str, tuple[str, ...]], list[list[str]]] = {}


def input_groups(ctx: BlockContext) -> list[list[str]]:
    """The block's linears in call order, grouped by shared input tensor (e.g. [[q, k, v], [o],
    [gate, up], [down]]); found by one probe forward and cached per block structure."""
    key = (type(ctx.block).__name__, tuple(ctx.linears))
    if key in _GROUP_CACHE:
        return _GROUP_CACHE[key]
    order: list[tuple[str, torch.Tensor]] = []
    handles = [
        lin.register_forward_pre_hook(lambda m, a, n=name: order.append((n, a[0])))
        for name, lin in ctx.linears.items()
    ]
    try:
        with torch.no_grad():
            ctx.run(ctx.inputs[0])
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    last: torch.Tensor | None = None
    for name, x in order:
        if groups and x is last and name not in groups[-1]:
            groups[-1].append(name)
        elif not any(name in g for g in groups):
            groups.append([name])
        last = x
    missing = [n for n in ctx.linears if not any(n in g for g in groups)]
    groups += [[n] for n in missing]
    _GROUP_CACHE[key] = groups
    return groups


def group_params(
    w: torch.Tensor, spec: QuantSpec, clip_grid: int = 0, norm: float = 2.4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero [N] for one group of columns w [N, g]: min/max range, optionally shrunk
    by the factor in (0.5, 1] (`clip_grid` steps) that minimizes sum |w - q(w)|^norm per row."""
    wmin = w.min(dim=1).values
    wmax = w.max(dim=1).values
    scale, zero = params_from_range(wmin, wmax, spec)
    if clip_grid <= 0:
        return scale, zero
    best = torch.full_like(scale, float("inf"))
    for i in range(clip_grid):
        shrink = 1 - 0.5 * i / clip_grid
        s, z = params_from_range(wmin * shrink, wmax * shrink, spec)
        q = torch.clamp(torch.round(w / s[:, None]) + z[:, None], 0, spec.maxq)
        err = ((q - z[:, None]) * s[:, None] - w).abs().pow(norm).sum(1)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    clip_grid: int = 0,
) -> QuantizedWeight:
    """GPTQ on one weight [N, K] with the Hessian [K, K] of its inputs; returns grid codes.

    Runs single-threaded: the column loop is thousands of small ops, which intra-op threads only
    slow down (by 30x on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _gptq(weight, hessian, spec, damp, block_size, act_order, clip_grid)
    finally:
        torch.set_num_threads(threads)


def _gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    clip_grid: int = 0,
) -> QuantizedWeight:
    """The GPTQ column loop. Group parameters are taken from the error-updated weights when the first column of a group
    is reached, or (with act_order) from the original weights up front: static groups."""
    w = weight.detach().float().clone()
    n, k = w.shape
    h = hessian.detach().float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    gsize = k if spec.group_size == -1 else min(spec.group_size, k)
    ngroups = num_groups(k, spec.group_size)
    gidx = group_index(k, spec.group_size)
    scales = torch.zeros(n, ngroups)
    zeros = torch.zeros(n, ngroups)
    static = act_order or block_size % gsize != 0
    if static:
        for g in range(ngroups):
            scales[:, g], zeros[:, g] = group_params(
                w[:, g * gsize : (g + 1) * gsize], spec, clip_grid
            )
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k)
    w = w[:, perm]
    h = h[perm][:, perm]
    h.diagonal().add_(damp * torch.mean(torch.diag(h)))
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    # Work on transposed copies so that every column of W is a contiguous row.
    wt = w.t().contiguous()
    st, zt = scales.t().contiguous(), zeros.t().contiguous()
    out = torch.zeros_like(wt)
    order = perm.tolist()
    groups_of = gidx.tolist()
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = wt[i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        diag = hinv1.diagonal().tolist()
        for i in range(i2 - i1):
            col = order[i1 + i]
            g = groups_of[col]
            if not static and col % gsize == 0:
                st[g], zt[g] = group_params(w1[i : i + gsize].t(), spec, clip_grid)
            s, z = st[g], zt[g]
            wc = w1[i]
            q = torch.round(wc / s).add_(z).clamp_(0, spec.maxq).sub_(z).mul_(s)
            out[i1 + i] = q
            e = (wc - q).div_(diag[i])
            w1[i:].addr_(hinv1[i, i:], e, alpha=-1)
            err1[i] = e
        wt[i2:].sub_(hinv[i1:i2, i2:].t() @ err1)
    out = out[torch.argsort(perm)].t()
    scales, zeros = st.t(), zt.t()
    return quantize_to_grid(out, scales, zeros, spec)


def check_args(ctx: BlockContext, defaults: dict[str, Any], method: str) -> None:
    """Reject method options the method does not know (a typo would otherwise be ignored)."""
    unknown = sorted(set(ctx.args) - set(defaults))
    if unknown:
        raise UsageError(
            f"{method}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(defaults))}"
        )


def quantize_block(ctx: BlockContext) -> dict[str, Quantized]:
    """Quantize the block's linears group by group (q/k/v, o, gate/up, down) with GPTQ."""
    check_args(ctx, DEFAULTS, "gptq")
    a = ctx.args
    groups = input_groups(ctx)
    result: dict[str, Quantized] = {}
    stats = {} if a["sequential"] else collect_stats(ctx, [g[0] for g in groups], False)
    for group in groups:
        if a["sequential"]:
            stats.update(collect_stats(ctx, [group[0]]))
        lins = [ctx.linears[name] for name in group]
        stacked = torch.cat([lin.weight.data.float() for lin in lins])
        qw = gptq_quantize(
            stacked,
            stats[group[0]].hessian,
            ctx.spec,
            damp=a["damp"],
            block_size=a["block_size"],
            act_order=a["act_order"],
            clip_grid=a["clip_grid"],
        )
        start = 0
        for name, lin in zip(group, lins, strict=True):
            rows = slice(start, start + lin.out_features)
            start += lin.out_features
            part = QuantizedWeight(
                qw.q[:, rows].contiguous(),
                qw.scales[:, rows].contiguous(),
                qw.zeros[:, rows].contiguous(),
                ctx.spec,
            )
            lin.weight.data = part.dequantize().to(lin.weight.dtype)
            result[name] = part
    return result


METHOD = register_method(
    Method(
        name="gptq",
        needs_calibration=True,
        quantize_block=quantize_block,
        description="GPTQ/OPTQ second-order error compensation with calibration Hessians",
        defaults=DEFAULTS,
    )
)
