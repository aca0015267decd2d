"""The packed checkpoint: write it atomically with a checksummed manifest, verify it, and load
it straight into QuantLinear modules of a model built on the meta device (the fp32 model is
never materialised). See docs/checkpoint-format.md for the layout."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from bitserve import __version__
from bitserve.errors import (
    ChecksumError,
    CorruptFileError,
    MissingTensorError,
    NotACheckpointError,
    ShapeMismatchError,
    UnsupportedFormatError,
    UsageError,
)
from bitserve.kernels import BACKENDS, QuantLinear
from bitserve.kernels.bcq_linear import BCQ_BACKENDS, bcq_from_entry
from bitserve.quantization.pipeline import set_module

FORMAT = "bitserve-packed"
FORMAT_VERSION = 1
MANIFEST = "bitserve-manifest.json"
WEIGHTS = "model.safetensors"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _int_layer(entry: dict[str, Any], device: str) -> nn.Module:
    return QuantLinear(
        entry["in_features"],
        entry["out_features"],
        entry["bits"],
        entry["group_size"],
        entry.get("bias", False),
        entry.get("sym", False),
        device=device,
    )


# Manifest layer "format" -> constructor of an empty module (on `device`) that loads it. A
# quantized module exposes manifest_entry() -> dict with at least "format".
LAYER_FORMATS: dict[str, Callable[[dict[str, Any], str], nn.Module]] = {"int": _int_layer}
LAYER_FORMATS["bcq"] = bcq_from_entry


def layer_entries(model: PreTrainedModel) -> dict[str, dict[str, Any]]:
    """Per-layer format of every quantized module in the model, as the manifest records it."""
    return {
        name: m.manifest_entry()
        for name, m in model.named_modules()
        if callable(getattr(m, "manifest_entry", None))
    }


def _state_to_save(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """State dict in 16 bits (fp16 for float tensors), the tied lm_head left out."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    out: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue
        if t.is_floating_point():
            t = t.to(torch.float16)
        out[key] = t.detach().contiguous().cpu()
    return out


def save_checkpoint(
    model: PreTrainedModel,
    tokenizer: Any,
    out_dir: Path,
    manifest: dict[str, Any],
    force: bool = False,
) -> Path:
    """Write model.safetensors, config.json (with quantization_config), the tokenizer and the
    manifest into `out_dir`, via a temporary directory renamed into place."""
    out_dir = Path(out_dir)
    check_out_dir(out_dir, force)
    return write_folder(out_dir, lambda tmp: _write_files(model, tokenizer, tmp, manifest))


def write_folder(out_dir: Path, write: Callable[[Path], None]) -> Path:
    """Have `write` fill a temporary folder beside `out_dir`, then put it in `out_dir`'s place
    (replacing what was there): an interrupted or failed write leaves no partial folder behind,
    and never one that looks complete."""
    tmp = out_dir.with_name(out_dir.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out_dir)
    return out_dir


def _write_files(
    model: PreTrainedModel, tokenizer: Any, tmp: Path, manifest: dict[str, Any]
) -> None:
    """Every file of the checkpoint into `tmp`, the manifest (with their digests) last."""
    layers = layer_entries(model)
    quant = manifest.get("quantization", {})
    config = model.config
    config.quantization_config = {
        "quant_method": "bitserve",
        "format_version": FORMAT_VERSION,
        **quant,
    }
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    save_file(
        _state_to_save(model),
        str(tmp / WEIGHTS),
        metadata={"format": "pt", "bitserve_format": str(FORMAT_VERSION)},
    )
    _sort_metadata(tmp / WEIGHTS)
    full = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "bitserve_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **manifest,
        "layers": layers,
        "files": {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()},
    }
    (tmp / MANIFEST).write_text(json.dumps(full, indent=2))


def _sort_metadata(path: Path) -> None:
    """Rewrite a safetensors header with its metadata keys sorted, in place (same length):
    safetensors writes them in hash order, which changes from run to run, so the same weights
    would get another SHA-256 each time."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= size:  # the same entries: never longer
            f.seek(8)
            f.write(text.ljust(size, b" "))


def check_out_dir(out_dir: Path, force: bool) -> None:
    """Refuse an output directory that cannot take a checkpoint before any work is done: one
    that exists (without `force`), a file, or a folder with files that is not a checkpoint
    (`force` would delete it: the source model, a project); or one below a file."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise UsageError(f"{out_dir} exists (pass --force to overwrite)")
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{out_dir} is a file, not a checkpoint directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not looks_like_checkpoint(out_dir):
        raise UsageError(
            f"{out_dir} is not a bitserve checkpoint: --force only replaces checkpoints "
            "(choose another --out)"
        )
    above = next((p for p in out_dir.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise UsageError(f"{out_dir}: {above} is a file, not a directory")


def _unreadable(path: Path, why: object) -> CorruptFileError:
    return CorruptFileError(f"{path}: unreadable safetensors file ({why})")


def tensor_bytes(path: Path) -> dict[str, int]:
    """Stored bytes of every tensor of a safetensors file, read from its header alone."""
    try:
        with safe_open(str(path), framework="pt", device="cpu"):
            pass  # safetensors checks the whole header (its JSON, every entry's fields)
    except SafetensorError as e:
        raise _unreadable(path, e) from None
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return {
        k: v["data_offsets"][1] - v["data_offsets"][0]
        for k, v in header.items()
        if k != "__metadata__"
    }


def _safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, or {} if it cannot be read."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size <= 100 * 2**20:
                return {}
            header = json.loads(f.read(size))
    except (OSError, ValueError):  # ValueError: bad JSON or UTF-8
        return {}
    return header if isinstance(header, dict) else {}


def bitserve_marker(path: Path) -> str | None:
    """Why the folder `path` looks like a bitserve checkpoint whatever its manifest says (its
    config.json or its weights were written by bitserve), or None when nothing does."""
    path = Path(path)
    quant: Any = None
    try:
        config = json.loads((path / "config.json").read_text())
        quant = config.get("quantization_config") if isinstance(config, dict) else None
    except (OSError, ValueError):
        pass
    if isinstance(quant, dict):  # another quantizer's model (GPTQ, AWQ...) is not ours
        method = quant.get("quant_method")
        return f"config.json has quant_method {method!r}" if method == "bitserve" else None
    for f in sorted(path.glob("*.safetensors")):
        header = _safetensors_header(f)
        if "bitserve_format" in (header.get("__metadata__") or {}):
            return f"{f.name} was written by bitserve"
        packed = next((k for k in header if k.endswith((".qweight", ".qzeros"))), None)
        if packed is not None:
            return f"{f.name} holds packed tensors such as {packed!r}"
    return None


def is_checkpoint(path: Path) -> bool:
    return Path(path, MANIFEST).is_file()


def looks_like_checkpoint(path: Path) -> bool:
    """A checkpoint, complete or not: loaders must read it as one (and fail cleanly if its
    manifest is missing), never as a plain model with freshly initialised layers."""
    return Path(path).is_dir() and (is_checkpoint(path) or bitserve_marker(path) is not None)


def require_unquantized(path: Path) -> None:
    """Refuse to quantize (again) a source that is already a bitserve checkpoint."""
    if looks_like_checkpoint(path):
        raise UsageError(
            f"{path}: already a quantized checkpoint; quantizing needs the unquantized model"
        )


def read_manifest(path: Path) -> dict[str, Any]:
    path = Path(path)
    mpath = path / MANIFEST
    if not path.is_dir():
        raise NotACheckpointError(f"{path}: not a directory")
    if not mpath.is_file():
        marker = bitserve_marker(path)
        if marker is not None:
            raise NotACheckpointError(
                f"{path}: not a bitserve checkpoint: {MANIFEST} is missing, though {marker} "
                "(an incomplete copy, or another tool's packed weights? bitserve loads its own "
                "checkpoints and unquantized models: quantize the source model again)"
            )
        raise NotACheckpointError(f"{path}: not a bitserve checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"{mpath}: manifest is not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise CorruptFileError(f"{mpath}: manifest is not a JSON object")
    if manifest.get("format") != FORMAT:
        raise NotACheckpointError(
            f"{mpath}: format is {manifest.get('format')!r}, expected {FORMAT!r}"
        )
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UnsupportedFormatError(
            f"{mpath}: format version {manifest.get('format_version')!r} is not supported "
            f"(this bitserve reads version {FORMAT_VERSION})"
        )
    _check_manifest_fields(mpath, manifest)
    return manifest


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_manifest_fields(mpath: Path, manifest: dict[str, Any]) -> None:
    """The fields loaders rely on, with the right types: `layers` maps names to entries with a
    format and positive sizes, `files` maps file names to digests."""
    layers, files = manifest.get("layers"), manifest.get("files")
    if not isinstance(layers, dict) or not isinstance(files, dict):
        raise CorruptFileError(f"{mpath}: 'layers' and 'files' must be JSON objects")
    if not all(isinstance(digest, str) for digest in files.values()):
        raise CorruptFileError(f"{mpath}: every 'files' digest must be a string")
    for name, entry in layers.items():
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("format"), str)
            and _positive_int(entry.get("in_features"))
            and _positive_int(entry.get("out_features"))
        ):
            raise CorruptFileError(
                f"{mpath}: layer {name} needs a format and positive in_features and out_features"
            )


def update_manifest(path: Path, **fields: Any) -> dict[str, Any]:
    """Add or replace top-level manifest fields (e.g. the quality report) in place."""
    manifest = read_manifest(path)
    manifest.update(fields)
    tmp = Path(path, MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(Path(path, MANIFEST))
    return manifest


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Check the manifest and the SHA-256 of every file it lists; returns the manifest."""
    manifest = read_manifest(path)
    unlisted = [name for name in ("config.json", WEIGHTS) if name not in manifest["files"]]
    if unlisted:
        raise ChecksumError(
            f"{Path(path, MANIFEST)}: no SHA-256 for {', '.join(unlisted)}, so it cannot be "
            "verified (the manifest was edited)"
        )
    for name, digest in manifest["files"].items():
        f = Path(path, name)
        if not f.is_file():
            raise MissingTensorError(f"{f}: file listed in the manifest is missing")
        actual = sha256_file(f)
        if actual != digest:
            raise ChecksumError(
                f"{f}: SHA-256 mismatch (manifest {digest[:12]}…, file {actual[:12]}…): the file is corrupt or was modified"
            )
    return manifest


def backend_names() -> list[str]:
    """What --backend accepts on this machine: 'auto' and every registered kernel backend."""
    return ["auto", *sorted(set(BACKENDS) | set(BCQ_BACKENDS))]


def check_backend(name: str) -> str:
    """`name` if it is a backend this machine has, else a UsageError listing those it has."""
    names = backend_names()
    if name not in names:
        raise UsageError(f"--backend {name}: unknown backend (available here: {', '.join(names)})")
    return name


def set_backends(model: nn.Module, backend: str = "auto") -> None:
    """Let every quantized module pick (and prepare) its kernel backend."""
    check_backend(backend)
    for m in model.modules():
        setter = getattr(m, "set_backend", None)
        if callable(setter):
            try:
                setter(backend)
            except ValueError as e:  # the backend asked for cannot run this layer
                if backend == "auto":
                    raise
                raise UsageError(f"--backend {backend}: {e}") from None


@dataclass
class Loaded:
    """A model ready to run, its tokenizer, and the checkpoint manifest (None if unquantized)."""

    model: PreTrainedModel
    tokenizer: Any
    manifest: dict[str, Any] | None
    path: Path


def _meta_model(path: Path, manifest: dict[str, Any]) -> PreTrainedModel:
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    for name, entry in manifest["layers"].items():
        try:
            model.get_submodule(name)
        except AttributeError:
            raise CorruptFileError(
                f"{path / MANIFEST}: layer {name} does not exist in the model"
            ) from None
        fmt = entry.get("format")
        if fmt not in LAYER_FORMATS:
            raise UnsupportedFormatError(
                f"{path / MANIFEST}: layer {name} has unknown format {fmt!r}"
            )
        try:
            module = LAYER_FORMATS[fmt](entry, "meta")
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
            raise CorruptFileError(
                f"{path / MANIFEST}: layer {name} has a bad {fmt!r} entry ({type(e).__name__}: {e})"
            ) from None
        set_module(model, name, module)
    return model


def load_checkpoint(
    path: Path,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
    verify: bool = True,
) -> Loaded:
    """Load a packed checkpoint into QuantLinear modules, checking every tensor's presence and
    shape against the model the config describes."""
    path = Path(path)
    manifest = verify_checkpoint(path) if verify else read_manifest(path)
    model = _meta_model(path, manifest)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    expected = {
        k: tuple(v.shape)
        for k, v in model.state_dict().items()
        if not (tied and k == "lm_head.weight")
    }
    quant_prefixes = tuple(f"{name}." for name in manifest["layers"])
    wfile = path / WEIGHTS
    if not wfile.is_file():
        raise MissingTensorError(f"{wfile}: weights file is missing")
    state: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(wfile), framework="pt", device="cpu") as f:
            keys = set(f.keys())
            for key, shape in expected.items():
                if key not in keys:
                    raise MissingTensorError(f"{wfile}: missing tensor {key!r}")
                got = tuple(f.get_slice(key).get_shape())
                if got != shape:
                    raise ShapeMismatchError(
                        f"{wfile}: tensor {key!r} has shape {list(got)}, expected {list(shape)}"
                    )
            extra = keys - set(expected)
            if extra:
                raise CorruptFileError(f"{wfile}: unexpected tensors {sorted(extra)[:3]}")
            for key in expected:
                t = f.get_tensor(key)
                # Quantized modules keep their stored 16-bit scales; everything else runs in dtype.
                if t.is_floating_point() and (
                    not key.startswith(quant_prefixes) or key.endswith(".bias")
                ):
                    t = t.to(dtype)
                state[key] = t.to(device)
    except SafetensorError as e:
        raise _unreadable(wfile, e) from None
    model.load_state_dict(state, strict=False, assign=True)
    del state
    if tied:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    model.to(device)  # type: ignore[arg-type]
    leftover = [
        n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta
    ]
    if leftover:
        raise MissingTensorError(f"{wfile}: no data for {leftover[:3]}")
    set_backends(model, backend)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return Loaded(model, tokenizer, manifest, path)
