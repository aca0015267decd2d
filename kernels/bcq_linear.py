"""BCQLinear: an nn.Linear replacement holding binary-coding-quantized weights (sign bit planes
and per-group scales α), with its own small backend choice: the reference (unpack, dequantize,
matmul; any device) and LUT-GEMM (Triton, CUDA)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bitserve.kernels.packing import group_index, num_groups, packed_rows, unpack_rows
from bitserve.kernels.quant_linear import pick_backend


def dequantize_bcq(
    signs: torch.Tensor, alpha: torch.Tensor, offset: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    """Signs bool [bits, K, N], alpha [G, bits, N], offset [G, N] | None -> weight [N, K] fp32."""
    g = group_index(signs.shape[1], group_size, signs.device)
    w = ((signs.float() * 2 - 1) * alpha.float()[g].permute(1, 0, 2)).sum(dim=0)  # [K, N]
    if offset is not None:
        w = w + offset.float()[g]
    return w.t().contiguous()


class BCQLinear(nn.Module):
    """y = x @ W.T + b with W[n, k] = Σ_i alpha[g(k), i, n] · (2·bit_i[k, n] − 1) + offset[g(k), n].

    Buffers (the checkpoint tensors): qweight int32 [bits, words(K), N] (one sign plane per bit,
    packed along K, LSB first, bit set = +1), alpha fp16 [G, bits, N], optional offset fp16
    [G, N] and bias.
    """

    qweight: torch.Tensor
    alpha: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool = False,
        offset: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if bits not in (2, 3, 4):
            raise ValueError(f"unsupported BCQ bit width {bits} (choose 2, 3 or 4)")
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        groups = num_groups(in_features, group_size)
        self.register_buffer(
            "qweight",
            torch.empty(
                bits, packed_rows(in_features, 1), out_features, dtype=torch.int32, device=device
            ),
        )
        self.register_buffer(
            "alpha", torch.empty(groups, bits, out_features, dtype=torch.float16, device=device)
        )
        self.offset: torch.Tensor | None
        if offset:
            self.register_buffer(
                "offset", torch.empty(groups, out_features, dtype=torch.float16, device=device)
            )
        else:
            self.offset = None
        self.bias: torch.Tensor | None
        if bias:
            self.register_buffer("bias", torch.empty(out_features, device=device))
        else:
            self.bias = None
        self.backend = "reference"

    def signs(self) -> torch.Tensor:
        """Unpacked sign planes, bool [bits, K, N] (True = +1)."""
        return torch.stack(
            [unpack_rows(self.qweight[i], 1, self.in_features) for i in range(self.bits)]
        ).bool()

    def dequantize(self) -> torch.Tensor:
        """The layer's weight [N, K] in float32."""
        return dequantize_bcq(self.signs(), self.alpha, self.offset, self.group_size)

    def bits_per_weight(self) -> float:
        """Storage cost per weight, counting the fp16 α of every plane and the fp16 offset."""
        groups = int(self.alpha.shape[0])
        per_group = 16 * self.bits + (16 if self.offset is not None else 0)
        total = self.bits * self.in_features * self.out_features
        return (total + groups * self.out_features * per_group) / (
            self.in_features * self.out_features
        )

    def manifest_entry(self) -> dict[str, object]:
        """How the manifest describes this layer (format "bcq")."""
        return {
            "format": "bcq",
            "bits": self.bits,
            "group_size": self.group_size,
            "offset": self.offset is not None,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
        }

    def set_backend(self, name: str | None = None) -> str:
        """Pick a BCQ backend by name, or the best supported one for None/"auto"."""
        self.backend = select_bcq_backend(self, name).name
        return self.backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return BCQ_BACKENDS[self.backend].forward(self, x)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, offset={self.offset is not None}, "
            f"backend={self.backend}"
        )


@dataclass(frozen=True)
class BCQBackend:
    """How one kind of kernel runs BCQLinear: `supports` returns None or the reason it cannot."""

    name: str
    priority: int
    supports: Callable[[BCQLinear], str | None]
    forward: Callable[[BCQLinear, torch.Tensor], torch.Tensor]


BCQ_BACKENDS: dict[str, BCQBackend] = {}


def register_bcq_backend(backend: BCQBackend) -> BCQBackend:
    BCQ_BACKENDS[backend.name] = backend
    return backend


def select_bcq_backend(layer: BCQLinear, name: str | None = None) -> BCQBackend:
    """The BCQ backend to use: named, or the best supported one."""
    return pick_backend(BCQ_BACKENDS, layer, name)


def _reference_forward(layer: BCQLinear, x: torch.Tensor) -> torch.Tensor:
    w = layer.dequantize().to(x.dtype)
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return F.linear(x, w, bias)


REFERENCE = register_bcq_backend(
    BCQBackend("reference", 0, supports=lambda layer: None, forward=_reference_forward)
)


def bcq_from_entry(entry: dict[str, Any], device: str) -> BCQLinear:
    """An empty BCQLinear (on `device`) for a manifest layer entry of format "bcq"."""
    return BCQLinear(
        entry["in_features"],
        entry["out_features"],
        entry["bits"],
        entry["group_size"],
        entry.get("bias", False),
        entry.get("offset", True),
        device=device,
    )
