"""The interface every quantization method implements, and the registry of methods.

A method quantizes one decoder block at a time: it gets the block in full precision, the
linear layers to quantize, and (when it needs calibration) the block's captured inputs; it
returns a Quantized weight per linear and may change other weights of the block (AWQ folds its
scales into the preceding norm). The pipeline then swaps the block's weights for their
dequantized values so that the next block is calibrated on the quantized model's activations.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from bitserve.quantization.grid import QuantSpec

# One captured call of a decoder block: positional args and keyword args.
BlockCall = tuple[tuple[Any, ...], dict[str, Any]]


class Quantized(Protocol):
    """A quantized weight as a method returns it (QuantizedWeight for the integer grid)."""

    def dequantize(self) -> torch.Tensor:
        """The weight [N, K] in float32 that the packed form reproduces."""
        ...

    def to_module(self, bias: torch.Tensor | None = None) -> nn.Module:
        """The packed module (with manifest_entry()) that replaces the nn.Linear."""
        ...


@dataclass
class BlockContext:
    """Everything a method sees for one decoder block."""

    index: int
    block: nn.Module
    linears: dict[str, nn.Linear]  # name relative to the block -> module
    spec: QuantSpec
    inputs: list[BlockCall] = field(default_factory=list)  # empty for data-free methods
    args: dict[str, Any] = field(default_factory=dict)  # method-specific options
    seed: int = 0
    carry: dict[str, Any] = field(default_factory=dict)  # one run's state shared by its blocks
    bf16: bool = False  # run block forwards under bfloat16 autocast (the method's bf16_forwards)
    outputs: list[torch.Tensor] | None = None  # set by a method that already ran the block on
    # every input with the weights its outputs should come from: the pipeline then skips its pass

    def run(self, call: BlockCall) -> torch.Tensor:
        """Run the block on one captured call and return its hidden-state output."""
        with torch.autocast(_device(call), torch.bfloat16, enabled=self.bf16):
            out = self.block(*call[0], **call[1])
        return out[0] if isinstance(out, tuple) else out


def call_hidden(call: BlockCall) -> torch.Tensor:
    """The hidden states a captured call feeds the block (first positional or keyword)."""
    args, kwargs = call
    return args[0] if args else kwargs["hidden_states"]


def with_hidden(call: BlockCall, hidden: torch.Tensor) -> BlockCall:
    """The same call with other hidden states (the next block's input, or fp states)."""
    args, kwargs = call
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _device(call: BlockCall) -> str:
    """The device type of a call's first tensor argument (for autocast)."""
    for x in (*call[0], *call[1].values()):
        if isinstance(x, torch.Tensor):
            return x.device.type
    return "cpu"


@dataclass(frozen=True)
class Method:
    """A quantization method: its name, whether it needs calibration activations, the function
    that quantizes one block, its default method-specific options, and whether it writes int
    layers whose group scales `bitserve tune` can learn."""

    name: str
    needs_calibration: bool
    quantize_block: Callable[[BlockContext], dict[str, Quantized]]
    description: str
    defaults: dict[str, Any] = field(default_factory=dict)
    tunable: bool = True


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        from bitserve.errors import UsageError

        raise UsageError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def is_int(value: Any) -> bool:
    """An integer method option (JSON true/false are not integers)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite real method option (an integer or a float, not a bool)."""
    return (is_int(value) or isinstance(value, float)) and math.isfinite(value)


def input_power(ctx: BlockContext) -> dict[str, torch.Tensor]:
    """E[x_k²] of every linear's inputs over the block's calibration calls, by linear name: the
    per-input-channel weighting that activation-aware methods (bcq-act, mixed) share."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook_for(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + x.pow(2).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]

        return hook

    handles = [lin.register_forward_pre_hook(hook_for(n)) for n, lin in ctx.linears.items()]
    try:
        with torch.no_grad():
            for call in ctx.inputs:
                ctx.run(call)
    finally:
        for h in handles:
            h.remove()
    return {name: sums[name] / counts[name] for name in sums}
