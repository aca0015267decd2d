"""The mma GEMV prototype (bench/mma_gemv.py) in Triton's interpreter against an fp32 matmul of
the same codes: the offline fragment-order packing, every lane's A and B fragments and results
(rebuilt into whole tiles by the interpreter's emulation of `mma.sync`), scales and zeros per
group, split-K, and 1-16 rows of x. The PTX path is compiled for sm_90 by
tests/test_kernels_compile.py (which also checks that the MMAs run in the word load's layout)
and run on a GPU by the benchmark itself."""

from __future__ import annotations

import os
import re

os.environ["TRITON_INTERPRET"] = "1"  # set before triton_int is first imported

import pytest  # noqa: E402
import torch  # noqa: E402
from bench_scripts import load_bench  # noqa: E402

triton_int = pytest.importorskip("bitserve.kernels.triton_int")
if not triton_int.INTERPRET:
    pytest.skip("triton_int was imported without TRITON_INTERPRET=1", allow_module_level=True)


MG = load_bench("mma_gemv")


@pytest.mark.parametrize(
    "k, n, group, m, warps, split",
    [
        (64, 64, 32, 1, 1, 1),
        (128, 128, 64, 3, 2, 2),
        (256, 64, 128, 8, 1, 1),
        (192, 128, 32, 11, 1, 4),  # split-K over 6 groups, 3 rows in the second block
        (128, 64, 16, 16, 1, 3),
        (96, 512, 32, 5, 2, 2),  # 4 programs of 2 warps
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


def test_mma_gemv_reuses_its_split_k_buffers() -> None:
    """The split-K counters are re-armed by the kernel: a second call with the same workspace
    and counters (as graph replays make) gives the same result."""
    q, s, z = MG.random_case(256, 128, 32, "cpu", seed=3)
    qw = MG.pack_mma(q)
    x = torch.randn(2, 256).half()
    ws = torch.full((4 * 2 * 128,), float("nan"))
    counters = torch.zeros(1, dtype=torch.int32)
    first = MG.mma_gemv(x, qw, s, z, 32, 2, 4, ws=ws, counters=counters).clone()
    assert int(counters.sum()) == 0
    second = MG.mma_gemv(x, qw, s, z, 32, 2, 4, ws=ws, counters=counters)
    assert torch.equal(first, second)
    ref = MG.reference(x, q, s, z, 32)
    assert float((first.float() - ref).norm() / ref.norm()) < 1e-3


def test_mma_gemv_refuses_what_it_does_not_tile() -> None:
    q, s, z = MG.random_case(128, 64, 32, "cpu")
    qw = MG.pack_mma(q)
    x = torch.randn(3, 128).half()
    with pytest.raises(ValueError, match="multiple of 16 and N of 64"):
        MG.pack_mma(q[:, :48])
    cases = [
        (dict(x=torch.randn(17, 128).half()), "M=17 rows, more than 16"),
        (dict(x=x.float()), "x is torch.float32, not float16"),
        (dict(x=torch.randn(128, 3).half().t()), "x is not contiguous"),
        (dict(warps=2), "N=64 is not a multiple of 64 x warps"),
        (dict(warps=3), "warps=3, not 1, 2, 4 or 8"),
        (dict(group=24), "group=24 is not a positive multiple of 16 dividing K=128"),
        (dict(group=0), "group=0 is not a positive multiple"),
        (dict(scales=s[:2]), "scales (2, 64), zeros (4, 64), not (4, 64)"),
        (dict(qw=qw[:-128]), "896 words, not K x N / 8 = 1024"),
    ]
    for change, message in cases:
        args = dict(x=x, qw=qw, scales=s, zeros=z, group=32, warps=1) | change
        with pytest.raises(ValueError, match=re.escape(message)):
            MG.mma_gemv(**args)


def test_asm_layouts_reads_the_layout_each_inline_asm_runs_in() -> None:
    """What `compiled` checks every sm_90 / sm_80 compile with (bench/compile_check.py)."""
    ttgir = """#blocked = #ttg.blocked<{sizePerThread = [4], threadsPerWarp = [32], warpsPerCTA = [2], order = [0]}>
#blocked1 = #ttg.blocked<{sizePerThread = [1], threadsPerWarp = [32], warpsPerCTA = [2], order = [0]}>
  %1 = tt.load %0 : tensor<256x!tt.ptr<i32>, #blocked>
  %2:4 = tt.elementwise_inline_asm "mma" {pure = true} %1 : tensor<256xi32, #blocked1> -> tensor<256xf32, #blocked1>
"""
    assert MG.asm_layouts(ttgir) == {
        "sizePerThread = [1], threadsPerWarp = [32], warpsPerCTA = [2], order = [0]"
    }
    assert MG.asm_layouts(ttgir) != {MG.WORD_LAYOUT.format(w=2)}
    good = ttgir.replace("#blocked1>", "#blocked>")
    assert MG.asm_layouts(good) == {MG.WORD_LAYOUT.format(w=2)}
