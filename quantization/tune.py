"""End-to-end scale tuning: after block-wise quantization, learn every int layer's group scales
on the whole model's output, by distillation from the unquantized model (KL divergence of the
next-token distributions) on calibration windows. Codes and zero points stay fixed, so the
checkpoint format is unchanged. This is EfficientQAT's end-to-end step (E2E-QP, arXiv
2407.11062) with the teacher's distribution in place of the labels: block-wise methods fit each
block alone, while this corrects how the blocks' errors add up in the logits."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from bitserve.errors import UsageError
from bitserve.kernels.packing import group_index
from bitserve.kernels.quant_linear import QuantLinear
from bitserve.quantization.pipeline import set_module

DEFAULT_STEPS = 64
DEFAULT_LR = 2e-3
PROBE_WINDOWS = 2  # calibration windows whose KL to the source is recorded before and after


class _ScaledLinear(nn.Module):
    """A QuantLinear as fixed integer offsets (code - zero) [N, K] times learnable group scales:
    scale = stored scale * (1 + factor), the factor trained from 0."""

    group_of: torch.Tensor
    offsets: torch.Tensor
    base: torch.Tensor

    def __init__(self, layer: QuantLinear) -> None:
        super().__init__()
        self.layer = layer
        group_of = group_index(layer.in_features, layer.group_size, layer.scales.device)
        self.register_buffer("group_of", group_of)
        offsets = layer.codes().float() - layer.zero_codes().float()[self.group_of]
        self.register_buffer("offsets", offsets.t().contiguous())
        self.register_buffer("base", layer.scales.float().t().contiguous())  # [N, G]
        self.factor = nn.Parameter(torch.zeros_like(self.base))

    def scales(self) -> torch.Tensor:
        """The tuned scales in the checkpoint's layout, fp16 [G, N]."""
        return (self.base * (1 + self.factor)).t().half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.offsets * (self.base * (1 + self.factor))[:, self.group_of]
        return F.linear(x, w, self.layer.bias)


def _kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions, averaged over positions."""
    t = teacher_logits.float().log_softmax(-1)
    s = student_logits.float().log_softmax(-1)
    return (t.exp() * (t - s)).sum(-1).mean()


def _check(steps: int, lr: float, batch_size: int) -> None:
    if steps < 1 or not 0 < lr < math.inf or batch_size < 1:
        raise UsageError("tune: need steps >= 1, a finite lr > 0 and batch size >= 1")


def tune_scales(
    model: nn.Module,
    teacher: nn.Module,
    ids: torch.Tensor,
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    batch_size: int = 1,
    seed: int = 0,
    amp: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Tune the scales of `model`'s QuantLinear layers in place (Adam, linear decay to 0) so that
    its next-token distributions on `ids` [n, L] match `teacher`'s; returns what to record."""
    _check(steps, lr, batch_size)
    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    if not names:
        raise UsageError("tune: the model has no int (QuantLinear) layers to tune")
    t0 = time.perf_counter()
    wrapped = {n: _ScaledLinear(model.get_submodule(n)) for n in names}
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for n, w in wrapped.items():
        set_module(model, n, w)
    factors = [w.factor for w in wrapped.values()]
    opt = torch.optim.Adam(factors, lr=lr)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    gen = torch.Generator().manual_seed(seed)
    passes = -(-steps * batch_size // ids.shape[0])
    order = torch.cat([torch.randperm(ids.shape[0], generator=gen) for _ in range(passes)])
    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=amp)
    probe = ids[:PROBE_WINDOWS].to(device)
    with torch.no_grad(), autocast:
        probe_target = teacher(input_ids=probe, use_cache=False).logits

    def probe_kl() -> float:
        with torch.no_grad(), autocast:
            return float(_kl(probe_target, model(input_ids=probe, use_cache=False).logits))

    kl_before = probe_kl()
    bar = tqdm(range(steps), desc="tune scales", unit="step", disable=not progress)
    try:
        for step in bar:
            batch = ids[order[step * batch_size : (step + 1) * batch_size]].to(device)
            with torch.no_grad(), autocast:
                target = teacher(input_ids=batch, use_cache=False).logits
            with autocast:
                logits = model(input_ids=batch, use_cache=False).logits
            loss = _kl(target, logits)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            decay.step()
            bar.set_postfix(kl=f"{float(loss.detach()):.4f}")
        kl_after = probe_kl()
    finally:
        with torch.no_grad():
            for n, w in wrapped.items():
                w.layer.scales.copy_(w.scales())
                w.layer.set_backend(w.layer.backend)  # a prepared copy may hold the old scales
                set_module(model, n, w.layer)
        for n, p in model.named_parameters():
            p.requires_grad_(trainable[n])
    return {
        "steps": steps,
        "lr": lr,
        "batch_size": batch_size,
        "seed": seed,
        "layers": len(names),
        "kl_before": round(kl_before, 5),
        "kl_after": round(kl_after, 5),
        "wall_time_s": round(time.perf_counter() - t0, 2),
    }


def tune_checkpoint(
    ckpt: Path,
    out: Path,
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    batch_size: int = 1,
    source: str | None = None,
    calib: Path | None = None,
    nsamples: int | None = None,
    seqlen: int | None = None,
    seed: int | None = None,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Tune an existing checkpoint's scales against its source model and write a new one.
    Calibration defaults to the checkpoint's own windows (same file, count, length and seed)."""
    from bitserve.models import load_model, resolve_source, source_hash
    from bitserve.quantization.calibration import file_calibration
    from bitserve.quantization.checkpoint import check_out_dir, read_manifest, save_checkpoint

    _check(steps, lr, batch_size)
    check_out_dir(Path(out), force)
    manifest = read_manifest(Path(ckpt))
    recorded = manifest.get("calibration") or {}
    if calib is not None and not Path(calib).is_file():
        raise UsageError(f"{calib}: no such file")
    path = calib or (Path(recorded["path"]) if recorded.get("source") == "file" else None)
    if path is None:
        how = "without calibration" if not recorded else f"on {recorded.get('source')} calibration"
        raise UsageError(
            f"{ckpt} was quantized {how}, so there are no windows to reuse: pass --calib FILE"
        )
    if not Path(path).is_file():
        raise UsageError(
            f"{ckpt}: its calibration file {path} is not available here; pass --calib FILE"
        )
    src = source or manifest.get("source", {}).get("path")
    if not src or (src != "default" and not Path(src).exists()):
        raise UsageError(f"{ckpt}: source model {src!r} not found here; pass --source")
    expected = manifest.get("source", {}).get("sha256")
    if expected and source_hash(resolve_source(src)) != expected:
        raise UsageError(
            f"{src}: not the model {ckpt} was quantized from (its SHA-256 differs from the "
            "manifest's source.sha256); pass that model as --source"
        )
    loaded = load_model(ckpt, backend="reference")
    teacher = load_model(src).model
    seed = recorded.get("seed", 0) if seed is None else seed
    ids, info = file_calibration(
        loaded.tokenizer,
        Path(path),
        nsamples or recorded.get("nsamples", 128),
        seqlen or recorded.get("seqlen", 512),
        seed,
    )
    stats = tune_scales(
        loaded.model, teacher, ids, steps, lr, batch_size, seed=seed, progress=progress
    )
    written = ("format", "format_version", "bitserve_version", "created", "layers", "files")
    kept = {k: v for k, v in manifest.items() if k not in written}
    kept.update(tune={**stats, "calibration": info}, quality=None)
    return save_checkpoint(loaded.model, loaded.tokenizer, Path(out), kept, force=force)


def cmd_tune(args: Any) -> int:
    out = tune_checkpoint(
        Path(args.checkpoint),
        Path(args.out),
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        source=args.source,
        calib=args.calib,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        seed=args.seed,
        force=args.force,
    )
    print(out)
    return 0


def add_parser(sub: Any) -> None:
    """Register the `tune` sub-command."""
    from bitserve.cli import int_at_least, seed_value

    t = sub.add_parser(
        "tune",
        help="tune a checkpoint's scales end to end against its unquantized source model",
        description="Learn every int layer's group scales so that the quantized model's "
        "next-token distributions match the source model's on calibration text (KL divergence, "
        "Adam, linear decay). Codes and zero points are kept, so the result loads into the same "
        "kernels. Most useful at 2 and 3 bits, after a block-wise method such as signround.",
    )
    t.add_argument("checkpoint", help="bitserve checkpoint directory with int layers")
    t.add_argument("--out", required=True, help="checkpoint directory to write")
    t.add_argument(
        "--steps", type=int, default=DEFAULT_STEPS, help="optimizer steps (default %(default)s)"
    )
    t.add_argument(
        "--lr",
        type=float,
        default=DEFAULT_LR,
        help="Adam learning rate on the relative scale change (default %(default)s)",
    )
    t.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="calibration windows per step (default %(default)s)",
    )
    t.add_argument("--source", help="unquantized model (default: the manifest's source path)")
    t.add_argument("--calib", type=Path, help="calibration text (default: the checkpoint's own)")
    t.add_argument(
        "--nsamples", type=int_at_least(1), help="calibration windows (default: the checkpoint's)"
    )
    t.add_argument(
        "--seqlen", type=int_at_least(1), help="tokens per window (default: the checkpoint's)"
    )
    t.add_argument(
        "--seed", type=seed_value, help="window sampling and order (default: the checkpoint's)"
    )
    t.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    t.set_defaults(func=cmd_tune)
