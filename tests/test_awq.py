"""AWQ: the scaled block computes the same function before rounding, the scale and clip
searches never lose to plain RTN on their objective, and checkpoints round-trip."""

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from test_gptq import correlated_inputs, roundtrip
from tiny_models import tiny_config
from transformers import AutoModelForCausalLM

from bitserve.quantization import get_method
from bitserve.quantization.awq import output_error, scale_block, search_clip, search_scale
from bitserve.quantization.base import BlockContext
from bitserve.quantization.gptq import InputStats, collect_stats, input_groups
from bitserve.quantization.grid import QuantSpec, fake_quantize, quantize_rtn
from bitserve.quantization.pipeline import block_linears, capture_block_inputs, decoder_blocks


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny matrices: intra-op threads only add overhead (a lot of it on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _block_ctx(arch: str, kv_heads: int) -> BlockContext:
    torch.manual_seed(0)
    config = tiny_config(arch, layers=1)
    config.num_key_value_heads = kv_heads
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # non-trivial norm weights, so folding into them is exercised
                p.uniform_(0.5, 1.5)
            if name.endswith("bias"):
                p.normal_()
    calls = capture_block_inputs(model, torch.randint(3, 90, (4, 48)), batch_size=2)
    blk = decoder_blocks(model)[0]
    m = get_method("awq")
    return BlockContext(0, blk, block_linears(blk), QuantSpec(3, 64), calls, dict(m.defaults))


@pytest.mark.parametrize(
    "arch,kv_heads", [("llama", 2), ("llama", 4), ("qwen2", 2), ("mistral", 4)]
)
def test_folded_scales_leave_block_unchanged(arch: str, kv_heads: int) -> None:
    """kv_heads == heads also folds v -> o; qwen2 has q/k/v biases."""
    ctx = _block_ctx(arch, kv_heads)
    with torch.no_grad():
        ref = [ctx.run(c) for c in ctx.inputs]
        groups = input_groups(ctx)
        stats = collect_stats(ctx, [g[0] for g in groups], stop_early=False)
        weights = {n: lin.weight.detach().clone() for n, lin in ctx.linears.items()}
        scales = scale_block(ctx, groups, stats)
        out = [ctx.run(c) for c in ctx.inputs]
    for a, b in zip(ref, out, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    # and the weights really were rescaled (the comparison above is not vacuous)
    changed = [n for n, lin in ctx.linears.items() if not torch.equal(lin.weight, weights[n])]
    assert "self_attn.q_proj" in changed and "mlp.down_proj" in changed
    assert ("self_attn.o_proj" in changed) == (kv_heads == 4)
    assert (scales["mlp.gate_proj"] != 1).any()


def _stats(x: torch.Tensor) -> InputStats:
    return InputStats(2 * x.t() @ x / x.shape[0], x.abs().mean(0))


def test_scale_search_beats_rtn_on_outlier_channels() -> None:
    x = correlated_inputs(1024, 128, seed=3)
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(4))
    spec = QuantSpec(3, 64)
    st = _stats(x)
    s = search_scale([w[:32], w[32:]], st, spec, n_grid=20)
    rtn = output_error(w, fake_quantize(w, spec), st.hessian)
    awq = output_error(w, fake_quantize(w * s, spec) / s, st.hessian)
    assert awq < 0.9 * rtn
    assert s[:4].mean() > s[4:].mean()  # the large-activation channels get the large scales


@pytest.mark.parametrize("group", [64, -1])
def test_clip_search_never_worse_per_group(group: int) -> None:
    x = correlated_inputs(512, 160, seed=5)
    w = torch.randn(32, 160, generator=torch.Generator().manual_seed(6))
    w[:, 7] *= 6  # an outlier weight column: clipping its groups pays off
    h = 2 * x.t() @ x / x.shape[0]
    spec = QuantSpec(2, group)
    clip = search_clip(w, h, spec, n_grid=20, max_shrink=0.5)
    assert clip.shape == (32, 1 if group == -1 else 3)
    assert ((clip >= 0.5) & (clip <= 1)).all() and (clip < 1).any()
    clipped = quantize_rtn(w, spec, clip).dequantize()
    assert output_error(w, clipped, h) <= output_error(w, fake_quantize(w, spec), h)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_awq_checkpoint_roundtrip(tmp_path: Path, arch: str) -> None:
    roundtrip(tmp_path, "awq", QuantSpec(4, 64), arch=arch)
