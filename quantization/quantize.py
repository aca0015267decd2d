"""From a source model to a packed checkpoint on disk: load, calibrate, quantize layer by layer,
swap in QuantLinear, save with a manifest."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from bitserve.errors import UsageError
from bitserve.models import load_model, resolve_source, source_hash
from bitserve.quantization.base import get_method
from bitserve.quantization.calibration import file_calibration, generated_calibration
from bitserve.quantization.checkpoint import (
    check_out_dir,
    require_unquantized,
    save_checkpoint,
)
from bitserve.quantization.grid import QuantSpec
from bitserve.quantization.pipeline import quantize_model, swap_in_quant_linears
from bitserve.quantization.tune import tune_scales

DEFAULT_METHOD = "rtn"


def quantize_to_checkpoint(
    src: str | Path,
    out: Path,
    method: str = DEFAULT_METHOD,
    spec: QuantSpec | None = None,
    calib: Path | None = None,
    nsamples: int = 128,
    seqlen: int = 512,
    seed: int = 0,
    lm_head: bool = False,
    method_args: dict[str, Any] | None = None,
    force: bool = False,
    progress: bool = True,
    tune_steps: int = 0,
) -> Path:
    """Quantize `src` (HF folder, .gguf or 'default') with `method` (W4 g128 unless `spec`) and
    write the checkpoint; with `tune_steps`, then tune its scales end to end (quantization/tune.py)
    on the same calibration windows."""
    spec = spec or QuantSpec(4, 128)
    m = get_method(method)
    unknown = sorted(set(method_args or {}) - set(m.defaults))
    if unknown:
        accepted = ", ".join(sorted(m.defaults)) or "none"
        raise UsageError(f"method {m.name!r} has no option {unknown[0]!r} (accepted: {accepted})")
    check_out_dir(Path(out), force)
    if tune_steps < 0:
        raise UsageError(f"--tune-steps must be >= 0, got {tune_steps}")
    if tune_steps > 0 and not m.tunable:
        raise UsageError(
            f"--tune-steps: method {m.name!r} writes no int (QuantLinear) layers, whose group "
            "scales are what tuning learns"
        )
    if calib is not None and not (m.needs_calibration or tune_steps > 0):
        raise UsageError(
            f"--calib {calib}: method {m.name!r} uses no calibration data (drop --calib, or tune "
            "on it with --tune-steps N)"
        )
    if nsamples < 1 or seqlen < 1:
        raise UsageError(f"--nsamples and --seqlen must be >= 1, got {nsamples} and {seqlen}")
    source = resolve_source(src)
    require_unquantized(source)
    t0 = time.perf_counter()
    loaded = load_model(source)
    model, tokenizer = loaded.model, loaded.tokenizer
    calib_ids, calib_info = None, None
    if m.needs_calibration or tune_steps > 0:
        if calib is not None:
            calib_ids, calib_info = file_calibration(tokenizer, calib, nsamples, seqlen, seed)
        else:
            calib_ids, calib_info = generated_calibration(model, tokenizer, nsamples, seqlen, seed)
    options = {**m.defaults, **(method_args or {})}
    with torch.no_grad():
        quantized, block_times = quantize_model(
            model, m, spec, calib_ids, options, seed=seed, lm_head=lm_head, progress=progress
        )
        swap_in_quant_linears(model, quantized)
    wall = time.perf_counter() - t0
    tuned = None
    if tune_steps > 0:
        assert calib_ids is not None
        teacher = load_model(source).model
        tuned = tune_scales(model, teacher, calib_ids, tune_steps, seed=seed, progress=progress)
    manifest = {
        "method": {
            "name": m.name,
            "args": options,
            "seed": seed,
            "wall_time_s": round(wall, 2),
            "blocks_wall_time_s": round(sum(block_times.values()), 2),
        },
        "quantization": {**asdict(spec), "method": m.name, "lm_head": lm_head},
        "calibration": calib_info,
        "source": {"path": str(loaded.path), "sha256": source_hash(loaded.path)},
        "quality": None,
    }
    if tuned is not None:
        manifest["tune"] = {**tuned, "calibration": calib_info}
    return save_checkpoint(model, tokenizer, out, manifest, force=force)
