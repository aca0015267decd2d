"""AWQ: activation-aware weight quantization. Input channels that carry large activations are
scaled up in the weights (s = mean|x|^a / mean|w|^(1-a), `a` grid-searched on the calibration
output error) and the inverse scale is folded into the op that produces those inputs
(input_layernorm -> q/k/v, post_attention_layernorm -> gate/up, up -> down, v -> o when there is
one KV head per query head), so the full-precision model is unchanged. A per-group clipping
search then shrinks each group's range where that lowers the output error, and the scaled
weights go through plain round-to-nearest on the shared grid.

The output error of a weight error E [N, K] on inputs X is tr(E H E^T)/2 with H = 2 X^T X / n,
so every candidate is scored over all calibration tokens at the cost of one matmul."""

from __future__ import annotations

from typing import Any

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
from bitserve.quantization.gptq import InputStats, check_args, collect_stats, input_groups
from bitserve.quantization.grid import QuantSpec, fake_quantize, quantize_rtn

DEFAULTS: dict[str, Any] = {
    "scale": True,  # search and fold per-channel scales
    "clip": True,  # search per-group range shrink factors
    "n_grid": 20,  # grid steps of both searches
    "max_shrink": 0.5,  # smallest range factor tried is 1 - max_shrink
}
_NORM_BEFORE = {
    "q_proj": "input_layernorm",
    "k_proj": "input_layernorm",
    "v_proj": "input_layernorm",
    "gate_proj": "post_attention_layernorm",
    "up_proj": "post_attention_layernorm",
}
_NO_CLIP = ("q_proj", "k_proj")  # their errors are amplified by the attention softmax
FOLD_TOLERANCE = 1e-3  # relative change of a block's output beyond which a fold is not exact


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _sibling(name: str, leaf: str) -> str:
    parent = name.rpartition(".")[0]
    return f"{parent}.{leaf}" if parent else leaf


def previous_op(ctx: BlockContext, group: list[str]) -> nn.Module | None:
    """The module whose output is exactly this group's input, scaled per channel by dividing its
    weight (an RMSNorm, or the rows of a linear); None where no such fold is exact."""
    leaf = _leaf(group[0])
    if leaf in _NORM_BEFORE:
        norm = getattr(ctx.block, _NORM_BEFORE[leaf], None)
        return norm if isinstance(getattr(norm, "weight", None), torch.Tensor) else None
    if leaf == "down_proj":
        return ctx.linears.get(_sibling(group[0], "up_proj"))
    if leaf == "o_proj":
        attn = ctx.block.get_submodule(group[0].rpartition(".")[0])
        if getattr(attn, "num_key_value_groups", None) == 1:
            return ctx.linears.get(_sibling(group[0], "v_proj"))
    return None


def output_error(w: torch.Tensor, wq: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """tr(E H E^T) for E = wq - w: twice the mean squared output error on the calibration set."""
    e = wq - w
    return ((e @ hessian) * e).sum()


def search_scale(
    weights: list[torch.Tensor], stats: InputStats, spec: QuantSpec, n_grid: int
) -> torch.Tensor:
    """Per-input-channel scale [K] for the linears `weights` (which share an input): the best of
    s = 1 and s = mean|x|^a / mean|w|^(1-a) for a in [0, 1) by the RTN output error."""
    w = torch.cat(weights).float()
    k = w.shape[1]
    groups = group_index(k, spec.group_size)
    gmax = torch.zeros(w.shape[0], num_groups(k, spec.group_size))
    gmax = gmax.scatter_reduce(1, groups.expand_as(w), w.abs(), "amax", include_self=False)
    w_mean = (w.abs() / gmax[:, groups].clamp_min(1e-8)).mean(0)
    x_mean = stats.mean_abs
    best_s = torch.ones(k)
    best = output_error(w, fake_quantize(w, spec), stats.hessian)
    for i in range(n_grid):
        alpha = i / n_grid
        s = (x_mean.pow(alpha) / w_mean.pow(1 - alpha).clamp_min(1e-4)).clamp_min(1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = output_error(w, fake_quantize(w * s, spec) / s, stats.hessian)
        if err < best:
            best, best_s = err, s
    return best_s


def fold_scale(ctx: BlockContext, group: list[str], prev: nn.Module, s: torch.Tensor) -> None:
    """Multiply the group's weight columns by s and divide the previous op's output channels by
    s: the block computes the same function (exactly, before rounding)."""
    with torch.no_grad():
        for name in group:
            lin = ctx.linears[name]
            lin.weight.mul_(s.to(lin.weight.dtype)[None, :])
        weight = prev.weight
        assert isinstance(weight, torch.Tensor)
        if weight.dim() == 1:
            weight.div_(s.to(weight.dtype))
        else:
            weight.div_(s.to(weight.dtype)[:, None])
        bias = getattr(prev, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.div_(s.to(bias.dtype))


def fold_if_exact(ctx: BlockContext, group: list[str], prev: nn.Module, s: torch.Tensor) -> bool:
    """Fold s, and keep it only if the block's output on the first calibration call is unchanged.
    Names alone cannot tell that a fold is exact: Gemma's norms scale by (1 + weight), Phi's one
    norm also feeds the parallel MLP, Gemma 2's post_attention_layernorm normalises an output."""
    params = [ctx.linears[n].weight for n in group] + [
        t for t in (prev.weight, getattr(prev, "bias", None)) if isinstance(t, torch.Tensor)
    ]
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        before = ctx.run(ctx.inputs[0])
        fold_scale(ctx, group, prev, s)
        after = ctx.run(ctx.inputs[0])
        if (after - before).norm() <= FOLD_TOLERANCE * before.norm():
            return True
        for p, value in zip(params, saved, strict=True):
            p.copy_(value)
    return False


def scale_block(
    ctx: BlockContext, groups: list[list[str]], stats: dict[str, InputStats]
) -> dict[str, torch.Tensor]:
    """Search and fold the scales of every group that has a foldable previous op; returns each
    group's scale by its first linear's name (ones where nothing was folded)."""
    scales: dict[str, torch.Tensor] = {}
    for group in groups:
        prev = previous_op(ctx, group)
        k = ctx.linears[group[0]].in_features
        s = torch.ones(k)
        if prev is not None and ctx.args["scale"]:
            weights = [ctx.linears[n].weight.data for n in group]
            s = search_scale(weights, stats[group[0]], ctx.spec, ctx.args["n_grid"])
            if not fold_if_exact(ctx, group, prev, s):
                s = torch.ones(k)
        scales[group[0]] = s
    return scales


def search_clip(
    w: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, n_grid: int, max_shrink: float
) -> torch.Tensor:
    """Per (row, group) range shrink factor [N, G] in [1 - max_shrink, 1] minimizing each
    group's share of the output error e_g H_gg e_g^T."""
    n, k = w.shape
    ng = num_groups(k, spec.group_size)
    size = k if ng == 1 else spec.group_size
    best = torch.full((n, ng), float("inf"))
    best_clip = torch.ones(n, ng)
    for i in range(n_grid + 1):
        shrink = 1 - max_shrink * i / n_grid
        e = fake_quantize(w, spec, shrink) - w
        err = torch.stack(
            [
                (
                    (
                        e[:, g * size : (g + 1) * size]
                        @ hessian[g * size : (g + 1) * size, g * size : (g + 1) * size]
                    )
                    * e[:, g * size : (g + 1) * size]
                ).sum(1)
                for g in range(ng)
            ],
            dim=1,
        )
        better = err < best
        best = torch.where(better, err, best)
        best_clip = torch.where(better, torch.full_like(best_clip, shrink), best_clip)
    return best_clip


def check_options(a: dict[str, Any]) -> None:
    """Refuse option values the searches cannot use (they would fail deep inside, or round
    every weight to nothing)."""
    for key in ("scale", "clip"):
        if not isinstance(a[key], bool):
            raise UsageError(f"awq: {key} must be true or false, got {a[key]!r}")
    if not (is_int(a["n_grid"]) and a["n_grid"] >= 1):
        raise UsageError(f"awq: n_grid must be an integer >= 1, got {a['n_grid']!r}")
    if not (is_number(a["max_shrink"]) and 0 <= a["max_shrink"] < 1):
        raise UsageError(f"awq: max_shrink must be a number in [0, 1), got {a['max_shrink']!r}")


def quantize_block(ctx: BlockContext) -> dict[str, Quantized]:
    """Scale (folded), clip-search and round the block's linears."""
    check_args(ctx, DEFAULTS, "awq")
    check_options(ctx.args)
    groups = input_groups(ctx)
    stats = collect_stats(ctx, [g[0] for g in groups], stop_early=False)
    scales = scale_block(ctx, groups, stats)
    result: dict[str, Quantized] = {}
    for group in groups:
        s = scales[group[0]]
        hessian = stats[group[0]].hessian / (s[:, None] * s[None, :])
        for name in group:
            w = ctx.linears[name].weight.data.float()
            clip: torch.Tensor | float = 1.0
            if ctx.args["clip"] and _leaf(name) not in _NO_CLIP:
                clip = search_clip(w, hessian, ctx.spec, ctx.args["n_grid"], ctx.args["max_shrink"])
            result[name] = quantize_rtn(w, ctx.spec, clip)
    return result


METHOD = register_method(
    Method(
        name="awq",
        needs_calibration=True,
        quantize_block=quantize_block,
        description="activation-aware scaling folded into the previous op, clip search, then RTN",
        defaults=DEFAULTS,
    )
)
