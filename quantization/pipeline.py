"""Layer-by-layer quantization: capture the inputs of the first decoder block, then for each
block let the method quantize its linears, swap in the dequantized weights and run the block to
get the next block's inputs. Only one block's activations are live at a time. A method whose
options set `bf16_forwards` has every block forward (its own and these) run under bfloat16
autocast, faster on CPUs with bfloat16 units; one that already computed the block's outputs
hands them over in `ctx.outputs` and this pass is skipped."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedModel

from bitserve.errors import UsageError
from bitserve.quantization.base import BlockCall, BlockContext, Method, Quantized, with_hidden
from bitserve.quantization.grid import QuantSpec, quantize_rtn


class _StopForward(Exception):
    pass


def decoder_blocks(model: PreTrainedModel) -> nn.ModuleList:
    """The model's list of decoder blocks (the ModuleList with num_hidden_layers entries)."""
    n = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise UsageError(f"cannot find the decoder blocks of {type(model).__name__}")


def block_prefix(model: PreTrainedModel) -> str:
    blocks = decoder_blocks(model)
    for name, module in model.named_modules():
        if module is blocks:
            return name
    raise AssertionError("unreachable")


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside one decoder block, by name relative to the block."""
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}


def capture_block_inputs(
    model: PreTrainedModel, ids: torch.Tensor, batch_size: int = 8
) -> list[BlockCall]:
    """Run the model up to its first decoder block on `ids` [n, L]; return the block's calls."""
    first = decoder_blocks(model)[0]
    calls: list[BlockCall] = []

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        calls.append((args, kwargs))
        raise _StopForward

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for start in range(0, ids.shape[0], batch_size):
                with contextlib.suppress(_StopForward):
                    model(input_ids=ids[start : start + batch_size], use_cache=False)
    finally:
        handle.remove()
    return calls


def quantize_model(
    model: PreTrainedModel,
    method: Method,
    spec: QuantSpec,
    calib_ids: torch.Tensor | None,
    args: dict[str, Any] | None = None,
    seed: int = 0,
    lm_head: bool = False,
    progress: bool = True,
) -> tuple[dict[str, Quantized], dict[str, float]]:
    """Quantize every linear of every decoder block (and lm_head if asked) in place.

    Returns the quantized weights by full module name, and per-block wall times. The model's
    linears are left holding their dequantized values (a fake-quantized model)."""
    if method.needs_calibration and calib_ids is None:
        raise UsageError(f"method {method.name!r} needs calibration data")
    options = {**method.defaults, **(args or {})}
    blocks = decoder_blocks(model)
    if not any(block_linears(block) for block in blocks):
        raise UsageError(
            f"{type(model).__name__}: its decoder blocks have no nn.Linear layers to quantize "
            "(e.g. GPT-2's Conv1D); this architecture is not supported"
        )
    prefix = block_prefix(model)
    calls = capture_block_inputs(model, calib_ids) if calib_ids is not None else []
    result: dict[str, Quantized] = {}
    times: dict[str, float] = {}
    carry: dict[str, Any] = {}
    bf16 = bool(options.get("bf16_forwards", False))
    torch.manual_seed(seed)
    bar = tqdm(
        list(enumerate(blocks)),
        desc=f"{method.name} {spec.label()}",
        unit="block",
        disable=not progress,
    )
    for i, block in bar:
        t0 = time.perf_counter()
        ctx = BlockContext(
            i, block, block_linears(block), spec, calls, options, seed, carry, bf16=bf16
        )
        quantized = method.quantize_block(ctx)
        with torch.no_grad():
            for name, qw in quantized.items():
                lin = ctx.linears[name]
                lin.weight.data = qw.dequantize().to(lin.weight.dtype)
                result[f"{prefix}.{i}.{name}"] = qw
            if calls and i + 1 < len(blocks):
                outs = ctx.outputs if ctx.outputs is not None else [ctx.run(c) for c in calls]
                calls = [with_hidden(c, out) for c, out in zip(calls, outs, strict=True)]
        times[f"{prefix}.{i}"] = time.perf_counter() - t0
    if lm_head:
        head = model.get_output_embeddings()
        qw = quantize_rtn(head.weight.data, spec)
        head.weight = nn.Parameter(qw.dequantize().to(head.weight.dtype), requires_grad=False)
        model.config.tie_word_embeddings = False
        result["lm_head"] = qw
    return result, times


def set_module(model: PreTrainedModel, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def swap_in_quant_linears(model: PreTrainedModel, quantized: dict[str, Quantized]) -> nn.Module:
    """Replace each quantized nn.Linear by its packed module (the in-memory quantized model).

    Any result type with dequantize() and to_module(bias) works (e.g. BCQ's)."""
    for name, qw in quantized.items():
        lin = model.get_submodule(name)
        set_module(model, name, qw.to_module(getattr(lin, "bias", None)))
    return model
