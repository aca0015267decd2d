"""bitserve: quantize a causal LM into a packed low-bit checkpoint and serve it."""

__version__ = "0.1.0"
