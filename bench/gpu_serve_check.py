"""`bitserve serve --device cuda` over real HTTP on 127.0.0.1, for the lent GPU machine: a tiny
random-init llama (tests/tiny_models.py) quantized W4 g64 by `bitserve quantize`, served once with
the automatic backend (Triton on CUDA, fused decode kernels) and once with the reference backend
and `--no-fused-decode`. Checks: /v1/models reports cuda, float16, the backend and how decode
steps run; greedy completions (plain and streamed as SSE) of both servers are the same text;
sampling on the device: a seeded top-p request gives the same text twice, and top-k 1 at
temperature 1 gives the greedy text; a prompt sent twice has its whole prefill chunks reused
the second time (`cached_tokens`, copied from the first request's slot) and the same greedy
text; n = 2 prefills the prompt once for both choices; a JSON-schema response format (grammar
masks crossing to the device) gives one of the schema's values, and a logit bias of +100 on "z"
gives only z's. Prints what it saw and exits non-zero on a mismatch.

    python bench/gpu_serve_check.py [--timeout 240]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from serve import free_port, start_server

from bitserve.kernels import cpu_native

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["Hello world", "The quick brown fox", "0123456789"]
CHUNK = 32  # --prefill-chunk: the 100-character prompt below is three whole chunks and a part
LONG = "".join(f"{i} bottles of beer on the wall, " for i in range(9, 5, -1))[:100]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "bitserve.cli", *args]


def serve(
    ckpt: Path, device: str, backend: str, log: Path, timeout: float
) -> tuple[subprocess.Popen, str]:
    """Start `bitserve serve` and wait (bounded) for /ready; the log's end if it never is."""
    port = free_port()
    cmd = cli("serve", str(ckpt), "--device", device, "--backend", backend, "--port", str(port))
    cmd += ["--prefill-chunk", str(CHUNK)]
    if backend == "reference":  # the slow path throughout: torch's ops between the matmuls
        cmd.append("--no-fused-decode")
    try:  # cwd outside the repo: its bitserve/ folder is not the package (nothing installed)
        proc = start_server(cmd, port, "/ready", log, timeout, cwd=log.parent)
    except (RuntimeError, TimeoutError):
        print(log.read_text()[-3000:])
        raise
    return proc, f"http://127.0.0.1:{port}"


def completions(url: str, model: str) -> tuple[list[str], str]:
    """Greedy completions of PROMPTS, and the first one again streamed (SSE deltas joined)."""
    texts = []
    for prompt in PROMPTS:
        body = {"model": model, "prompt": prompt, "max_tokens": 24, "temperature": 0}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        r.raise_for_status()
        texts.append(r.json()["choices"][0]["text"])
    body = {"model": model, "prompt": PROMPTS[0], "max_tokens": 24, "temperature": 0}
    streamed = []
    with httpx.stream(
        "POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=120
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                streamed.append(json.loads(line[6:])["choices"][0]["text"])
    return texts, "".join(streamed)


def sampled(url: str, model: str) -> tuple[str, str, str]:
    """A seeded top-p completion of PROMPTS[0], twice, and one with top-k 1 (greedy's text)."""
    texts = []
    for extra in ({"top_p": 0.9, "seed": 7}, {"top_p": 0.9, "seed": 7}, {"top_k": 1}):
        body = {"model": model, "prompt": PROMPTS[0], "max_tokens": 24, "temperature": 0.9}
        r = httpx.post(f"{url}/v1/completions", json=body | extra, timeout=120)
        r.raise_for_status()
        texts.append(r.json()["choices"][0]["text"])
    return texts[0], texts[1], texts[2]


def reused(url: str, model: str) -> tuple[list[str], list[int], list[str]]:
    """LONG completed greedily twice (texts, cached_tokens of each), then with n = 2 (texts)."""
    texts, cached = [], []
    body = {"model": model, "prompt": LONG, "max_tokens": 16, "temperature": 0}
    for _ in range(2):
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        r.raise_for_status()
        texts.append(r.json()["choices"][0]["text"])
        cached.append(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
    r = httpx.post(f"{url}/v1/completions", json=body | {"n": 2}, timeout=120)
    r.raise_for_status()
    return texts, cached, [c["text"] for c in r.json()["choices"]]


def guided(url: str, model: str, z_id: int) -> tuple[str, str]:
    """Greedy texts under a JSON schema of three values, and under a logit bias of +100 on z."""
    schema = {"name": "color", "schema": {"enum": ["red", "green", "blue"]}}
    body = {"model": model, "prompt": PROMPTS[1], "max_tokens": 16, "temperature": 0}
    fmt = {"response_format": {"type": "json_schema", "json_schema": schema}}
    texts = []
    for extra in (fmt, {"logit_bias": {str(z_id): 100}, "max_tokens": 8}):
        r = httpx.post(f"{url}/v1/completions", json=body | extra, timeout=120)
        if r.status_code != 200:
            return f"HTTP {r.status_code}: {r.text[:300]}", ""
        texts.append(r.json()["choices"][0]["text"])
    return texts[0], texts[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--timeout", type=float, default=240, help="seconds to wait for each server")
    ap.add_argument("--device", default="cuda", help="cpu tries the script without a GPU")
    args = ap.parse_args()
    fast, dtype = ("triton", "float16") if args.device == "cuda" else ("cpu", "float32")
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import CHARS, SPECIALS, save_tiny_model

    z_id = len(SPECIALS) + CHARS.index("z")  # the char tokenizer's id of "z"

    tmp = Path(tempfile.mkdtemp())
    src = save_tiny_model(tmp / "src")
    ckpt = tmp / "ckpt"
    q = cli("quantize", str(src), "--out", str(ckpt), "--method", "rtn", "--bits", "4")
    done = subprocess.run([*q, "--group-size", "64"], capture_output=True, text=True, cwd=tmp)
    if done.returncode:
        print(f"quantize failed:\n{done.stdout[-2000:]}{done.stderr[-4000:]}")
        return 1
    seen: dict[str, tuple[list[str], str]] = {}
    ok = True
    for backend in ("auto", "reference"):
        t0 = time.perf_counter()
        proc, url = serve(ckpt, args.device, backend, tmp / f"serve-{backend}.log", args.timeout)
        try:
            card = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]
            texts, streamed = completions(url, card["id"])
            seeded, again, top1 = sampled(url, card["id"])
            long_texts, cached, pair = reused(url, card["id"])
            schema_text, biased = guided(url, card["id"], z_id)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        quant = card.get("quantization") or {}
        logged = (tmp / f"serve-{backend}.log").read_text(errors="replace").splitlines()
        for line in logged:
            if "warm-up" in line or "warming up" in line or "serving " in line:
                print(f"  log: {line[-160:]}")
        print(
            f"--backend {backend}: device={card.get('device')} dtype={card.get('dtype')} "
            f"backend={quant.get('backend')} decode={card.get('decode')} "
            f"({time.perf_counter() - t0:.0f} s)"
        )
        for prompt, text in zip(PROMPTS, texts, strict=True):
            print(f"  {prompt!r} -> {text!r}")
        print(f"  streamed: {streamed!r}")
        print(f"  seeded top-p: {seeded!r}, again: {'same' if seeded == again else repr(again)}")
        print(f"  top-k 1: {'greedy text' if top1 == texts[0] else repr(top1)}")
        print(f"  {len(LONG)}-character prompt twice: cached_tokens {cached}, texts {long_texts}")
        print(f"  n = 2: {pair}")
        # the second time, the three whole chunks come from the first request's slot
        ok &= cached[0] == 0 and cached[1] == 3 * CHUNK and long_texts[0] == long_texts[1]
        ok &= len(pair) == 2 and all(pair)
        print(f"  json_schema enum: {schema_text!r}; logit_bias +100 on z: {biased!r}")
        ok &= schema_text in ('"red"', '"green"', '"blue"') and biased == "z" * 8
        ok &= seeded == again and top1 == texts[0]
        ok &= card.get("device") == args.device and card.get("dtype") == dtype
        ok &= streamed == texts[0] and all(texts)
        want = [fast] if backend == "auto" else ["reference"]
        ok &= quant.get("backend") == want
        gpu = args.device == "cuda"
        # fused: Triton's decode kernels on CUDA; on the CPU the one-C-call step, where our
        # kernel builds (it then runs every layer of this W4 g64 model)
        fused = backend == "auto" and (gpu or cpu_native.library() is not None)
        want_decode = {"cuda_graphs": gpu, "fused_kernels": fused, "prefix_cache": False}
        ok &= card.get("decode") == want_decode
        seen[backend] = (texts, streamed)
    same = seen["auto"][0] == seen["reference"][0]
    print(f"greedy text, {fast} vs reference backend: {'same' if same else 'DIFFERENT'}")
    ok &= same
    print("serve check:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
