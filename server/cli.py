"""`bitserve serve`: resolve what to serve (quantizing and caching the default model on first
use), load it, build the engine and run the HTTP app under uvicorn."""

from __future__ import annotations

import argparse
import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from bitserve.errors import CheckpointError, QualityGateError, UsageError
from bitserve.quantization.checkpoint import Loaded
from bitserve.quantization.grid import QuantSpec
from bitserve.server.settings import LOG_LEVELS, Settings, settings_from_flags

DEFAULT_QUANTIZE = "w4g128"  # with the default method
GATE_SEQLEN, GATE_WINDOWS = 512, 40
T = TypeVar("T")
SHUTDOWN_BACKSTOP = 10.0  # seconds past --shutdown-timeout before uvicorn drops connections


def parse_quantize(text: str) -> tuple[str, QuantSpec, int]:
    """'gptq:w4g128' -> ('gptq', W4 g128, 0 tuning steps). The method may be left out (default
    method); the group may be 32/64/128 or 'ch' (per output channel); '-sym' asks for a
    symmetric grid; '+tune' (64 steps) or '+tuneN' then tunes the scales end to end."""
    from bitserve.quantization.base import get_method
    from bitserve.quantization.quantize import DEFAULT_METHOD
    from bitserve.quantization.tune import DEFAULT_STEPS

    m = re.fullmatch(
        r"(?:([a-z0-9-]+):)?w([2348])g(32|64|128|ch)(-sym)?(\+tune([1-9][0-9]*)?)?", text
    )
    if m is None:
        raise UsageError(
            f"--quantize {text!r}: expected METHOD:wBITSgGROUP[-sym][+tune[N]], e.g. gptq:w4g128"
        )
    method = get_method(m.group(1) or DEFAULT_METHOD).name
    group = -1 if m.group(3) == "ch" else int(m.group(3))
    tune = 0 if m.group(5) is None else int(m.group(6) or DEFAULT_STEPS)
    return method, QuantSpec(int(m.group(2)), group, m.group(4) is not None), tune


def resolve_checkpoint(src: str, quantize: str | None = None, calib: Path | None = None) -> Path:
    """Map SRC to what to load. With `quantize` (always for 'default': W4 g128 with the default
    method) the source is quantized on first use and cached under models/checkpoints/, keyed by
    the source hash, the method, the format and the calibration file; else SRC is loaded as is."""
    from bitserve.models import models_dir, resolve_source, source_hash
    from bitserve.quantization.base import get_method
    from bitserve.quantization.checkpoint import (
        is_checkpoint,
        require_unquantized,
        verify_checkpoint,
    )
    from bitserve.quantization.quantize import quantize_to_checkpoint

    if quantize is None:
        if src != "default":
            return Path(src)
        quantize = DEFAULT_QUANTIZE
    method, spec, tune_steps = parse_quantize(quantize)
    source = resolve_source(src)
    require_unquantized(source)
    if calib is not None and not calib.is_file():
        raise UsageError(f"{calib}: no such calibration file")
    if calib is not None and not (get_method(method).needs_calibration or tune_steps):
        raise UsageError(  # here too: a cache made before this check would be served silently
            f"--calib {calib}: method {method!r} uses no calibration data (drop --calib, or "
            "append +tune to tune on it)"
        )
    calib_key = (
        "self-generated" if calib is None else hashlib.sha256(calib.read_bytes()).hexdigest()
    )
    args = f"{source_hash(source)}|{method}|{spec}|{calib_key}"
    tuned = f"-tune{tune_steps}" if tune_steps else ""
    if tune_steps:  # untuned keys stay as they were, so existing caches still match
        args += f"|tune{tune_steps}"
    key = hashlib.sha256(args.encode()).hexdigest()
    name = source.stem if source.is_file() else source.name
    out = models_dir() / "checkpoints" / f"{name}-{method}-{spec.label()}{tuned}-{key[:12]}"
    log = logging.getLogger("bitserve")
    if is_checkpoint(out):
        try:
            verify_checkpoint(out)
            return out
        except CheckpointError as e:  # a cache damaged on disk would fail every start
            log.warning("cached checkpoint %s is damaged (%s): quantizing again", out, e)
    log.info("quantizing %s with %s %s%s -> %s", source, method, spec.label(), tuned, out)
    quantize_to_checkpoint(
        source, out, method, spec, calib=calib, force=True, tune_steps=tune_steps
    )
    return out


def quality_gate(ckpt: Path, src: str, text: Path, max_rise_pct: float) -> dict[str, Any]:
    """Perplexity of the checkpoint and of its unquantized source on `text`; the result is stored
    in the manifest either way, and QualityGateError is raised if it rose by more than the limit."""
    from bitserve.models import load_model
    from bitserve.quantization.checkpoint import read_manifest, sha256_file, update_manifest
    from bitserve.quantization.eval import perplexity

    if not text.is_file():
        raise UsageError(f"{text}: no such text file for the quality gate")
    stored = read_manifest(ckpt).get("quality") or {}
    digest = sha256_file(text)  # the same path may hold another text since
    if stored.get("text_sha256") == digest and "source_perplexity" in stored:
        result = stored
    else:
        fp = load_model(src)
        base = perplexity(fp.model, fp.tokenizer, text, GATE_SEQLEN, GATE_WINDOWS)["perplexity"]
        del fp
        q = load_model(ckpt)
        result = perplexity(q.model, q.tokenizer, text, GATE_SEQLEN, GATE_WINDOWS)
        result["source_perplexity"] = base
        result["text_sha256"] = digest
    result["rise_pct"] = 100 * (result["perplexity"] / result["source_perplexity"] - 1)
    update_manifest(ckpt, quality=result)
    if result["rise_pct"] > max_rise_pct:
        raise QualityGateError(
            f"{ckpt}: perplexity rose {result['rise_pct']:.1f}% over the unquantized source "
            f"({result['source_perplexity']:.2f} -> {result['perplexity']:.2f} on {text}), more "
            f"than --quality-gate {max_rise_pct:g}%; not serving"
        )
    return result


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; 'cuda' without one is a usage error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is visible to torch (use --device cpu)")
    return device


def build_state(loaded: Loaded, settings: Settings) -> Any:
    """The engine (KV cache sized by the settings), metrics and model card of a loaded model."""
    from bitserve.kernels import QuantLinear
    from bitserve.server.api import ServerState
    from bitserve.server.engine import Engine
    from bitserve.server.metrics import create_metrics
    from bitserve.server.runner import LlamaRunner, auto_head_dtype
    from bitserve.server.schemas import ModelCard

    model, tok = loaded.model, loaded.tokenizer
    weight = model.get_input_embeddings().weight  # its device and dtype are the model's
    name = settings.served_model_name or Path(loaded.path).name
    graphs = settings.cuda_graphs and weight.device.type == "cuda"
    kv = settings.kv_cache_dtype
    # Counted before the runner fuses q/k/v and gate/up: the checkpoint's layers.
    quant, quality = None, None
    if loaded.manifest is not None:
        layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
        weights = sum(m.in_features * m.out_features for m in layers)
        bpw = sum(m.bits_per_weight() * m.in_features * m.out_features for m in layers) / weights
        quant = {
            **loaded.manifest.get("quantization", {}),
            "bits_per_weight": round(bpw, 4),
            "quantized_layers": len(layers),
            "backend": sorted({m.backend for m in layers}),
        }
        quality = loaded.manifest.get("quality")
    if settings.head_dtype == "auto":
        head_weight = getattr(model.get_output_embeddings(), "weight", None)
        head = torch.bfloat16 if head_weight is None else auto_head_dtype(head_weight)
    else:
        head = getattr(torch, settings.head_dtype)
    fused = None if settings.fused_decode else False  # None: the runner's default (CUDA, Triton)
    runner = LlamaRunner(  # --kv-cache-mib lowers the slots to fit
        model,
        settings.max_num_seqs,
        settings.max_model_len,
        head,
        decode_graphs=graphs,
        fused_decode=fused,
        kv_dtype=kv if kv == "auto" else getattr(torch, kv),
        kv_cache_mib=settings.kv_cache_mib,
    )
    if quant is not None:  # the kernels of the layers as the runner runs them (fused)
        quant["kernels"] = _kernels(runner)
    if settings.warmup and weight.device.type == "cuda":
        log = logging.getLogger("bitserve")
        log.info("warming up: tuning kernels and capturing decode graphs before serving")
        t0 = time.perf_counter()
        runs = runner.warmup(settings.prefill_chunk)
        log.info("warm-up: %d forward passes in %.1f s", len(runs), time.perf_counter() - t0)
    eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos |= set(gen_eos if isinstance(gen_eos, list) else [] if gen_eos is None else [gen_eos])
    metrics = create_metrics(name)
    engine = Engine(
        runner,
        tok,
        metrics,
        name,
        eos,
        settings.prefill_chunk,
        settings.max_waiting,
        settings.prefix_cache,
    )
    card = ModelCard(
        id=name,
        created=int(time.time()),
        max_model_len=settings.max_model_len,
        device=weight.device.type,
        dtype=str(weight.dtype).removeprefix("torch."),
        quantization=quant,
        quality=quality,
        decode={
            "cuda_graphs": runner.decode_graphs,
            "fused_kernels": runner.fused_decode or runner.cpu_decode is not None,
            "prefix_cache": settings.prefix_cache,
        },
        lm_head=runner.head_description(),
        kv_cache_dtype=str(runner.k_cache.dtype).removeprefix("torch."),
    )
    return ServerState(engine=engine, tokenizer=tok, metrics=metrics, card=card)


def _kernels(runner: Any) -> list[str]:
    """The kernels that run the runner's quantized projections (as their backends name them)."""
    from bitserve.kernels import BACKENDS, QuantLinear

    mods = [m for layer in runner.layers for m in (*layer.qkv, layer.o, *layer.gate_up, layer.down)]
    names = set()
    for m in mods:
        if isinstance(m, QuantLinear):
            describe = BACKENDS[m.backend].describe
            names.add(describe(m) if describe else m.backend)
    return sorted(names)


def in_worker_thread(fn: Callable[[], T]) -> T:
    """fn() on a thread that exits when it returns (its exception re-raised here). Loading and
    quantizing run torch's OpenMP work; from the main thread that would leave a second thread
    team beside the engine thread's, and with more OpenMP threads than cores libgomp stops its
    idle workers spinning, so each small op of a CPU decode step waits for one to wake: steps
    ran 1.7-2.2x slower (docs/serving.md, "Threads")."""
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as e:  # re-raised on the caller's thread
            error.append(e)

    thread = threading.Thread(target=run, name="bitserve-load", daemon=True)  # Ctrl-C exits
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def _prepare_state(settings: Settings) -> tuple[Any, Path, str, torch.dtype]:
    """Resolve (quantizing if asked), gate, load and build the engine: (state, checkpoint
    path, device, dtype)."""
    from bitserve.models import load_model

    path = resolve_checkpoint(settings.model, settings.quantize, settings.calib)
    if settings.quality_gate is not None and settings.gate_text is not None:
        quality_gate(path, settings.model, settings.gate_text, settings.quality_gate)
    device = resolve_device(settings.device)
    dtype = torch.float16 if device == "cuda" else torch.float32
    # resolve_checkpoint verified (or just wrote) a quantized cache: no second SHA-256 pass
    cached = settings.quantize is not None or settings.model == "default"
    loaded = load_model(
        path, device=device, dtype=dtype, backend=settings.backend, verify=not cached
    )
    return build_state(loaded, settings), path, device, dtype


def cmd_serve(args: argparse.Namespace) -> int:
    """Load the model, then serve it until interrupted."""
    import uvicorn

    from bitserve.server.api import create_app

    overrides = {
        k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None
    }
    settings = settings_from_flags(overrides)
    # "trace" is uvicorn's level below debug (5), which `logging` has no name for
    level = 5 if settings.log_level == "trace" else settings.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(message)s")
    if settings.threads:
        torch.set_num_threads(settings.threads)
    if settings.quality_gate is not None and settings.gate_text is None:
        raise UsageError(
            "--quality-gate needs --gate-text FILE (the text to measure perplexity on)"
        )
    if (
        settings.quality_gate is not None
        and settings.quantize is None
        and settings.model != "default"
    ):
        raise UsageError("--quality-gate needs --quantize (or SRC 'default')")
    state, path, device, dtype = in_worker_thread(lambda: _prepare_state(settings))
    runner = state.engine.runner
    decode = "CUDA graphs" if runner.decode_graphs else "eager"
    decode += ", fused decode kernels" if runner.fused_decode else ""
    decode += ", one C call a decode step" if runner.cpu_decode is not None else ""
    decode += ", prefix cache" if state.engine.prefix_cache else ""
    kernels = (state.card.quantization or {}).get("kernels")
    logging.getLogger("bitserve").info(
        "serving %s on %s (%s, decode %s, lm_head %s, K/V cache %s%s)",
        path,
        device,
        dtype,
        decode,
        runner.head_description(),
        state.card.kv_cache_dtype,
        f"; matmuls: {', '.join(kernels)}" if kernels else "",
    )
    config = uvicorn.Config(
        create_app(state),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        # a backstop: streams whose client stops reading cannot take their last chunk
        timeout_graceful_shutdown=None
        if settings.shutdown_timeout is None
        else settings.shutdown_timeout + SHUTDOWN_BACKSTOP,
    )
    _run_with_deadline(uvicorn.Server(config), state.engine, settings.shutdown_timeout)
    return 0


def _run_with_deadline(server: Any, engine: Any, timeout: float | None) -> None:
    """Run the uvicorn server; its first SIGTERM/SIGINT also starts the --shutdown-timeout
    clock, after which the engine ends every request in flight with finish_reason "abort"
    (so streams still close with a last chunk and [DONE]) and uvicorn can exit."""
    default_exit = server.handle_exit
    timer = None if timeout is None else threading.Timer(timeout, engine.cut_off)

    def handle_exit(sig: int, frame: Any) -> None:
        if timer is not None and timer.ident is None:  # not started yet
            timer.daemon = True
            timer.start()
        default_exit(sig, frame)

    server.handle_exit = handle_exit  # uvicorn installs it as the signal handler in run()
    server.run()


def add_parser(sub: Any) -> None:
    """Add the `serve` sub-command to the CLI's sub-parsers."""
    s = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a checkpoint with continuous batching. Every flag also reads from "
        "the environment as BITSERVE_<FLAG> (e.g. BITSERVE_PORT); flags win.",
    )
    s.add_argument(
        "model",
        nargs="?",
        default=None,
        help="checkpoint dir, HF folder, .gguf, or 'default' (W4 g128 of the embedded "
        "model, quantized once and cached under models/checkpoints/)",
    )
    s.add_argument(
        "--quantize",
        metavar="METHOD:wBITSgGROUP[+tune]",
        help="quantize SRC first (e.g. gptq:w4g128, rtn:w8gch, awq:w3g64-sym; append +tune or "
        "+tuneN to tune the scales end to end for 64 or N steps), caching the checkpoint by "
        "source hash and arguments under models/checkpoints/",
    )
    s.add_argument(
        "--calib",
        type=Path,
        help="calibration text for --quantize (default: data-free); refused by methods that "
        "read none (rtn, bcq) unless +tune",
    )
    s.add_argument(
        "--quality-gate",
        type=float,
        metavar="PCT",
        help="refuse to serve if perplexity on --gate-text rose more than PCT%% over the source "
        f"(seqlen {GATE_SEQLEN}, first {GATE_WINDOWS} windows); the result goes into the manifest",
    )
    s.add_argument("--gate-text", type=Path, help="evaluation text for --quality-gate")
    s.add_argument("--host", help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="port (default 8000)")
    s.add_argument("--served-model-name", help="model id in the API (default: the folder name)")
    s.add_argument("--max-num-seqs", type=int, help="sequences decoded together (default 16)")
    s.add_argument("--max-model-len", type=int, help="prompt + output tokens (default 2048)")
    s.add_argument("--kv-cache-mib", type=float, help="cap the KV cache (lowers max-num-seqs)")
    s.add_argument(
        "--kv-cache-dtype",
        choices=["auto", "float32", "float16"],
        help="K/V cache element type. float16 halves the cache (twice the sequences or context "
        "in the same memory) and makes long-context decode steps in bitserve's CPU C step "
        "faster; only an fp32 model on the CPU may narrow it. auto (default): float16 for an "
        "fp32 model on a CPU where that C step runs, else the model's dtype (docs/serving.md)",
    )
    s.add_argument("--prefill-chunk", type=int, help="prompt tokens per step (default 256)")
    s.add_argument("--max-waiting", type=int, help="queue length before 429 (default 64)")
    s.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        help="where the model runs (default auto: cuda with fp16 when a GPU is visible, "
        "else cpu with fp32)",
    )
    s.add_argument("--backend", help="QuantLinear backend (default: best available)")
    s.add_argument(
        "--prefix-cache",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="reuse any prefix of a prompt whose K/V a slot holds (a finished sequence's, "
        "or a running one's), prefilling only the rest (multi-turn chats, which resend the last "
        "answer). Without it only whole prefill chunks are reused (long system prompts), which "
        "gives the same logits as prefilling them; a prefix ending mid-chunk rounds "
        "differently, so greedy texts may then depend on what was served before",
    )
    s.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="on CUDA, replay decode steps from CUDA graphs captured per padded batch size and "
        "attention length (default on; --no-cuda-graphs launches every kernel from Python)",
    )
    s.add_argument(
        "--fused-decode",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="on CUDA, run a decode step's work between the matmuls (norms, rotary + KV-cache "
        "write, attention, SiLU) as fused Triton kernels (default on; --no-fused-decode uses "
        "torch's ops)",
    )
    s.add_argument(
        "--warmup",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="on CUDA, before serving: tune the Triton kernels for every batch-size bucket and "
        "capture the decode graphs, so that the first requests do not wait for them (default "
        "on; --no-warmup starts at once and does it on first use)",
    )
    s.add_argument(
        "--head-dtype",
        choices=["auto", "bfloat16", "int8", "float32"],
        help="the lm_head matmul, when narrower than the model's. bfloat16: on the CPU in "
        "oneDNN's layout where the CPU has it (about 2x torch's plain bf16 matmul). int8, on "
        "the CPU: an RTN W8 g32 copy, half bf16's bytes and closer to fp32, through bitserve's "
        "own kernel. auto (default): int8 on a CPU where bitserve's kernel runs and oneDNN's "
        "bf16 matmul does not (plain AVX2: 3-5x faster there), else bfloat16 "
        "(docs/serving.md). An fp16 model on a GPU keeps its own",
    )
    s.add_argument(
        "--shutdown-timeout",
        type=float,
        metavar="SECONDS",
        help="on SIGTERM or Ctrl-C, stop accepting requests and wait this long for those in "
        "flight, then end them with finish_reason 'abort' (streams still get their last chunk "
        "and [DONE]) and exit (default: wait for every request to finish)",
    )
    s.add_argument("--threads", type=int, help="torch CPU threads (default: all cores)")
    s.add_argument(
        "--log-level",
        help=f"uvicorn/bitserve log level: {', '.join(LOG_LEVELS)} (default info)",
    )
    s.set_defaults(func=cmd_serve)
