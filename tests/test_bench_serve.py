"""The serving benchmark's client (bench/serve.py) counts a request that fails (an HTTP error,
an error in the stream, a stream without a finish_reason, or one that ended in error or abort)
as failed, never as a success; a stream without [DONE] (transformers serve) is fine."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
from bench_scripts import load_bench

ROOT = Path(__file__).resolve().parents[1]


def bench() -> Any:
    return load_bench("serve")


def sse(*chunks: Any) -> str:
    return "".join(f"data: {c if isinstance(c, str) else json.dumps(c)}\n\n" for c in chunks)


def run(body: str, status: int = 200) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        transport = httpx.MockTransport(lambda request: httpx.Response(status, text=body))
        async with httpx.AsyncClient(transport=transport) as client:
            return dict(await bench().one_request(client, "http://stub", "m", "hi", 4, {}))

    return asyncio.run(go())


def test_a_stream_counts_only_when_it_finished() -> None:
    text = {"choices": [{"index": 0, "text": "a", "finish_reason": None}]}
    last = {"choices": [{"index": 0, "text": "b", "finish_reason": "length"}]}
    usage = {"choices": [], "usage": {"completion_tokens": 2}}
    ok = run(sse(text, last, usage, "[DONE]"))
    assert ok["error"] is None and ok["tokens"] == 2 and len(ok["stamps"]) == 2
    assert run(sse(text, last))["error"] is None  # transformers serve: no [DONE]
    assert run(sse(text, "[DONE]"))["error"] == "finish_reason None"
    assert run(sse(text))["error"] == "finish_reason None"  # cut short
    for reason in ("error", "abort"):
        failed = {"choices": [{"index": 0, "text": "", "finish_reason": reason}]}
        assert run(sse(text, failed, "[DONE]"))["error"] == f"finish_reason {reason}"
    err = {"error": {"message": "engine failed", "type": "server_error"}}
    assert run(sse(text, err, "[DONE]"))["error"] == "engine failed"
    assert run(sse(text, {"error": "broken"}))["error"] == "broken"
    assert run("", status=503)["error"].startswith("HTTPStatusError")


def test_shared_prefix_prompts_and_the_prefix_cache_server() -> None:
    """`--shared-prefix-words N` starts every prompt with the same N words, and the
    bitserve-w4-prefix-cache server is bitserve-w4 with `--prefix-cache`."""
    b = bench()
    texts = b.bench_prompts(150)
    heads = {" ".join(t.split()[:150]) for t in texts}
    assert len(heads) == 1 and len(texts) == len(b.PROMPTS)
    assert [t.split()[150:] for t in texts] == [p.split() for p in b.PROMPTS]
    assert b.bench_prompts(0) == b.PROMPTS
    args = b.argparse.Namespace(
        checkpoint="ck", unquantized="u", shared_prefix_words=150, prompt_words=0, max_tokens=64
    )
    specs = b.server_specs(args)
    plain, cached = specs["bitserve-w4"][0](1234), specs["bitserve-w4-prefix-cache"][0](1234)
    assert cached == [*plain, "--prefix-cache"]
    assert plain[plain.index("--max-model-len") + 1] == "512"


def test_long_prompts_of_their_own_and_room_for_them() -> None:
    """`--prompt-words N` puts N words of its own before each prompt (after the shared
    preamble): no two prompts share their first words, and both servers get sequences long
    enough for two tokens a word and the completion."""
    b = bench()
    texts = b.bench_prompts(20, 700)
    assert [len(t.split()) for t in texts] == [720 + len(p.split()) for p in b.PROMPTS]
    assert len({" ".join(t.split()[:20]) for t in texts}) == 1  # the shared preamble
    assert len({" ".join(t.split()[20:23]) for t in texts}) == len(texts)  # then their own
    assert [t.split()[720:] for t in texts] == [p.split() for p in b.PROMPTS]
    assert b.bench_prompts(20, 700) == texts  # the same prompts every run
    # every request of every level its own prompt; without --prompt-words, PROMPTS in turn
    args = b.argparse.Namespace(shared_prefix_words=20, prompt_words=700)
    levels = [b.level_prompts(args, conc, rounds) for conc, rounds in ((1, 8), (4, 2), (8, 1))]
    assert [[len(w) for w in level] for level in levels] == [[8], [2] * 4, [1] * 8]
    sent = [t for level in levels for w in level for t in w]
    assert len({" ".join(t.split()[20:30]) for t in sent}) == len(sent) == 24
    args.prompt_words = 0
    assert b.level_prompts(args, 4, 2) == [
        [b.bench_prompts(20)[(w + r) % 8] for r in range(2)] for w in range(4)
    ]
    args = b.argparse.Namespace(
        checkpoint="ck",
        unquantized="u",
        shared_prefix_words=20,
        prompt_words=700,
        max_tokens=64,
        threads=2,
        llama_server="llama-server",
        gguf="m.gguf",
    )
    ours = b.server_specs(args)["bitserve-w4"][0](1234)
    assert int(ours[ours.index("--max-model-len") + 1]) >= 2 * 720 + 64
    theirs = b.llama_server_cmd(args, 1234)
    assert int(theirs[theirs.index("-c") + 1]) == 16 * int(ours[ours.index("--max-model-len") + 1])
    # a negative count of words: a one-line message and exit 2, before any server starts
    for flag in ("--prompt-words", "--shared-prefix-words"):
        run = subprocess.run(
            [sys.executable, str(ROOT / "bench" / "serve.py"), flag, "-1"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 2 and "take 0 or more words" in run.stderr, run.stderr
        assert "Traceback" not in run.stderr


def assert_refusals(script: Path, cases: list[tuple[list[str], str]]) -> None:
    """Each (arguments, message) case of `script` exits non-zero with the message on stderr and
    no traceback."""
    for args, message in cases:
        run = subprocess.run(
            [sys.executable, str(script), *args],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=script.parents[1],
        )
        assert run.returncode != 0 and message in run.stderr, (args, run.stderr)
        assert "Traceback" not in run.stderr


def test_runner_steps_refuses_bad_arguments_with_one_line() -> None:
    """bench/runner_steps.py: nothing to compare with (no runner, kernel or K/V dtype), a --long
    out of range and a --kernel revision without our kernels each end with a one-line message
    and a non-zero exit, before any model loads."""
    script = Path(__file__).parents[1] / "bench" / "runner_steps.py"
    cases = [
        ([], "give a baseline runner, --kernel REV, --kv-dtype, or some of them"),
        (["--kernel", "HEAD", "--long", "-1"], "--long takes 0-8192 tokens"),
        (["--kernel", "no-such-revision"], "--kernel no-such-revision: no kernels/"),
    ]
    assert_refusals(script, cases)


def test_kv_cache_dtype_bench_refuses_bad_arguments_with_one_line(
    server_tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """bench/kv_cache_dtype.py: --rows or --tokens out of range, a missing --text, and a text
    shorter than rows x tokens each end with a one-line message and a non-zero exit."""
    script = Path(__file__).parents[1] / "bench" / "kv_cache_dtype.py"
    short = tmp_path / "short.txt"
    short.write_text("\ufeff = Valkyria = \n a few words only \n", encoding="utf-8")
    ckpt = ["--checkpoint", str(server_tiny_checkpoint)]
    cases = [
        (["--rows", "0"], "--rows takes 1-16 excerpts, --tokens 2-4096"),
        (["--tokens", "5000"], "--rows takes 1-16 excerpts, --tokens 2-4096"),
        ([*ckpt, "--text", str(tmp_path / "none.txt")], "none.txt: no such file"),
        ([*ckpt, "--text", str(short), "--rows", "2", "--tokens", "64"], "fewer than --rows x"),
    ]
    assert_refusals(script, cases)
