"""Quantize -> save -> load on small random-init models, and every kind of bad checkpoint."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import save_tiny_model

from bitserve.errors import (
    ChecksumError,
    CorruptFileError,
    MissingTensorError,
    NotACheckpointError,
    ShapeMismatchError,
    UnsupportedFormatError,
    UsageError,
)
from bitserve.kernels import QuantLinear
from bitserve.models import load_model
from bitserve.quantization import get_method
from bitserve.quantization.checkpoint import (
    MANIFEST,
    WEIGHTS,
    load_checkpoint,
    read_manifest,
    sha256_file,
)
from bitserve.quantization.grid import QuantSpec
from bitserve.quantization.pipeline import quantize_model, swap_in_quant_linears
from bitserve.quantization.quantize import quantize_to_checkpoint

IDS = torch.tensor([[1, 10, 20, 30, 40, 50, 60, 70, 5, 6, 7]])


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ckpt")
    src = save_tiny_model(root / "src", "llama")
    return quantize_to_checkpoint(src, root / "w4", "rtn", QuantSpec(4, 64), progress=False)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("bits,group", [(4, 64), (3, 128), (2, 32), (8, -1)])
def test_save_load_matches_in_memory_model(
    tmp_path: Path, arch: str, bits: int, group: int
) -> None:
    src = save_tiny_model(tmp_path / "src", arch)
    spec = QuantSpec(bits, group, sym=bits == 3)
    lm_head = arch == "mistral"  # untied head: quantize it too
    ckpt = quantize_to_checkpoint(
        src, tmp_path / "ckpt", "rtn", spec, lm_head=lm_head, progress=False
    )

    model = load_model(src).model
    quantized, _ = quantize_model(
        model, get_method("rtn"), spec, None, lm_head=lm_head, progress=False
    )
    swap_in_quant_linears(model, quantized)
    for p in model.parameters():  # the checkpoint keeps unquantized tensors in fp16
        p.data = p.data.half().float()
    loaded = load_checkpoint(ckpt, backend="reference")  # format fidelity; kernels: test_kernels_*
    n_quant = sum(isinstance(m, QuantLinear) for m in loaded.model.modules())
    assert n_quant == 2 * 7 + int(lm_head)
    with torch.no_grad():
        expected = model(IDS).logits
        got = loaded.model(IDS).logits
        fp = load_model(src).model(IDS).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # and quantization really changed the model (the comparison above is not vacuous)
    assert (got - fp).abs().max() > 1e-4


def test_manifest_records_method_hashes_and_layers(tiny_ckpt: Path) -> None:
    m = read_manifest(tiny_ckpt)
    assert m["format_version"] == 1 and m["method"]["name"] == "rtn"
    assert m["quantization"]["bits"] == 4 and m["quantization"]["group_size"] == 64
    assert len(m["source"]["sha256"]) == 64
    assert m["files"][WEIGHTS] == sha256_file(tiny_ckpt / WEIGHTS)
    entry = m["layers"]["model.layers.0.mlp.down_proj"]
    assert entry == {
        "format": "int",
        "bits": 4,
        "group_size": 64,
        "sym": False,
        "in_features": 160,
        "out_features": 96,
        "bias": False,
    }
    config = json.loads((tiny_ckpt / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitserve"


def _copy(ckpt: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(ckpt, tmp_path / "copy"))


def _rewrite_weights(ckpt: Path, change) -> None:  # type: ignore[no-untyped-def]
    """Rewrite model.safetensors through `change` and fix its checksum, so only the content is bad."""
    state = load_file(str(ckpt / WEIGHTS))
    change(state)
    save_file(state, str(ckpt / WEIGHTS))
    m = json.loads((ckpt / MANIFEST).read_text())
    m["files"][WEIGHTS] = sha256_file(ckpt / WEIGHTS)
    (ckpt / MANIFEST).write_text(json.dumps(m))


def test_flipped_byte_fails_checksum(tiny_ckpt: Path, tmp_path: Path) -> None:
    ckpt = _copy(tiny_ckpt, tmp_path)
    data = bytearray((ckpt / WEIGHTS).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (ckpt / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=r"model\.safetensors: SHA-256 mismatch"):
        load_checkpoint(ckpt)


def test_truncated_file(tiny_ckpt: Path, tmp_path: Path) -> None:
    ckpt = _copy(tiny_ckpt, tmp_path)
    data = (ckpt / WEIGHTS).read_bytes()
    (ckpt / WEIGHTS).write_bytes(data[: len(data) // 3])
    with pytest.raises(ChecksumError):
        load_checkpoint(ckpt)
    with pytest.raises(CorruptFileError, match="unreadable safetensors"):
        load_checkpoint(ckpt, verify=False)


def test_missing_tensor(tiny_ckpt: Path, tmp_path: Path) -> None:
    ckpt = _copy(tiny_ckpt, tmp_path)
    _rewrite_weights(ckpt, lambda s: s.pop("model.layers.1.self_attn.k_proj.scales"))
    with pytest.raises(MissingTensorError, match="model.layers.1.self_attn.k_proj.scales"):
        load_checkpoint(ckpt)


def test_wrong_shape(tiny_ckpt: Path, tmp_path: Path) -> None:
    ckpt = _copy(tiny_ckpt, tmp_path)
    key = "model.layers.0.mlp.up_proj.qweight"
    _rewrite_weights(ckpt, lambda s: s.__setitem__(key, s[key][:-1].contiguous()))
    with pytest.raises(
        ShapeMismatchError, match=r"up_proj.qweight' has shape \[11, 160\], expected \[12, 160\]"
    ):
        load_checkpoint(ckpt)


def test_unknown_format_version(tiny_ckpt: Path, tmp_path: Path) -> None:
    ckpt = _copy(tiny_ckpt, tmp_path)
    m = json.loads((ckpt / MANIFEST).read_text())
    m["format_version"] = 99
    (ckpt / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(UnsupportedFormatError, match="format version 99 is not supported"):
        load_checkpoint(ckpt)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(NotACheckpointError, match="not a bitserve checkpoint"):
        load_checkpoint(tmp_path)
    with pytest.raises(NotACheckpointError, match="not a directory"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(UsageError, match="not a bitserve checkpoint, a Hugging Face model folder"):
        load_model(tmp_path)


def test_refuses_to_overwrite_and_writes_atomically(tiny_ckpt: Path, tmp_path: Path) -> None:
    src = tiny_ckpt.parent / "src"
    with pytest.raises(UsageError, match="exists"):
        quantize_to_checkpoint(src, tiny_ckpt, "rtn", progress=False)
    with pytest.raises(UsageError, match="has no option 'iters'"):
        quantize_to_checkpoint(src, tmp_path / "x", "rtn", method_args={"iters": 3}, progress=False)
    assert not any(p.name.startswith("x") for p in tmp_path.iterdir())
