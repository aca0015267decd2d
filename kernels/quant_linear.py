"""QuantLinear: an nn.Linear replacement that holds packed low-bit weights, plus the backend
registry that decides how its matmul runs (reference, CPU packed, GPU Triton, ...)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from torch import nn

from bitserve.kernels.packing import num_groups, pack_rows, packed_rows, unpack_rows

# Where backends keep what they build at run time (compiled CPU kernels, tuned Triton configs).
CACHE_DIR = Path(os.environ.get("BITSERVE_CACHE_DIR") or os.path.expanduser("~/.cache/bitserve"))


class QuantLinear(nn.Module):
    """y = x @ dequant(W).T + b, with W stored as packed `bits`-bit codes, grouped scales and zeros.

    Buffers (the checkpoint tensors): qweight int32 [words(K), N], qzeros int32 [G, words(N)],
    scales fp16 [G, N], optional bias. Backends may add prepared tensors in `self.prepared`.
    """

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool = False,
        sym: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if bits not in (2, 3, 4, 8):
            raise ValueError(f"unsupported bit width {bits} (choose 2, 3, 4 or 8)")
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.sym = sym
        groups = num_groups(in_features, group_size)
        self.register_buffer(
            "qweight",
            torch.empty(
                packed_rows(in_features, bits), out_features, dtype=torch.int32, device=device
            ),
        )
        self.register_buffer(
            "qzeros",
            torch.empty(groups, packed_rows(out_features, bits), dtype=torch.int32, device=device),
        )
        self.register_buffer(
            "scales", torch.empty(groups, out_features, dtype=torch.float16, device=device)
        )
        self.bias: torch.Tensor | None
        if bias:
            self.register_buffer("bias", torch.empty(out_features, device=device))
        else:
            self.bias = None
        self.backend = "reference"
        self.prepared: dict[str, torch.Tensor] = {}

    def codes(self) -> torch.Tensor:
        """Unpacked weight codes, uint8 [K, N]."""
        return unpack_rows(self.qweight, self.bits, self.in_features)

    def zero_codes(self) -> torch.Tensor:
        """Unpacked zero points, uint8 [G, N]."""
        return unpack_rows(self.qzeros.t().contiguous(), self.bits, self.out_features).t()

    def bits_per_weight(self) -> float:
        """Storage cost per weight, counting the fp16 scale and the packed zero of each group."""
        groups = int(self.scales.shape[0])
        total = self.bits * self.in_features * self.out_features + groups * self.out_features * (
            16 + self.bits
        )
        return total / (self.in_features * self.out_features)

    def manifest_entry(self) -> dict[str, object]:
        """How the manifest describes this layer (format "int")."""
        return {
            "format": "int",
            "bits": self.bits,
            "group_size": self.group_size,
            "sym": self.sym,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
        }

    def set_backend(self, name: str | None = None) -> str:
        """Pick a backend (the best supported one if `name` is None) and let it prepare once."""
        if self.qweight.numel() == 0:
            raise RuntimeError(
                "this layer's packed codes were released (release_packed); reload the "
                "checkpoint to change its backend"
            )
        backend = select_backend(self, name)
        self.prepared = {}
        backend.prepare(self)
        self.backend = backend.name
        return backend.name

    def release_packed(self) -> None:
        """Free the checkpoint's packed codes and zeros once the backend holds its own repacked
        copy: a served model needs nothing else, and its int layers then take half the memory.
        The layer can no longer change backend afterwards."""
        if self.backend == "reference":
            raise ValueError("the reference backend reads the packed codes on every call")
        empty = torch.empty(0, dtype=torch.int32, device=self.qweight.device)
        self.qweight, self.qzeros = empty, empty.clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return BACKENDS[self.backend].forward(self, x)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, backend={self.backend}"
        )


def concat_outputs(layers: list[QuantLinear]) -> QuantLinear | None:
    """One QuantLinear whose output is the layers' outputs side by side (fused q/k/v, gate/up:
    one kernel call instead of several), on the first layer's backend; None when the layers
    differ in input size, bit width, grouping, symmetry or bias."""
    first = layers[0]
    key = (first.in_features, first.bits, first.group_size, first.sym, first.bias is None)
    if any((m.in_features, m.bits, m.group_size, m.sym, m.bias is None) != key for m in layers):
        return None
    fused = QuantLinear(
        first.in_features,
        sum(m.out_features for m in layers),
        first.bits,
        first.group_size,
        bias=first.bias is not None,
        sym=first.sym,
        device=first.qweight.device,
    )
    fused.qweight = torch.cat([m.qweight for m in layers], dim=1)
    fused.scales = torch.cat([m.scales for m in layers], dim=1)
    zeros = torch.cat([m.zero_codes() for m in layers], dim=1)  # [G, N], packed along N
    fused.qzeros = pack_rows(zeros.t().cpu(), first.bits).t().contiguous().to(zeros.device)
    if first.bias is not None:
        fused.bias = torch.cat([m.bias for m in layers if m.bias is not None])
    fused.set_backend(first.backend)
    return fused


Direct = tuple[torch.dtype, Callable[[torch.Tensor], torch.Tensor]]


@dataclass(frozen=True)
class Backend:
    """How one kind of kernel runs QuantLinear. `supports` returns None when it can run the
    layer on its device, else the reason it cannot; `prepare` repacks once at load. `direct`
    (optional) gives the layer's matmul as one call on [M, K] rows already in the dtype it
    names, the same arithmetic as `forward` without its per-call reshapes and casts, for the
    serving runner's CPU decode loop; None where it has none for this layer. `describe`
    (optional) names the kernel that runs a prepared layer, for the model card."""

    name: str
    priority: int
    supports: Callable[[QuantLinear], str | None]
    prepare: Callable[[QuantLinear], None]
    forward: Callable[[QuantLinear, torch.Tensor], torch.Tensor]
    direct: Callable[[QuantLinear], Direct | None] | None = None
    describe: Callable[[QuantLinear], str] | None = None


BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    BACKENDS[backend.name] = backend
    return backend


class _Ranked(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def priority(self) -> int: ...


B = TypeVar("B", bound=_Ranked)


def pick_backend(registry: Mapping[str, B], layer: Any, name: str | None = None) -> B:
    """The named backend of `registry` (checked against the layer), or the highest-priority
    one whose `supports(layer)` returns None. Shared by every quantized module type."""
    if name is not None and name != "auto":
        if name not in registry:
            raise ValueError(f"unknown backend {name!r}; available: {', '.join(sorted(registry))}")
        reason = registry[name].supports(layer)  # type: ignore[attr-defined]
        if reason is not None:
            raise ValueError(f"backend {name!r} cannot run {layer.extra_repr()}: {reason}")
        return registry[name]
    for backend in sorted(registry.values(), key=lambda b: -b.priority):
        if backend.supports(layer) is None:  # type: ignore[attr-defined]
            return backend
    raise RuntimeError("no backend supports this layer")  # reference supports everything


def select_backend(layer: QuantLinear, name: str | None = None) -> Backend:
    """The QuantLinear backend to use: named, or the best supported one."""
    return pick_backend(BACKENDS, layer, name)
