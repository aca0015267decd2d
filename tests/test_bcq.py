"""BCQ: the ALS fit on random matrices, the packed BCQLinear against its fit, and quantize ->
save -> load on a small random-init llama through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny_model

from bitserve.cli import main
from bitserve.errors import UsageError
from bitserve.kernels.bcq_linear import BCQLinear
from bitserve.models import load_model
from bitserve.quantization import get_method
from bitserve.quantization.bcq import fit_bcq
from bitserve.quantization.checkpoint import MANIFEST, load_checkpoint
from bitserve.quantization.grid import QuantSpec, quantize_rtn
from bitserve.quantization.pipeline import quantize_model, swap_in_quant_linears

IDS = torch.tensor([[1, 10, 20, 30, 40, 50, 60, 70, 5, 6, 7]])


def rel_error(w: torch.Tensor, approx: torch.Tensor) -> float:
    return float((w - approx).norm() / w.norm())


def weight(n: int = 48, k: int = 300, seed: int = 0) -> torch.Tensor:
    """Heavy-tailed rows of different scales, like trained weights (k=300 leaves short groups)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.distributions.StudentT(4.0).sample((n, k)) * 0.02
    return w * torch.rand(n, 1, generator=gen).add(0.5)


@pytest.mark.parametrize("group", [64, 128, -1])
def test_error_falls_with_bits(group: int) -> None:
    w = weight()
    errs = [rel_error(w, fit_bcq(w, bits, group).dequantize()) for bits in (2, 3, 4)]
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < 0.17  # 4-bit BCQ of a Gaussian weight: about 0.15


@pytest.mark.parametrize("offset", [True, False])
def test_als_beats_greedy_init(offset: bool) -> None:
    w = weight(seed=1)
    for bits in (2, 3, 4):
        greedy = rel_error(w, fit_bcq(w, bits, 64, iters=0, offset=offset).dequantize())
        als = rel_error(w, fit_bcq(w, bits, 64, iters=10, offset=offset).dequantize())
        assert als < 0.95 * greedy, (bits, greedy, als)


def test_offset_fit_never_worse_than_round_to_nearest() -> None:
    """BCQ with an offset holds the integer min/max grid, and ALS also starts there."""
    w = weight(seed=2)
    for bits, group in [(2, 64), (3, 128), (4, 128)]:
        rtn = rel_error(w, quantize_rtn(w, QuantSpec(bits, group)).dequantize())
        bcq = rel_error(w, fit_bcq(w, bits, group).dequantize())
        assert bcq < rtn, (bits, group, rtn, bcq)


def test_importance_weighting_lowers_output_error() -> None:
    """Inputs with a few outlier channels: weighing the least squares by E[x²] cuts the layer's
    output error (the weight error it trades away matters less)."""
    torch.manual_seed(4)
    w = weight(n=64, k=256, seed=4)
    x = torch.randn(512, 256)
    x[:, torch.randperm(256)[:6]] *= 20
    importance = x.pow(2).mean(0)

    def output_error(approx: torch.Tensor) -> float:
        return float((x @ (approx - w).t()).norm() / (x @ w.t()).norm())

    plain = output_error(fit_bcq(w, 3, 128).dequantize())
    weighted = output_error(fit_bcq(w, 3, 128, importance=importance).dequantize())
    assert weighted < 0.8 * plain, (plain, weighted)


def test_only_bcq_act_needs_calibration() -> None:
    assert get_method("bcq-act").needs_calibration and not get_method("bcq").needs_calibration


def test_stored_form_is_canonical() -> None:
    q = fit_bcq(weight(n=16, k=200, seed=3), 3, 64)
    assert q.signs.shape == (3, 200, 16) and q.signs.dtype == torch.bool
    assert q.alpha.shape == (4, 3, 16) and q.alpha.dtype == torch.float16
    assert q.offset is not None and q.offset.shape == (4, 16)
    assert bool((q.alpha >= 0).all())


@pytest.mark.parametrize(
    ("bits", "group", "offset"), [(3, 64, True), (2, -1, False), (4, 128, True)]
)
def test_module_reproduces_fit(bits: int, group: int, offset: bool) -> None:
    w = weight(n=40, k=200, seed=bits)
    q = fit_bcq(w, bits, group, offset=offset)
    bias = torch.randn(40)
    layer = q.to_module(bias)
    assert isinstance(layer, BCQLinear) and layer.backend == "reference"
    assert torch.equal(layer.dequantize(), q.dequantize())
    x = torch.randn(2, 5, 200)
    torch.testing.assert_close(layer(x), x @ q.dequantize().t() + bias, rtol=1e-5, atol=1e-5)
    entry = layer.manifest_entry()
    assert entry == {
        "format": "bcq", "bits": bits, "group_size": group, "offset": offset,
        "in_features": 200, "out_features": 40, "bias": True,
    }  # fmt: skip
    groups = 1 if group == -1 else -(-200 // group)
    expected = bits + groups * (16 * bits + 16 * offset) / 200
    assert layer.bits_per_weight() == pytest.approx(expected)


def test_unsupported_bits_and_backend() -> None:
    with pytest.raises(UsageError, match="BCQ supports 2, 3, 4 bits"):
        fit_bcq(weight(), 8, 128)
    layer = fit_bcq(weight(n=8, k=64), 2, 32).to_module()
    with pytest.raises(ValueError, match="unknown backend .cpu.; available: "):
        layer.set_backend("cpu")
    assert layer.set_backend("auto") == "reference"  # the only BCQ backend on a CPU-only torch


def test_save_load_logits_equal(tmp_path: Path) -> None:
    """CLI quantize -> checkpoint with "bcq" layers -> load: same logits as the in-memory model."""
    src = save_tiny_model(tmp_path / "src", "llama")
    ckpt = tmp_path / "bcq"
    rc = main(["quantize", str(src), "--out", str(ckpt), "--method", "bcq", "--bits", "3",
               "--group-size", "64"])  # fmt: skip
    assert rc == 0
    manifest = json.loads((ckpt / MANIFEST).read_text())
    assert manifest["method"]["name"] == "bcq"
    entries = manifest["layers"]
    assert len(entries) == 14 and {e["format"] for e in entries.values()} == {"bcq"}
    assert entries["model.layers.0.mlp.down_proj"]["group_size"] == 64

    model = load_model(src).model
    spec = QuantSpec(3, 64)
    quantized, _ = quantize_model(model, get_method("bcq"), spec, None, progress=False)
    swap_in_quant_linears(model, quantized)
    for p in model.parameters():  # the checkpoint keeps unquantized tensors in fp16
        p.data = p.data.half().float()
    loaded = load_checkpoint(ckpt)
    assert sum(isinstance(m, BCQLinear) for m in loaded.model.modules()) == 14
    with torch.no_grad():
        expected = model(IDS).logits
        got = loaded.model(IDS).logits
        fp = load_model(src).model(IDS).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (got - fp).abs().max() > 1e-4  # quantization really changed the model


def test_calibrated_bcq_act_checkpoint(tmp_path: Path) -> None:
    """bcq-act quantizes from a local calibration file and loads like any checkpoint."""
    from bitserve.quantization.quantize import quantize_to_checkpoint

    src = save_tiny_model(tmp_path / "src", "llama")
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    ckpt = quantize_to_checkpoint(
        src, tmp_path / "act", "bcq-act", QuantSpec(2, 32), calib=text, nsamples=4, seqlen=64,
        progress=False,
    )  # fmt: skip
    manifest = json.loads((ckpt / MANIFEST).read_text())
    assert manifest["method"]["name"] == "bcq-act" and manifest["calibration"]["nsamples"] == 4
    loaded = load_checkpoint(ckpt)
    assert sum(isinstance(m, BCQLinear) for m in loaded.model.modules()) == 14
    with torch.no_grad():
        assert bool(torch.isfinite(loaded.model(IDS).logits).all())
