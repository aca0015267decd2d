"""End-to-end scale tuning (`bitserve tune`): the tunable layer is the checkpoint's layer until
trained, and on a real checkpoint on disk tuning keeps codes and zeros, changes scales, and
brings the model's next-token distributions closer to the source model's on held-out text."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny_model
from transformers import AutoModelForCausalLM

from bitserve.kernels import QuantLinear
from bitserve.models import load_model
from bitserve.quantization.calibration import file_calibration
from bitserve.quantization.grid import QuantSpec, quantize_rtn
from bitserve.quantization.tune import _kl, _ScaledLinear

BITSERVE = str(Path(sys.executable).parent / "bitserve")


@pytest.mark.parametrize(("k", "group", "sym"), [(96, 32, False), (80, 32, True), (64, -1, False)])
def test_untrained_scaled_linear_is_the_reference_layer(k: int, group: int, sym: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    layer = quantize_rtn(torch.randn(24, k, generator=gen), QuantSpec(2, group, sym)).to_module(
        torch.randn(24, generator=gen)
    )
    x = torch.randn(5, k, generator=gen)
    want = layer(x)
    tuned = _ScaledLinear(layer)
    got = tuned(x).detach()
    assert float((got - want).norm() / want.norm()) < 1e-6
    assert torch.equal(tuned.scales(), layer.scales)
    with torch.no_grad():
        tuned.factor.fill_(0.5)  # every scale x1.5: the output's weight part scales with it
    assert bool(torch.allclose(tuned(x) - layer.bias, 1.5 * (want - layer.bias), rtol=1e-3))


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BITSERVE, *args], capture_output=True, text=True, timeout=600)


def _tiny_and_text(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny random-init model on disk and a calibration text file for it."""
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. A lazy cat naps. " * 150)
    return save_tiny_model(tmp_path / "src"), calib


def _held_out_kl(model: torch.nn.Module, teacher: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float(_kl(teacher(ids).logits, model(ids).logits))


def test_cli_tune_keeps_codes_and_moves_the_model_towards_its_source(tmp_path: Path) -> None:
    src, calib = _tiny_and_text(tmp_path)
    ckpt, tuned = tmp_path / "rtn", tmp_path / "tuned"
    q = _run("quantize", str(src), "--out", str(ckpt), "--bits", "2", "--group-size", "32")
    assert q.returncode == 0, q.stderr
    # RTN records no calibration: the command says what is missing in one line.
    r = _run("tune", str(ckpt), "--out", str(tuned))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--calib" in r.stderr
    assert not tuned.exists()
    args = ["--calib", str(calib), "--nsamples", "16", "--seqlen", "32", "--lr", "0.01"]
    r = _run("tune", str(ckpt), "--out", str(tuned), "--steps", "40", *args)
    assert r.returncode == 0, r.stderr
    before = load_model(ckpt, backend="reference")
    after = load_model(tuned, backend="reference")  # verifies the checksums
    assert after.manifest is not None
    record = after.manifest["tune"]
    assert record["steps"] == 40 and record["calibration"]["nsamples"] == 16
    assert record["kl_after"] < 0.9 * record["kl_before"]
    assert after.manifest["method"]["name"] == "rtn"
    layers = [n for n, m in before.model.named_modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14
    moved = 0
    for name in layers:
        a, b = before.model.get_submodule(name), after.model.get_submodule(name)
        assert isinstance(a, QuantLinear) and isinstance(b, QuantLinear)
        assert torch.equal(a.qweight, b.qweight) and torch.equal(a.qzeros, b.qzeros)
        moved += int(not torch.equal(a.scales, b.scales))
    assert moved == len(layers)
    teacher = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    held_out, _ = file_calibration(before.tokenizer, calib, 8, 32, seed=123)
    assert _held_out_kl(after.model, teacher, held_out) < 0.9 * _held_out_kl(
        before.model, teacher, held_out
    )


def test_cli_tune_rejects_bad_input(tmp_path: Path) -> None:
    src, calib = _tiny_and_text(tmp_path)
    r = _run("tune", str(src), "--out", str(tmp_path / "x"), "--calib", str(calib))
    assert r.returncode == 2 and "bitserve: error:" in r.stderr and "Traceback" not in r.stderr
    ckpt = tmp_path / "rtn"
    assert _run("quantize", str(src), "--out", str(ckpt), "--bits", "4").returncode == 0
    r = _run("tune", str(ckpt), "--out", str(tmp_path / "y"), "--calib", str(calib), "--steps", "0")
    assert r.returncode == 2 and "steps >= 1" in r.stderr and "Traceback" not in r.stderr
    r = _run("tune", str(ckpt), "--out", str(ckpt), "--calib", str(calib))
    assert r.returncode == 2 and "exists" in r.stderr
    r = _run("tune", str(ckpt), "--out", str(tmp_path / "z"), "--calib", str(tmp_path / "none"))
    assert r.returncode == 2 and "no such file" in r.stderr and not (tmp_path / "z").exists()
    r = _run("quantize", str(src), "--out", str(tmp_path / "q"), "--tune-steps", "-1")
    assert r.returncode == 2 and "--tune-steps must be >= 0" in r.stderr
    assert not (tmp_path / "q").exists()
    bcq = ["quantize", str(src), "--out", str(tmp_path / "b"), "--method", "bcq", "--bits", "3"]
    r = _run(*bcq, "--tune-steps", "4", "--calib", str(calib))
    assert r.returncode == 2 and "writes no int" in r.stderr and "Traceback" not in r.stderr
    assert "bcq w3" not in r.stderr  # refused before quantizing: no progress bar
    moved = tmp_path / "moved-away"
    src.rename(moved)  # the manifest's source path no longer exists: say how to point at it
    r = _run("tune", str(ckpt), "--out", str(tmp_path / "w"), "--calib", str(calib))
    assert r.returncode == 2 and "--source" in r.stderr and "Traceback" not in r.stderr
    args = ["--calib", str(calib), "--source", str(moved), "--steps", "2", "--nsamples", "4"]
    r = _run("tune", str(ckpt), "--out", str(tmp_path / "w"), *args, "--seqlen", "16")
    assert r.returncode == 0, r.stderr


def test_quantize_with_tune_steps_tunes_the_fresh_checkpoint(tmp_path: Path) -> None:
    """`quantize --tune-steps N` = quantize, then tune on the same calibration windows: same
    codes as the plain run, tuned scales, and both records in the manifest."""
    src, calib = _tiny_and_text(tmp_path)
    common = ["--bits", "2", "--group-size", "32"]
    plain, tuned = tmp_path / "plain", tmp_path / "tuned"
    assert _run("quantize", str(src), "--out", str(plain), *common).returncode == 0  # RTN: no calib
    windows = ["--calib", str(calib), "--nsamples", "8", "--seqlen", "32"]
    r = _run("quantize", str(src), "--out", str(tuned), *common, *windows, "--tune-steps", "12")
    assert r.returncode == 0, r.stderr
    a = load_model(plain, backend="reference")
    b = load_model(tuned, backend="reference")
    assert a.manifest is not None and b.manifest is not None
    assert "tune" not in a.manifest
    assert b.manifest["tune"]["steps"] == 12
    assert b.manifest["tune"]["calibration"] == b.manifest["calibration"]
    name = "model.layers.1.mlp.down_proj"
    la, lb = a.model.get_submodule(name), b.model.get_submodule(name)
    assert isinstance(la, QuantLinear) and isinstance(lb, QuantLinear)
    assert torch.equal(la.qweight, lb.qweight) and not torch.equal(la.scales, lb.scales)
