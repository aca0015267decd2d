"""Structured outputs (`response_format` json_object / json_schema and vLLM's
`structured_outputs`, through llguidance) and `logit_bias`: the sampler's masks and biases, a
random model's output kept valid by the grammar, and the same over HTTP on a real
`bitserve serve` process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pydantic
import pytest
import torch
from conftest import ServerStarter

from bitserve.models import load_model
from bitserve.server.sampling import SamplingParams, make_generator, sample
from bitserve.server.structured import json_grammar

# A schema whose every value is bounded, so a random model's output ends (a free string could
# run on for the whole context), with a short free string to exercise escaping.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "member": {"type": "boolean"},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "age", "member", "color", "tags"],
    "additionalProperties": False,
}


def check_person(text: str) -> dict[str, Any]:
    """The object `text` holds, after checking it against PERSON by hand."""
    obj = json.loads(text)
    assert set(obj) == {"name", "age", "member", "color", "tags"}, text
    assert isinstance(obj["name"], str) and len(obj["name"]) <= 6, text
    assert type(obj["age"]) is int and 0 <= obj["age"] <= 120, text
    assert type(obj["member"]) is bool and obj["color"] in ("red", "green", "blue"), text
    assert len(obj["tags"]) <= 3 and set(obj["tags"]) <= {"a", "b"}, text
    return dict(obj)


def test_sampler_chooses_only_allowed_tokens_and_adds_logit_bias() -> None:
    """Greedy rows take the best allowed token, drawing rows never draw a masked one, a bias
    of +100 forces its token and -100 removes the best one; logprobs stay those of the raw
    logits; a row whose mask allows nothing is an error, not token 0."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 40, generator=g)
    allowed = torch.rand(4, 40, generator=g) < 0.3
    allowed[:, 0] = True
    best = logits.argmax(dim=-1)
    params = [
        SamplingParams(5, temperature=0, logprobs=2),
        SamplingParams(5, temperature=0, logit_bias={int(best[1]): -100.0}),
        SamplingParams(5, temperature=0, logit_bias={7: 100.0}),
        SamplingParams(5, temperature=1.0, seed=3),
    ]
    gens = [make_generator(p.seed) for p in params]
    everything = torch.ones_like(allowed)
    tokens, lps = sample(logits, params, gens, [None] * 4, everything)
    assert tokens[0] == int(best[0]) and tokens[2] == 7
    assert tokens[1] == int(logits[1].topk(2).indices[1])
    masked = logits.masked_fill(~allowed, float("-inf"))
    drawn = []
    for i in range(200):
        gens = [make_generator(i) for _ in params]
        tokens, lps = sample(logits, params, gens, [None] * 4, allowed)
        drawn.append(tokens[3])
        assert tokens[0] == int(masked[0].argmax())
        assert all(bool(allowed[row, t]) for row, t in enumerate(tokens[:2]))
    assert all(bool(allowed[3, t]) for t in drawn) and len(set(drawn)) > 2
    raw = torch.log_softmax(logits[0], dim=-1)
    assert lps[0] is not None and lps[0].logprob == pytest.approx(float(raw[tokens[0]]))
    nothing = allowed.clone()
    nothing[1] = False
    with pytest.raises(ValueError, match="no finite value"):
        sample(logits, params, [make_generator(0)] * 4, [None] * 4, nothing)


def test_grammar_keeps_a_random_models_output_valid(server_tiny_checkpoint: Path) -> None:
    """A random 2-layer model writes noise; with PERSON's grammar every choice (greedy and
    sampled, batched together with a free one) is JSON matching it, and it stops right after
    the closing brace. Without the grammar the same seeds give no JSON at all."""
    from bitserve.server.cli import build_state
    from bitserve.server.settings import Settings

    state = build_state(load_model(server_tiny_checkpoint), Settings(max_num_seqs=8))
    engine, tok = state.engine, state.tokenizer
    prompt = tok("A person:", add_special_tokens=False)["input_ids"]
    grammar = json_grammar(PERSON)

    def run(constrained: bool) -> list[Any]:
        outs: dict[int, list[Any]] = {i: [] for i in range(6)}
        seqs = []
        for i in range(6):
            params = SamplingParams(max_tokens=60, temperature=0 if i == 0 else 1.0, seed=i)
            matcher = state.constraints.matchers(grammar, 1)[0] if constrained and i < 5 else None
            seqs.append(engine.new_sequence(i, prompt, params, outs[i].append, matcher=matcher))
        engine.submit(seqs)
        while engine.running or engine.waiting:
            engine.step()
        return [outs[i] for i in range(6)]

    for i, out in enumerate(run(True)[:5]):
        text = "".join(o.text for o in out)
        assert out[-1].finish_reason == "stop", (i, text)
        check_person(text)
        assert text.endswith("}") and tok.decode(out[-1].token_ids).endswith("}")
    for out in run(False)[:5]:
        with pytest.raises(ValueError):
            json.loads("".join(o.text for o in out))


def test_grammar_never_allows_special_or_end_tokens_inside_json(
    server_tiny_checkpoint: Path,
) -> None:
    """Inside a JSON string only text tokens are allowed: not the tokens the detokenizer drops
    (SmolLM2's <filename>, <jupyter_code>, ... are special but unnamed: they would vanish from
    the text the grammar counted them in) nor any end-of-sequence id (the end would cut the
    JSON short). After the JSON, only the end ids are. A second matcher of the same grammar
    is a copy of the compiled one, with its own state."""
    from transformers import AutoTokenizer

    from bitserve.server.engine import TokenBytes
    from bitserve.server.structured import Constraints, allowed_tokens

    tok = AutoTokenizer.from_pretrained(server_tiny_checkpoint)
    vocab = len(tok)
    special = sorted(i for i, t in tok.added_tokens_decoder.items() if t.special)
    assert len(special) > len(tok.all_special_ids)  # some are not named
    eos = {tok.eos_token_id, 1000}  # a second end id, as generation_config may add
    constraints = Constraints(tok, TokenBytes(tok), vocab, eos)
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    first, second = constraints.matchers(json_grammar(schema), 2)
    assert first.consume_tokens(tok.encode('{"a": "x', add_special_tokens=False))
    inside = allowed_tokens([first, second], vocab, torch.device("cpu"))
    assert not inside[0, special].any() and not inside[0, sorted(eos)].any()
    assert inside[0].sum() > vocab // 2  # almost any text may follow in a string
    assert inside[1].sum() < 10  # the second is still at the start: "{" and little else
    assert first.consume_tokens(tok.encode('"}', add_special_tokens=False))
    done = allowed_tokens([first], vocab, torch.device("cpu"))[0]
    assert set(done.nonzero().flatten().tolist()) == eos and first.is_stopped()


@pytest.fixture(scope="module")
def url(server_start: ServerStarter, server_tiny_checkpoint: Path) -> str:
    return server_start(server_tiny_checkpoint, "--max-model-len", "256", "--threads", "1")


def post(url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=120)


def test_response_format_over_http(url: str) -> None:
    """json_schema and json_object through both routes, streamed or not, n = 2, and the
    official client's parse() with a pydantic model: every text is JSON of the right shape."""
    chat = {"messages": [{"role": "user", "content": "Describe a person."}], "max_tokens": 80}
    schema_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    r = post(url, "/v1/chat/completions", chat | {"response_format": schema_format, "n": 2})
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        assert choice["finish_reason"] == "stop"
        check_person(choice["message"]["content"])
    body = {"prompt": "Person:", "max_tokens": 80, "temperature": 0}
    r = post(url, "/v1/completions", body | {"response_format": schema_format})
    assert r.status_code == 200, r.text
    check_person(r.json()["choices"][0]["text"])

    with httpx.stream(
        "POST",
        f"{url}/v1/chat/completions",
        json=chat | {"response_format": {"type": "json_object"}, "stream": True, "seed": 1},
        timeout=120,
    ) as s:
        events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    reasons = [c["choices"][0]["finish_reason"] for c in chunks]
    if reasons[-1] == "stop":  # a free-form object may also reach max_tokens
        assert isinstance(json.loads(text), dict)
    assert text.startswith("{")

    class Pet(pydantic.BaseModel):
        kind: str = pydantic.Field(max_length=8)
        legs: int = pydantic.Field(ge=0, le=8)
        tame: bool

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120, max_retries=0)
    parsed = client.chat.completions.parse(
        model=client.models.list().data[0].id,
        messages=[{"role": "user", "content": "A pet, please."}],
        response_format=Pet,
        max_tokens=60,
        seed=4,
    )
    pet = parsed.choices[0].message.parsed
    assert isinstance(pet, Pet) and 0 <= pet.legs <= 8


def test_vllm_structured_outputs_over_http(url: str) -> None:
    """vLLM's `structured_outputs`: one of the given strings, text matching a regex, a GBNF
    and a Lark grammar, a JSON schema; a random model's sampled output always matches."""
    import re

    choices = ["positive", "negative", 'mixed "feelings"', "n/a"]
    specs: list[tuple[dict[str, Any], Any]] = [
        ({"choice": choices}, lambda t: t in choices),
        ({"regex": "[0-9]{3}-[a-z]{2,4}"}, lambda t: re.fullmatch("[0-9]{3}-[a-z]{2,4}", t)),
        ({"grammar": 'root ::= "yes" | "no" | "maybe"'}, lambda t: t in ("yes", "no", "maybe")),
        ({"grammar": 'start: "up" | "down"'}, lambda t: t in ("up", "down")),
        ({"json": PERSON}, check_person),
    ]
    for spec, valid in specs:
        for path, body in [
            ("/v1/completions", {"prompt": "Answer:"}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Answer?"}]}),
        ]:
            request = body | {"structured_outputs": spec, "max_tokens": 60, "n": 3, "seed": 2}
            r = post(url, path, request)
            assert r.status_code == 200, r.text
            for choice in r.json()["choices"]:
                text = choice["text"] if "text" in choice else choice["message"]["content"]
                assert choice["finish_reason"] == "stop" and valid(text), (spec, text)


def test_logit_bias_over_http(url: str, server_tiny_checkpoint: Path) -> None:
    """A +100 bias makes every token the biased one, greedy or sampled; -100 on the greedy
    first token makes the second most likely one come first."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(server_tiny_checkpoint)
    body = {"prompt": "Hello", "max_tokens": 4, "temperature": 0, "logprobs": 2}

    def first_tokens(**extra: Any) -> list[str]:
        r = post(url, "/v1/completions", body | extra)
        assert r.status_code == 200, r.text
        return list(r.json()["choices"][0]["logprobs"]["tokens"])

    texts = [tok.decode([i]) for i in range(len(tok))]
    for temperature in (0, 1.0):
        tokens = first_tokens(temperature=temperature, logit_bias={"1001": 100})
        assert tokens == [texts[1001]] * 4
    r = post(url, "/v1/completions", body)
    logprobs = r.json()["choices"][0]["logprobs"]
    ranked = sorted(logprobs["top_logprobs"][0].items(), key=lambda kv: -kv[1])
    best = [i for i, t in enumerate(texts) if t == ranked[0][0]]  # every id with that text
    banned = first_tokens(logit_bias=dict.fromkeys(map(str, best), -100))
    assert banned[0] == ranked[1][0] != ranked[0][0]


@pytest.mark.parametrize(
    ("extra", "status", "param", "says"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"schema": {"type": "objekt"}},
                }
            },
            400,
            "response_format",
            "objekt",
        ),
        ({"response_format": {"type": "json_schema"}}, 422, "response_format", "json_schema"),
        ({"response_format": {"type": "yaml"}}, 422, "response_format", "json_object"),
        ({"logit_bias": {"x": 1}}, 400, "logit_bias", "'x'"),
        ({"logit_bias": {"49152": 1}}, 400, "logit_bias", "49152"),
        ({"logit_bias": {"5": 101}}, 422, "logit_bias", "100"),
        ({"structured_outputs": {"regex": "(unclosed"}}, 400, "structured_outputs", "unclosed"),
        ({"structured_outputs": {"grammar": "start: nope"}}, 400, "structured_outputs", "nope"),
        ({"structured_outputs": {"grammar": "root ::= (("}}, 400, "structured_outputs", "GBNF"),
        ({"structured_outputs": {"choice": []}}, 422, "structured_outputs", "at least 1"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, 422, "structured_outputs", "one"),
        (
            {"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}},
            400,
            "structured_outputs",
            "not both",
        ),
        ({"logit_bias": {"1_0": 1}}, 400, "logit_bias", "'1_0'"),
        ({"logit_bias": {"010": 1}}, 400, "logit_bias", "'010'"),
        ({"logit_bias": {"\u0661\u0660": 1}}, 400, "logit_bias", "token ids"),
        ({"logit_bias": {"9" * 5000: 1}}, 400, "logit_bias", "99..."),
    ],
)
def test_bad_response_format_or_logit_bias_is_a_clear_error(
    url: str, extra: dict[str, Any], status: int, param: str, says: str
) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2} | extra
    r = post(url, "/v1/chat/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"].startswith(param) and says in err["message"], err
