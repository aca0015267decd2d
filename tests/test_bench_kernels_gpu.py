"""Pieces of the GPU benchmark (bench/kernels_gpu.py) that run without a GPU: its synthetic W4
layers (weights like a random-init model's, so a 32-layer model's logits stay finite) and the
loads-only floor kernel, in Triton's interpreter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from bench_scripts import load_bench

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def kg():
    return load_bench("kernels_gpu")


def test_synthetic_layers_have_zero_mean_weights(kg) -> None:
    """Codes from 0 put the mean half a step below the zero point: through 32 layers that
    common mode overflowed fp16 and GPU run 9's serving-runner rows sampled NaN logits."""
    torch.manual_seed(0)
    for bits in (2, 3, 4, 8):
        layer = kg.synthetic_layer(576, 96, bits, 128, "cpu")
        rows = {k: t.shape for k, t in layer.prepared.items() if k in ("qweight", "qhigh")}
        # K = 576 padded to 768 (K_ALIGN), 32 / bits codes a word (3-bit: 2-bit + 1-bit plane)
        want = {"qweight": (48, 96), "qhigh": (24, 96)} if bits == 3 else {}
        assert rows == (want or {"qweight": (768 * bits // 32, 96)})
    w = kg.decode_prepared_w4(kg.synthetic_layer(4096, 512, 4, 128, "cpu")).float()
    assert abs(w.mean().item()) < 2e-4 and 0.018 < w.pow(2).mean().sqrt().item() < 0.023


@pytest.mark.parametrize("tiling", [(32, 64, 2, 4), (64, 128, 3, 4), (32, 256, 1, 1)])
def test_loads_only_floor_kernel_xors_the_word_tiles(kg, tiling) -> None:
    """Each k-slice's output is the XOR of the words of its K-blocks (N not a multiple of
    BLOCK_N, several blocks per slice)."""
    block_n, block_k, split_k, _ = tiling
    words = block_k // 8
    qw = torch.randint(-(2**31), 2**31 - 1, (words * 5, 100), dtype=torch.int32)
    out = kg.words_xor(qw, *tiling).numpy()
    blocks = qw.numpy().reshape(5, words, 100)
    for p in range(split_k):
        want = np.bitwise_xor.reduce(blocks[p::split_k].reshape(-1, 100), axis=0)
        np.testing.assert_array_equal(out[p], want)


def test_m1_sweep_adds_split_k_counts_and_the_red_finish(kg) -> None:
    """The chain sweep times every GEMV candidate that applies, then the tuned config with the
    other split-K counts its K allows, with the "red" finish and with masked loads ("odd");
    those extra configs (in no candidate list, so no other test runs them) match the reference
    backend."""
    from bitserve.kernels import triton_int

    torch.manual_seed(0)
    k, n = 4 * 128 - 64, 136  # four K-blocks of 128 (the last short), N not a multiple of 128
    layer = kg.random_layer(k, n, 4, 128, False, "cpu")
    x = torch.randn(1, k).half()
    ref = layer(x.float())  # the reference backend
    triton_int.BACKEND.prepare(layer)
    tuned = triton_int.Config("gemv", 1, 128, 128, 8, 4, 1, "lop3+pf")
    configs = kg.m1_sweep_configs(layer, tuned)
    cands = [c for c in triton_int.CANDIDATES[1] if triton_int._applies(c, layer, torch.float16)]
    assert configs[: len(cands)] == cands and len(set(configs)) == len(configs)
    extra = configs[len(cands) :]
    assert {c.split_k for c in extra} == {1, 2, 4, 8}  # at most the 4 K-blocks, as _launch clamps
    assert tuned._replace(variant="lop3+pf+red") in extra
    assert tuned._replace(variant="lop3+odd+pf") in extra
    for cfg in extra:
        out = torch.full((1, n), float("nan"), dtype=torch.float16)
        y = triton_int._launch(layer, x, out, cfg).float()
        assert float((y - ref).norm() / ref.norm()) < 2e-3, cfg
        assert not layer.prepared["counters"].any()
