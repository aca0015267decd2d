"""Salience-driven mixed precision: the width allocation is optimal and exact, salient groups
get the bits, it beats RTN at the same average, and its checkpoints reload to the same logits."""

import itertools
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny_model
from transformers import AutoModelForCausalLM

from bitserve.errors import UsageError
from bitserve.kernels import QuantLinear
from bitserve.kernels.mixed_linear import MixedLinear, MixedPart
from bitserve.kernels.reference import dequantized_weight
from bitserve.models import load_model
from bitserve.quantization import get_method
from bitserve.quantization.grid import QuantizedWeight, QuantSpec, quantize_rtn
from bitserve.quantization.mixed import (
    MixedWeight,
    _gptq_parts,
    _rtn_parts,
    _Unit,
    _units,
    allocate,
)
from bitserve.quantization.pipeline import quantize_model
from bitserve.quantization.quantize import quantize_to_checkpoint


def _random_units(seed: int, n: int) -> list[_Unit]:
    gen = torch.Generator().manual_seed(seed)
    sizes = [64, 64, 128, 64, 64, 128][:n]
    out = []
    for size in sizes:
        e2 = float(torch.rand(1, generator=gen)) * 10
        out.append(_Unit("x", torch.arange(size), size * 4, [e2, e2 / 4, e2 / 16]))
    return out


@pytest.mark.parametrize("avg", [Fraction(3), Fraction(5, 2), Fraction(13, 4)])
def test_allocation_is_exact_and_optimal(avg: Fraction) -> None:
    widths = [2, 3, 4]
    units = _random_units(int(avg * 4), 6)
    picked = allocate(units, widths, avg)
    total = sum(u.weights for u in units)
    assert Fraction(sum(u.weights * b for u, b in zip(units, picked, strict=True)), total) == avg
    cost = sum(u.errors[widths.index(b)] for u, b in zip(units, picked, strict=True))
    # Brute force over every assignment with the same exact average.
    best = min(
        sum(u.errors[widths.index(b)] for u, b in zip(units, combo, strict=True))
        for combo in itertools.product(widths, repeat=len(units))
        if Fraction(sum(u.weights * b for u, b in zip(units, combo, strict=True)), total) == avg
    )
    assert cost == pytest.approx(best)


def test_infeasible_average_is_a_usage_error() -> None:
    units = [_Unit("x", torch.arange(4), 4, [1.0, 0.5]) for _ in range(3)]
    with pytest.raises(UsageError, match="exactly"):
        allocate(units, [2, 3], Fraction(5, 2))


def _salient_model(tmp_path: Path) -> torch.nn.Module:
    """Tiny random model whose norms amplify a few channels, like LLM outlier channels."""
    path = save_tiny_model(tmp_path / "tiny", seed=0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p[:6] *= 12.0
    return model


IDS = torch.randint(3, 90, (8, 48), generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize(
    ("bits", "args", "avg"),
    [
        (3, {}, Fraction(3)),
        (3, {"avg_bits": 2.5, "scope": "block"}, Fraction(5, 2)),
        (2, {"scope": "block", "widths": "2,3"}, Fraction(2)),
    ],
)
def test_model_average_is_exact(tmp_path: Path, bits: int, args: dict, avg: Fraction) -> None:
    model = _salient_model(tmp_path)
    out, _ = quantize_model(
        model, get_method("mixed"), QuantSpec(bits, 32), IDS, args, progress=False
    )
    total = bits_sum = 0
    for qw in out.values():
        parts = qw.parts if isinstance(qw, MixedWeight) else [(torch.arange(qw.q.shape[0]), qw)]
        for cols, part in parts:
            assert isinstance(part, QuantizedWeight)
            bits_sum += part.spec.bits * len(cols) * part.q.shape[1]
            total += len(cols) * part.q.shape[1]
    assert Fraction(bits_sum, total) == avg
    assert any(isinstance(qw, MixedWeight) for qw in out.values()) == (avg != 2)


def test_salient_columns_get_more_bits(tmp_path: Path) -> None:
    model = _salient_model(tmp_path)
    out, _ = quantize_model(model, get_method("mixed"), QuantSpec(3, 32), IDS, progress=False)
    q = out["model.layers.0.self_attn.q_proj"]
    assert isinstance(q, MixedWeight)
    widths = {int(c): qw.spec.bits for cols, qw in q.parts for c in cols}
    # Group 0 (columns 0..31) holds the amplified channels: it gets the most bits.
    assert widths[0] == max(widths.values()) > min(widths.values())


def test_beats_rtn_on_a_layer_with_salient_channels() -> None:
    gen = torch.Generator().manual_seed(2)
    k, n = 256, 64
    power = torch.ones(k)
    power[:40] = 50.0  # outlier input channels, as LLM activations have
    x = torch.randn(4096, k, generator=gen) * power.sqrt()
    w = torch.randn(n, k, generator=gen)
    spec = QuantSpec(3, 32)
    units = _units("x", w, power, spec, [2, 3, 4])
    picked = allocate(units, [2, 3, 4], Fraction(3))
    by_width: dict[int, list[torch.Tensor]] = {}
    for u, b in zip(units, picked, strict=True):
        by_width.setdefault(b, []).append(u.cols)
    mixed = MixedWeight(_rtn_parts(w, {b: torch.cat(c) for b, c in by_width.items()}, spec), k)
    assert mixed.code_bits() == 3
    rtn = quantize_rtn(w, spec).dequantize()
    err_mixed = float((x @ (w - mixed.dequantize()).t()).pow(2).mean())
    err_rtn = float((x @ (w - rtn).t()).pow(2).mean())
    assert err_mixed < 0.6 * err_rtn


@pytest.mark.parametrize("scope", ["layer", "block"])
def test_beats_rtn_at_the_same_average(tmp_path: Path, scope: str) -> None:
    errors = {}
    for name, args in (("rtn", {}), ("mixed", {"scope": scope})):
        model = _salient_model(tmp_path)
        with torch.no_grad():
            ref = model(IDS).logits
        quantize_model(model, get_method(name), QuantSpec(3, 32), IDS, args, progress=False)
        with torch.no_grad():
            errors[name] = float((model(IDS).logits - ref).pow(2).mean())
    assert errors["mixed"] < errors["rtn"]


def test_gptq_base_beats_rtn_base_on_correlated_inputs() -> None:
    gen = torch.Generator().manual_seed(0)
    k, n = 128, 48
    mix = torch.randn(k, k, generator=gen) / k**0.5 + torch.eye(k)
    x = torch.randn(2048, k, generator=gen) @ mix
    w = torch.randn(n, k, generator=gen)
    h = 2 * x.t() @ x / x.shape[0]
    by_width = {2: torch.arange(0, 64), 4: torch.arange(64, 128)}
    spec = QuantSpec(3, 32)
    errs = {}
    for name, parts in (
        ("rtn", _rtn_parts(w, by_width, spec)),
        ("gptq", _gptq_parts(w, h, by_width, spec, 0.01)),
    ):
        mw = MixedWeight(parts, k)
        errs[name] = float((x @ (w - mw.dequantize()).t()).pow(2).mean())
    assert errs["gptq"] < 0.8 * errs["rtn"]


def test_mixed_linear_matches_its_dequantized_weight() -> None:
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(40, 96, generator=gen)
    cols = {2: torch.cat([torch.arange(32, 64), torch.arange(64, 96)]), 4: torch.arange(0, 32)}
    mw = MixedWeight(_rtn_parts(w, cols, QuantSpec(3, 32)), 96)
    bias = torch.randn(40, generator=gen)
    layer = mw.to_module(bias)
    assert isinstance(layer, MixedLinear)
    x = torch.randn(3, 5, 96, generator=gen)
    want = x @ mw.dequantize().t() + bias
    assert layer.set_backend("reference") == "reference,reference"
    torch.testing.assert_close(layer(x), want, rtol=1e-4, atol=1e-4)
    # The best backend (possibly a reduced-precision fast path) reaches every part.
    names = layer.set_backend("auto").split(",")
    assert names == [p.backend for p in layer.parts.values()]
    assert float((layer(x) - want).norm() / want.norm()) < 2e-2
    torch.testing.assert_close(layer.dequantized_weight(), mw.dequantize())
    part = layer.parts["w4"]
    torch.testing.assert_close(dequantized_weight(part), w[:, :32], rtol=0, atol=0.2)
    assert layer.code_bits() == pytest.approx((4 * 32 + 2 * 64) / 96)


def test_checkpoint_save_load_gives_the_same_logits(tmp_path: Path) -> None:
    src = save_tiny_model(tmp_path / "src", seed=3)
    calib = tmp_path / "calib.txt"
    calib.write_text("Salience decides which groups keep more bits. " * 100)
    out = quantize_to_checkpoint(
        src,
        tmp_path / "ckpt",
        "mixed",
        QuantSpec(3, 32),
        calib=calib,
        nsamples=8,
        seqlen=32,
        method_args={"avg_bits": 2.5, "scope": "block"},
        progress=False,
    )
    loaded = load_model(out)
    assert loaded.manifest is not None
    layers = loaded.manifest["layers"]
    assert any(e["format"] == "mixed" for e in layers.values())
    assert not any(".parts." in name for name in layers)
    # Rebuild in process: the same seeded calibration gives the same fake-quantized model.
    from bitserve.quantization.calibration import file_calibration

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids, _ = file_calibration(loaded.tokenizer, calib, 8, 32, 0)
    quantize_model(
        model,
        get_method("mixed"),
        QuantSpec(3, 32),
        ids,
        {"avg_bits": 2.5, "scope": "block"},
        progress=False,
    )
    probe = ids[:2]
    with torch.no_grad():
        got, want = loaded.model(probe).logits, model(probe).logits
    assert float((got - want).abs().max()) < 1e-2 * float(want.abs().max())
    # The loaded modules still average exactly 2.5 code bits per weight.
    bits = count = 0.0
    for m in loaded.model.modules():
        if isinstance(m, MixedLinear) or (
            isinstance(m, QuantLinear) and not isinstance(m, MixedPart)
        ):
            n = m.in_features * m.out_features
            bits += (m.code_bits() if isinstance(m, MixedLinear) else m.bits) * n
            count += n
    assert bits / count == pytest.approx(2.5, abs=1e-12)
    for m in loaded.model.modules():
        if isinstance(m, MixedLinear):
            m.set_backend("reference")
