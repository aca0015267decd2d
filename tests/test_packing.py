"""Bit packing and the shared integer grid."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitserve.kernels.packing import (
    dequantize,
    group_index,
    num_groups,
    pack_rows,
    packed_rows,
    unpack_rows,
)
from bitserve.quantization.grid import QuantSpec, fake_quantize, quantize_rtn


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    rows=st.integers(1, 80),
    cols=st.integers(1, 7),
    seed=st.integers(0, 2**16),
)
def test_pack_unpack_round_trip(bits: int, rows: int, cols: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 1 << bits, (rows, cols), generator=gen, dtype=torch.int64)
    packed = pack_rows(q, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (packed_rows(rows, bits), cols)
    assert torch.equal(unpack_rows(packed, bits, rows).long(), q)


def test_packing_order_is_lsb_first_and_3bit_straddles_words() -> None:
    q = torch.arange(11).remainder(8).view(11, 1)  # codes 0..7,0..2 in 3 bits = 33 bits
    packed = pack_rows(q, 3)
    assert packed.shape == (2, 1)
    word0 = packed[0, 0].item() & 0xFFFFFFFF
    assert word0 & 0b111 == 0 and (word0 >> 3) & 0b111 == 1  # first code in the lowest bits
    # code 10 (value 2) occupies bits 30..32: its low two bits end word 0, its top bit opens word 1
    assert (word0 >> 30) & 0b11 == 2 & 0b11
    assert packed[1, 0].item() & 1 == (2 >> 2) & 1


def test_pack_rejects_out_of_range_codes() -> None:
    with pytest.raises(ValueError, match="out of range"):
        pack_rows(torch.tensor([[16]]), 4)


@pytest.mark.parametrize("k,g,expected", [(576, 128, 5), (576, -1, 1), (512, 128, 4), (96, 128, 1)])
def test_num_groups_with_short_last_group(k: int, g: int, expected: int) -> None:
    assert num_groups(k, g) == expected
    idx = group_index(k, g)
    assert int(idx.max()) == expected - 1


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 64, 128])
@pytest.mark.parametrize("sym", [False, True])
def test_rtn_error_within_half_a_step(bits: int, group_size: int, sym: bool) -> None:
    torch.manual_seed(bits * 100 + group_size)
    w = torch.randn(24, 200)  # 200 inputs: a short last group for every group size
    spec = QuantSpec(bits, group_size, sym)
    qw = quantize_rtn(w, spec)
    assert qw.q.shape == (200, 24) and int(qw.q.max()) <= spec.maxq
    step = qw.scales.float()[group_index(200, group_size)].t()  # [N, K]
    err = (qw.dequantize() - w).abs()
    # within one grid step everywhere (clamping at the range ends), half a step on average
    assert bool((err <= step + 1e-6).all())
    assert float((err / step).mean()) < 0.3
    assert torch.equal(fake_quantize(w, spec), qw.dequantize())


def test_more_bits_means_less_error() -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    errs = [
        (quantize_rtn(w, QuantSpec(b, 64)).dequantize() - w).pow(2).mean().item()
        for b in (2, 3, 4, 8)
    ]
    assert errs == sorted(errs, reverse=True)
    assert errs[-1] < 1e-4 < errs[0]


def test_dequantize_formula() -> None:
    q = torch.tensor([[0, 15], [7, 8], [1, 2]], dtype=torch.uint8)  # K=3, N=2
    scales = torch.tensor([[0.5, 2.0], [1.0, 1.0]], dtype=torch.float16)  # G=2 (group size 2)
    zeros = torch.tensor([[8, 0], [1, 1]], dtype=torch.uint8)
    w = dequantize(q, scales, zeros, 2)
    expected = torch.tensor(
        [[(0 - 8) * 0.5, (7 - 8) * 0.5, (1 - 1) * 1.0], [15 * 2.0, 8 * 2.0, (2 - 1) * 1.0]]
    )
    assert torch.equal(w, expected)
