"""Reference backend: unpack, dequantize, matmul. Slow, any device, any bit width: the oracle
every fast backend is tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bitserve.kernels.packing import dequantize
from bitserve.kernels.quant_linear import Backend, QuantLinear, register_backend


def dequantized_weight(layer: QuantLinear) -> torch.Tensor:
    """The layer's full-precision weight [N, K] in float32."""
    return dequantize(layer.codes(), layer.scales, layer.zero_codes(), layer.group_size)


def _forward(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    w = dequantized_weight(layer).to(x.dtype)
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return F.linear(x, w, bias)


BACKEND = register_backend(
    Backend(
        name="reference",
        priority=0,
        supports=lambda layer: None,
        prepare=lambda layer: None,
        forward=_forward,
    )
)
