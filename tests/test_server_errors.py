"""Error handling and edge cases of the HTTP server, over real HTTP on 127.0.0.1: seeds out of
torch's range, unexpected exceptions (a JSON 500, counted), tokenization off the event loop,
logprobs of tokens that hold part of a character, `n` beyond the engine's capacity, JSON
nulls, malformed bodies and OpenAI fields that bitserve does not implement."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import httpx
import openai
import pytest
import uvicorn
from conftest import DEFAULT_TOKENIZER, ServerStarter
from prometheus_client.parser import text_string_to_metric_families

from bitserve.server.api import ServerState, create_app
from bitserve.server.engine import TextOffsets, TokenBytes
from bitserve.server.metrics import create_metrics
from bitserve.server.schemas import ModelCard

CHAT = [{"role": "user", "content": "Say 日本"}]


@pytest.fixture(scope="module")
def url(server_start: ServerStarter, server_tiny_checkpoint: Path) -> str:
    # 2 KV slots + 1 waiting: a request may have at most 3 sequences
    return server_start(
        server_tiny_checkpoint,
        "--max-model-len",
        "512",
        "--max-num-seqs",
        "2",
        "--max-waiting",
        "1",
        "--threads",
        "1",
    )


def post(url: str, path: str, body: Any, **kw: Any) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=120, **kw)


def error_of(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = dict(r.json()["error"])
    assert err["message"] and err["type"]
    return err


def errors_counted(url: str, status: int) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "bitserve_request_errors_total" and s.labels["status"] == str(status)
    )


# --- seeds (#4) -------------------------------------------------------------------------------


def test_seeds_outside_torch_range(url: str) -> None:
    base = {"prompt": "hi", "max_tokens": 4, "temperature": 1.0, "ignore_eos": True}
    for seed in (2**64, -(2**63) - 1, -1e23, 10**30):
        err = error_of(post(url, "/v1/completions", {**base, "seed": seed}), 422)
        assert err["param"] == "seed" and err["type"] == "invalid_request_error"
    # the ends of the range work, and seed + i wraps modulo 2**64: choice 1 of seed 2**64 - 1
    # draws what choice 0 of seed 0 draws
    top = post(url, "/v1/completions", {**base, "seed": 2**64 - 1, "n": 2})
    assert top.status_code == 200, top.text
    zero = post(url, "/v1/completions", {**base, "seed": 0})
    texts = {c["index"]: c["text"] for c in top.json()["choices"]}
    assert texts[1] == zero.json()["choices"][0]["text"]
    low = post(url, "/v1/completions", {**base, "seed": -(2**63), "n": 2})
    assert low.status_code == 200, low.text
    assert errors_counted(url, 500) == 0


# --- unexpected exceptions (#4) and tokenization off the event loop (#3), on a stub app ------


class GateTokenizer:
    """Tokenizes "boom" by raising; anything else only once `release` is set."""

    chat_template = "stub"

    def __init__(self) -> None:
        self.entered, self.release = threading.Event(), threading.Event()

    def __call__(self, text: str, **_: Any) -> dict[str, list[int]]:
        if text == "boom":
            raise RuntimeError("tokenizer exploded")
        self.entered.set()
        self.release.wait(20)
        return {"input_ids": [1] * 100}  # over the stub's 64-token context

    def apply_chat_template(self, messages: list[dict[str, str]], **_: Any) -> str:
        return messages[-1]["content"]

    def decode(self, ids: list[int], **_: Any) -> str:
        return "x" * len(ids)


class StubEngine:
    runner = SimpleNamespace(lm_head=SimpleNamespace(out_features=100))
    eos_ids: set[int] = set()

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def alive(self) -> bool:
        return True


@contextlib.contextmanager
def serving(state: ServerState) -> Iterator[str]:
    """The real app over `state`, served by uvicorn in a thread on 127.0.0.1: its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    server = uvicorn.Server(
        uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="critical")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def stub() -> Iterator[tuple[str, GateTokenizer]]:
    """The real app over a stub engine and tokenizer."""
    tok = GateTokenizer()
    card = ModelCard(id="stub", created=0, max_model_len=64)
    state = ServerState(
        engine=cast(Any, StubEngine()), tokenizer=tok, metrics=create_metrics("stub"), card=card
    )
    with serving(state) as url:
        yield url, tok
        tok.release.set()


def test_unexpected_exception_is_a_counted_json_500(stub: tuple[str, GateTokenizer]) -> None:
    url, _ = stub
    before = errors_counted(url, 500)
    for path, body in [
        ("/v1/completions", {"prompt": "boom"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "boom"}]}),
    ]:
        r = post(url, path, body)
        assert r.headers["content-type"] == "application/json"
        err = error_of(r, 500)
        assert (err["type"], err["code"], err["param"]) == ("server_error", "internal_error", None)
        assert "Traceback" not in r.text and "exploded" not in r.text
    assert errors_counted(url, 500) == before + 2


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": "slow"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "slow"}]}),
    ],
)
def test_tokenization_does_not_block_the_event_loop(
    stub: tuple[str, GateTokenizer], path: str, body: dict[str, Any]
) -> None:
    """While a request is being tokenized, the server answers others (on the event loop the
    tokenizer would hold every route until it returns)."""
    url, tok = stub
    tok.entered.clear()
    tok.release.clear()
    result: dict[str, httpx.Response] = {}
    sender = threading.Thread(target=lambda: result.setdefault("r", post(url, path, body)))
    sender.start()
    try:
        assert tok.entered.wait(20), "the request never reached the tokenizer"
        assert httpx.get(f"{url}/health", timeout=3).json() == {"status": "ok"}
    finally:
        tok.release.set()
        sender.join(timeout=30)
    assert error_of(result["r"], 400)["code"] == "context_length_exceeded"


class SlowTokenizer:
    """A tokenizer that takes SLOW seconds longer to tokenize (as a long prompt does)."""

    SLOW = 0.5

    def __init__(self, tok: Any) -> None:
        self.tok = tok

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tok, name)

    def __call__(self, text: str, **kw: Any) -> Any:
        time.sleep(self.SLOW)
        return self.tok(text, **kw)


def metric_sums(url: str, names: list[str]) -> dict[str, float]:
    """The histograms' sums, once each has an observation (the engine records the end-to-end
    latency just after the response's last output, so poll, bounded)."""
    deadline = time.monotonic() + 30
    while True:
        text = httpx.get(f"{url}/metrics", timeout=10).text
        got = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
        if all(got.get(f"{n}_count", 0) >= 1 for n in names) or time.monotonic() > deadline:
            return {n: got[f"{n}_sum"] for n in names}
        time.sleep(0.05)


def test_latency_metrics_start_before_tokenization(server_tiny_checkpoint: Path) -> None:
    """Time to first token and end-to-end latency run from the request's arrival, tokenizing
    included, as a client measures them; the queue time starts when the engine gets the
    sequence. A real engine over the tiny model, its tokenizer made slow."""
    from bitserve.models import load_model
    from bitserve.server.cli import build_state
    from bitserve.server.settings import Settings

    settings = Settings(max_num_seqs=2, max_model_len=128, warmup=False)
    state = build_state(load_model(server_tiny_checkpoint), settings)
    state.tokenizer = SlowTokenizer(state.tokenizer)
    names = [
        "bitserve_time_to_first_token_seconds",
        "bitserve_e2e_request_latency_seconds",
        "bitserve_request_queue_time_seconds",
    ]
    with serving(state) as url:
        body = {"prompt": "hi", "max_tokens": 2, "ignore_eos": True}
        r = post(url, "/v1/completions", body)
        assert r.status_code == 200, r.text
        ttft, e2e, queue = metric_sums(url, names).values()
    assert ttft >= SlowTokenizer.SLOW and e2e >= ttft
    assert queue < SlowTokenizer.SLOW


def test_huge_prompt_does_not_stall_the_server(url: str) -> None:
    """A few MB of prompt take seconds to tokenize; /health keeps answering meanwhile."""
    body = {"prompt": "hello world " * 300_000, "max_tokens": 1}  # 3.6 MB, 600k tokens
    done: dict[str, Any] = {}

    def send() -> None:
        t0 = time.monotonic()
        done["r"] = post(url, "/v1/completions", body)
        done["s"] = time.monotonic() - t0

    sender = threading.Thread(target=send)
    sender.start()
    waits = []
    while sender.is_alive():
        t0 = time.monotonic()
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200
        if sender.is_alive():
            waits.append(time.monotonic() - t0)
        time.sleep(0.05)
    sender.join()
    assert error_of(done["r"], 400)["code"] == "context_length_exceeded"
    assert done["s"] > 0.5, "tokenization too fast to tell; make the prompt longer"
    assert len(waits) >= 3 and max(waits) < 1.0, (done["s"], waits)


# --- logprobs of partial characters (#5) -----------------------------------------------------


def vocab_bytes(tok: Any) -> set[bytes]:
    """Every token's bytes, through transformers' GPT-2 byte alphabet."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    return {
        b"".join(bytes([byte_of[c]]) if c in byte_of else c.encode() for c in piece)
        for piece in tok.convert_ids_to_tokens(list(range(len(tok))))
    }


def char_offsets(pieces: list[bytes]) -> list[int]:
    """The index, in the decoded text (U+FFFD for invalid runs), of the character that each
    piece's first byte belongs to."""
    whole, p, out = b"".join(pieces), 0, []

    def lossy(b: bytes) -> str:
        return b.decode("utf-8", errors="replace")

    for piece in pieces:
        n = len(lossy(whole[:p]))
        if lossy(whole[:p]) + lossy(whole[p:]) != lossy(whole):
            n -= 1  # p falls inside a character: it is the last one of the head
        out.append(n)
        p += len(piece)
    return out


def test_token_bytes_and_offsets_of_cjk_and_emoji() -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DEFAULT_TOKENIZER)
    tb = TokenBytes(tok)
    assert tb.kind == "byte_level"
    text = "日本語の文章: 今日は 🎉 café"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces = [tb(i) for i in ids]
    assert b"".join(pieces) == text.encode()
    assert any(p != p.decode(errors="replace").encode() for p in pieces)  # partial characters
    assert [tb.text(i) for i in ids] == [p.decode("utf-8", errors="replace") for p in pieces]
    offsets = TextOffsets(tb)
    got = [offsets.add(i) for i in ids]
    assert got == char_offsets(pieces)
    assert "".join(text[o] for o in got).startswith("日日本語語語の文章章")
    cut = tok.convert_tokens_to_ids(["æĹ", "a", "¥"])  # e6 97 | a | a5: two invalid runs
    offsets = TextOffsets(tb)
    assert [offsets.add(i) for i in cut] == char_offsets([tb(i) for i in cut]) == [0, 1, 2]


def test_logprobs_carry_the_bytes_of_partial_characters(
    url: str, server_tiny_checkpoint: Path
) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(server_tiny_checkpoint)
    known, special = vocab_bytes(tok), set(tok.all_special_tokens)
    sampling = {"temperature": 1.0, "max_tokens": 24, "ignore_eos": True}
    for seed in range(60):  # the random model emits a partial character for some seeds
        chat = post(
            url,
            "/v1/chat/completions",
            {"messages": CHAT, "seed": seed, "logprobs": True, "top_logprobs": 3, **sampling},
        ).json()
        content = chat["choices"][0]["logprobs"]["content"]
        if any("\ufffd" in e["token"] for e in content) and not any(
            e["token"] in special for e in content
        ):
            break
    else:
        pytest.fail("no seed gave a token holding part of a character")
    text = chat["choices"][0]["message"]["content"]
    for e in content + [t for c in content for t in c["top_logprobs"]]:
        raw = bytes(e["bytes"])
        assert raw in known, e
        assert e["token"] == raw.decode("utf-8", errors="replace")
    partial = [e for e in content if "\ufffd" in e["token"]]
    assert all("\ufffd".encode() not in bytes(e["bytes"]) for e in partial), partial
    pieces = [bytes(e["bytes"]) for e in content]
    rebuilt = b"".join(pieces).decode("utf-8", errors="replace")
    assert rebuilt.startswith(text) and set(rebuilt[len(text) :]) <= {"\ufffd"}

    # the same tokens through the legacy route: the chat prompt's ids, the same seed
    rendered = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    ids = tok(rendered, add_special_tokens=False)["input_ids"]
    legacy = {"prompt": ids, "seed": seed, "logprobs": 2, **sampling}
    choice = post(url, "/v1/completions", legacy).json()["choices"][0]
    assert choice["text"] == text
    lp = choice["logprobs"]
    assert lp["tokens"] == [e["token"] for e in content]
    assert lp["text_offset"] == char_offsets(pieces)
    assert all(o <= len(text) for o in lp["text_offset"])
    with httpx.stream(
        "POST", f"{url}/v1/completions", json={**legacy, "stream": True}, timeout=120
    ) as r:
        chunks = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    streamed = [o for c in chunks if (x := c["choices"][0]["logprobs"]) for o in x["text_offset"]]
    assert streamed == lp["text_offset"]


# --- n beyond capacity (#8) ------------------------------------------------------------------


def test_n_that_can_never_fit_is_400_not_429(url: str) -> None:
    body = {"prompt": "hi", "max_tokens": 2, "ignore_eos": True}
    r = post(url, "/v1/completions", {**body, "n": 4})
    err = error_of(r, 400)
    assert err["param"] == "n" and err["type"] == "invalid_request_error"
    assert "retry-after" not in r.headers
    chat = {"messages": CHAT, "max_tokens": 2, "n": 4}
    assert error_of(post(url, "/v1/chat/completions", chat), 400)["param"] == "n"
    ok = post(url, "/v1/completions", {**body, "n": 3})  # 2 slots + 1 waiting
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 3


# --- JSON null means the default (#9) --------------------------------------------------------


NULLABLE = (
    "temperature",
    "top_p",
    "top_k",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "max_tokens",
    "stop",
    "stop_token_ids",
    "seed",
    "stream",
    "stream_options",
    "user",
    "logit_bias",
    "response_format",
)


def test_null_sampling_fields_take_their_defaults(url: str) -> None:
    nulls = dict.fromkeys(NULLABLE)
    r = post(
        url,
        "/v1/completions",
        {"prompt": "hi", "ignore_eos": True, "logprobs": None, "echo": None, "best_of": None}
        | nulls,
    )
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1 and r.json()["usage"]["completion_tokens"] == 16
    r = post(
        url,
        "/v1/chat/completions",
        {"messages": CHAT, "max_completion_tokens": 3, "ignore_eos": True, "logprobs": None}
        | nulls
        | {"top_logprobs": None, "tools": None, "tool_choice": None},
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=60, max_retries=0)
    c = client.completions.create(
        model=client.models.list().data[0].id,
        prompt="hi",
        max_tokens=2,
        extra_body={"temperature": None, "top_p": None, "n": None, "frequency_penalty": None},
    )
    assert c.choices[0].text is not None


# --- malformed bodies (#10) ------------------------------------------------------------------


def test_malformed_bodies_get_a_readable_400(url: str) -> None:
    cases: list[tuple[bytes, str | None, str]] = [
        (b'{"prompt": "hi",', "application/json", "not valid JSON"),
        (b"", "application/json", "empty"),
        (b'["hi"]', "application/json", "JSON object"),
        (b'{"prompt": "hi"}', "text/plain", "Content-Type: application/json"),
        (b'{"prompt": "hi"}', None, "Content-Type: application/json"),
    ]
    before = errors_counted(url, 400)
    for content, ctype, says in cases:
        headers = {"content-type": ctype} if ctype else {}
        r = httpx.post(f"{url}/v1/completions", content=content, headers=headers, timeout=30)
        err = error_of(r, 400)
        assert says in err["message"] and err["param"] is None, err
        assert err["type"] == "invalid_request_error"
    r = httpx.post(
        f"{url}/v1/chat/completions",
        content=b'{"messages": [}',
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert error_of(r, 400)["message"] == (
        "request body is not valid JSON: Expecting value at line 1 column 15"
    )
    assert errors_counted(url, 400) == before + len(cases) + 1
    # a well-formed body with a bad field stays a 422 naming it
    err = error_of(post(url, "/v1/completions", {"prompt": "hi", "temperature": "hot"}), 422)
    assert err["param"] == "temperature"


# --- fields bitserve does not implement (#12) ------------------------------------------------


@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        ("/v1/completions", {"echo": True}, "echo"),
        ("/v1/completions", {"best_of": 3}, "best_of"),
        ("/v1/completions", {"suffix": " the end"}, "suffix"),
        ("/v1/chat/completions", {"tools": [{"type": "function"}]}, "tools"),
        ("/v1/chat/completions", {"tool_choice": "auto"}, "tool_choice"),
        ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions"),
        ("/v1/chat/completions", {"function_call": "auto"}, "function_call"),
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
        (
            "/v1/chat/completions",
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "x"}}],
                    }
                ]
            },
            "messages",
        ),
    ],
)
def test_unimplemented_fields_are_rejected(
    url: str, path: str, extra: dict[str, Any], param: str
) -> None:
    base = {"prompt": "hi"} if path == "/v1/completions" else {"messages": CHAT}
    err = error_of(post(url, path, {**base, "max_tokens": 2, **extra}), 400)
    assert (err["param"], err["type"]) == (param, "invalid_request_error")
    assert param in err["message"] or "content parts" in err["message"]


def test_harmless_fields_are_accepted(url: str) -> None:
    harmless = {"user": "u1", "metadata": {"k": "v"}, "logit_bias": {}, "max_tokens": 2}
    harmless |= {"response_format": {"type": "text"}}
    r = post(url, "/v1/completions", {"prompt": "hi", "echo": False, "best_of": 1, **harmless})
    assert r.status_code == 200, r.text
    r = post(
        url,
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "tool_choice": "none",
            "parallel_tool_calls": False,
            "logprobs": True,
            "top_logprobs": 2,
            **harmless,
        },
    )
    assert r.status_code == 200, r.text
