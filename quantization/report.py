"""`bitserve report`: quantize one source model with several methods and bit widths, measure
each checkpoint's perplexity next to the unquantized source, and write report.json, report.md
and report.png (perplexity against bits per weight, one line per method)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from bitserve.errors import UsageError
from bitserve.models import load_model, resolve_source, source_files
from bitserve.quantization.base import get_method
from bitserve.quantization.checkpoint import read_manifest, require_unquantized
from bitserve.quantization.eval import perplexity
from bitserve.quantization.grid import QuantSpec
from bitserve.quantization.quantize import quantize_to_checkpoint
from bitserve.quantization.tune import tune_checkpoint

BITS = (2, 3, 4, 8)
GROUPS = (-1, 32, 64, 128)


def _int_list(text: str, allowed: tuple[int, ...], what: str) -> list[int]:
    """Parse '4,3' into [4, 3], each value one of `allowed`."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{what} must be comma-separated integers, got {text!r}") from None
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise UsageError(f"{what} {text!r}: each value must be one of {list(allowed)}")
    return values


def dir_size(path: Path) -> int:
    """Bytes of all files under `path` (or of the file itself)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def bits_per_weight(model: torch.nn.Module) -> float:
    """Average storage bits per decoder-linear weight: the quantized modules' own count
    (codes plus group scales and zeros), or the dtype's width for an unquantized model."""
    total, count = 0.0, 0
    for m in model.modules():
        cost = getattr(m, "bits_per_weight", None)
        if callable(cost):
            n = int(getattr(m, "in_features")) * int(getattr(m, "out_features"))  # noqa: B009
            total += float(cost()) * n
            count += n
    if count:
        return total / count
    return float(next(model.parameters()).element_size() * 8)


def _evaluate(src: str | Path, args: argparse.Namespace) -> tuple[float, float]:
    """Perplexity of a model or checkpoint on --text, and its bits per weight."""
    loaded = load_model(src)
    result = perplexity(
        loaded.model,
        loaded.tokenizer,
        args.text,
        args.seqlen,
        args.max_windows,
        progress=not args.quiet,
    )
    return result["perplexity"], bits_per_weight(loaded.model)


def run_report(args: argparse.Namespace) -> dict[str, Any]:
    """Quantize, evaluate and tabulate every method x bits x group size; returns report.json."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise UsageError(f"--methods {args.methods!r}: no method names")
    untunable = [m for m in methods if not get_method(m).tunable]
    if args.tune_steps < 0:
        raise UsageError(f"--tune-steps must be >= 0, got {args.tune_steps}")
    if args.tune_steps and (untunable or args.calib is None):
        why = f"{untunable[0]} writes no int layers" if untunable else "it needs --calib FILE"
        raise UsageError(f"--tune-steps: {why}")
    bits = _int_list(args.bits, BITS, "--bits")
    groups = _int_list(args.group_size, GROUPS, "--group-size")
    src = resolve_source(args.model)
    require_unquantized(src)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fp_ppl, fp_bits = _evaluate(src, args)
    report: dict[str, Any] = {
        "source": str(src),
        "text": str(args.text),
        "seqlen": args.seqlen,
        "max_windows": args.max_windows,
        "calibration": str(args.calib) if args.calib else "self-generated",
        "nsamples": args.nsamples,
        "seed": args.seed,
        "full_precision": {
            "perplexity": fp_ppl,
            "bits_per_weight": fp_bits,
            "size_bytes": sum(f.stat().st_size for f in source_files(src)),
        },
        "results": [],
    }
    # Calibration and output options shared by quantizing and tuning.
    common: dict[str, Any] = {
        "calib": args.calib,
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "seed": args.seed,
        "force": True,
        "progress": not args.quiet,
    }
    for method in methods:
        for b in bits:
            for g in groups:
                spec = QuantSpec(b, g)
                ckpt = out / "checkpoints" / f"{method}-{spec.label()}"
                # --calib goes to the methods that read it (and to tuning, below)
                calib = args.calib if get_method(method).needs_calibration else None
                quantize_to_checkpoint(src, ckpt, method, spec, **{**common, "calib": calib})
                seconds = read_manifest(ckpt)["method"]["wall_time_s"]
                rows = [(method, ckpt, seconds)]
                if args.tune_steps:  # the same checkpoint, its scales then tuned end to end
                    tuned = ckpt.with_name(f"{ckpt.name}-tune{args.tune_steps}")
                    tune_checkpoint(ckpt, tuned, args.tune_steps, **common)
                    extra = read_manifest(tuned)["tune"]["wall_time_s"]
                    rows.append((f"{method}+tune{args.tune_steps}", tuned, seconds + extra))
                for name, path, wall in rows:
                    ppl, bpw = _evaluate(path, args)
                    row = {
                        "method": name,
                        "bits": b,
                        "group_size": g,
                        "perplexity": ppl,
                        "delta_pct": 100 * (ppl / fp_ppl - 1),
                        "size_bytes": dir_size(path),
                        "bits_per_weight": bpw,
                        "quant_seconds": wall,
                        "checkpoint": str(path),
                    }
                    report["results"].append(row)
                    if not args.quiet:
                        print(json.dumps(row))
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report))
    plot(report, out / "report.png")
    return report


def markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown table, full precision first."""
    fp = report["full_precision"]
    lines = [
        f"# Quantization report: {report['source']}",
        "",
        f"Perplexity on `{report['text']}` (seqlen {report['seqlen']}, first "
        f"{report['max_windows']} windows); calibration: {report['calibration']} "
        f"({report['nsamples']} samples), seed {report['seed']}.",
        "",
        "| method | bits | group | perplexity | delta vs fp | size (MiB) | bits/weight | quant time (s) |",
        "|---|---|---|---|---|---|---|---|",
        f"| full precision | - | - | {fp['perplexity']:.2f} | - | {fp['size_bytes'] / 2**20:.1f} "
        f"| {fp['bits_per_weight']:.2f} | - |",
    ]
    for r in report["results"]:
        group = "ch" if r["group_size"] == -1 else r["group_size"]
        lines.append(
            f"| {r['method']} | {r['bits']} | {group} | {r['perplexity']:.2f} | "
            f"{r['delta_pct']:+.1f}% | {r['size_bytes'] / 2**20:.1f} | "
            f"{r['bits_per_weight']:.3f} | {r['quant_seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """Perplexity (log scale) against bits per weight, one line per method, fp as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig, ax = plt.subplots(figsize=(7, 4.5))
    methods = sorted({r["method"] for r in report["results"]})
    for method in methods:
        rows = sorted(
            (r for r in report["results"] if r["method"] == method),
            key=lambda r: r["bits_per_weight"],
        )
        ax.plot(
            [r["bits_per_weight"] for r in rows],
            [r["perplexity"] for r in rows],
            marker="o",
            label=method,
        )
    ax.axhline(
        report["full_precision"]["perplexity"], color="gray", linestyle="--", label="full precision"
    )
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    low, high = ax.get_ylim()
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain if high / low < 10 else NullFormatter())
    ax.set_xlabel("bits per weight (codes + scales + zeros)")
    ax.set_ylabel("perplexity")
    ax.set_title(Path(report["source"]).name)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_report(args: argparse.Namespace) -> int:
    report = run_report(args)
    print(markdown(report), end="")
    return 0


def add_parser(sub: Any) -> None:
    """Register the `report` sub-command."""
    from bitserve.cli import int_at_least, seed_value

    r = sub.add_parser(
        "report",
        help="quantize with several methods and bit widths and compare their perplexity",
        description="Quantize SRC with every method x bits x group size (and, with --tune-steps, "
        "tune each), evaluate perplexity on --text next to the unquantized model, and write "
        "report.json, report.md and report.png into --out (the checkpoints go to "
        "--out/checkpoints).",
    )
    r.add_argument("--model", default="default", help="HF folder, .gguf file or 'default'")
    r.add_argument("--methods", default="rtn,gptq,awq", help="comma-separated method names")
    r.add_argument("--bits", default="4,3", help="comma-separated bit widths (default 4,3)")
    r.add_argument(
        "--group-size", default="128", help="comma-separated group sizes, -1 = per channel"
    )
    r.add_argument(
        "--calib", type=Path, help="calibration text (default: text the model generates itself)"
    )
    r.add_argument("--nsamples", type=int_at_least(1), default=128, help="calibration sequences")
    r.add_argument("--text", type=Path, required=True, help="UTF-8 evaluation text")
    r.add_argument(
        "--seqlen",
        type=int_at_least(2),
        default=512,
        help="tokens per calibration and eval window",
    )
    r.add_argument(
        "--max-windows", type=int_at_least(1), default=40, help="evaluate the first N windows"
    )
    r.add_argument(
        "--seed",
        type=seed_value,
        default=0,
        help="seed of calibration sampling and methods (default 0)",
    )
    r.add_argument(
        "--tune-steps",
        type=int,
        default=0,
        help="also tune each checkpoint's scales end to end for N steps (`bitserve tune`) and "
        "report it as METHOD+tuneN (needs --calib)",
    )
    r.add_argument("--out", type=Path, required=True, help="directory for the report files")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.set_defaults(func=cmd_report)
