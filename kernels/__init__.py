"""Quantized linear layers and the backends that run them."""

import importlib.util

import torch

from bitserve.kernels import bcq_linear, cpu, reference
from bitserve.kernels.quant_linear import (
    BACKENDS,
    Backend,
    QuantLinear,
    register_backend,
    select_backend,
)

if importlib.util.find_spec("triton") is not None and torch.cuda.is_available():
    # Importing them registers the GPU backends (int Triton kernels, BCQ's LUT-GEMM).
    from bitserve.kernels import lutgemm, triton_int  # noqa: F401

__all__ = [
    "BACKENDS",
    "Backend",
    "QuantLinear",
    "bcq_linear",
    "cpu",
    "reference",
    "register_backend",
    "select_backend",
]
