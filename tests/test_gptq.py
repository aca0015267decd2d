"""GPTQ: second-order error compensation beats round-to-nearest on correlated inputs, keeps the
plain group layout with act-order, and its checkpoints round-trip through save/load."""

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny_model

from bitserve.errors import UsageError
from bitserve.kernels.packing import num_groups
from bitserve.models import load_model
from bitserve.quantization import get_method
from bitserve.quantization.base import BlockContext
from bitserve.quantization.calibration import file_calibration
from bitserve.quantization.checkpoint import load_checkpoint, read_manifest
from bitserve.quantization.gptq import (
    _inverse_cholesky,
    add_gram,
    collect_stats,
    gptq_quantize,
    group_params,
    input_groups,
    static_group_params,
)
from bitserve.quantization.grid import QuantSpec, quantize_rtn
from bitserve.quantization.pipeline import (
    block_linears,
    capture_block_inputs,
    decoder_blocks,
    quantize_model,
    swap_in_quant_linears,
)
from bitserve.quantization.quantize import quantize_to_checkpoint

TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!\n"
    "How vexingly quick daft zebras jump; 12 + 30 = 42, said the sphinx of black quartz.\n"
) * 12


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny matrices: intra-op threads only add overhead (a lot of it on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def correlated_inputs(tokens: int, k: int, seed: int = 0) -> torch.Tensor:
    """Inputs with strongly correlated channels and a few large ones, like LLM activations."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5
    x = torch.randn(tokens, k, generator=g) @ mix + 0.05 * torch.randn(tokens, k, generator=g)
    x[:, :4] *= 8
    return x


@pytest.mark.parametrize("bits,group", [(4, 128), (3, 64), (2, 32), (4, -1), (3, 128)])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_below_rtn(bits: int, group: int, act_order: bool) -> None:
    n, k = 48, 160  # 160 inputs: g64 and g128 leave a short last group
    x = correlated_inputs(2048, k)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(1))
    h = 2 * x.t() @ x / x.shape[0]
    spec = QuantSpec(bits, group)
    qg = gptq_quantize(w, h, spec, act_order=act_order)
    qr = quantize_rtn(w, spec)
    err_g = (x @ (qg.dequantize() - w).t()).pow(2).mean()
    err_r = (x @ (qr.dequantize() - w).t()).pow(2).mean()
    assert err_g < 0.8 * err_r
    # plain k // G groups whatever the column order: the format every kernel loads
    assert qg.scales.shape == (num_groups(k, group), n) and qg.q.shape == (k, n)
    assert int(qg.q.max()) <= spec.maxq and int(qg.zeros.max()) <= spec.maxq


def test_gptq_with_identity_hessian_is_rtn() -> None:
    """With uncorrelated inputs there is nothing to compensate: GPTQ rounds to nearest."""
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(2))
    spec = QuantSpec(4, 64)
    qg = gptq_quantize(w, torch.eye(128), spec, damp=0.0)
    assert torch.equal(qg.q, quantize_rtn(w, spec).q)


def test_input_groups_follow_shared_inputs(tmp_path: Path) -> None:
    model = load_model(save_tiny_model(tmp_path / "src")).model
    blk = decoder_blocks(model)[0]
    calls = capture_block_inputs(model, torch.randint(3, 90, (2, 16)))
    ctx = BlockContext(0, blk, block_linears(blk), QuantSpec(4, 64), calls)
    assert input_groups(ctx) == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]


def roundtrip(
    tmp_path: Path, method: str, spec: QuantSpec, arch: str = "llama", **kw: object
) -> None:
    """Quantize a tiny model in memory and through a checkpoint on disk: same logits, and
    different from the full-precision model's."""
    src = save_tiny_model(tmp_path / "src", arch)
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    ckpt = quantize_to_checkpoint(
        src,
        tmp_path / "ckpt",
        method,
        spec,
        calib=calib,
        nsamples=4,
        seqlen=64,
        method_args=dict(kw),
        progress=False,
    )
    loaded = load_model(src)
    model, tok = loaded.model, loaded.tokenizer
    ids, _ = file_calibration(tok, calib, 4, 64, 0)
    m = get_method(method)
    quantized, _ = quantize_model(model, m, spec, ids, {**m.defaults, **kw}, progress=False)
    swap_in_quant_linears(model, quantized)
    for p in model.parameters():  # the checkpoint keeps unquantized tensors in fp16
        p.data = p.data.half().float()
    got_model = load_checkpoint(ckpt, backend="reference").model  # format, not kernel, check
    test_ids = tok(TEXT[:50], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model(test_ids).logits
        got = got_model(test_ids).logits
        fp = load_model(src).model(test_ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (got - fp).abs().max() > 1e-4
    manifest = read_manifest(ckpt)
    assert manifest["method"]["name"] == method
    assert manifest["calibration"]["source"] == "file"
    assert all(manifest["method"]["args"][k] == v for k, v in kw.items())


@pytest.mark.parametrize(
    "options",
    [
        {},
        {
            "act_order": False,
            "clip_grid": 0,
            "damp": 0.01,
            "bf16_forwards": False,
            "sequential": True,
            "propagate": "quantized",
        },
    ],
)
def test_gptq_checkpoint_roundtrip(tmp_path: Path, options: dict[str, object]) -> None:
    roundtrip(tmp_path, "gptq", QuantSpec(4, 64), **options)


def test_gptq_model_closer_to_fp_than_rtn(tmp_path: Path) -> None:
    """On a tiny model at 3 bits, GPTQ's last hidden states on calibration text stay closer to
    full precision than RTN's."""
    src = save_tiny_model(tmp_path / "src", layers=2)
    loaded = load_model(src)
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    ids, _ = file_calibration(loaded.tokenizer, calib, 8, 64, 0)
    with torch.no_grad():
        ref = loaded.model.model(ids).last_hidden_state
    errs = {}
    for name in ("rtn", "gptq"):
        model = load_model(src).model
        m = get_method(name)
        quantize_model(model, m, QuantSpec(3, 64), ids, m.defaults, progress=False)
        with torch.no_grad():
            errs[name] = (model.model(ids).last_hidden_state - ref).pow(2).mean().item()
    assert errs["gptq"] < errs["rtn"]


def test_gptq_is_deterministic(tmp_path: Path) -> None:
    src = save_tiny_model(tmp_path / "src", layers=1)
    loaded = load_model(src)
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    ids, _ = file_calibration(loaded.tokenizer, calib, 4, 64, 3)
    codes = []
    for _ in range(2):
        model = load_model(src).model
        m = get_method("gptq")
        q, _ = quantize_model(model, m, QuantSpec(3, 64), ids, m.defaults, progress=False)
        codes.append(torch.cat([qw.q.flatten() for qw in q.values()]))  # type: ignore[attr-defined]
    assert torch.equal(codes[0], codes[1])


def test_group_params_clip_search_lowers_group_error() -> None:
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(7)) ** 3  # heavy tails
    spec = QuantSpec(2, 64)

    def err(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        q = torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, spec.maxq)
        return ((q - zero[:, None]) * scale[:, None] - w).abs().pow(2.4).sum(1)

    plain = err(*group_params(w, spec))
    searched = err(*group_params(w, spec, clip_grid=20))
    assert (searched <= plain + 1e-6).all() and (searched < plain).any()


def test_bf16_statistics_match_float32(tmp_path: Path) -> None:
    """bf16_forwards: the bfloat16 forwards and X^T X products give the float32 Hessians to
    about bfloat16 precision, and really run in bfloat16 (the sums differ)."""
    model = load_model(save_tiny_model(tmp_path / "src")).model
    blk = decoder_blocks(model)[0]
    calls = capture_block_inputs(model, torch.randint(3, 90, (4, 64)))
    names = ["self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"]
    stats = {}
    for bf16 in (False, True):
        ctx = BlockContext(0, blk, block_linears(blk), QuantSpec(4, 64), calls, bf16=bf16)
        stats[bf16] = collect_stats(ctx, names, stop_early=False)
    for name in names:
        h32, h16 = stats[False][name].hessian, stats[True][name].hessian
        rel = ((h16 - h32).norm() / h32.norm()).item()
        assert 0 < rel < 0.03, (name, rel)


def test_inverse_cholesky_raises_damping_for_indefinite_hessian() -> None:
    """A Hessian that rounding left slightly indefinite still factors (with more damping); one
    that no damping fixes is a clear error."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, 32, generator=g)
    h = x.t() @ x  # rank 8 of 32
    h -= 1e-3 * h.diag().mean() * torch.eye(32)  # smallest eigenvalues now negative
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky(h + 1e-5 * h.diag().mean() * torch.eye(32))
    u = _inverse_cholesky(h, 1e-5)
    assert torch.isfinite(u).all() and torch.equal(u, u.triu())
    spd = h + 0.1 * h.diag().mean() * torch.eye(32)
    torch.testing.assert_close(
        _inverse_cholesky(spd, 0.0).t() @ _inverse_cholesky(spd, 0.0),
        torch.linalg.inv(spd),
        rtol=1e-3,
        atol=1e-5,
    )
    with pytest.raises(UsageError, match="not positive definite"):
        _inverse_cholesky(-torch.eye(4), 0.01)


@pytest.mark.parametrize("group", [32, 64, -1])
def test_static_group_params_match_group_by_group(group: int) -> None:
    """The batched search over all groups (k=160 leaves a short last group at g64) gives what
    searching each group on its own gives."""
    w = torch.randn(24, 160, generator=torch.Generator().manual_seed(8)) ** 3
    spec = QuantSpec(3, group)
    scale, zero = static_group_params(w, spec, clip_grid=10)
    gsize = 160 if group == -1 else group
    for g in range(num_groups(160, group)):
        s, z = group_params(w[:, g * gsize : (g + 1) * gsize], spec, clip_grid=10)
        torch.testing.assert_close(scale[:, g], s, rtol=0, atol=0)
        torch.testing.assert_close(zero[:, g], z, rtol=0, atol=0)


@pytest.mark.parametrize("k", [7, 64])
def test_add_gram_upper_blocks(k: int) -> None:
    """add_gram accumulates X^T X on the blocks on and above the diagonal (odd k included);
    the block below is left for the caller to mirror."""
    x = torch.randn(50, k, generator=torch.Generator().manual_seed(9))
    acc = torch.ones(k, k)
    add_gram(acc, x)
    add_gram(acc, 2 * x)
    half = k // 2
    want = 1 + 5 * x.t() @ x
    torch.testing.assert_close(acc[:half, :], want[:half, :], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(acc[half:, half:], want[half:, half:], rtol=1e-4, atol=1e-4)
    assert torch.equal(acc[half:, :half], torch.ones(k - half, half))


def test_propagate_fp_feeds_next_block_fp_outputs(tmp_path: Path) -> None:
    """propagate=fp: the first block is quantized the same way, the second sees the fp first
    block's outputs (so its codes differ from propagate=quantized's); a bad value is an error."""
    src = save_tiny_model(tmp_path / "src", layers=2)
    loaded = load_model(src)
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    ids, _ = file_calibration(loaded.tokenizer, calib, 4, 64, 0)
    m = get_method("gptq")
    codes = {}
    for mode in ("fp", "quantized"):
        model = load_model(src).model
        options = {**m.defaults, "propagate": mode}
        q, _ = quantize_model(model, m, QuantSpec(3, 64), ids, options, progress=False)
        codes[mode] = {name: qw.q for name, qw in q.items()}  # type: ignore[attr-defined]
    first = [n for n in codes["fp"] if ".0." in n]
    second = [n for n in codes["fp"] if ".1." in n]
    assert first and second
    assert all(torch.equal(codes["fp"][n], codes["quantized"][n]) for n in first)
    assert any(not torch.equal(codes["fp"][n], codes["quantized"][n]) for n in second)
    for key, bad in (("propagate", "maybe"), ("bf16_forwards", "no"), ("sequential", 1)):
        with pytest.raises(UsageError, match=key):
            quantize_model(
                load_model(src).model,
                m,
                QuantSpec(3, 64),
                ids,
                {**m.defaults, key: bad},
                progress=False,
            )
