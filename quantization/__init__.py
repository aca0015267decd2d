"""Offline quantization: methods behind one interface, the packed checkpoint, calibration, eval."""

from bitserve.quantization import awq, bcq, gptq, mixed, rtn, signround
from bitserve.quantization.base import METHODS, Method, get_method, register_method
from bitserve.quantization.grid import QuantizedWeight, QuantSpec

__all__ = [
    "METHODS",
    "Method",
    "QuantSpec",
    "QuantizedWeight",
    "awq",
    "bcq",
    "get_method",
    "gptq",
    "mixed",
    "register_method",
    "rtn",
    "signround",
]
