"""The mma GEMV prototype (bench/mma_gemv.py) in Triton's interpreter against an fp32 matmul of
the same codes: the offline fragment-order packing, every lane's A and B fragments and results
(rebuilt into whole tiles by the interpreter's emulation of `mma.sync`), scales and zeros per
group, split-K, and 1-16 rows of x. The PTX path is compiled for sm_90 by
tests/test_kernels_compile.py (which also checks that the MMAs run in the word load's layout)
and run on a GPU by the benchmark itself."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

os.environ["TRITON_INTERPRET"] = "1"  # set before triton_int is first imported

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
triton_int = pytest.importorskip("bitserve.kernels.triton_int")
if not triton_int.INTERPRET:
    pytest.skip("triton_int was imported without TRITON_INTERPRET=1", allow_module_level=True)


def mma() -> Any:
    spec = importlib.util.spec_from_file_location("mma_gemv", ROOT / "bench" / "mma_gemv.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MG = mma()


@pytest.mark.parametrize(
    "k, n, group, m, warps, split",
    [
        (64, 64, 32, 1, 1, 1),
        (128, 128, 64, 3, 2, 2),
        (256, 64, 128, 8, 1, 1),
        (192, 128, 32, 11, 1, 4),  # split-K over 6 groups, 3 rows in the second block
        (128, 64, 16, 16, 1, 3),
    ],
)
def test_mma_gemv_matches_fp32_matmul(
    k: int, n: int, group: int, m: int, warps: int, split: int
) -> None:
    q, s, z = MG.random_case(k, n, group, "cpu", seed=k + m)
    x = torch.randn(m, k).half()
    out = torch.full((m, n), float("nan"), dtype=torch.float16)  # poisoned: every element written
    y = MG.mma_gemv(x, MG.pack_mma(q), s, z, group, warps, split, out=out)
    ref = MG.reference(x, q, s, z, group)
    assert ref.abs().mean() > 0.01
    assert torch.isfinite(y).all()
    assert float((y.float() - ref).norm() / ref.norm()) < 1e-3


def test_packing_puts_each_code_where_its_lane_reads_it() -> None:
    """A code changed at one (k, n) changes exactly one word, the one lane l = 4 g + t of the
    quad's n-tile holds for that k-step, at the nibble SLOT names."""
    k, n = 32, 128
    q = torch.zeros(k, n, dtype=torch.int32)
    base = MG.pack_mma(q)
    for kk, nn in [(0, 0), (17, 9), (9, 70), (31, 127)]:
        q2 = q.clone()
        q2[kk, nn] = 5
        diff = (MG.pack_mma(q2) != base).nonzero().flatten().tolist()
        step, j = kk // 16, nn // 16
        dn, dk = (nn % 16) // 8 * 8, (kk % 16) % 2 + (kk % 16) // 8 * 8
        g, t = nn % 8, (kk % 8) // 2
        lane = 4 * g + t
        want = ((step * (n // 64) + j // 4) * 32 + lane) * 4 + j % 4
        assert diff == [want]
        nibble = MG.SLOT.index((dn, dk))
        assert int(MG.pack_mma(q2)[want]) == 5 << (4 * nibble)


def test_mma_gemv_refuses_shapes_it_does_not_tile() -> None:
    q, s, z = MG.random_case(128, 64, 32, "cpu")
    with pytest.raises(ValueError, match="multiple of 16 and N of 64"):
        MG.pack_mma(q[:, :48])
    with pytest.raises(ValueError, match="unsupported"):
        MG.mma_gemv(torch.randn(17, 128).half(), MG.pack_mma(q), s, z, 32)
