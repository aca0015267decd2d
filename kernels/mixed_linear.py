"""MixedLinear: a linear layer whose input columns are split by bit width, one packed
QuantLinear per width over its own subset of columns: y = sum_b part_b(x[..., cols_b]) + bias.

Checkpoint tensors (see docs/checkpoint-format.md, "Mixed precision layers"): for each width b
present, `parts.w{b}.qweight|qzeros|scales` (a QuantLinear over len(cols) inputs) and
`parts.w{b}.cols` (int32 input-column indices, in the order the part's groups use them)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bitserve.kernels.quant_linear import QuantLinear


class MixedPart(QuantLinear):
    """A QuantLinear over a subset of the parent's input columns. It is stored inside its
    MixedLinear's manifest entry, so it has no manifest entry of its own."""

    cols: torch.Tensor
    manifest_entry = None  # type: ignore[assignment]

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        sym: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bits, group_size, False, sym, device=device)
        self.register_buffer("cols", torch.empty(in_features, dtype=torch.int32, device=device))


class MixedLinear(nn.Module):
    """Packed weights at several bit widths over disjoint input-column subsets."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        parts: list[tuple[int, int]],
        group_size: int,
        bias: bool = False,
        sym: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        """`parts`: (bits, number of input columns) per width; the counts sum to in_features."""
        super().__init__()
        if sum(n for _, n in parts) != in_features:
            raise ValueError(f"mixed parts cover {parts}, expected {in_features} columns")
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        self.sym = sym
        self.parts = nn.ModuleDict(
            {
                f"w{b}": MixedPart(n, out_features, b, group_size, sym, device=device)
                for b, n in parts
            }
        )
        self.bias: torch.Tensor | None
        if bias:
            self.register_buffer("bias", torch.empty(out_features, device=device))
        else:
            self.bias = None

    def _parts(self) -> list[MixedPart]:
        return [p for p in self.parts.values() if isinstance(p, MixedPart)]

    def bits_per_weight(self) -> float:
        """Storage bits per weight over all parts (codes, group scales and zeros)."""
        total = sum(p.bits_per_weight() * p.in_features for p in self._parts())
        return total / self.in_features

    def code_bits(self) -> float:
        """Average code width per weight (what `avg_bits` asks for), without scales."""
        return sum(p.bits * p.in_features for p in self._parts()) / self.in_features

    def manifest_entry(self) -> dict[str, Any]:
        """How the manifest describes this layer (format "mixed")."""
        return {
            "format": "mixed",
            "group_size": self.group_size,
            "sym": self.sym,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "parts": [{"bits": p.bits, "columns": p.in_features} for p in self._parts()],
        }

    def set_backend(self, name: str | None = None) -> str:
        """Let every part pick (or use the named) backend; returns their names joined."""
        return ",".join(p.set_backend(name) for p in self._parts())

    def dequantized_weight(self) -> torch.Tensor:
        """The full weight [N, K] in float32 (reference path)."""
        from bitserve.kernels.reference import dequantized_weight

        parts = self._parts()
        w = torch.zeros(self.out_features, self.in_features, device=parts[0].qweight.device)
        for p in parts:
            w[:, p.cols.long()] = dequantized_weight(p)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor | None = None
        for p in self._parts():
            out = p(x.index_select(-1, p.cols.long()))
            y = out if y is None else y + out
        assert y is not None
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        widths = ", ".join(f"{p.bits}b x {p.in_features}" for p in self._parts())
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"group_size={self.group_size}, parts=[{widths}]"
        )


def mixed_from_entry(entry: dict[str, Any], device: str) -> MixedLinear:
    """An empty MixedLinear shaped as a manifest entry describes (for checkpoint loading)."""
    return MixedLinear(
        entry["in_features"],
        entry["out_features"],
        [(int(p["bits"]), int(p["columns"])) for p in entry["parts"]],
        entry["group_size"],
        entry.get("bias", False),
        entry.get("sym", False),
        device=device,
    )
