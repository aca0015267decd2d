"""Serving edge cases a demanding client hits, over real HTTP against a `bitserve serve` process
on 127.0.0.1: chat templates that reject a conversation, batches of prompts in
/v1/completions, model ids with a slash, and the metrics of a request abandoned in the queue."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import ServerStarter, launch_server
from prometheus_client.parser import text_string_to_metric_families
from tiny_models import char_tokenizer, save_tiny_model

MODEL = "org/tiny"  # a served name with a slash, as Hugging Face ids have
# Llama-2 / Mistral style: a conversation whose roles do not alternate is an error
STRICT_TEMPLATE = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}"
    "{% endif %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


@pytest.fixture(scope="module")
def url(server_start: ServerStarter, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = save_tiny_model(tmp_path_factory.mktemp("hunt") / "tiny-strict")
    tok = char_tokenizer()
    tok.chat_template = STRICT_TEMPLATE
    tok.save_pretrained(path)
    # one KV slot, so that a second request waits in the queue
    return server_start(
        path,
        "--served-model-name",
        MODEL,
        "--max-model-len",
        "4096",
        "--max-num-seqs",
        "1",
        "--threads",
        "1",
    )


def post(url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{url}{path}", json={"model": MODEL, **body}, timeout=120)


def metrics(url: str) -> dict[str, float]:
    """Every sample of /metrics as {name{labels}: value} (the model label left out)."""
    out = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model")
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def wait_for(url: str, check: Any, what: str) -> dict[str, float]:
    """Poll /metrics until check(metrics) holds (bounded)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        m = metrics(url)
        if check(m):
            return m
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}: {m}")


def test_chat_template_rejecting_messages_is_a_400(url: str) -> None:
    before = metrics(url)
    messages = [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "hello"}]
    r = post(url, "/v1/chat/completions", {"messages": messages, "max_tokens": 2})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == "messages"
    assert "roles must alternate" in err["message"]
    after = metrics(url)
    assert after.get("bitserve_request_errors_total{status=500}", 0) == before.get(
        "bitserve_request_errors_total{status=500}", 0
    )
    # the conversation the template accepts still works
    ok = post(url, "/v1/chat/completions", {"messages": messages[1:], "max_tokens": 2})
    assert ok.status_code == 200, ok.text


def raw_post(url: str, path: str, body: str) -> httpx.Response:
    """A JSON body sent as written (json= would refuse a lone surrogate before sending it)."""
    headers = {"content-type": "application/json"}
    return httpx.post(f"{url}{path}", content=body.encode(), headers=headers, timeout=120)


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", '{"prompt": "Hi \\ud800 there", "max_tokens": 2}', "prompt"),
        ("/v1/completions", '{"prompt": ["ok", "x\\udfff"], "max_tokens": 2}', "prompt"),
        ("/v1/completions", '{"prompt": "ok", "stop": "\\ud83d", "max_tokens": 2}', "stop"),
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": "Hi \\ud83d"}], "max_tokens": 2}',
            "messages.0.content",
        ),
    ],
)
def test_unpaired_surrogate_is_a_clear_4xx_not_a_500(
    url: str, path: str, body: str, param: str
) -> None:
    """A lone UTF-16 surrogate is valid JSON but not Unicode: the tokenizer raised a TypeError
    (a 500); now a 422 naming the field."""
    before = metrics(url).get("bitserve_request_errors_total{status=500}", 0)
    r = raw_post(url, path, body)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["param"] == param and "surrogate" in err["message"]
    assert metrics(url).get("bitserve_request_errors_total{status=500}", 0) == before


def test_openai_and_vllm_conventions(url: str) -> None:
    """Chat text parts are joined one per line (vLLM; they were glued into one word);
    top_k -1 means no top-k (vLLM; it was a 422); stream_options without stream is a 400
    (OpenAI, vLLM); a chat prompt over the context names `messages`; a 405 keeps its Allow."""
    parts = [{"type": "text", "text": "ab"}, {"type": "text", "text": "cd"}]
    usage = []
    for content in (parts, "ab\ncd"):
        body = {"messages": [{"role": "user", "content": content}], "max_tokens": 1}
        r = post(url, "/v1/chat/completions", body)
        assert r.status_code == 200, r.text
        usage.append(r.json()["usage"]["prompt_tokens"])
    assert usage[0] == usage[1]
    base = {"prompt": "ab", "max_tokens": 3, "temperature": 1.0, "seed": 5}
    with_minus = post(url, "/v1/completions", {**base, "top_k": -1})
    assert with_minus.status_code == 200, with_minus.text
    assert texts(with_minus.json()) == texts(post(url, "/v1/completions", base).json())
    r = post(url, "/v1/completions", {**base, "stream_options": {"include_usage": True}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options"
    long = {"messages": [{"role": "user", "content": "a" * 5000}], "max_tokens": 1}
    r = post(url, "/v1/chat/completions", long)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
    r = httpx.delete(f"{url}/v1/models", timeout=10)
    assert r.status_code == 405 and r.headers["allow"] == "GET"


def test_model_id_with_a_slash(url: str) -> None:
    r = httpx.get(f"{url}/v1/models/{MODEL}", timeout=10)
    assert r.status_code == 200, r.text
    assert r.json()["id"] == MODEL
    assert httpx.get(f"{url}/v1/models/org/other", timeout=10).status_code == 404


def texts(body: dict[str, Any]) -> list[str]:
    return [c["text"] for c in sorted(body["choices"], key=lambda c: c["index"])]


def test_completions_batch_of_prompts(url: str) -> None:
    base = {"max_tokens": 5, "temperature": 1.0, "seed": 11, "n": 2, "ignore_eos": True}
    singles = [post(url, "/v1/completions", {**base, "prompt": p}).json() for p in ("ab", "12")]
    r = post(url, "/v1/completions", {**base, "prompt": ["ab", "12"]})
    assert r.status_code == 200, r.text
    batch = r.json()
    # choice i * n + j is prompt i's choice j, as if each prompt came alone (seeds included)
    assert [c["index"] for c in batch["choices"]] == [0, 1, 2, 3]
    assert texts(batch) == texts(singles[0]) + texts(singles[1])
    assert batch["usage"]["prompt_tokens"] == sum(s["usage"]["prompt_tokens"] for s in singles)
    assert batch["usage"]["completion_tokens"] == 20
    # a list of token-id lists is a batch too, and gives the same texts
    tok = char_tokenizer()
    ids = [tok("ab")["input_ids"], tok("12")["input_ids"]]
    assert texts(post(url, "/v1/completions", {**base, "prompt": ids}).json()) == texts(batch)


def test_completions_numeric_strings_are_text_not_token_ids(url: str) -> None:
    base = {"max_tokens": 4, "temperature": 0, "ignore_eos": True}
    as_text = post(url, "/v1/completions", {**base, "prompt": ["12", "7"]}).json()
    assert as_text["usage"]["prompt_tokens"] == len(char_tokenizer()("12")["input_ids"]) + len(
        char_tokenizer()("7")["input_ids"]
    )
    assert len(as_text["choices"]) == 2
    for bad in ([True, False], [1.5, 2.0], [["a"]], [[]], ["ab", ""]):
        r = post(url, "/v1/completions", {**base, "prompt": bad})
        assert r.status_code in (400, 422), (bad, r.text)
        assert r.json()["error"]["param"].startswith("prompt")


def test_completions_batch_streams_every_choice(url: str) -> None:
    body = {
        "prompt": ["ab", "cd", "ef"],
        "max_tokens": 3,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream(
        "POST", f"{url}/v1/completions", json={"model": MODEL, **body}, timeout=120
    ) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    finished = [
        c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]
    ]
    assert sorted(c["index"] for c in finished) == [0, 1, 2]
    assert all(c["finish_reason"] == "length" for c in finished)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 9
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    out = client.completions.create(model=MODEL, prompt=["ab", "cd"], max_tokens=2, temperature=0)
    assert [c.index for c in out.choices] == [0, 1]


def test_request_abandoned_in_the_queue_is_counted_like_the_others(url: str) -> None:
    """Every finished sequence observes the e2e histogram, one abandoned while queued too, so
    that the histogram's count and bitserve_request_success_total agree."""
    before = metrics(url)
    long = {"model": MODEL, "prompt": "ab", "max_tokens": 4000, "ignore_eos": True}
    with httpx.stream(
        "POST", f"{url}/v1/completions", json={**long, "stream": True}, timeout=120
    ) as running:
        lines = running.iter_lines()  # kept: closing it would close the connection
        while not next(lines).startswith("data: "):
            pass
        with httpx.stream(
            "POST", f"{url}/v1/completions", json={**long, "stream": True}, timeout=120
        ) as queued:
            assert queued.status_code == 200
            wait_for(url, lambda m: m["bitserve_num_requests_waiting{}"] == 1, "a queued request")
        aborted = "bitserve_request_success_total{finish_reason=abort}"
        wait_for(url, lambda m: m.get(aborted, 0) == before.get(aborted, 0) + 1, "the abort")
    after = wait_for(
        url,
        lambda m: (
            m.get(aborted, 0) == before.get(aborted, 0) + 2
            and m["bitserve_num_requests_running{}"] == 0
        ),
        "both aborts",
    )

    def diff(prefix: str) -> float:
        return sum(v - before.get(k, 0) for k, v in after.items() if k.startswith(prefix))

    assert diff("bitserve_request_success_total") == 2
    assert diff("bitserve_e2e_request_latency_seconds_count") == 2
    assert after["bitserve_num_requests_waiting{}"] == 0
    assert after["bitserve_kv_cache_usage_ratio{}"] == 0


def _stream_events(url: str, body: dict[str, Any], first: threading.Event, out: list) -> None:
    """Read one streamed completion, appending each SSE data line to out; set `first` once
    the first chunk (or the end) has arrived."""
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    out.append(line[6:])
                    first.set()
    except httpx.HTTPError as e:
        out.append(f"error: {e!r}")
    first.set()


def test_sigterm_ends_requests_in_flight_at_the_shutdown_timeout(tmp_path: Path) -> None:
    """With --shutdown-timeout 1, a SIGTERM ends a stream that would run for many seconds, and
    one still queued behind it, with finish_reason "abort", a last chunk and [DONE]; then the
    server exits. (Without the flag the stream runs to its 12000 tokens.)"""
    path = save_tiny_model(tmp_path / "tiny")
    flags = ("--shutdown-timeout", "1", "--max-num-seqs", "1", "--max-model-len", "16384")
    proc, url = launch_server(path, (*flags, "--threads", "1"), tmp_path)
    try:
        body = {"model": "tiny", "prompt": "ab", "max_tokens": 12000, "stream": True}
        body |= {"ignore_eos": True, "temperature": 0}
        started = [threading.Event(), threading.Event()]
        events: list[list[str]] = [[], []]
        readers = [
            threading.Thread(target=_stream_events, args=(url, body, started[i], events[i]))
            for i in range(2)
        ]
        readers[0].start()
        assert started[0].wait(30), "the first stream sent nothing"
        readers[1].start()  # one KV slot: this one waits in the queue
        deadline = time.monotonic() + 30
        while metrics(url).get("bitserve_num_requests_waiting{}", 0) < 1:
            assert time.monotonic() < deadline, "the second request never queued"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        for reader in readers:
            reader.join(timeout=45)
            assert not reader.is_alive(), "a stream did not end after the shutdown timeout"
        for lines in events:
            assert lines[-1] == "[DONE]", lines[-3:]
            assert json.loads(lines[-2])["choices"][0]["finish_reason"] == "abort", lines[-2]
        assert len(events[0]) < 12000  # cut short, not run to its length
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=15)
