"""Quantized linear layers and the backends that run them."""

from bitserve.kernels import reference
from bitserve.kernels.quant_linear import BACKENDS, Backend, QuantLinear, register_backend, select_backend

__all__ = ["BACKENDS", "Backend", "QuantLinear", "reference", "register_backend", "select_backend"]
