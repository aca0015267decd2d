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
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bitserve.errors import UsageError
from bitserve.kernels.packing import group_index
from bitserve.quantization.base import BlockCall, BlockContext, Method, Quantized, register_method
from bitserve.quantization.grid import QuantizedWeight, QuantSpec, group_range

DEFAULTS: dict[str, Any] = {
    "iters": 200,
    "lr": None,  # None: 1 / iters (auto-round's default), for V and the clipping factors
    "batch_size": 4,  # calibration samples per step (each of the calibration seqlen)
    "targets": "fp",
    "clip_min": 0.5,  # lower bound of the learned min/max clipping factors
}

# The fp model's hidden states entering the next block, kept between blocks of one run
# (targets="fp"); keyed by the run's options dict, which the pipeline shares across blocks.
_FP_STREAM: dict[str, Any] = {}


@dataclass
class _Params:
    """Learnable state of one linear: rounding offsets and group clipping factors."""

    w: torch.Tensor  # [N, K] fp32, frozen
    wmin: torch.Tensor  # [N, G]
    wmax: torch.Tensor  # [N, G]
    gidx: torch.Tensor  # [K] group of each input channel
    v: torch.Tensor  # [N, K] rounding offset
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


def _fake_quant(p: _Params, spec: QuantSpec) -> torch.Tensor:
    """The dequantized weight [N, K] for the current V and clipping, differentiable."""
    scale, zero = _grid(p, spec)
    s, z = scale[:, p.gidx], zero[:, p.gidx]
    q = torch.clamp(_ste_round(p.w / s + p.v) + z, 0, spec.maxq)
    return (q - z) * s


@torch.no_grad()
def _export(p: _Params, spec: QuantSpec) -> QuantizedWeight:
    """Codes, fp16 scales and zeros of the learned rounding, in the shared grid layout."""
    scale, zero = _grid(p, spec)
    s, z = scale[:, p.gidx], zero[:, p.gidx]
    q = torch.clamp(torch.round(p.w / s + p.v) + z, 0, spec.maxq)
    return QuantizedWeight(
        q=q.t().to(torch.uint8).contiguous(),
        scales=scale.t().half().contiguous(),
        zeros=zero.t().to(torch.uint8).contiguous(),
        spec=spec,
    )


def _init_params(w: torch.Tensor, spec: QuantSpec) -> _Params:
    w = w.detach().float()
    wmin, wmax = group_range(w, spec.group_size)
    return _Params(
        w=w,
        wmin=wmin,
        wmax=wmax,
        gidx=group_index(w.shape[1], spec.group_size, w.device),
        v=torch.zeros_like(w, requires_grad=True),
        lo=torch.ones_like(wmin, requires_grad=True),
        hi=torch.ones_like(wmax, requires_grad=True),
    )


def _hidden(call: BlockCall) -> torch.Tensor:
    args, kwargs = call
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(call: BlockCall, hidden: torch.Tensor) -> BlockCall:
    args, kwargs = call
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _rows(call: BlockCall, rows: torch.Tensor) -> BlockCall:
    """The call restricted to some samples: every tensor batched like the hidden states is
    sliced, the rest (batch-1 position embeddings, None masks, flags) passed as is."""
    n = _hidden(call).shape[0]

    def pick(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == n:
            return x[rows]
        if isinstance(x, tuple):
            return tuple(pick(t) for t in x)
        return x

    args, kwargs = call
    return tuple(pick(a) for a in args), {k: pick(v) for k, v in kwargs.items()}


def _run(block: nn.Module, call: BlockCall, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    out = torch.func.functional_call(block, weights, call[0], call[1])
    return out[0] if isinstance(out, tuple) else out


def _options(args: dict[str, Any]) -> tuple[int, float, int, str, float]:
    try:
        iters = int(args["iters"])
        lr = float(args["lr"]) if args.get("lr") is not None else 1.0 / max(iters, 1)
        batch = int(args["batch_size"])
        clip_min = float(args["clip_min"])
    except (TypeError, ValueError) as e:
        raise UsageError(f"signround: bad option value ({e})") from None
    targets = str(args["targets"])
    if iters < 0 or batch < 1 or not 0.0 < clip_min <= 1.0 or lr <= 0:
        raise UsageError("signround: need iters >= 0, batch_size >= 1, lr > 0, 0 < clip_min <= 1")
    if targets not in ("fp", "quantized"):
        raise UsageError(f"signround: targets must be 'fp' or 'quantized', got {targets!r}")
    return iters, lr, batch, targets, clip_min


def _fp_inputs(ctx: BlockContext, targets: str) -> list[BlockCall]:
    """The calls whose fp block outputs are the targets (see the module docstring)."""
    stream = _FP_STREAM.get("state")
    if (
        targets == "fp"
        and ctx.index > 0
        and stream is not None
        and stream["args"] is ctx.args
        and stream["index"] == ctx.index
    ):
        return [_with_hidden(c, h) for c, h in zip(ctx.inputs, stream["hidden"], strict=True)]
    return ctx.inputs


def signround_block(ctx: BlockContext, losses: list[float] | None = None) -> dict[str, Quantized]:
    """Quantize one block's linears with SignRound; append each step's loss to `losses`."""
    iters, lr, batch, targets, clip_min = _options(ctx.args)
    spec, block = ctx.spec, ctx.block
    with torch.no_grad():
        fp_out = [ctx.run(c).detach() for c in _fp_inputs(ctx, targets)]
    _FP_STREAM.pop("state", None)
    if targets == "fp":
        _FP_STREAM["state"] = {"args": ctx.args, "index": ctx.index + 1, "hidden": fp_out}
    params = {name: _init_params(lin.weight, spec) for name, lin in ctx.linears.items()}
    if iters == 0 or not ctx.inputs:
        return {name: _export(p, spec) for name, p in params.items()}
    sizes = [_hidden(c).shape[0] for c in ctx.inputs]
    gen = torch.Generator().manual_seed(ctx.seed * 1000 + ctx.index)
    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    best = math.inf
    best_state = {name: [t.detach().clone() for t in p.tensors()] for name, p in params.items()}
    try:
        with torch.enable_grad():
            for step in range(iters):
                c = int(torch.randint(len(ctx.inputs), (1,), generator=gen))
                rows = torch.randperm(sizes[c], generator=gen)[: min(batch, sizes[c])]
                call = _rows(ctx.inputs[c], rows)
                weights = {f"{n}.weight": _fake_quant(p, spec) for n, p in params.items()}
                loss = torch.nn.functional.mse_loss(_run(block, call, weights), fp_out[c][rows])
                value = float(loss.detach())
                if losses is not None:
                    losses.append(value)
                if value < best:
                    best = value
                    for n, p in params.items():
                        for saved, t in zip(best_state[n], p.tensors(), strict=True):
                            saved.copy_(t.detach())
                loss.backward()
                step_lr = lr * (1.0 - step / iters)  # linear decay to 0
                with torch.no_grad():
                    for p in params.values():
                        for t in p.tensors():
                            assert t.grad is not None
                            t.sub_(step_lr * torch.sign(t.grad))
                            t.grad = None
                        p.v.clamp_(-0.5, 0.5)
                        p.lo.clamp_(clip_min, 1.0)
                        p.hi.clamp_(clip_min, 1.0)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    with torch.no_grad():
        for n, p in params.items():
            for t, saved in zip(p.tensors(), best_state[n], strict=True):
                t.copy_(saved)
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
