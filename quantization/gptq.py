"""GPTQ / OPTQ: layer-wise second-order quantization. Each linear's columns are rounded one at a
time and the rounding error is spread over the not-yet-quantized columns through the inverse
Hessian H = 2 X X^T of its calibration inputs (Cholesky form, lazy block updates). Linears that
share an input (q/k/v, gate/up) are solved together; with `sequential` each group sees the
inputs produced by the already quantized groups before it. `act_order` visits columns by
decreasing Hessian diagonal but keeps static groups (k // G), so checkpoints load into the same
kernels as RTN ones."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import torch
from torch import nn

from bitserve.errors import UsageError
from bitserve.kernels.packing import group_index, num_groups
from bitserve.quantization.base import (
    BlockContext,
    Method,
    Quantized,
    is_int,
    is_number,
    register_method,
)
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
    "sequential": False,  # re-collect inputs after each quantized group of the block
    "clip_grid": 20,  # > 0: search each group's range shrink on this many steps (0: min/max)
    "bf16_forwards": True,  # block forwards and X^T X products in bfloat16 (sums stay fp32)
    "propagate": "fp",  # next block's inputs: this block's outputs with fp or quantized weights
}


P = ParamSpec("P")
R = TypeVar("R")


class _Stop(Exception):
    """Raised from a hook to end a block forward once the inputs we want are recorded."""


@dataclass
class InputStats:
    """Calibration statistics of one linear's input: H = 2/n X^T X and mean |x| per channel."""

    hessian: torch.Tensor
    mean_abs: torch.Tensor


def collect_stats(
    ctx: BlockContext,
    names: Sequence[str],
    stop_early: bool = True,
    outputs: list[torch.Tensor] | None = None,
) -> dict[str, InputStats]:
    """Run the block on every captured call with the current weights and accumulate the input
    statistics of the linears `names`; with `stop_early` each call ends once all have fired.
    With `outputs`, every call runs to the end and its block output is appended there. With
    `ctx.bf16` each call's X^T X is a bfloat16 product added to float32 sums."""
    sums: dict[str, torch.Tensor] = {}
    abs_sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    fired: set[str] = set()

    def hook_for(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            if name not in sums:
                sums[name] = torch.zeros(x.shape[1], x.shape[1])
                abs_sums[name] = torch.zeros(x.shape[1])
                rows[name] = 0
            add_gram(sums[name], x.to(torch.bfloat16 if ctx.bf16 else torch.float32))
            abs_sums[name] += x.abs().sum(0, dtype=torch.float32)
            rows[name] += x.shape[0]
            fired.add(name)
            if stop_early and outputs is None and fired.issuperset(names):
                raise _Stop

        return hook

    handles = [ctx.linears[n].register_forward_pre_hook(hook_for(n)) for n in names]
    try:
        with torch.no_grad():
            for call in ctx.inputs:
                fired.clear()
                with contextlib.suppress(_Stop):
                    out = ctx.run(call)
                    if outputs is not None:
                        outputs.append(out)
    finally:
        for h in handles:
            h.remove()
    for h in sums.values():  # add_gram filled the upper blocks only
        half = h.shape[0] // 2
        h[half:, :half] = h[:half, half:].t()
    return {
        n: InputStats(sums[n].mul_(2 / rows[n]), abs_sums[n] / rows[n]) for n in names if n in sums
    }


def add_gram(acc: torch.Tensor, x: torch.Tensor) -> None:
    """acc += X^T X on the diagonal and upper-right blocks of a 2 x 2 split of the columns (the
    lower-left one is the transpose: 3/4 of the products). The product runs in x's dtype
    (bfloat16 or float32) and is added to the float32 `acc`."""
    half = x.shape[1] // 2
    a, b = x[:, :half], x[:, half:]
    for rows, cols, left, right in (
        (slice(0, half), slice(0, half), a, a),
        (slice(0, half), slice(half, None), a, b),
        (slice(half, None), slice(half, None), b, b),
    ):
        acc[rows, cols] += (left.t() @ right).float()


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
    """Scale and zero [...] for groups of columns w [..., g] (e.g. [N, g] or [N, G, g]): min/max
    range, optionally shrunk by the factor in (0.5, 1] (`clip_grid` steps) that minimizes
    sum |w - q(w)|^norm per group row."""
    wmin = w.min(dim=-1).values
    wmax = w.max(dim=-1).values
    scale, zero = params_from_range(wmin, wmax, spec)
    if clip_grid <= 0:
        return scale, zero
    best = torch.full_like(scale, float("inf"))
    for i in range(clip_grid):
        shrink = 1 - 0.5 * i / clip_grid
        s, z = params_from_range(wmin * shrink, wmax * shrink, spec)
        q = torch.clamp(torch.round(w / s[..., None]) + z[..., None], 0, spec.maxq)
        err = ((q - z[..., None]) * s[..., None] - w).abs().pow(norm).sum(-1)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero


def static_group_params(
    w: torch.Tensor, spec: QuantSpec, clip_grid: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zeros [N, G] of every group of w [N, K] from the weights as they are (static
    groups), the full groups in one batched search and a short last group on its own."""
    n, k = w.shape
    gsize = k if spec.group_size == -1 else min(spec.group_size, k)
    full = k // gsize
    scale, zero = group_params(w[:, : full * gsize].reshape(n, full, gsize), spec, clip_grid)
    if full * gsize < k:
        s, z = group_params(w[:, full * gsize :], spec, clip_grid)
        scale, zero = torch.cat([scale, s[:, None]], 1), torch.cat([zero, z[:, None]], 1)
    return scale, zero


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1. A Hessian that rounding (e.g.
    bfloat16 products) left not positive definite gets ten times the damping, up to 4 times."""
    mean = torch.mean(torch.diag(h))
    for attempt in range(5):
        damped = h + torch.eye(h.shape[0]) * (damp * 10**attempt * mean)
        factor, info = torch.linalg.cholesky_ex(damped)
        if info == 0:
            break
    else:
        raise UsageError("gptq: the calibration Hessian is not positive definite; raise damp")
    return torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True)


def _single_threaded(fn: Callable[P, R]) -> Callable[P, R]:
    """Run `fn` with one intra-op thread: GPTQ's column loop is thousands of small ops, which
    threads only slow down (by 30x on a busy 2-core machine)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapper


@_single_threaded
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
    Group parameters are taken from the error-updated weights when the first column of a group
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
    static = act_order or block_size % gsize != 0
    if static:
        scales, zeros = static_group_params(w, spec, clip_grid)
    else:
        scales, zeros = torch.zeros(n, ngroups), torch.zeros(n, ngroups)
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k)
    w = w[:, perm]
    h = h[perm][:, perm]
    hinv = _inverse_cholesky(h, damp)
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
    if a["propagate"] not in ("fp", "quantized"):
        raise UsageError(f"gptq: propagate must be 'fp' or 'quantized', got {a['propagate']!r}")
    for key in ("act_order", "sequential", "bf16_forwards"):
        if not isinstance(a[key], bool):
            raise UsageError(f"gptq: {key} must be true or false, got {a[key]!r}")
    if not (is_int(a["block_size"]) and a["block_size"] >= 1):
        raise UsageError(f"gptq: block_size must be an integer >= 1, got {a['block_size']!r}")
    if not (is_int(a["clip_grid"]) and a["clip_grid"] >= 0):
        raise UsageError(f"gptq: clip_grid must be an integer >= 0, got {a['clip_grid']!r}")
    if not (is_number(a["damp"]) and a["damp"] >= 0):
        raise UsageError(f"gptq: damp must be a number >= 0, got {a['damp']!r}")
    firsts = [g[0] for g in groups]
    stats: dict[str, InputStats] = {}
    if a["propagate"] == "fp":  # one full pass: the fp block's outputs and the stats it can give
        ctx.outputs = []
        stats = collect_stats(ctx, firsts[:1] if a["sequential"] else firsts, False, ctx.outputs)
    elif not a["sequential"]:
        stats = collect_stats(ctx, firsts)
    for group in groups:
        if group[0] not in stats:  # sequential: inputs from the already quantized sub-layers
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
