"""The CPU backend against the reference backend on random layers and inputs, every bit width,
group size and grid, odd shapes included (K=576 with g128 leaves a short last group). The packed
kernels run activations in bf16 (see kernels/cpu.py), so they get a bf16 tolerance; the
dequantize fallback computes in the caller's dtype and must match fp32 closely."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from bitserve.kernels import QuantLinear, cpu
from bitserve.kernels.quant_linear import concat_outputs
from bitserve.quantization.grid import QuantSpec, quantize_rtn


def random_layer(
    k: int, n: int, bits: int, group: int, sym: bool, bias: bool = False
) -> QuantLinear:
    """A QuantLinear holding RTN codes of a random weight (reference backend)."""
    w = torch.randn(n, k)
    b = torch.randn(n) if bias else None
    return quantize_rtn(w, QuantSpec(bits, group, sym)).to_module(b)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm())


BF16_TOL = 1e-2


def check(layer: QuantLinear, m: int, dtype: torch.dtype) -> None:
    """Fresh random input; the cpu backend's output must match the reference's."""
    exact = cpu._kind(layer) == "dequant" and dtype == torch.float32
    tol = 1e-5 if exact else BF16_TOL
    x = torch.randn(m, layer.in_features).to(dtype)
    layer.set_backend("reference")
    ref = layer(x.float())
    layer.set_backend("cpu")
    y = layer(x)
    assert y.dtype == dtype and y.shape == ref.shape
    assert torch.isfinite(y).all()
    assert rel_err(y, ref) < tol, (layer.extra_repr(), m, dtype, rel_err(y, ref))


SHAPES = [(576, 192), (256, 100), (96, 48), (100, 48)]  # K=100: the int4 path pads K
CASES = list(itertools.product((2, 3, 4, 8), (32, 64, 128, -1), (False, True)))


@pytest.mark.parametrize(("bits", "group", "sym"), CASES)
def test_cpu_matches_reference(bits: int, group: int, sym: bool) -> None:
    torch.manual_seed(bits * 100 + group + sym)
    for k, n in SHAPES:
        layer = random_layer(k, n, bits, group, sym)
        for m in (1, 5):
            check(layer, m, torch.float32)
        check(layer, 3, torch.bfloat16)


@pytest.mark.parametrize(("bits", "group"), [(4, 128), (3, 64), (2, -1), (8, 128), (8, -1)])
def test_many_rows_take_the_dense_path_and_match(bits: int, group: int) -> None:
    """From DENSE_ROWS rows (half as many at 8 bits) the int4 planes are dequantized to bf16
    tiles for a dense GEMM: it must match the reference (whole 64-row blocks, a tail of 48 rows
    past them, K padded), and it must run (the packed layout it reads is checked, and the int4
    kernel is not called)."""
    if not cpu._layout_ok():
        pytest.skip("this CPU's int4 packed layout is not the AVX512 one the dense path reads")
    torch.manual_seed(bits + group)
    for k, n in [(576, 1000), (100, 48), (256, 64)]:
        layer = random_layer(k, n, bits, group, False, bias=True)
        for m in (cpu.DENSE_ROWS, cpu.DENSE_ROWS + 3):
            check(layer, m, torch.float32)
        if cpu._kind(layer) != "int4":
            continue
        x = torch.randn(cpu.DENSE_ROWS, k)
        kernel = torch.ops.aten._weight_int4pack_mm_for_cpu
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)  # must not be used
            dense = layer(x)
            with pytest.raises(TypeError):
                layer(x[:3])  # few rows: the int4 kernel
        mp.undo()
        assert torch.ops.aten._weight_int4pack_mm_for_cpu is kernel
        assert torch.isfinite(dense).all()


def test_many_rows_keep_the_int4_kernel_when_the_layout_is_unknown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where the packed layout is not the one `_int4_columns` reads (other instruction sets),
    many-row calls stay on the int4 kernel and still match; several dense chunks do too."""
    torch.manual_seed(5)
    layer = random_layer(576, 1000, 4, 128, False)
    monkeypatch.setattr(cpu, "DENSE_CHUNK", 192)  # several chunks, and a multiple of 64
    check(layer, cpu.DENSE_ROWS, torch.float32)
    monkeypatch.setattr(cpu, "_layout_ok", lambda: False)
    calls = []
    kernel = torch.ops.aten._weight_int4pack_mm_for_cpu
    monkeypatch.setattr(
        torch.ops.aten,
        "_weight_int4pack_mm_for_cpu",
        lambda *a: calls.append(a[0].shape[0]) or kernel(*a),
    )
    check(layer, cpu.DENSE_ROWS, torch.float32)
    assert calls == [cpu.DENSE_ROWS]


def test_layout_check_fails_on_another_layout(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A packing whose rows are ordered otherwise (as on other instruction sets) fails the
    layout check, with a warning, instead of feeding the dense path wrong weights."""
    convert = torch.ops.aten._convert_weight_to_int4pack_for_cpu
    monkeypatch.setattr(
        torch.ops.aten,
        "_convert_weight_to_int4pack_for_cpu",
        lambda codes, tiles: convert(codes.flip(0), tiles),
    )
    with caplog.at_level("WARNING", logger="bitserve.kernels"):
        assert not cpu._layout_ok.__wrapped__()
    assert "unexpected int4 packed layout" in caplog.text


@pytest.mark.parametrize(
    ("bits", "group", "kind"),
    [(4, 128, "int4"), (3, 64, "int4"), (2, -1, "int4"), (8, -1, "int8"), (8, 128, "int4")],
)
def test_path_taken_and_no_float_copy(bits: int, group: int, kind: str) -> None:
    """Each layer takes its fast path, and nothing prepared is a full-precision weight."""
    layer = random_layer(576, 1536, bits, group, False)
    assert layer.set_backend() == "cpu"
    assert cpu._kind(layer) == kind
    for t in layer.prepared.values():
        assert not (t.is_floating_point() and t.numel() >= layer.in_features * layer.out_features)


def test_unaligned_int8_avoids_the_int8_kernel_and_matches() -> None:
    """int8 per-channel on an unaligned shape (where the int8 kernel misbehaves) runs as two
    nibble planes through the int4 kernel, K padded; with bias, 3-D input."""
    torch.manual_seed(1)
    layer = random_layer(70, 50, 8, -1, False, bias=True)
    layer.set_backend("cpu")
    assert cpu._kind(layer) == "int4" and "int4_weight1" in layer.prepared
    x = torch.randn(2, 3, 70)
    y = layer(x)
    layer.set_backend("reference")
    assert y.shape == (2, 3, 50)
    assert rel_err(y, layer(x)) < BF16_TOL


def test_odd_group_size_falls_back_and_matches() -> None:
    """A group size the int4 kernel cannot split (48) takes the dequant path, exact in fp32."""
    torch.manual_seed(3)
    layer = random_layer(96, 40, 8, 48, False)
    layer.set_backend("cpu")
    assert cpu._kind(layer) == "dequant"
    x = torch.randn(3, 96)
    y = layer(x)
    layer.set_backend("reference")
    assert rel_err(y, layer(x)) < 1e-5


def test_bias_and_batched_input_int4() -> None:
    torch.manual_seed(2)
    layer = random_layer(576, 576, 4, 128, True, bias=True)
    x = torch.randn(2, 7, 576)
    ref = layer(x)
    layer.set_backend("cpu")
    assert rel_err(layer(x), ref) < BF16_TOL


def test_cpu_backend_refuses_other_devices() -> None:
    layer = random_layer(64, 32, 4, 32, False).to("meta")
    assert cpu.BACKEND.supports(layer) is not None


@pytest.mark.slow
def test_default_checkpoint_loads_on_cpu_backend_with_reference_greedy(tmp_path: Path) -> None:
    """The W4 checkpoint on disk loads with every layer on the cpu backend (auto), and its
    greedy tokens are the reference backend's argmax at every step (one teacher-forced pass)."""
    from bitserve.models import fetch_default, load_model
    from bitserve.quantization.checkpoint import set_backends
    from bitserve.quantization.quantize import quantize_to_checkpoint

    path = quantize_to_checkpoint(fetch_default(), tmp_path / "w4", "rtn", progress=False)
    loaded = load_model(path)
    layers = [m for m in loaded.model.modules() if isinstance(m, QuantLinear)]
    assert layers and {m.backend for m in layers} == {"cpu"}
    ids = loaded.tokenizer("The history of the city begins", return_tensors="pt").input_ids
    with torch.inference_mode():
        out = loaded.model.generate(ids, max_new_tokens=12, do_sample=False)
        set_backends(loaded.model, "reference")
        logits = loaded.model(out).logits
    new = out[0, ids.shape[1] :]
    assert torch.equal(logits[0, ids.shape[1] - 1 : -1].argmax(-1), new)


@pytest.mark.parametrize(
    "bits,group,backend",
    [(4, 128, "cpu"), (3, 64, "cpu"), (8, 128, "cpu"), (2, 32, "reference")],
)
def test_concat_outputs_matches_separate_layers(bits: int, group: int, backend: str) -> None:
    """A fused q/k/v-style layer computes the three layers' outputs side by side, on the first
    layer's backend. The first layer's 196 zero points do not fill whole packed words at 2, 3 or
    4 bits, so concatenating packed words instead of codes would shift the others'."""
    layers = [random_layer(576, n, bits, group, sym=False, bias=True) for n in (196, 576, 192)]
    for m in layers:
        m.set_backend(backend)
    fused = concat_outputs(layers)
    assert fused is not None and fused.backend == backend and fused.out_features == 964
    assert torch.equal(fused.zero_codes(), torch.cat([m.zero_codes() for m in layers], dim=1))
    x = torch.randn(5, 576)
    ref = torch.cat([m(x) for m in layers], dim=1)
    assert rel_err(fused(x), ref) < 1e-6
    other = random_layer(576, 64, bits, group, sym=True)
    assert concat_outputs([*layers, other]) is None  # a different grid cannot share the kernel


def test_int4_geometry_pads_only_when_it_must() -> None:
    """K=576 g128 (short last group) runs on kernel groups of 64 without padding x per call;
    K=100 has no kernel group dividing it and is padded to whole groups."""
    assert cpu._int4_geometry(random_layer(576, 40, 4, 128, False)) == (64, 576, 48)
    assert cpu._int4_geometry(random_layer(1536, 64, 4, 128, False)) == (128, 1536, 64)
    assert cpu._int4_geometry(random_layer(100, 48, 4, 64, False)) == (64, 128, 48)
    assert cpu._int4_geometry(random_layer(100, 48, 4, -1, False)) == (32, 128, 48)


def test_release_packed_keeps_the_backend_running() -> None:
    """After release_packed the cpu backend answers exactly as before from its own copy; the
    reference backend (which unpacks on every call) refuses, and so does a later backend
    change, with messages that say why."""
    layer = random_layer(576, 96, 4, 128, False)
    with pytest.raises(ValueError, match="reference backend"):
        layer.release_packed()
    layer.set_backend("cpu")
    x = torch.randn(3, 576)
    before = layer(x)
    layer.release_packed()
    assert layer.qweight.numel() == 0 and layer.qzeros.numel() == 0
    assert torch.equal(layer(x), before)
    with pytest.raises(RuntimeError, match="released"):
        layer.set_backend("reference")
