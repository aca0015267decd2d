"""The LUT-GEMM Triton kernel against BCQLinear's reference backend, run on the CPU by Triton's
interpreter (small shapes): 2/3/4 bits, group sizes 32/64/128/per-channel with short last
groups, with and without offsets and bias, tables of 8 and 4 activations, fp16/bf16/fp32."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # set before the kernel module is imported: kernels run on CPU

import pytest  # noqa: E402
import torch  # noqa: E402

from bitserve.kernels.bcq_linear import BCQLinear  # noqa: E402
from bitserve.quantization.bcq import fit_bcq  # noqa: E402

lutgemm = pytest.importorskip("bitserve.kernels.lutgemm")
if not lutgemm.INTERPRET:  # imported earlier in this process without the interpreter
    pytest.skip("lutgemm was imported without TRITON_INTERPRET=1", allow_module_level=True)


def random_layer(k: int, n: int, bits: int, group: int, offset: bool, bias: bool) -> BCQLinear:
    q = fit_bcq(torch.randn(n, k), bits, group, iters=2, offset=offset)
    return q.to_module(torch.randn(n) if bias else None)


CASES = [  # bits, group, offset, bias, K, N
    (3, 128, True, False, 576, 48),  # the default model's K: short last group of 64
    (2, 64, True, True, 200, 40),  # K not a multiple of 32: padded last word
    (4, 32, False, True, 256, 33),
    (3, -1, False, False, 200, 24),
]


@pytest.mark.parametrize(("bits", "group", "offset", "bias", "k", "n"), CASES)
def test_lutgemm_matches_reference(
    bits: int, group: int, offset: bool, bias: bool, k: int, n: int
) -> None:
    torch.manual_seed(bits * 1000 + k + n)
    layer = random_layer(k, n, bits, group, offset, bias)
    for m, dtype, mu, lut_dtype, tol in [
        (1, torch.float16, 8, torch.float32, 2e-3),
        (3, torch.bfloat16, 8, torch.float32, 1e-2),
        (2, torch.float32, 4, torch.float32, 1e-5),
        (1, torch.float16, 8, torch.float16, 3e-3),
    ]:
        x = torch.randn(m, k).to(dtype)  # fresh input per check
        ref = layer(x.float())  # the reference backend, in float32
        out = torch.full((m, n), float("nan"), dtype=dtype)  # poisoned: every entry must be written
        y = lutgemm.lutgemm(layer, x, out=out, mu=mu, lut_dtype=lut_dtype)
        assert y is out and bool(torch.isfinite(y).all())
        err = float((y.float() - ref).norm() / ref.norm())
        assert err < tol, (bits, group, m, dtype, mu, lut_dtype, err)


def test_backend_through_the_module() -> None:
    """set_backend("lutgemm") runs the kernel for small M (any leading shape) and the reference
    path above MAX_M; both agree with the reference backend."""
    torch.manual_seed(7)
    layer = random_layer(160, 40, 3, 64, True, True)
    x_small = torch.randn(2, 3, 160)
    x_large = torch.randn(lutgemm.MAX_M + 1, 160)
    layer.set_backend("reference")
    ref_small, ref_large = layer(x_small), layer(x_large)
    assert layer.set_backend("lutgemm") == "lutgemm"
    small = layer(x_small)
    assert small.shape == (2, 3, 40)
    assert float((small - ref_small).norm() / ref_small.norm()) < 1e-5
    torch.testing.assert_close(layer(x_large), ref_large)


def test_rejects_groups_that_split_words() -> None:
    layer = BCQLinear(96, 8, 2, 48)
    assert lutgemm.BACKEND.supports(layer) == "group size 48 is not a multiple of 32"
    with pytest.raises(ValueError, match="not a multiple of 32"):
        layer.set_backend("lutgemm")
