"""Offline quantization: methods behind one interface, the packed checkpoint, calibration, eval."""

from bitserve.quantization import rtn
from bitserve.quantization.base import METHODS, Method, get_method, register_method
from bitserve.quantization.grid import QuantizedWeight, QuantSpec

__all__ = ["METHODS", "Method", "QuantSpec", "QuantizedWeight", "get_method", "register_method", "rtn"]
