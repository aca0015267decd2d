"""`bitserve export`: a checkpoint in compressed-tensors' pack-quantized layout. transformers (with
the compressed-tensors package) loads a symmetric export and gives our logits; an asymmetric
one unpacks, through compressed-tensors' own code, to exactly our codes, scales and zeros."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_main
from safetensors import safe_open
from tiny_models import save_tiny_model
from transformers import AutoModelForCausalLM

from bitserve.kernels.quant_linear import QuantLinear
from bitserve.kernels.reference import dequantized_weight
from bitserve.models import load_model
from bitserve.quantization.export import WEIGHTS

pytest.importorskip("compressed_tensors")


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("export") / "src", "llama")


def quantize(src: Path, out: Path, capsys: pytest.CaptureFixture[str], *flags: str) -> Path:
    code, err = run_main(["quantize", str(src), "--out", str(out), *flags], capsys)
    assert code == 0, err
    return out


def test_symmetric_export_loads_in_transformers_with_our_logits(
    src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = quantize(src, tmp_path / "ckpt", capsys, "--group-size", "32", "--sym")
    out = tmp_path / "ct"
    code, err = run_main(["export", str(ckpt), "--out", str(out)], capsys)
    assert code == 0, err
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["format"]) == ("compressed-tensors", "pack-quantized")
    (group,) = qc["config_groups"].values()
    weights = group["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"]) == (4, 32, True)
    assert len(group["targets"]) == 14 and qc["ignore"] == ["lm_head"]  # 2 layers x 7
    ours = load_model(ckpt, backend="reference").model
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, 60, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = ours(ids).logits, theirs(ids).logits
    assert float((got - want).norm() / want.norm()) < 1e-5


def test_asymmetric_export_unpacks_to_exactly_our_weights(
    src: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationConfig

    ckpt = quantize(src, tmp_path / "ckpt", capsys, "--bits", "8", "--group-size", "-1")
    out = tmp_path / "ct"
    with caplog.at_level("WARNING", logger="bitserve"):
        assert run_main(["export", str(ckpt), "--out", str(out)], capsys)[0] == 0
    assert "asymmetric layers" in caplog.text  # transformers cannot load them
    qc = QuantizationConfig.model_validate(
        json.loads((out / "config.json").read_text())["quantization_config"]
    )
    schemes = {t: s for s in qc.config_groups.values() for t in s.targets}
    model = load_model(ckpt, backend="reference").model
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert set(schemes) == set(layers)
    with safe_open(str(out / WEIGHTS), framework="pt") as f:
        for name, layer in layers.items():
            scheme = schemes[name]
            assert scheme.weights is not None
            assert (scheme.weights.num_bits, scheme.weights.strategy) == (8, "channel")
            assert not scheme.weights.symmetric
            keys = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")
            stored = {k: f.get_tensor(f"{name}.{k}") for k in keys}
            shape = tuple(stored["weight_shape"].tolist())
            codes = unpack_from_int32(stored["weight_packed"], 8, shape)  # signed: q - 128
            assert torch.equal(codes.int() + 128, layer.codes().t().int()), name
            assert torch.equal(stored["weight_scale"], layer.scales.t())
            theirs = PackedQuantizationCompressor.decompress(stored, scheme)
            zero = theirs["weight_zero_point"].int() + 128
            assert torch.equal(zero, layer.zero_codes().t().int()), name
            # their dequantization runs in the scales' fp16: ours up to its rounding
            want = dequantized_weight(layer)
            got = theirs["weight"].float()
            assert float((got - want).norm() / want.norm()) < 1e-3, name


def test_export_refusals_are_one_line(
    src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A short last group (K=96 with g64), --out on the checkpoint itself, an existing --out
    without --force or a folder that is not an export; --force replaces an earlier export."""
    short = quantize(src, tmp_path / "g64", capsys, "--group-size", "64")
    code, err = run_main(["export", str(short), "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "does not divide its 96 inputs" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()
    ckpt = quantize(src, tmp_path / "ckpt", capsys, "--group-size", "32")
    code, err = run_main(["export", str(ckpt), "--out", str(ckpt), "--force"], capsys)
    assert code == 2 and "is the checkpoint itself" in err
    assert (ckpt / "bitserve-manifest.json").is_file()
    code, err = run_main(["export", str(src), "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "not a bitserve checkpoint" in err
    bcq = quantize(src, tmp_path / "bcq", capsys, "--method", "bcq", "--bits", "3")
    code, err = run_main(["export", str(bcq), "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "is a 'bcq' layer" in err and not (tmp_path / "x").exists()
    out = tmp_path / "ct"
    assert run_main(["export", str(ckpt), "--out", str(out)], capsys)[0] == 0
    code, err = run_main(["export", str(ckpt), "--out", str(out)], capsys)
    assert code == 2 and "exists" in err
    assert run_main(["export", str(ckpt), "--out", str(out), "--force"], capsys)[0] == 0
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, err = run_main(["export", str(ckpt), "--out", str(afile), "--force"], capsys)
    assert code == 2 and "is a file, not a folder" in err and afile.read_text() == "x"
    for folder in (src, short):  # --force replaces neither a model nor a checkpoint
        code, err = run_main(["export", str(ckpt), "--out", str(folder), "--force"], capsys)
        assert code == 2 and "not an earlier export" in err
        assert (folder / "config.json").is_file()


def test_export_without_compressed_tensors_says_what_to_install(
    src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    ckpt = quantize(src, tmp_path / "ckpt", capsys, "--group-size", "32", "--sym")
    for name in ("compressed_tensors.compressors", "compressed_tensors.quantization"):
        monkeypatch.setitem(sys.modules, name, None)  # an import of it fails
    code, err = run_main(["export", str(ckpt), "--out", str(tmp_path / "ct")], capsys)
    assert code == 2 and "pip install 'bitserve[export]'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "ct").exists()
