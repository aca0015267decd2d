"""Binary-coding quantization (BCQ, the format LUT-GEMM consumes): per output row and group of
inputs, W ≈ Σ_i α_i b_i (+ z) with b_i ∈ {-1, +1}, fitted by alternating least squares.

Greedy start (sign of the residual, mean absolute residual), then alternate: α (and the offset
z) by least squares given the signs, and the signs by picking, for every weight, the nearest of
the 2^bits values Σ_i ±α_i (+ z). Both steps can only lower the squared error, so ALS never
ends worse than its start. `bcq` is data-free; `bcq-act` weighs each input channel's squared
error by its E[x²] on calibration data, so that channels with outlier activations keep their
weights (much better perplexity). See docs/bcq.md.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from bitserve.errors import UsageError
from bitserve.kernels.bcq_linear import BCQLinear, dequantize_bcq
from bitserve.kernels.packing import num_groups, pack_rows
from bitserve.quantization.base import (
    BlockContext,
    Method,
    Quantized,
    input_power,
    is_int,
    register_method,
)

BCQ_BITS = (2, 3, 4)


@dataclass
class BCQWeight:
    """One layer's BCQ weight: signs bool [bits, K, N] (True = +1), alpha fp16 [G, bits, N],
    offset fp16 [G, N] or None. w[n, k] = Σ_i alpha[g(k), i, n] · (±1) + offset[g(k), n]."""

    signs: torch.Tensor
    alpha: torch.Tensor
    offset: torch.Tensor | None
    group_size: int

    @property
    def bits(self) -> int:
        return int(self.signs.shape[0])

    def dequantize(self) -> torch.Tensor:
        """The weight [N, K] in float32, exactly as every BCQ backend reproduces it."""
        return dequantize_bcq(self.signs, self.alpha, self.offset, self.group_size)

    def to_module(self, bias: torch.Tensor | None = None) -> BCQLinear:
        """Pack the sign planes into a BCQLinear (reference backend)."""
        bits, k, n = self.signs.shape
        layer = BCQLinear(k, n, bits, self.group_size, bias is not None, self.offset is not None)
        layer.qweight = torch.stack(
            [pack_rows(self.signs[i].to(torch.uint8), 1) for i in range(bits)]
        )
        layer.alpha = self.alpha.half().contiguous()
        if self.offset is not None:
            layer.offset = self.offset.half().contiguous()
        if bias is not None:
            layer.bias = bias.detach().clone()
        return layer


def _grouped(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> zero-padded [N, G, S] and a bool mask [G, S] of the real entries (a short
    last group is padded)."""
    n, k = w.shape
    groups = num_groups(k, group_size)
    size = k if groups == 1 else group_size
    pad = groups * size - k
    mask = torch.ones(groups * size, dtype=torch.bool, device=w.device)
    if pad:
        w = torch.cat([w, w.new_zeros(n, pad)], dim=1)
        mask[k:] = False
    return w.view(n, groups, size), mask.view(groups, size)


def _design(bits: int, offset: bool) -> torch.Tensor:
    """Row c: the ±1 signs of code c (plane j is bit bits-1-j of c), then a 1 for the offset when
    asked; float64 [2^bits, bits (+1)]. A group's 2^bits values are design @ coefficients."""
    signs = itertools.product((-1.0, 1.0), repeat=bits)
    return torch.tensor([[*p, 1.0] if offset else list(p) for p in signs], dtype=torch.float64)


def _solve(
    w: torch.Tensor, codes: torch.Tensor, design: torch.Tensor, d: torch.Tensor
) -> torch.Tensor:
    """Weighted least-squares coefficients [N, G, c] (α per plane, then the offset) given every
    weight's code [N, G, S] and input-channel importance d [G, S]; padding carries code 2^bits
    and is ignored. The normal equations only need each code's total importance and the
    importance-weighted sum of its weights."""
    ncodes = design.shape[0]
    shape = (*codes.shape[:2], ncodes + 1)
    dw = d.expand_as(w)
    counts = w.new_zeros(shape).scatter_add_(-1, codes, dw)[..., :ncodes].double()
    sums = w.new_zeros(shape).scatter_add_(-1, codes, dw * w)[..., :ncodes].double()
    outer = design.unsqueeze(-1) * design.unsqueeze(-2)  # [C, c, c]
    gram = torch.einsum("ngk,kab->ngab", counts, outer)
    # A small ridge keeps groups that use few codes (e.g. constant weights) solvable.
    ridge = 1e-9 * gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)
    gram = gram + ridge[..., None, None] * torch.eye(design.shape[1], dtype=gram.dtype)
    return torch.linalg.solve(gram, (sums @ design).unsqueeze(-1)).squeeze(-1)


def _nearest(w: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """For every weight the code whose value (values [N, G, C]) is nearest: codes [N, G, S]."""
    ncodes = values.shape[-1]
    ordered, order = values.to(w.dtype).sort(dim=-1)
    mids = (ordered[..., 1:] + ordered[..., :-1]) / 2
    codes = order.gather(-1, torch.searchsorted(mids.contiguous(), w.contiguous()))
    return torch.where(mask, codes, ncodes)


def _error(
    w: torch.Tensor, codes: torch.Tensor, values: torch.Tensor, d: torch.Tensor
) -> torch.Tensor:
    """Importance-weighted squared error per row and group, [N, G] (padding adds nothing)."""
    padded = torch.cat([values, values.new_zeros(*values.shape[:2], 1)], dim=-1).to(w.dtype)
    return ((w - padded.gather(-1, codes)) ** 2 * d).sum(-1)


def _als(
    w: torch.Tensor,
    codes: torch.Tensor,
    mask: torch.Tensor,
    design: torch.Tensor,
    d: torch.Tensor,
    iters: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Alternate the least-squares solve and the nearest-code refit from `codes`, stopping early
    once no code changes; returns (coefficients, codes)."""
    coef = _solve(w, codes, design, d)
    for _ in range(iters):
        new_codes = _nearest(w, coef @ design.t(), mask)
        if torch.equal(new_codes, codes):
            break
        codes = new_codes
        coef = _solve(w, codes, design, d)
    return coef, codes


def _greedy(w: torch.Tensor, mask: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy BCQ: plane j takes the sign of the residual and α_j its mean magnitude.
    Returns (α [N, G, bits], codes [N, G, S])."""
    count = mask.sum(-1)
    residual = w.clone()
    codes = torch.zeros(w.shape, dtype=torch.long)
    alphas = []
    for j in range(bits):
        positive = residual >= 0
        a = (residual.abs() * mask).sum(-1) / count
        residual = residual - a.unsqueeze(-1) * torch.where(positive, 1.0, -1.0)
        codes |= positive.long() << (bits - 1 - j)
        alphas.append(a)
    return torch.stack(alphas, dim=-1), torch.where(mask, codes, 1 << bits)


def _uniform_codes(w: torch.Tensor, mask: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of the asymmetric min/max integer grid. BCQ with an offset holds that grid exactly
    (α_j = scale · 2^(bits-2-j)), so ALS started there ends at or below round-to-nearest."""
    inf = torch.tensor(float("inf"), dtype=w.dtype)
    lo = torch.where(mask, w, inf).amin(-1, keepdim=True)
    hi = torch.where(mask, w, -inf).amax(-1, keepdim=True)
    scale = ((hi - lo) / ((1 << bits) - 1)).clamp_min(1e-12)
    q = torch.round((w - lo) / scale).clamp(0, (1 << bits) - 1).long()
    return torch.where(mask, q, 1 << bits)


def fit_bcq(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    iters: int = 10,
    offset: bool = True,
    importance: torch.Tensor | None = None,
) -> BCQWeight:
    """Fit BCQ to w [N, K]: ALS for `iters` rounds from the greedy fit and from the min/max
    integer grid, keeping the better per row and group (iters=0: the greedy fit alone). With
    `importance` [K] (e.g. E[x_k²] of the layer's inputs) the least squares weigh input k by it,
    which minimises the expected output error instead of the weight error."""
    if bits not in BCQ_BITS:
        raise UsageError(f"BCQ supports {', '.join(map(str, BCQ_BITS))} bits, not {bits}")
    n, k = w.shape
    wg, mask = _grouped(w.detach().float().cpu(), group_size)
    design = _design(bits, offset)
    if importance is None:
        d = mask.float()
    else:
        imp = importance.detach().float().cpu().view(1, k)
        imp = imp / imp.mean().clamp_min(1e-20)
        d = _grouped(imp.clamp_min(1e-6), group_size)[0][0]  # padding gets 0
    alpha, codes = _greedy(wg, mask, bits)
    alpha = alpha.double()
    coef = torch.cat([alpha, torch.zeros_like(alpha[..., :1])], -1) if offset else alpha
    if iters > 0:
        coef, codes = _als(wg, codes, mask, design, d, iters)
        coef2, codes2 = _als(wg, _uniform_codes(wg, mask, bits), mask, design, d, iters)
        values, values2 = coef @ design.t(), coef2 @ design.t()
        better = _error(wg, codes2, values2, d) < _error(wg, codes, values, d)
        coef = torch.where(better.unsqueeze(-1), coef2, coef)
    # Stored form: α ≥ 0 (a negative α flips its sign plane, which the refit absorbs), α and the
    # offset rounded to fp16, and every code chosen against the values actually stored.
    coef[..., :bits] = coef[..., :bits].abs()
    coef = coef.half().double()
    codes = _nearest(wg, coef @ design.t(), mask)
    shifts = torch.arange(bits - 1, -1, -1).view(bits, 1, 1)
    planes = (codes.reshape(n, -1)[:, :k].unsqueeze(0) >> shifts) & 1  # [bits, N, K]
    return BCQWeight(
        signs=planes.transpose(1, 2).bool().contiguous(),
        alpha=coef[..., :bits].permute(1, 2, 0).half().contiguous(),
        offset=coef[..., bits].t().half().contiguous() if offset else None,
        group_size=group_size,
    )


def quantize_block(ctx: BlockContext) -> dict[str, Quantized]:
    """Fit every linear of the block independently, weighing input k by its calibration E[x_k²]
    when calibrated (bcq-act); data-free (bcq) every input counts the same."""
    if ctx.spec.sym:
        raise UsageError(
            "bcq: --sym does not apply (BCQ fits a per-group offset; --method-arg offset=false "
            "drops it)"
        )
    iters, offset = ctx.args.get("iters", 10), ctx.args.get("offset", True)
    if not (is_int(iters) and iters >= 0) or not isinstance(offset, bool):
        raise UsageError(
            f"bcq: need an integer iters >= 0 and offset true or false, got iters={iters!r}, "
            f"offset={offset!r}"
        )
    importance = input_power(ctx) if ctx.inputs else {}
    return {
        name: fit_bcq(
            lin.weight.data, ctx.spec.bits, ctx.spec.group_size, iters, offset, importance.get(name)
        )
        for name, lin in ctx.linears.items()
    }


METHOD = register_method(
    Method(
        name="bcq",
        needs_calibration=False,
        quantize_block=quantize_block,
        description="binary-coding quantization fitted by alternating least squares (data-free)",
        defaults={"iters": 10, "offset": True},
        tunable=False,
    )
)
ACT_METHOD = register_method(
    Method(
        name="bcq-act",
        needs_calibration=True,
        quantize_block=quantize_block,
        description="BCQ whose least squares weigh each input by its calibration E[x²]",
        defaults={"iters": 10, "offset": True},
        tunable=False,
    )
)
