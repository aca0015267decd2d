"""End to end on the real default model: `bitserve serve default` quantizes it to W4 g128 once
(cached under models/checkpoints/), answers a chat question correctly (in free text and
inside a JSON schema), and batches greedy requests without changing their output."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import openai
import pytest
from conftest import DEFAULT_TOKENIZER, ServerStarter

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def url(server_start: ServerStarter) -> str:
    if not (DEFAULT_TOKENIZER / "config.json").is_file():
        pytest.skip("default model folder not fetched (run `bitserve fetch-default`)")
    return server_start("default", "--max-model-len", "512", "--max-num-seqs", "16", timeout=1200)


def test_default_checkpoint_is_cached_and_described(url: str) -> None:
    from bitserve.server.cli import resolve_checkpoint

    path = resolve_checkpoint("default")
    assert path.is_dir() and path.parent.name == "checkpoints"
    card = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]
    assert card["id"] == path.name
    q = card["quantization"]
    assert (q["bits"], q["group_size"]) == (4, 128)
    assert 4.0 < q["bits_per_weight"] < 4.3
    from bitserve.kernels import cpu_native

    if cpu_native.library() is not None:  # the fast kernel runs every projection
        assert [k.startswith("cpu: bitserve int16-activation kernel") for k in q["kernels"]] == [
            True
        ]


def test_chat_answers_paris(url: str) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=300, max_retries=0)
    model = client.models.list().data[0].id
    messages: Any = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0)
    assert "Paris" in (r.choices[0].message.content or "")
    assert r.choices[0].finish_reason in ("stop", "length")


def test_chat_answers_in_a_json_schema(url: str) -> None:
    """With a schema the default model's greedy answer is JSON of that shape, and still right;
    asked the same without one, it writes no such JSON."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=300, max_retries=0)
    model = client.models.list().data[0].id
    messages: Any = [{"role": "user", "content": "What is the capital of France?"}]
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 40},
            "country": {"type": "string", "maxLength": 40},
        },
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "capital", "schema": schema}}
    r = client.chat.completions.create(
        model=model, messages=messages, max_tokens=40, temperature=0, response_format=fmt
    )
    assert r.choices[0].finish_reason == "stop"
    assert json.loads(r.choices[0].message.content or "") == {"city": "Paris", "country": "France"}
    free = client.chat.completions.create(
        model=model, messages=messages, max_tokens=40, temperature=0
    )
    assert not (free.choices[0].message.content or "").startswith("{")


def test_sixteen_concurrent_greedy_equal_alone(url: str) -> None:
    """Prompts of 5 to 18 tokens, so prefill pads rows and decode rows have other lengths."""
    model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
    words = "The history of the city begins with a small market town on the river"
    prompts = [" ".join(words.split()[: 2 + i % 14]) + f" ({i})" for i in range(16)]

    def body(p: str) -> dict[str, Any]:
        return {"model": model, "prompt": p, "max_tokens": 24, "temperature": 0}

    alone = [
        httpx.post(f"{url}/v1/completions", json=body(p), timeout=300).json()["choices"][0]["text"]
        for p in prompts
    ]

    async def together() -> list[str]:
        async with httpx.AsyncClient(timeout=600) as client:
            rs = await asyncio.gather(
                *[client.post(f"{url}/v1/completions", json=body(p)) for p in prompts]
            )
        return [r.json()["choices"][0]["text"] for r in rs]

    assert asyncio.run(together()) == alone
