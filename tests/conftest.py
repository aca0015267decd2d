"""Shared fixtures for the server tests: a tiny random-init llama checkpoint and a helper that
runs `bitserve serve` as a real uvicorn process on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

# Triton kernel tests run in Triton's CPU interpreter, which must be chosen before anything
# (torch included) first imports triton.
os.environ.setdefault("TRITON_INTERPRET", "1")

import httpx
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TOKENIZER = ROOT / "models" / "SmolLM2-135M-Instruct"
SERVER_QUALITY = {"perplexity": 123.4, "text": "fixture"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def server_tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random llama (RTN W4 g32) with the default model's tokenizer, saved as a
    packed bitserve checkpoint."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from bitserve.quantization import QuantSpec, get_method
    from bitserve.quantization.checkpoint import save_checkpoint
    from bitserve.quantization.pipeline import quantize_model, swap_in_quant_linears

    if not (DEFAULT_TOKENIZER / "tokenizer.json").is_file():
        pytest.skip("default model folder not fetched (run `bitserve fetch-default`)")
    tok = AutoTokenizer.from_pretrained(DEFAULT_TOKENIZER)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        initializer_range=0.5,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    spec = QuantSpec(4, 32)
    with torch.no_grad():
        quantized, _ = quantize_model(model, get_method("rtn"), spec, None, progress=False)
        swap_in_quant_linears(model, quantized)
    manifest = {
        "method": {"name": "rtn", "args": {}, "seed": 0},
        "quantization": {"bits": 4, "group_size": 32, "sym": False, "method": "rtn"},
        "quality": SERVER_QUALITY,
    }
    out = tmp_path_factory.mktemp("server") / "tiny-w4g32"
    return save_checkpoint(model, tok, out, manifest)


ServerStarter = Callable[..., str]


def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Exit code and stderr of the in-process CLI (argparse errors exit through SystemExit)."""
    from bitserve.cli import main

    try:
        code = main(args)
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capsys.readouterr().err


def launch_server(
    model: str | Path, flags: tuple[str, ...], logdir: Path, timeout: float = 600.0
) -> tuple[subprocess.Popen[bytes], str]:
    """Run `bitserve serve model *flags` on a free port of 127.0.0.1 and wait (bounded) for
    /ready: (the process, its base URL). The caller stops the process."""
    port = _free_port()
    log_path = logdir / f"serve-{port}.log"
    log = open(log_path, "wb")  # noqa: SIM115 (kept open for the process)
    cmd = [sys.executable, "-m", "bitserve.cli", "serve", str(model), "--port", str(port)]
    cmd += ["--log-level", "warning", *flags]
    env = {**os.environ, "BITSERVE_HOST": "127.0.0.1"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log_path.read_text()}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise TimeoutError(f"server on {url} not ready after {timeout}s")


@pytest.fixture(scope="module")
def server_start(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerStarter]:
    """start(model, *flags) runs `bitserve serve` on a free port, waits for /ready (bounded) and
    returns its base URL; every process is killed when the module's tests are done."""
    procs: list[subprocess.Popen[bytes]] = []
    logdir = tmp_path_factory.mktemp("server-logs")

    def start(model: str | Path, *flags: str, timeout: float = 600.0) -> str:
        proc, url = launch_server(model, flags, logdir, timeout)
        procs.append(proc)
        return url

    yield start
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
