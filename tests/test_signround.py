"""SignRound on small random-init models: its loss falls, its export is the grid it trained,
it beats round-to-nearest at low bits, and a CLI-made checkpoint reloads to the same logits."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny_model
from transformers import AutoModelForCausalLM

from bitserve.errors import UsageError
from bitserve.kernels import QuantLinear
from bitserve.models import load_model
from bitserve.quantization import get_method
from bitserve.quantization.base import BlockContext, call_hidden
from bitserve.quantization.calibration import file_calibration
from bitserve.quantization.grid import QuantSpec, quantize_rtn
from bitserve.quantization.pipeline import (
    block_linears,
    capture_block_inputs,
    decoder_blocks,
    quantize_model,
)
from bitserve.quantization.signround import (
    DEFAULTS,
    _batches,
    _export,
    _fake_quant,
    _init_params,
    _merge,
    _rows,
    _run,
    signround_block,
)


def _model(tmp_path: Path, seed: int = 0) -> torch.nn.Module:
    path = save_tiny_model(tmp_path / f"tiny{seed}", seed=seed)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _ids(n: int = 8, length: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 90, (n, length), generator=torch.Generator().manual_seed(seed))


def _block_error(ctx: BlockContext, target: torch.Tensor, quantized: dict) -> float:
    with torch.no_grad():
        saved = {n: lin.weight.data.clone() for n, lin in ctx.linears.items()}
        for n, qw in quantized.items():
            ctx.linears[n].weight.data = qw.dequantize()
        err = float((ctx.run(ctx.inputs[0]) - target).pow(2).mean())
        for n, lin in ctx.linears.items():
            lin.weight.data = saved[n]
    return err


@pytest.mark.parametrize("bits", [2, 3])
def test_loss_decreases_and_beats_rtn_on_block_output(tmp_path: Path, bits: int) -> None:
    model = _model(tmp_path)
    calls = capture_block_inputs(model, _ids())
    block = decoder_blocks(model)[0]
    spec = QuantSpec(bits, 32)
    args = {
        "iters": 80,
        "lr": None,
        "batch_size": 8,
        "targets": "quantized",
        "clip_min": 0.5,
        "amp": False,
    }
    ctx = BlockContext(0, block, block_linears(block), spec, calls, args, seed=0)
    with torch.no_grad():
        target = ctx.run(calls[0])
    losses: list[float] = []
    quantized = signround_block(ctx, losses)
    assert len(losses) == 80
    # One call, whole batch per step: the loss is the full objective; its first value is RTN's.
    assert min(losses) < 0.8 * losses[0]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10
    rtn = {n: quantize_rtn(lin.weight.data, spec) for n, lin in ctx.linears.items()}
    assert losses[0] == pytest.approx(_block_error(ctx, target, rtn), rel=1e-4)
    assert _block_error(ctx, target, quantized) == pytest.approx(min(losses), rel=1e-4)
    # The block's own weights are untouched and trainable again afterwards.
    assert all(p.requires_grad for p in block.parameters())


def test_keep_last_exports_the_final_iterate(tmp_path: Path) -> None:
    """keep=last exports the state the schedule ends in (near the last step's loss), not the
    lowest-loss iterate that keep=best exports; the trajectory itself is the same."""
    model = _model(tmp_path)
    calls = capture_block_inputs(model, _ids())
    block = decoder_blocks(model)[0]
    spec = QuantSpec(2, 32)
    errors, runs = {}, {}
    for keep in ("best", "last"):
        args = {**DEFAULTS, "iters": 60, "batch_size": 8, "targets": "quantized", "keep": keep}
        args["amp"] = False
        ctx = BlockContext(0, block, block_linears(block), spec, calls, args, seed=0)
        with torch.no_grad():
            target = ctx.run(calls[0])
        runs[keep] = []
        quantized = signround_block(ctx, runs[keep])
        errors[keep] = _block_error(ctx, target, quantized)
    assert runs["best"] == runs["last"]
    losses = runs["last"]
    assert errors["best"] == pytest.approx(min(losses), rel=1e-4)
    assert errors["last"] == pytest.approx(losses[-1], rel=0.1)
    assert errors["last"] < losses[0]  # still better than RTN


def test_minibatches_mix_chunks_and_use_every_sample_equally(tmp_path: Path) -> None:
    """The pipeline hands calibration over in chunks of 8; a step's minibatch is drawn from all
    samples (a fresh permutation per pass), and running the block on rows of the merged call
    gives the same outputs as running each chunk."""
    model = _model(tmp_path)
    calls = capture_block_inputs(model, _ids(n=20), batch_size=8)
    assert [call_hidden(c).shape[0] for c in calls] == [8, 8, 4]
    block = decoder_blocks(model)[0]
    merged = _merge(calls)
    with torch.no_grad():
        per_chunk = torch.cat([_run(block, c, {}) for c in calls])
        rows = torch.tensor([19, 0, 9, 3])
        picked = _run(block, _rows(merged, rows), {})
    torch.testing.assert_close(picked, per_chunk[rows], rtol=1e-4, atol=1e-5)

    gen = torch.Generator().manual_seed(0)
    batches = _batches(20, 6, gen)
    first_pass = [next(batches) for _ in range(3)]  # 3 x 6 of 20: the short tail is dropped
    drawn = torch.cat(first_pass)
    assert len(set(drawn.tolist())) == 18
    assert any(len({int(i) // 8 for i in b}) > 1 for b in first_pass)  # chunks are mixed
    counts = torch.bincount(torch.cat([next(batches) for _ in range(30)]), minlength=20)
    assert int(counts.max()) <= 10 and int(counts.min()) >= 6  # 10 passes, none repeats within
    assert next(_batches(3, 8, gen)).numel() == 3  # fewer samples than a batch: all of them


@pytest.mark.parametrize("sym", [False, True])
def test_export_reproduces_the_trained_weight(sym: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    spec = QuantSpec(3, 64, sym)
    w = torch.randn(48, 160, generator=gen)  # 160 = 2.5 groups: a padded short last group
    p = _init_params(w, spec)
    with torch.no_grad():
        p.v.uniform_(-0.5, 0.5, generator=gen)
        p.lo.uniform_(0.5, 1.0, generator=gen)
        p.hi.uniform_(0.5, 1.0, generator=gen)
    qw = _export(p, spec)
    assert qw.q.shape == (160, 48) and qw.scales.shape == (3, 48)
    assert int(qw.q.max()) <= spec.maxq
    torch.testing.assert_close(qw.dequantize(), _fake_quant(p, spec).detach(), rtol=0, atol=1e-6)
    # With V = 0 and no clipping the export is exactly round-to-nearest.
    fresh = _init_params(w, spec)
    rtn = quantize_rtn(w, spec)
    assert torch.equal(_export(fresh, spec).q, rtn.q)
    assert torch.equal(_export(fresh, spec).scales, rtn.scales)


def test_whole_model_logits_closer_than_rtn(tmp_path: Path) -> None:
    spec = QuantSpec(2, 32)
    ids = _ids(16, 64, seed=2)
    errors = {}
    for name, args in (("rtn", {}), ("signround", {"iters": 60})):
        model = _model(tmp_path)
        with torch.no_grad():
            ref = model(ids).logits
        quantize_model(model, get_method(name), spec, ids, args, seed=0, progress=False)
        with torch.no_grad():
            errors[name] = float((model(ids).logits - ref).pow(2).mean())
    assert errors["signround"] < 0.7 * errors["rtn"]


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    spec = QuantSpec(3, 32)
    ids = _ids(8, 32, seed=3)
    codes = []
    for _ in range(2):
        model = _model(tmp_path)
        out, _ = quantize_model(
            model, get_method("signround"), spec, ids, {"iters": 10}, seed=5, progress=False
        )
        codes.append(torch.cat([qw.q.flatten() for qw in out.values()]))
    assert torch.equal(codes[0], codes[1])


@pytest.mark.parametrize(
    "args",
    [
        {"iters": -1},
        {"batch_size": 0},
        {"targets": "bogus"},
        {"lr": "fast"},
        {"amp": "maybe"},
        {"tune_norms": "sometimes"},
        {"keep": "first"},
    ],
)
def test_bad_options_are_usage_errors(tmp_path: Path, args: dict) -> None:
    model = _model(tmp_path)
    with pytest.raises(UsageError):
        quantize_model(
            model, get_method("signround"), QuantSpec(4, 32), _ids(2, 16), args, progress=False
        )


@pytest.mark.parametrize("tune_norms", [False, True])
def test_cli_checkpoint_reloads_to_the_fake_quantized_logits(
    tmp_path: Path, tune_norms: bool
) -> None:
    src = save_tiny_model(tmp_path / "src")
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / "ckpt"
    subprocess.run(
        [
            str(Path(sys.executable).parent / "bitserve"),
            "quantize",
            str(src),
            "--out",
            str(out),
            "--method",
            "signround",
            "--bits",
            "3",
            "--group-size",
            "32",
            "--calib",
            str(calib),
            "--nsamples",
            "8",
            "--seqlen",
            "32",
            "--method-arg",
            "iters=30",
            "--method-arg",
            f"tune_norms={tune_norms}",
        ],
        check=True,
        capture_output=True,
    )
    loaded = load_model(out, backend="reference")
    assert loaded.manifest is not None
    assert loaded.manifest["method"]["name"] == "signround"
    assert loaded.manifest["method"]["args"]["iters"] == 30
    # Same seeded run in process: identical codes, and the same logits up to the checkpoint's
    # 16-bit storage of the unquantized tensors.
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids, _ = file_calibration(loaded.tokenizer, calib, 8, 32, 0)
    norm = "model.layers.0.input_layernorm.weight"
    before = model.get_parameter(norm).detach().clone()
    args = {"iters": 30, "tune_norms": tune_norms}
    quantized, _ = quantize_model(
        model, get_method("signround"), QuantSpec(3, 32), ids, args, progress=False
    )
    # Learned norm factors are folded into the norm gains, which the checkpoint keeps.
    after = model.get_parameter(norm).detach()
    assert torch.equal(after, before) != tune_norms
    torch.testing.assert_close(loaded.model.get_parameter(norm).float(), after, rtol=1e-2, atol=0)
    for name, qw in quantized.items():
        layer = loaded.model.get_submodule(name)
        assert isinstance(layer, QuantLinear)
        assert torch.equal(layer.codes(), qw.q)
    probe = ids[:2]
    with torch.no_grad():
        got, want = loaded.model(probe).logits, model(probe).logits
    assert float((got - want).abs().max()) < 1e-2 * float(want.abs().max())
