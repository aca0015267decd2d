"""The CPU backend against the reference backend on random layers and inputs, every bit width,
group size and grid, odd shapes included (K=576 with g128 leaves a short last group), with our
own kernel (`cpu_native`) and with torch's int4 kernel in its place. torch's packed kernels run
activations in bf16 (see kernels/cpu.py), so they get a bf16 tolerance; our kernel (int16
activations) and the dequantize fallback compute in fp32 and must match fp32 closely."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from bitserve.kernels import QuantLinear, cpu, cpu_native
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
NATIVE = cpu_native.library()  # None where our kernel does not build (then only torch's runs)
needs_native = pytest.mark.skipif(NATIVE is None, reason="our CPU kernel does not build here")


@pytest.fixture(params=["native", "torch"])
def kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with our own int4 kernel, and again with torch's in its place."""
    if request.param == "native" and NATIVE is None:
        pytest.skip("our CPU kernel does not build here")
    if request.param == "torch":
        monkeypatch.setattr(cpu_native, "library", lambda: None)
    return str(request.param)


@pytest.fixture
def torch_int4(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's int4 kernel in place of ours (the path of machines where ours does not build)."""
    monkeypatch.setattr(cpu_native, "library", lambda: None)


def check(layer: QuantLinear, m: int, dtype: torch.dtype) -> None:
    """Fresh random input; the cpu backend's output must match the reference's (as exactly as
    the path runs: fp32, int16 activations in our kernel, or bf16)."""
    kind = cpu._kind(layer)
    dense_fp32 = m >= cpu.DENSE_ROWS and cpu_native.dense_dtype() == torch.float32
    exact = dtype == torch.float32 and (
        kind == "dequant" or (kind == "native" and (m < cpu.DENSE_ROWS or dense_fp32))
    )
    tol = 1e-4 if kind == "native" and exact else 1e-5 if exact else BF16_TOL
    x = torch.randn(m, layer.in_features).to(dtype)
    layer.set_backend("reference")
    ref = layer(x.float())
    layer.set_backend("cpu")
    y = layer(x)
    assert y.dtype == dtype and y.shape == ref.shape
    assert torch.isfinite(y).all()
    assert rel_err(y, ref) < tol, (layer.extra_repr(), m, dtype, rel_err(y, ref))


# K=100: the int4 path pads K (and our kernel does not take it); N=100: not whole column blocks
SHAPES = [(576, 192), (256, 100), (96, 48), (100, 48), (256, 64)]
CASES = list(itertools.product((2, 3, 4, 8), (32, 64, 128, -1), (False, True)))


@pytest.mark.parametrize(("bits", "group", "sym"), CASES)
def test_cpu_matches_reference(bits: int, group: int, sym: bool, kernel: str) -> None:
    torch.manual_seed(bits * 100 + group + sym)
    for k, n in SHAPES:
        layer = random_layer(k, n, bits, group, sym)
        layer.set_backend("cpu")
        native = kernel == "native" and k % 32 == 0 and n % NATIVE.cols == 0
        assert (cpu._kind(layer) == "native") == native
        for m in (1, 5, 9):  # our kernel: rows in tiles of 4, and 1 or 5 left over
            check(layer, m, torch.float32)
        check(layer, 3, torch.bfloat16)


@pytest.mark.parametrize(("bits", "group"), [(4, 128), (3, 64), (2, -1), (8, 128), (8, -1)])
def test_many_rows_take_the_dense_path_and_match(bits: int, group: int, torch_int4: None) -> None:
    """From DENSE_ROWS rows (half as many at 8 bits) the int4 planes are dequantized into tiles
    (bf16 on CPUs with native bf16, else fp32) for a dense GEMM: it must match the reference
    (whole 64-row blocks, a tail of 48 rows past them, K padded), and it must run (the packed
    layout it reads is checked, and the int4 kernel is not called)."""
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
    monkeypatch: pytest.MonkeyPatch, torch_int4: None
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
def test_path_taken_and_no_float_copy(bits: int, group: int, kind: str, kernel: str) -> None:
    """Each layer takes its fast path (ours where it builds), and nothing prepared is a
    full-precision weight."""
    layer = random_layer(576, 1536, bits, group, False)
    assert layer.set_backend() == "cpu"
    assert cpu._kind(layer) == ("native" if kernel == "native" else kind)
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


def test_bias_and_batched_input_int4(kernel: str) -> None:
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
def test_concat_outputs_matches_separate_layers(
    bits: int, group: int, backend: str, kernel: str
) -> None:
    """A fused q/k/v-style layer computes the three layers' outputs side by side, on the first
    layer's backend. The first layer's 196 (or, where every part must fit our kernel's column
    blocks, 208) zero points do not fill whole packed words at 2, 3 or 4 bits (3 bits for 208),
    so concatenating packed words instead of codes would shift the others'."""
    sizes = (208, 576, 176) if kernel == "native" else (196, 576, 192)
    layers = [random_layer(576, n, bits, group, sym=False, bias=True) for n in sizes]
    for m in layers:
        m.set_backend(backend)
    fused = concat_outputs(layers)
    assert fused is not None and fused.backend == backend and fused.out_features == sum(sizes)
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


# Our own kernel (kernels/cpu_gemv.c through cpu_native).


def native_ref(codes: torch.Tensor, s: torch.Tensor, z: torch.Tensor, x: torch.Tensor, group: int):
    """x @ ((codes - z) * s) in fp64, groups of `group` along K."""
    from bitserve.kernels.packing import group_index

    g = group_index(codes.shape[0], group)
    return x.double() @ ((codes.double() - z.double()[g]) * s.double()[g])


@needs_native
@pytest.mark.parametrize("march", ["native", "x86-64-v3"])
def test_native_kernel_against_fp64_for_every_row_count(march: str) -> None:
    """Built for this CPU (16-column blocks with AVX512) and for plain AVX2 (8 columns,
    vpmaddwd), the kernel matches an fp64 matmul within 1e-4 (int16 activations) for 4 and
    8-bit codes, 1 to 9, 16 and 37 rows (tiles of 4 and what is left), a short last group,
    groups of 96, per-channel, an odd count of column blocks, inputs whose blocks differ in
    scale by 1e6 and subnormal ones; each row's result is the same bit for bit alone, in any
    batch, and on one thread."""
    if "avx2" not in cpu_native._cpu_flags():
        pytest.skip("no AVX2")
    lib = cpu_native.build(march)
    assert lib is not None and lib.cols == (8 if march == "x86-64-v3" else NATIVE.cols)
    gen = torch.Generator().manual_seed(3)
    cases = [(576, 96, 128, 4), (256, 48, 256, 4), (320, 32, 64, 4), (576, 48, 128, 8)]
    cases += [(256, 32, 256, 8), (320, 48, 32, 8), (1056, 56, 96, 4), (1056, 40, -1, 8)]
    for k, n, group, bits in cases:
        group = k if group == -1 else group
        n = n // lib.cols * lib.cols
        groups = -(-k // group)
        codes = torch.randint(0, 1 << bits, (k, n), generator=gen, dtype=torch.uint8)
        s = torch.rand(groups, n, generator=gen) + 0.1
        z = torch.randint(0, 1 << bits, (groups, n), generator=gen).float()
        p = cpu_native.pack(lib, codes, s, z, bits)
        x = torch.randn(37, k, generator=gen)
        x[:, :32] *= 1e6  # one block far larger than the rest: each block has its own scale
        for m in [*range(1, 10), 16, 37]:
            y = cpu_native.matmul(lib, p, x[:m], group)
            assert rel_err(y, native_ref(codes, s, z, x[:m], group)) < 1e-4, (k, n, m, bits)
        for r in (4, 36):
            alone = cpu_native.matmul(lib, p, x[r : r + 1].clone(), group)
            assert torch.equal(alone[0], y[r])
        assert torch.equal(cpu_native.matmul(lib, p, x[:9], group)[4], y[4])
        tiny = torch.randn(1, k, generator=gen) * 1e-36  # 32767 / max|x| overflows a float
        got = cpu_native.matmul(lib, p, tiny, group).double()
        want = native_ref(codes, s, z, tiny, group)
        assert float((got - want).norm() / want.norm()) < 1e-4
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            assert torch.equal(cpu_native.matmul(lib, p, x, group), y)
        finally:
            torch.set_num_threads(threads)
        g = torch.arange(k) // group
        want = ((codes.float() - z[g]) * s[g])[:, lib.cols :]  # the columns past the first block
        dense = cpu_native.columns(lib, p, group, lib.cols, n, torch.float32)
        assert dense.dtype == torch.float32 and rel_err(dense, want) < 1e-6
        bf16 = cpu_native.columns(lib, p, group, lib.cols, n, torch.bfloat16)
        assert torch.equal(bf16, dense.bfloat16())  # rounded once, to nearest even


@needs_native
@pytest.mark.parametrize("bits", [4, 8])
def test_native_kernel_passes_nan_and_infinity_on(bits: int) -> None:
    """A NaN or an infinity in a row of x makes that row's outputs NaN (int16 quantization
    would otherwise turn it into a finite number); the other rows are untouched."""
    torch.manual_seed(4)
    layer = random_layer(256, 64, bits, 64, False)
    layer.set_backend("cpu")
    assert cpu._kind(layer) == "native"
    x = torch.randn(3, 256)
    clean = layer(x)
    x[0, 100], x[2, 7] = float("nan"), float("inf")
    y = layer(x)
    assert torch.isnan(y[0]).all() and torch.isnan(y[2]).all()
    assert torch.equal(y[1], clean[1])


@needs_native
def test_native_is_more_exact_than_torchs_int4_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a default-model-sized layer our kernel is at least 20x closer to the fp32 reference
    than torch's bf16 int4 kernel (the point of int16 activations)."""
    torch.manual_seed(11)
    layer = random_layer(576, 960, 4, 128, False)
    x = torch.randn(4, 576)
    ref = layer(x)
    layer.set_backend("cpu")
    assert cpu._kind(layer) == "native"
    ours = rel_err(layer(x), ref)
    monkeypatch.setattr(cpu_native, "library", lambda: None)
    layer.set_backend("reference")
    layer.set_backend("cpu")
    assert cpu._kind(layer) == "int4"
    assert ours * 20 < rel_err(layer(x), ref), ours


@needs_native
def test_native_many_rows_take_the_dense_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """From DENSE_ROWS rows (FP32_DENSE_ROWS where the GEMM runs in fp32) the layer runs a GEMM
    on dequantized columns (several chunks; bf16 and fp32 both), matching the reference, without
    calling the kernel; the decode loop's direct call
    takes fp32 rows and answers as the module does."""
    torch.manual_seed(6)
    layer = random_layer(576, 1024, 3, 64, True, bias=False)
    layer.set_backend("cpu")
    dtype, call = cpu.BACKEND.direct(layer)  # type: ignore[misc]
    x = torch.randn(5, 576)
    assert dtype == torch.float32 and torch.equal(call(x), layer(x))
    assert torch.equal(call(x.t().contiguous().t()), call(x))  # strided rows are copied first
    with pytest.raises(ValueError, match="rows of 576 values"):
        call(torch.randn(2, 512))  # never read past the rows
    monkeypatch.setattr(cpu, "DENSE_CHUNK", 320)
    monkeypatch.setattr(cpu, "_gemv", None)  # the kernel call: must not be used
    for dtype in (torch.bfloat16, torch.float32):
        monkeypatch.setattr(cpu_native, "dense_dtype", lambda dtype=dtype: dtype)
        rows = cpu.native_dense_rows()
        assert rows == (cpu.DENSE_ROWS if dtype == torch.bfloat16 else cpu.FP32_DENSE_ROWS)
        for m in (rows, rows + 5):
            check(layer, m, torch.float32)


@needs_native
def test_native_keeps_the_kernel_up_to_fp32_dense_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the dense GEMM would run in fp32, calls of DENSE_ROWS up to FP32_DENSE_ROWS rows
    stay on our kernel (faster there, docs/kernels.md); with a bf16 GEMM they take it."""
    torch.manual_seed(9)
    layer = random_layer(256, 64, 4, 64, False, bias=False)
    layer.set_backend("cpu")
    kernel_rows: list[int] = []
    gemv = cpu._gemv

    def counted(lib: cpu_native.Library, layer: QuantLinear) -> Callable[..., torch.Tensor]:
        call = gemv(lib, layer)
        return lambda x: kernel_rows.append(x.shape[0]) or call(x)

    monkeypatch.setattr(cpu, "_gemv", counted)
    for dtype, took in (
        (torch.float32, [cpu.DENSE_ROWS, cpu.FP32_DENSE_ROWS - 1]),
        (torch.bfloat16, []),
    ):
        monkeypatch.setattr(cpu_native, "dense_dtype", lambda dtype=dtype: dtype)
        kernel_rows.clear()
        for m in (cpu.DENSE_ROWS, cpu.FP32_DENSE_ROWS - 1, cpu.FP32_DENSE_ROWS):
            check(layer, m, torch.float32)
        assert kernel_rows == took, dtype


def test_dense_gemm_is_bf16_only_where_the_cpu_multiplies_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The many-row GEMM runs in bf16 only on CPUs with AVX512-BF16 or AMX; on others (plain
    AVX2: torch's bf16 GEMM about 100x slower than fp32) in fp32, torch's int4 planes' dense
    path included."""
    for flags, dtype in [
        ("flags : fpu avx2 avx512f avx512_bf16", torch.bfloat16),
        ("flags : fpu avx2 amx_bf16 amx_tile", torch.bfloat16),
        ("flags : fpu avx2 avx512f avx512_vnni", torch.float32),
        ("flags : fpu avx avx2 fma", torch.float32),
    ]:
        monkeypatch.setattr(cpu_native, "_cpu_flags", lambda flags=flags: flags)
        assert cpu_native.dense_dtype.__wrapped__() == dtype, flags
    monkeypatch.setattr(cpu_native, "library", lambda: None)
    monkeypatch.setattr(cpu, "_layout_ok", lambda: True)
    layer = random_layer(256, 64, 4, 64, False)
    layer.set_backend("cpu")
    assert cpu._kind(layer) == "int4"
    seen = []

    def dense(layer: QuantLinear, x: torch.Tensor, kg: int) -> torch.Tensor:
        seen.append(x.dtype)
        return torch.zeros(x.shape[0], 64, dtype=x.dtype)

    monkeypatch.setattr(cpu, "_dense_int4", dense)
    for dtype in (torch.float32, torch.bfloat16):
        monkeypatch.setattr(cpu_native, "dense_dtype", lambda dtype=dtype: dtype)
        layer(torch.randn(cpu.DENSE_ROWS, 256))
    assert seen == [torch.float32, torch.bfloat16]


@needs_native
def test_native_kernel_call_is_made_again_when_the_layer_is_prepared_again() -> None:
    """The layer's cached kernel call follows its weights: scales changed and the layer
    prepared again, the call uses the new ones."""
    torch.manual_seed(8)
    layer = random_layer(256, 64, 4, 64, False)
    layer.set_backend("cpu")
    x = torch.randn(2, 256)
    before = layer(x)
    layer.set_backend("reference")
    with torch.no_grad():
        layer.scales *= 2
    layer.set_backend("cpu")
    assert rel_err(layer(x), 2 * before) < 1e-6


@needs_native
def test_native_refuses_other_storage_widths() -> None:
    """Codes of a width the kernel has no layout for, or not uint8, are refused when packed; a
    packed weight of another width is refused by the call, not read past its end; the dense
    columns come in fp32 or bf16 only (their buffer is sized by the dtype)."""
    lib = NATIVE
    codes = torch.randint(0, 16, (64, lib.cols), dtype=torch.uint8)
    s, z = torch.rand(2, lib.cols), torch.rand(2, lib.cols)
    with pytest.raises(ValueError, match="2, 3, 4 or 8 bits"):
        cpu_native.pack(lib, codes, s, z, 5)
    with pytest.raises(ValueError, match="2, 3, 4 or 8 bits"):
        cpu_native.pack(lib, codes.int(), s, z, 4)
    p = cpu_native.pack(lib, codes, s, z, 4)
    p["native_weight"] = p["native_weight"][..., :2].contiguous()  # 2 bytes per column: 2 bits
    with pytest.raises(ValueError, match="4 or 8-bit storage"):
        cpu_native.matmul(lib, p, torch.randn(1, 64), 32)
    with pytest.raises(ValueError, match="4 or 8-bit storage"):
        cpu_native.columns(lib, p, 32, 0, lib.cols, torch.float32)
    with pytest.raises(ValueError, match="float32 or bfloat16, not torch.float16"):
        cpu_native.columns(lib, cpu_native.pack(lib, codes, s, z, 4), 32, 0, lib.cols, torch.half)


def test_native_build_failures_fall_back_with_a_reason(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """No compiler, a compile error, or BITSERVE_CPU_KERNEL=torch: no kernel (the cpu backend
    keeps torch's), with a warning that says why; a built library is reused from the cache
    (keyed by the CPU's flags) without compiling again."""
    monkeypatch.setattr(cpu_native, "CACHE_DIR", tmp_path)
    with caplog.at_level("WARNING", logger="bitserve.kernels"):
        assert cpu_native.build(cc=str(tmp_path / "no-such-cc")) is None
        assert "own CPU kernel unavailable" in caplog.text
        assert cpu_native.build(march="no-such-arch") is None
        assert "did not compile" in caplog.text and "no-such-arch" in caplog.text
    monkeypatch.setenv("BITSERVE_CPU_KERNEL", "torch")
    assert cpu_native.library.__wrapped__() is None
    if NATIVE is None:
        return
    assert cpu_native.build() is not None
    built = list(tmp_path.glob("cpu-gemv-*.so"))
    assert len(built) == 1

    def no_compiler(*args: object, **kwargs: object) -> None:
        raise AssertionError("compiled again")

    monkeypatch.setattr(cpu_native.subprocess, "run", no_compiler)
    assert cpu_native.build() is not None
    monkeypatch.setattr(cpu_native, "_cpu_flags", lambda: "flags another CPU")
    with pytest.raises(AssertionError, match="compiled again"):
        cpu_native.build()
