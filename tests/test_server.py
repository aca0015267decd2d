"""The serving stack end to end: a real `bitserve serve` uvicorn process on 127.0.0.1 over a
tiny random-init W4 checkpoint, driven through httpx and the official openai client."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from conftest import SERVER_QUALITY, ServerStarter
from prometheus_client.parser import text_string_to_metric_families

PROMPTS = [
    f"Story {i}: once upon a time, a {w} went"
    for i, w in enumerate(
        [
            "cat",
            "dog",
            "fox",
            "owl",
            "bee",
            "ant",
            "elk",
            "yak",
            "cow",
            "pig",
            "hen",
            "emu",
            "bat",
            "rat",
            "eel",
            "gnu",
        ]
    )
]


@pytest.fixture(scope="module")
def url(server_start: ServerStarter, server_tiny_checkpoint: Path) -> str:
    # a small prefill chunk makes every prompt take several chunked, batched prefill steps
    return server_start(
        server_tiny_checkpoint,
        "--max-model-len",
        "512",
        "--max-num-seqs",
        "16",
        "--prefill-chunk",
        "16",
        "--threads",
        "1",
    )


@pytest.fixture(scope="module")
def model_id(url: str) -> str:
    return str(httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"])


def complete(url: str, **body: Any) -> dict[str, Any]:
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return dict(r.json())


def metrics(url: str) -> dict[str, float]:
    """Every sample of /metrics as {name{labels}: value}, parsed by prometheus-client."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model")
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def sse_events(response: httpx.Response) -> list[str]:
    return [line[6:] for line in response.iter_lines() if line.startswith("data: ")]


def test_health_ready_and_model_card(url: str, server_tiny_checkpoint: Path) -> None:
    assert httpx.get(f"{url}/health", timeout=10).json() == {"status": "ok"}
    assert httpx.get(f"{url}/ready", timeout=10).status_code == 200
    card = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]
    assert card["id"] == server_tiny_checkpoint.name
    assert (card["device"], card["dtype"]) == ("cpu", "float32")
    # no CUDA graphs on the CPU; the fused step (one C call) where our kernel runs every layer
    # (W4 g32 here); the prefix cache is off by default
    from bitserve.kernels import cpu_native

    fused = cpu_native.library() is not None
    assert card["decode"] == {"cuda_graphs": False, "fused_kernels": fused, "prefix_cache": False}
    # the K/V cache (auto): fp16 where our kernel runs, else the model's fp32
    assert card["kv_cache_dtype"] == ("float16" if fused else "float32")
    # the default (auto): a bf16 copy of the fp32 head in oneDNN's layout where the CPU has
    # it, else an int8 one where our kernel runs, else a plain bf16 one
    from bitserve.models import load_model
    from bitserve.server.runner import auto_head_dtype, onednn_weight

    auto = auto_head_dtype(load_model(server_tiny_checkpoint).model.lm_head.weight)
    onednn = onednn_weight(torch.randn(16, 32).bfloat16()) is not None
    want = "int8 g32" if auto == torch.int8 else "bfloat16" + " (oneDNN layout)" * onednn
    assert card["lm_head"] == want
    q = card["quantization"]
    assert (q["method"], q["bits"], q["group_size"]) == ("rtn", 4, 32)
    assert q["bits_per_weight"] == pytest.approx(4 + (16 + 4) / 32)
    from bitserve.kernels import cpu_native

    lib = cpu_native.library()  # our own kernel where it builds, else torch's int4 kernel
    kernel = f"bitserve int16-activation kernel ({lib.isa})" if lib else "torch int4 kernel"
    assert [k.startswith(f"cpu: {kernel}") for k in q["kernels"]] == [True], q["kernels"]
    assert card["quality"] == SERVER_QUALITY


def test_completion_usage_and_length(url: str, model_id: str, server_tiny_checkpoint: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(server_tiny_checkpoint)
    body = complete(
        url, model=model_id, prompt=PROMPTS[0], max_tokens=12, temperature=0, ignore_eos=True
    )
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length" and choice["text"]
    assert body["usage"]["prompt_tokens"] == len(tok(PROMPTS[0])["input_ids"])
    assert body["usage"]["completion_tokens"] == 12
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 12
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}  # no whole chunk held


def test_stream_matches_non_stream_httpx(url: str, model_id: str) -> None:
    args = {"model": model_id, "prompt": PROMPTS[1], "max_tokens": 20, "temperature": 0}
    full = complete(url, **args)["choices"][0]
    with httpx.stream(
        "POST", f"{url}/v1/completions", json={**args, "stream": True}, timeout=120
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == full["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == full["finish_reason"]


def test_openai_client_completions_and_chat(url: str, model_id: str) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120, max_retries=0)
    assert [m.id for m in client.models.list()] == [model_id]
    c = client.completions.create(model=model_id, prompt=PROMPTS[2], max_tokens=10, temperature=0)
    streamed = "".join(
        ch.choices[0].text
        for ch in client.completions.create(
            model=model_id, prompt=PROMPTS[2], max_tokens=10, temperature=0, stream=True
        )
    )
    assert c.choices[0].text == streamed and c.usage is not None
    messages: Any = [{"role": "user", "content": "Hello there"}]
    chat = client.chat.completions.create(
        model=model_id, messages=messages, max_tokens=10, temperature=0
    )
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage is not None and chat.usage.completion_tokens >= 1
    stream = client.chat.completions.create(
        model=model_id,
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, usage = [], None
    for ch in stream:
        if ch.usage is not None:
            usage = ch.usage
        if ch.choices and ch.choices[0].delta.content:
            parts.append(ch.choices[0].delta.content)
    assert "".join(parts) == chat.choices[0].message.content
    assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens


def test_concurrent_greedy_equals_sequential(url: str, model_id: str) -> None:
    def body(p: str) -> dict[str, Any]:
        return {
            "model": model_id,
            "prompt": p,
            "max_tokens": 24,
            "temperature": 0,
            "ignore_eos": True,
        }

    alone = [complete(url, **body(p))["choices"][0]["text"] for p in PROMPTS]

    async def together() -> list[str]:
        async with httpx.AsyncClient(timeout=300) as client:
            rs = await asyncio.gather(
                *[client.post(f"{url}/v1/completions", json=body(p)) for p in PROMPTS]
            )
        return [r.json()["choices"][0]["text"] for r in rs]

    assert asyncio.run(together()) == alone
    assert len(set(alone)) > 1  # the prompts really differ


def test_seed_n_stop_and_logprobs(url: str, model_id: str) -> None:
    sampled = {
        "model": model_id,
        "prompt": PROMPTS[3],
        "max_tokens": 16,
        "temperature": 1.0,
        "top_p": 0.9,
        "top_k": 50,
        "seed": 7,
        "n": 2,
        "ignore_eos": True,
    }
    before = metrics(url)
    a = complete(url, **sampled)
    after = metrics(url)
    prefilled = after["bitserve_prompt_tokens_total{}"] - before["bitserve_prompt_tokens_total{}"]
    shared = (
        after["bitserve_prompt_tokens_shared_total{}"]
        - before["bitserve_prompt_tokens_shared_total{}"]
    )
    assert prefilled == shared == a["usage"]["prompt_tokens"]  # two choices, prefilled once
    b = complete(url, **sampled)
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]
    assert sorted(c["index"] for c in a["choices"]) == [0, 1]
    assert a["usage"]["completion_tokens"] == 32
    greedy = complete(
        url, model=model_id, prompt=PROMPTS[4], max_tokens=20, temperature=0, ignore_eos=True
    )["choices"][0]["text"]
    stop = greedy[len(greedy) // 2 : len(greedy) // 2 + 3]
    cut = complete(
        url,
        model=model_id,
        prompt=PROMPTS[4],
        max_tokens=20,
        temperature=0,
        ignore_eos=True,
        stop=[stop],
    )["choices"][0]
    assert cut["finish_reason"] == "stop"
    assert cut["text"] == greedy[: greedy.index(stop)]
    lp = complete(
        url,
        model=model_id,
        prompt=PROMPTS[4],
        max_tokens=5,
        temperature=0,
        ignore_eos=True,
        logprobs=3,
    )["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 5 and all(len(t) == 3 for t in lp["top_logprobs"])
    for value, top in zip(lp["token_logprobs"], lp["top_logprobs"], strict=True):
        assert value <= 0 and value == pytest.approx(max(top.values()))


def test_disconnect_frees_sequence(url: str, model_id: str) -> None:
    before = metrics(url).get("bitserve_request_success_total{finish_reason=abort}", 0.0)
    body = {
        "model": model_id,
        "prompt": PROMPTS[5],
        "max_tokens": 200,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(3)]
        assert any(g.startswith("data: ") for g in got)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = metrics(url)
        if (
            m["bitserve_num_requests_running{}"] == 0
            and m.get("bitserve_request_success_total{finish_reason=abort}", 0.0) == before + 1
        ):
            break
        time.sleep(0.2)
    assert m["bitserve_num_requests_running{}"] == 0
    assert m["bitserve_request_success_total{finish_reason=abort}"] == before + 1
    assert m["bitserve_generation_tokens_total{}"] > 0


def test_non_streaming_disconnect_frees_sequence(url: str, model_id: str) -> None:
    aborted = "bitserve_request_success_total{finish_reason=abort}"
    before = metrics(url).get(aborted, 0.0)
    body = {
        "model": model_id,
        "prompt": PROMPTS[6],
        "max_tokens": 480,
        "temperature": 0,
        "ignore_eos": True,
    }
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json=body, timeout=httpx.Timeout(10, read=0.2))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = metrics(url)
        if m["bitserve_num_requests_running{}"] == 0 and m.get(aborted, 0.0) == before + 1:
            break
        time.sleep(0.2)
    assert m["bitserve_num_requests_running{}"] == 0
    assert m[aborted] == before + 1


def test_metrics_counters_match_requests(url: str, model_id: str) -> None:
    before = metrics(url)
    usages = [
        complete(url, model=model_id, prompt=p, max_tokens=5 + i, temperature=0, ignore_eos=True)[
            "usage"
        ]
        for i, p in enumerate(PROMPTS[:4])
    ]
    after = metrics(url)

    def diff(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert diff("bitserve_request_success_total{finish_reason=length}") == 4
    assert diff("bitserve_prompt_tokens_total{}") == sum(u["prompt_tokens"] for u in usages)
    assert diff("bitserve_generation_tokens_total{}") == sum(u["completion_tokens"] for u in usages)
    assert diff("bitserve_time_to_first_token_seconds_count{}") == 4
    assert diff("bitserve_e2e_request_latency_seconds_count{}") == 4
    assert diff("bitserve_inter_token_latency_seconds_count{}") == sum(
        u["completion_tokens"] - 1 for u in usages
    )
    assert after["bitserve_kv_cache_usage_ratio{}"] == 0
    assert after["bitserve_decode_step_seconds_count{}"] > 0


def test_errors_have_openai_shape(url: str, model_id: str) -> None:
    cases = [
        ({"model": model_id, "prompt": "x", "temperature": 5}, 422, "temperature"),
        ({"model": model_id, "prompt": "x", "n": 0}, 422, "n"),
        ({"model": "nope", "prompt": "x"}, 404, "model"),
        ({"model": model_id, "prompt": "word " * 600}, 400, "prompt"),
        ({"model": model_id, "prompt": "x", "max_tokens": 1000}, 400, "max_tokens"),
        ({"model": model_id, "prompt": [10**7]}, 400, "prompt"),
    ]
    for body, status, param in cases:
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert err["param"] == param and err["message"] and err["type"]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=30, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    assert metrics(url)["bitserve_request_errors_total{status=404}"] >= 2


def test_overload_answers_429_with_retry_after(
    server_start: ServerStarter, server_tiny_checkpoint: Path
) -> None:
    url = server_start(
        server_tiny_checkpoint,
        "--max-num-seqs",
        "1",
        "--max-waiting",
        "0",
        "--max-model-len",
        "512",
        "--threads",
        "1",
    )
    body = {"prompt": PROMPTS[0], "max_tokens": 400, "temperature": 0, "ignore_eos": True}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=300) as client:
            return list(
                await asyncio.gather(
                    *[client.post(f"{url}/v1/completions", json=body) for _ in range(4)]
                )
            )

    codes = sorted(r.status_code for r in asyncio.run(burst()))
    assert codes[0] == 200 and codes[-1] == 429
    r = httpx.post(f"{url}/v1/completions", json={**body, "max_tokens": 20}, timeout=300)
    assert r.status_code == 200


def test_int8_head_over_http(server_start: ServerStarter, server_tiny_checkpoint: Path) -> None:
    """`serve --head-dtype int8 --kv-cache-dtype float32`: the card says how the head runs and
    the K/V cache's dtype, and greedy completions sent together are the texts each gives alone
    (the W8 g32 head does not depend on the batch)."""
    url = server_start(
        server_tiny_checkpoint,
        "--head-dtype",
        "int8",
        "--threads",
        "1",
        "--kv-cache-dtype",
        "float32",
    )
    card = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]
    assert card["lm_head"] == "int8 g32" and card["kv_cache_dtype"] == "float32"
    body = {"model": card["id"], "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    alone = [complete(url, prompt=p, **body)["choices"][0]["text"] for p in PROMPTS]

    async def together() -> list[str]:
        async with httpx.AsyncClient(timeout=300) as client:
            rs = await asyncio.gather(
                *[client.post(f"{url}/v1/completions", json={"prompt": p, **body}) for p in PROMPTS]
            )
        return [r.json()["choices"][0]["text"] for r in rs]

    assert asyncio.run(together()) == alone and all(alone)


def test_prefix_cache_over_http(server_start: ServerStarter, server_tiny_checkpoint: Path) -> None:
    """`serve --prefix-cache`: the card says so; a chat's second turn (the first turn's
    messages, its answer and a new question) and a second question under the same system
    prompt are prefilled from where the cached prefix ends, which /metrics counts."""
    url = server_start(server_tiny_checkpoint, "--prefix-cache", "--threads", "1")
    card = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]
    assert card["decode"]["prefix_cache"] is True
    system = {"role": "system", "content": "You are a terse assistant. " * 8}
    body = {"model": card["id"], "max_tokens": 8, "temperature": 0}

    def chat(messages: list[dict[str, str]]) -> dict[str, Any]:
        r = httpx.post(
            f"{url}/v1/chat/completions", json={**body, "messages": messages}, timeout=120
        )
        assert r.status_code == 200, r.text
        return dict(r.json())

    first = [system, {"role": "user", "content": "Name a colour."}]
    answer = chat(first)
    before = metrics(url)
    turn = first + [answer["choices"][0]["message"], {"role": "user", "content": "Another?"}]
    second = chat(turn)
    after = metrics(url)
    hits = (
        after["bitserve_prefix_cache_hits_total{}"] - before["bitserve_prefix_cache_hits_total{}"]
    )
    prompt = second["usage"]["prompt_tokens"]
    assert hits >= answer["usage"]["prompt_tokens"] > 0  # the whole first prompt, at least
    prefilled = after["bitserve_prompt_tokens_total{}"] - before["bitserve_prompt_tokens_total{}"]
    assert prefilled == prompt - hits
    assert second["choices"][0]["finish_reason"] in ("stop", "length")
    assert second["usage"]["prompt_tokens_details"] == {"cached_tokens": hits}
    assert answer["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}  # the first turn

    # streamed, n = 2: the prompt counted once, by its first choice (the slot of the turn above)
    stream = {**body, "messages": turn, "n": 2, "stream": True}
    stream["stream_options"] = {"include_usage": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=stream, timeout=120) as r:
        chunks = [json.loads(e) for e in sse_events(r) if e != "[DONE]"]
    assert chunks[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": prompt - 1}

    before = metrics(url)
    chat([system, {"role": "user", "content": "Name a number."}])
    hits = (
        metrics(url)["bitserve_prefix_cache_hits_total{}"]
        - before["bitserve_prefix_cache_hits_total{}"]
    )
    assert hits >= 40  # the shared system prompt's tokens, at least
