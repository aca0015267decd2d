"""SignRound (arXiv 2309.05516, the auto-round method): per decoder block, learn each weight's
rounding offset V in [-0.5, 0.5] and per-group min/max clipping factors by signed gradient
descent on the block's output error, then round onto the shared integer grid.

As in auto-round, the block is trained on the inputs the quantized model feeds it (the
pipeline's inputs) against targets from the full-precision model (`targets="fp"`: the fp block
run on the fp model's own hidden states, carried from block to block), so each block also
corrects the drift of the blocks before it. `targets="quantized"` uses the fp block on the
quantized inputs instead (no carried state, less memory)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bitserve.errors import UsageError
from bitserve.quantization.base import (
    BlockCall,
    BlockContext,
    Method,
    Quantized,
    call_hidden,
    register_method,
    with_hidden,
)
from bitserve.quantization.grid import QuantizedWeight, QuantSpec, group_range

DEFAULTS: dict[str, Any] = {
    "iters": 200,
    "lr": None,  # None: 1 / iters (auto-round's default), for V and the clipping factors
    "batch_size": 4,  # calibration samples per step (each of the calibration seqlen)
    "targets": "fp",
    "clip_min": 0.5,  # lower bound of the learned min/max clipping factors
    "amp": True,  # run the block's matmuls in bfloat16 (autocast) while learning, as auto-round
    "tune_norms": False,  # also learn a factor on each norm gain (see signround_block)
    "keep": "best",  # which iterate to export: "best" (lowest minibatch loss) or "last"
}


@dataclass
class _Params:
    """Learnable state of one linear: rounding offsets and group clipping factors."""

    w: torch.Tensor  # [N, G, group] fp32, frozen; a short last group is zero-padded
    k: int  # input features (w's real width)
    wmin: torch.Tensor  # [N, G]
    wmax: torch.Tensor  # [N, G]
    v: torch.Tensor  # [N, G, group] rounding offset
    lo: torch.Tensor  # [N, G] factor on the group minimum
    hi: torch.Tensor  # [N, G] factor on the group maximum

    def tensors(self) -> list[torch.Tensor]:
        return [self.v, self.lo, self.hi]


def _ste_round(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def _grid(p: _Params, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (fp16-representable) and zero point [N, G] of the clipped group ranges, the same
    arithmetic as grid.params_from_range but differentiable (STE through the roundings)."""
    lo, hi = p.wmin * p.lo, p.wmax * p.hi
    if spec.sym:
        amax = torch.maximum(lo.abs(), hi.abs())
        scale = amax / ((spec.maxq + 1) / 2 - 0.5)
    else:
        scale = (hi - lo) / spec.maxq
    scale = scale.clamp_min(1e-5)
    scale = scale + (scale.half().float() - scale).detach()
    if spec.sym:
        zero = torch.full_like(scale, (spec.maxq + 1) // 2)
    else:
        zero = _ste_round(-lo / scale).clamp(0, spec.maxq)
    return scale, zero


def _codes(p: _Params, spec: QuantSpec, rnd: Any) -> tuple[torch.Tensor, ...]:
    """Codes, scales and zeros broadcast over the padded groups [N, G, group]; `rnd` rounds.
    Broadcasting (not indexing by group) keeps the backward pass a cheap sum."""
    scale, zero = _grid(p, spec)
    s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
    return torch.clamp(rnd(p.w / s + p.v) + z, 0, spec.maxq), s, z


def _unpad(t: torch.Tensor, k: int) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)[:, :k]


def _fake_quant(p: _Params, spec: QuantSpec) -> torch.Tensor:
    """The dequantized weight [N, K] for the current V and clipping, differentiable."""
    q, s, z = _codes(p, spec, _ste_round)
    return _unpad((q - z) * s, p.k)


@torch.no_grad()
def _export(p: _Params, spec: QuantSpec) -> QuantizedWeight:
    """Codes, fp16 scales and zeros of the learned rounding, in the shared grid layout."""
    q, s, z = _codes(p, spec, torch.round)
    return QuantizedWeight(
        q=_unpad(q, p.k).t().to(torch.uint8).contiguous(),
        scales=s.squeeze(-1).t().half().contiguous(),
        zeros=z.squeeze(-1).t().to(torch.uint8).contiguous(),
        spec=spec,
    )


def _init_params(w: torch.Tensor, spec: QuantSpec) -> _Params:
    w = w.detach().float()
    n, k = w.shape
    wmin, wmax = group_range(w, spec.group_size)
    size = k if spec.group_size == -1 else min(spec.group_size, k)
    padded = torch.nn.functional.pad(w, (0, wmin.shape[1] * size - k)).view(n, -1, size)
    return _Params(
        w=padded,
        k=k,
        wmin=wmin,
        wmax=wmax,
        v=torch.zeros_like(padded, requires_grad=True),
        lo=torch.ones_like(wmin, requires_grad=True),
        hi=torch.ones_like(wmax, requires_grad=True),
    )


def _rows(call: BlockCall, rows: torch.Tensor) -> BlockCall:
    """The call restricted to some samples: every tensor batched like the hidden states is
    sliced, the rest (batch-1 position embeddings, None masks, flags) passed as is."""
    n = call_hidden(call).shape[0]

    def pick(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == n:
            return x[rows]
        if isinstance(x, tuple):
            return tuple(pick(t) for t in x)
        return x

    args, kwargs = call
    return tuple(pick(a) for a in args), {k: pick(v) for k, v in kwargs.items()}


def _merge(calls: list[BlockCall]) -> BlockCall:
    """One call over the samples of all `calls` (the pipeline's chunks): tensors batched like
    the hidden states are concatenated, everything else is taken from the first call."""
    n = call_hidden(calls[0]).shape[0]

    def cat(xs: list[Any]) -> Any:
        x = xs[0]
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == n:
            return torch.cat(xs)
        if isinstance(x, tuple):
            return tuple(cat(list(parts)) for parts in zip(*xs, strict=True))
        return x

    args = tuple(cat(list(a)) for a in zip(*(c[0] for c in calls), strict=True))
    return args, {k: cat([c[1][k] for c in calls]) for k in calls[0][1]}


def _batches(total: int, batch: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless minibatches of sample indices, as auto-round draws them: each pass over the data
    is a fresh permutation of all samples cut into batches (a short tail is dropped), so every
    sample is used equally often and batches mix samples from every calibration chunk."""
    size = min(batch, total)
    while True:
        order = torch.randperm(total, generator=gen)
        for start in range(0, total - size + 1, size):
            yield order[start : start + size]


def _run(block: nn.Module, call: BlockCall, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    out = torch.func.functional_call(block, weights, call[0], call[1])
    return out[0] if isinstance(out, tuple) else out


@dataclass(frozen=True)
class _Options:
    iters: int
    lr: float
    batch: int
    targets: str
    clip_min: float
    amp: bool
    tune_norms: bool
    keep: str


def _flag(value: Any) -> bool:
    """An on/off option given as a bool or as text; anything else is a ValueError."""
    text = str(value).lower()
    if text not in ("1", "true", "yes", "0", "false", "no"):
        raise ValueError(f"expected true or false, got {value!r}")
    return text in ("1", "true", "yes")


def _options(args: dict[str, Any]) -> _Options:
    try:
        iters = int(args["iters"])
        opts = _Options(
            iters=iters,
            lr=float(args["lr"]) if args.get("lr") is not None else 1.0 / max(iters, 1),
            batch=int(args["batch_size"]),
            targets=str(args["targets"]),
            clip_min=float(args["clip_min"]),
            amp=_flag(args.get("amp", True)),
            tune_norms=_flag(args.get("tune_norms", False)),
            keep=str(args.get("keep", "best")),
        )
    except (TypeError, ValueError) as e:
        raise UsageError(f"signround: bad option value ({e})") from None
    if iters < 0 or opts.batch < 1 or not 0.0 < opts.clip_min <= 1.0 or opts.lr <= 0:
        raise UsageError("signround: need iters >= 0, batch_size >= 1, lr > 0, 0 < clip_min <= 1")
    if opts.keep not in ("best", "last"):
        raise UsageError(f"signround: keep must be 'best' or 'last', got {opts.keep!r}")
    if opts.targets not in ("fp", "quantized"):
        raise UsageError(f"signround: targets must be 'fp' or 'quantized', got {opts.targets!r}")
    return opts


def _fp_inputs(ctx: BlockContext, targets: str) -> list[BlockCall]:
    """The calls whose fp block outputs are the targets (see the module docstring)."""
    hidden = ctx.carry.get("signround_fp_hidden")
    if targets == "fp" and ctx.index > 0 and hidden is not None:
        return [with_hidden(c, h) for c, h in zip(ctx.inputs, hidden, strict=True)]
    return ctx.inputs


def _norm_weights(ctx: BlockContext) -> dict[str, torch.Tensor]:
    """The block's 1-D weights outside its linears (RMSNorm gains), by parameter name."""
    return {
        n: p
        for n, p in ctx.block.named_parameters()
        if p.dim() == 1 and not any(n.startswith(f"{lin}.") for lin in ctx.linears)
    }


def signround_block(ctx: BlockContext, losses: list[float] | None = None) -> dict[str, Quantized]:
    """Quantize one block's linears with SignRound; append each step's loss to `losses`.

    With `tune_norms`, a factor in [0.5, 1.5] on each norm gain is learned alongside (a
    per-input-channel scaling of q/k/v and gate/up, as AWQ's but by gradient) and folded into
    the block's norm weights, which the checkpoint keeps in 16 bits."""
    opts = _options(ctx.args)
    iters, lr, batch, clip_min = opts.iters, opts.lr, opts.batch, opts.clip_min
    spec, block = ctx.spec, ctx.block
    with torch.no_grad():
        fp_out = [ctx.run(c).detach() for c in _fp_inputs(ctx, opts.targets)]
    ctx.carry["signround_fp_hidden"] = fp_out if opts.targets == "fp" else None
    params = {name: _init_params(lin.weight, spec) for name, lin in ctx.linears.items()}
    if iters == 0 or not ctx.inputs:
        return {name: _export(p, spec) for name, p in params.items()}
    norms = _norm_weights(ctx) if opts.tune_norms else {}
    factors = {n: torch.ones_like(w, requires_grad=True) for n, w in norms.items()}
    trained = [t for p in params.values() for t in p.tensors()] + list(factors.values())
    merged, target = _merge(ctx.inputs), torch.cat(fp_out)
    gen = torch.Generator().manual_seed(ctx.seed * 1000 + ctx.index)
    batches = _batches(target.shape[0], batch, gen)
    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    best = math.inf
    best_state = [t.detach().clone() for t in trained]
    try:
        autocast = torch.autocast(call_hidden(ctx.inputs[0]).device.type, torch.bfloat16, opts.amp)
        with torch.enable_grad():
            for step in range(iters):
                rows = next(batches)
                call = _rows(merged, rows)
                weights = {f"{n}.weight": _fake_quant(p, spec) for n, p in params.items()}
                weights.update({n: norms[n] * f for n, f in factors.items()})
                with autocast:
                    out = _run(block, call, weights)
                loss = torch.nn.functional.mse_loss(out.float(), target[rows])
                value = float(loss.detach())
                if losses is not None:
                    losses.append(value)
                if value < best:
                    best = value
                    for saved, t in zip(best_state, trained, strict=True):
                        saved.copy_(t.detach())
                loss.backward()
                step_lr = lr * (1.0 - step / iters)  # linear decay to 0
                with torch.no_grad():
                    for t in trained:
                        assert t.grad is not None
                        t.sub_(step_lr * torch.sign(t.grad))
                        t.grad = None
                    for p in params.values():
                        p.v.clamp_(-0.5, 0.5)
                        p.lo.clamp_(clip_min, 1.0)
                        p.hi.clamp_(clip_min, 1.0)
                    for f in factors.values():
                        f.clamp_(0.5, 1.5)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    with torch.no_grad():
        if opts.keep == "best":
            for t, saved in zip(trained, best_state, strict=True):
                t.copy_(saved)
        for n, f in factors.items():
            norms[n].mul_(f)
    return {name: _export(p, spec) for name, p in params.items()}


def quantize_block(ctx: BlockContext) -> dict[str, Quantized]:
    return signround_block(ctx)


METHOD = register_method(
    Method(
        name="signround",
        needs_calibration=True,
        quantize_block=quantize_block,
        description="SignRound: rounding offsets and clipping learned by SignSGD per block",
        defaults=DEFAULTS,
    )
)
