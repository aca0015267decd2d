"""Export a bitserve checkpoint to compressed-tensors' "pack-quantized" layout: the format
llm-compressor writes and vLLM serves with its WNA16 kernels (not run here), which transformers
loads through the compressed-tensors package. The library packs: it rounds our dequantized weight
with our scales and zero points, which gives back our codes (tests/test_export.py checks them
exactly)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from bitserve.errors import UsageError
from bitserve.kernels.quant_linear import QuantLinear
from bitserve.kernels.reference import dequantized_weight

log = logging.getLogger("bitserve")
WEIGHTS = "model.safetensors"
MARKER = "bitserve_export"  # in the weights' metadata: what `export --force` may replace


def _is_export(path: Path) -> bool:
    """Whether `path` holds an earlier export (its weights carry our marker)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path / WEIGHTS), framework="pt") as f:
            return MARKER in (f.metadata() or {})
    except (OSError, SafetensorError):
        return False


def _weight_args(layer: QuantLinear) -> Any:
    """The compressed-tensors QuantizationArgs of one of our int layers."""
    from compressed_tensors.quantization import QuantizationArgs

    per_channel = layer.group_size == -1 or layer.group_size >= layer.in_features
    return QuantizationArgs(
        num_bits=layer.bits,
        type="int",
        symmetric=layer.sym,
        strategy="channel" if per_channel else "group",
        group_size=None if per_channel else layer.group_size,
    )


def _check_exportable(model: torch.nn.Module) -> dict[str, QuantLinear]:
    """The model's int layers; UsageError for what the layout cannot hold."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    others = [
        (n, m.manifest_entry().get("format"))
        for n, m in model.named_modules()
        if not isinstance(m, QuantLinear) and hasattr(m, "manifest_entry")
    ]
    if others:
        name, fmt = others[0]
        raise UsageError(
            f"{name} is a {fmt!r} layer: compressed-tensors holds int layers (codes, group "
            "scales and zero points) only"
        )
    for name, m in layers.items():
        g = m.group_size
        if 0 < g < m.in_features and m.in_features % g:
            raise UsageError(
                f"{name}: group size {g} does not divide its {m.in_features} inputs (a short "
                "last group), which compressed-tensors and vLLM cannot hold; quantize with a "
                "group size that divides every layer's inputs (e.g. 32 or 64 here)"
            )
    return layers


def export_compressed_tensors(ckpt: Path, out: Path, force: bool = False) -> Path:
    """Write `out`: config.json (with compressed-tensors' quantization_config), the tokenizer,
    generation config and model.safetensors; int layers as weight_packed / weight_scale /
    weight_shape (/ weight_zero_point when asymmetric), everything else as stored (fp16)."""
    try:
        from compressed_tensors.compressors import PackedQuantizationCompressor
        from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme
    except ImportError:
        raise UsageError(
            "export needs the compressed-tensors package: pip install 'bitserve[export]'"
        ) from None

    from bitserve.models import load_model
    from bitserve.quantization.checkpoint import check_out_dir, is_checkpoint, write_folder

    ckpt, out = Path(ckpt), Path(out)
    if not is_checkpoint(ckpt):
        raise UsageError(f"{ckpt}: not a bitserve checkpoint (export reads one)")
    if out.resolve() == ckpt.resolve():
        raise UsageError(f"--out {out} is the checkpoint itself; choose another folder")
    if not out.exists():
        check_out_dir(out, force)  # e.g. a path below a file
    elif not force:
        raise UsageError(f"{out} exists (pass --force to overwrite)")
    elif not out.is_dir():
        raise UsageError(f"{out} is a file, not a folder")
    elif any(out.iterdir()) and not _is_export(out):
        raise UsageError(f"{out} is not an earlier export: --force replaces only those")
    loaded = load_model(ckpt, backend="reference")
    model = loaded.model
    layers = _check_exportable(model)
    if not all(m.sym for m in layers.values()):
        log.warning(
            "asymmetric layers: vLLM loads them, transformers with compressed-tensors 0.20 does "
            "not (quantize with --sym for transformers)"
        )
    state: dict[str, torch.Tensor] = {}
    groups: dict[str, tuple[Any, list[str]]] = {}
    for name, m in layers.items():
        args = _weight_args(m)
        key = json.dumps(args.model_dump(), sort_keys=True)
        groups.setdefault(key, (args, []))[1].append(name)
        # theirs: w = (c - zp) * scale with signed codes c = q - 2^(b-1), zp = z - 2^(b-1)
        half = 1 << (m.bits - 1)
        zero = (m.zero_codes().t().to(torch.int16) - half).to(torch.int8).contiguous()
        tensors = {
            "weight": dequantized_weight(m),
            "weight_scale": m.scales.t().contiguous(),
            "weight_zero_point": zero,
        }
        scheme = QuantizationScheme(targets=[name], weights=args)
        for k, v in PackedQuantizationCompressor.compress(tensors, scheme).items():
            state[f"{name}.{k}"] = v.contiguous()
        if m.bias is not None:
            state[f"{name}.bias"] = m.bias.to(torch.float16).contiguous()
    prefixes = tuple(f"{n}." for n in layers)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for k, v in model.state_dict().items():
        if k.startswith(prefixes) or (tied and k == "lm_head.weight"):
            continue
        state[k] = (v.to(torch.float16) if v.is_floating_point() else v).contiguous()
    config_groups = {
        f"group_{i}": QuantizationScheme(targets=names, weights=args)
        for i, (args, names) in enumerate(groups.values())
    }
    qconfig = QuantizationConfig(
        config_groups=config_groups,
        format="pack-quantized",
        quantization_status="compressed",
        ignore=[] if "lm_head" in layers else ["lm_head"],
    )
    model.config.quantization_config = qconfig.model_dump(exclude_none=True)
    model.config.dtype = torch.float16

    def write(tmp: Path) -> None:
        model.config.save_pretrained(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt", MARKER: "1"})

    return write_folder(out, write)


def cmd_export(args: Any) -> int:
    print(export_compressed_tensors(Path(args.checkpoint), Path(args.out), force=args.force))
    return 0


def add_parser(sub: Any) -> None:
    """Register the `export` sub-command."""
    e = sub.add_parser(
        "export",
        help="write a checkpoint in compressed-tensors' pack-quantized layout (vLLM, transformers)",
        description="Convert a bitserve checkpoint of int layers into a Hugging Face folder in "
        "compressed-tensors' pack-quantized layout, which vLLM serves with its own kernels and "
        "transformers loads through the compressed-tensors package. Codes, scales and zero "
        "points are carried over exactly. Needs group sizes that divide every layer's inputs; "
        "vLLM's kernels take 4- and 8-bit weights.",
    )
    e.add_argument("checkpoint", help="bitserve checkpoint directory with int layers")
    e.add_argument("--out", required=True, help="folder to write (a Hugging Face model folder)")
    e.add_argument(
        "--force", action="store_true", help="replace --out if it holds an earlier export"
    )
    e.set_defaults(func=cmd_export)
