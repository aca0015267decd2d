"""`bitserve serve`: resolve what to serve (quantizing and caching the default model on first
use), load it, build the engine and run the HTTP app under uvicorn."""

from __future__ import annotations

import argparse
import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import torch

from bitserve.quantization.checkpoint import Loaded
from bitserve.server.settings import Settings

DEFAULT_BITS, DEFAULT_GROUP = 4, 128


def resolve_checkpoint(
    src: str, method: str | None = None, bits: int = DEFAULT_BITS, group_size: int = DEFAULT_GROUP
) -> Path:
    """Map SRC to what to load. 'default' becomes a W4 g128 checkpoint of the embedded model,
    quantized on first use and cached under models/checkpoints/, keyed by the source hash and
    the quantization arguments; anything else is loaded as given."""
    if src != "default":
        return Path(src)
    from bitserve.models import DEFAULT_NAME, models_dir, resolve_source, source_hash
    from bitserve.quantization.checkpoint import is_checkpoint
    from bitserve.quantization.grid import QuantSpec
    from bitserve.quantization.quantize import DEFAULT_METHOD, quantize_to_checkpoint

    method = method or DEFAULT_METHOD
    spec = QuantSpec(bits, group_size)
    source = resolve_source("default")
    key = hashlib.sha256(f"{source_hash(source)}|{method}|{spec}".encode()).hexdigest()[:12]
    out = models_dir() / "checkpoints" / f"{DEFAULT_NAME}-{method}-{spec.label()}-{key}"
    if not is_checkpoint(out):
        logging.getLogger("bitserve").info(
            "quantizing %s with %s %s -> %s", source, method, spec.label(), out
        )
        quantize_to_checkpoint("default", out, method, spec, force=True)
    return out


def build_state(loaded: Loaded, settings: Settings) -> Any:
    """The engine (KV cache sized by the settings), metrics and model card of a loaded model."""
    from bitserve.kernels import QuantLinear
    from bitserve.server.api import ServerState
    from bitserve.server.engine import Engine
    from bitserve.server.metrics import create_metrics
    from bitserve.server.runner import LlamaRunner, kv_bytes_per_slot
    from bitserve.server.schemas import ModelCard

    model, tok = loaded.model, loaded.tokenizer
    name = settings.served_model_name or Path(loaded.path).name
    slots = settings.max_num_seqs
    if settings.kv_cache_mib is not None:
        per_slot = kv_bytes_per_slot(model.config, settings.max_model_len, torch.float32)
        slots = min(slots, int(settings.kv_cache_mib * 2**20 // per_slot))
        if slots < 1:
            from bitserve.errors import UsageError

            raise UsageError(
                f"--kv-cache-mib {settings.kv_cache_mib} holds no sequence of --max-model-len "
                f"{settings.max_model_len} ({per_slot / 2**20:.1f} MiB each)"
            )
    runner = LlamaRunner(model, slots, settings.max_model_len, getattr(torch, settings.head_dtype))
    eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos |= set(gen_eos if isinstance(gen_eos, list) else [] if gen_eos is None else [gen_eos])
    metrics = create_metrics(name)
    engine = Engine(runner, tok, metrics, name, eos, settings.prefill_chunk, settings.max_waiting)
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
    card = ModelCard(
        id=name,
        created=int(time.time()),
        max_model_len=settings.max_model_len,
        quantization=quant,
        quality=quality,
    )
    return ServerState(engine=engine, tokenizer=tok, metrics=metrics, card=card)


def cmd_serve(args: argparse.Namespace) -> int:
    """Load the model, then serve it until interrupted."""
    import uvicorn

    from bitserve.models import load_model
    from bitserve.server.api import create_app

    overrides = {
        k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None
    }
    settings = Settings(**overrides)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    if settings.threads:
        torch.set_num_threads(settings.threads)
    path = resolve_checkpoint(settings.model)
    loaded = load_model(path, backend=settings.backend)
    state = build_state(loaded, settings)
    uvicorn.run(
        create_app(state),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
    )
    return 0


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
    s.add_argument("--host", help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="port (default 8000)")
    s.add_argument("--served-model-name", help="model id in the API (default: the folder name)")
    s.add_argument("--max-num-seqs", type=int, help="sequences decoded together (default 16)")
    s.add_argument("--max-model-len", type=int, help="prompt + output tokens (default 2048)")
    s.add_argument("--kv-cache-mib", type=float, help="cap the KV cache (lowers max-num-seqs)")
    s.add_argument("--prefill-chunk", type=int, help="prompt tokens per step (default 256)")
    s.add_argument("--max-waiting", type=int, help="queue length before 429 (default 64)")
    s.add_argument("--backend", help="QuantLinear backend (default: best available)")
    s.add_argument(
        "--head-dtype",
        choices=["bfloat16", "float32"],
        help="lm_head matmul dtype (default bfloat16)",
    )
    s.add_argument("--threads", type=int, help="torch CPU threads (default: all cores)")
    s.add_argument("--log-level", help="uvicorn/bitserve log level (default info)")
    s.set_defaults(func=cmd_serve)
