"""Round-to-nearest: min/max group ranges, no calibration. The floor other methods must beat."""

from __future__ import annotations

from bitserve.quantization.base import BlockContext, Method, Quantized, register_method
from bitserve.quantization.grid import quantize_rtn


def quantize_block(ctx: BlockContext) -> dict[str, Quantized]:
    return {name: quantize_rtn(lin.weight.data, ctx.spec) for name, lin in ctx.linears.items()}


METHOD = register_method(
    Method(
        name="rtn",
        needs_calibration=False,
        quantize_block=quantize_block,
        description="round-to-nearest on min/max group ranges (no calibration)",
    )
)
