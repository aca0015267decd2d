"""The HTTP layer: OpenAI-compatible routes over the engine, SSE streaming, OpenAI-shaped
errors, health/readiness and Prometheus metrics. A request's path: route -> tokenize and check
-> Engine.submit (one Sequence per choice) -> StepOutputs on an asyncio queue -> JSON or SSE.
Tokenization runs in a worker thread, so a huge prompt does not stall the event loop (and with
it every other stream)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, cast

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from bitserve.server import schemas as S
from bitserve.server.engine import (
    Engine,
    Overloaded,
    Sequence,
    StepOutput,
    TextOffsets,
    TokenBytes,
    TooManySequences,
)
from bitserve.server.metrics import Metrics, render
from bitserve.server.sampling import SamplingParams, TokenLogprobs
from bitserve.server.structured import (
    Constraints,
    choice_grammar,
    json_grammar,
    lark_grammar,
    regex_grammar,
)

log = logging.getLogger("bitserve.api")


@dataclass
class ServerState:
    """Everything a route needs: the engine, its tokenizer, metrics and the model card."""

    engine: Engine
    tokenizer: Any
    metrics: Metrics
    card: S.ModelCard
    token_bytes: TokenBytes = field(init=False)
    constraints: Constraints = field(init=False)

    def __post_init__(self) -> None:
        self.token_bytes = TokenBytes(self.tokenizer)
        vocab = self.engine.runner.lm_head.out_features
        self.constraints = Constraints(self.tokenizer, self.token_bytes, vocab, self.engine.eos_ids)


class APIError(Exception):
    """An error answered in the OpenAI shape with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = (
            status,
            message,
            type_,
            code,
            param,
        )
        self.retry_after = retry_after


def _error_response(state: ServerState, err: APIError) -> JSONResponse:
    """Count the error by status and answer it in the OpenAI error shape."""
    state.metrics.rejected.labels(model=state.card.id, status=str(err.status)).inc()
    body = S.ErrorResponse(
        error=S.ErrorBody(message=err.message, type=err.type, param=err.param, code=err.code)
    )
    headers = {"Retry-After": str(err.retry_after)} if err.retry_after is not None else None
    return JSONResponse(body.model_dump(), status_code=err.status, headers=headers)


def _check_model(state: ServerState, model: str | None) -> None:
    """404 unless `model` is absent or the served model's id."""
    if model is not None and model != state.card.id:
        raise APIError(
            404,
            f"The model {model!r} does not exist; this server serves {state.card.id!r}",
            code="model_not_found",
            param="model",
        )


def _check_prompt(
    state: ServerState, ids: list[int], max_tokens: int | None, param: str = "prompt"
) -> int:
    """Validate the prompt (the request field `param`) against the context; return the
    effective max_tokens."""
    limit = state.card.max_model_len
    if not ids:
        raise APIError(400, "The prompt is empty", param=param)
    vocab = state.engine.runner.lm_head.out_features
    if min(ids) < 0 or max(ids) >= vocab:
        raise APIError(400, f"Prompt token ids must be in [0, {vocab})", param=param)
    if len(ids) >= limit:
        raise APIError(
            400,
            f"This model's maximum context length is {limit} tokens, but the prompt has "
            f"{len(ids)} tokens",
            code="context_length_exceeded",
            param=param,
        )
    if max_tokens is None:
        return limit - len(ids)
    if len(ids) + max_tokens > limit:
        raise APIError(
            400,
            f"This model's maximum context length is {limit} tokens; the prompt ({len(ids)}) "
            f"plus max_tokens ({max_tokens}) exceeds it",
            code="context_length_exceeded",
            param="max_tokens",
        )
    return max_tokens


def _check_supported(req: S.SamplingFields) -> None:
    """400 for a field set to something bitserve does not implement (rather than ignore it)."""
    if (bad := req.unsupported()) is not None:
        raise APIError(400, bad.message, code=bad.code, param=bad.param)


def _logit_bias(state: ServerState, req: S.SamplingFields) -> dict[int, float]:
    """The request's logit_bias with token ids as integers; 400 for a key that is not a token
    id of this model."""
    vocab = state.engine.runner.lm_head.out_features
    bias = {}
    for key, value in (req.logit_bias or {}).items():
        token = int(key) if key.isascii() and key.isdigit() and len(key) < 12 else -1
        if not 0 <= token < vocab or str(token) != key:
            shown = key if len(key) <= 20 else key[:20] + "..."
            raise APIError(
                400,
                f"logit_bias keys must be token ids in [0, {vocab}), got {shown!r}",
                param="logit_bias",
            )
        bias[token] = value
    return bias


def _grammar(req: S.SamplingFields) -> str | None:
    """The llguidance grammar the request's output must follow (None: free text)."""
    spec = req.structured_outputs
    if spec is None:
        schema = None if req.response_format is None else req.response_format.output_schema()
        return None if schema is None else json_grammar(schema)
    if spec.json_ is not None:
        return json_grammar(spec.json_)
    if spec.regex is not None:
        return regex_grammar(spec.regex)
    if spec.choice is not None:
        return choice_grammar(spec.choice)
    return lark_grammar(spec.grammar or "")


def _matchers(state: ServerState, req: S.SamplingFields, count: int) -> list[Any]:
    """One grammar matcher per sequence for a structured output (None each for free text);
    a schema, regex or grammar llguidance cannot compile is a 400 with its reason. Blocking
    (a large schema compiles for a while): the routes call it in a worker thread."""
    param = "response_format" if req.structured_outputs is None else "structured_outputs"
    try:
        grammar = _grammar(req)
        return [None] * count if grammar is None else state.constraints.matchers(grammar, count)
    except ValueError as e:
        raise APIError(400, f"{param}: {e}", param=param) from None


def _params(
    state: ServerState, req: S.SamplingFields, max_tokens: int, logprobs: int | None
) -> list[SamplingParams]:
    """One SamplingParams per choice; a seeded request gives choice i the seed + i (taken
    modulo 2**64 by make_generator)."""
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    bias = _logit_bias(state, req)
    return [
        SamplingParams(
            max_tokens=max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=max(req.top_k, 0),
            seed=None if req.seed is None else req.seed + i,
            stop=stop,
            stop_token_ids=list(req.stop_token_ids or []),
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            logprobs=logprobs,
            ignore_eos=req.ignore_eos,
            logit_bias=bias,
        )
        for i in range(req.n)
    ]


def _submit(
    state: ServerState, choices: list[tuple[list[int], SamplingParams, Any]], arrival: float
) -> tuple[asyncio.Queue[StepOutput], list[Sequence]]:
    """Hand one sequence per choice (its prompt ids, parameters and grammar matcher) to the engine; outputs
    arrive on the returned queue. arrival: when the route began (before tokenizing), where the
    latency metrics start, as a client's clock would."""
    if not state.engine.alive():
        raise APIError(503, "The engine is not running", "server_error", retry_after=5)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[StepOutput] = asyncio.Queue()

    def emit(out: StepOutput) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, out)

    seqs = [
        state.engine.new_sequence(i, ids, p, emit, arrival, matcher)
        for i, (ids, p, matcher) in enumerate(choices)
    ]
    try:
        state.engine.submit(seqs)
    except TooManySequences as e:
        raise APIError(400, f"n (times the prompts) is too large: {e}", param="n") from None
    except Overloaded as e:
        raise APIError(
            429,
            f"The server is overloaded ({e}); retry later",
            "rate_limit_error",
            code="overloaded",
            retry_after=1,
        ) from None
    return queue, seqs


async def _outputs(
    state: ServerState, queue: asyncio.Queue[StepOutput], seqs: list[Sequence]
) -> AsyncIterator[StepOutput]:
    """Outputs of all choices until each has finished; abandoning the iterator aborts them."""
    left = len(seqs)
    try:
        while left:
            out = await queue.get()
            left -= out.finish_reason is not None
            yield out
    finally:
        if left:
            state.engine.abort(seqs)


def _completion_logprobs(
    state: ServerState, ids: list[int], lps: list[TokenLogprobs | None], offsets: TextOffsets
) -> S.CompletionLogprobs:
    """Legacy completions logprobs (tokens, token_logprobs, top_logprobs, text_offset). A token
    that holds part of a character reads U+FFFD; `offsets` (one per choice, kept across
    streamed chunks) gives character offsets into the choice's text."""
    out = S.CompletionLogprobs()
    for token, lp in zip(ids, lps, strict=True):
        if lp is None:
            continue
        out.tokens.append(state.token_bytes.text(token))
        out.token_logprobs.append(lp.logprob)
        top: dict[str, float] = {}
        for t, v in lp.top:  # most likely first: keep it if two tokens read the same
            top.setdefault(state.token_bytes.text(t), v)
        out.top_logprobs.append(top)
        out.text_offset.append(offsets.add(token))
    return out


def _chat_logprobs(
    state: ServerState, ids: list[int], lps: list[TokenLogprobs | None]
) -> S.ChatLogprobs:
    """Chat logprobs: one entry per token with its top alternatives and the token's own bytes
    (those of a partial character too, so that clients can rebuild the text)."""

    def entry(token: int, value: float) -> S.TopLogprob:
        raw = state.token_bytes(token)
        return S.TopLogprob(
            token=raw.decode("utf-8", errors="replace"), logprob=value, bytes=list(raw)
        )

    content = [
        S.TokenLogprob(
            **entry(t, lp.logprob).model_dump(), top_logprobs=[entry(*x) for x in lp.top]
        )
        for t, lp in zip(ids, lps, strict=True)
        if lp is not None
    ]
    return S.ChatLogprobs(content=content)


def _usage(seqs: list[Sequence], n: int, prompt_tokens: int, completion_tokens: int) -> S.Usage:
    """The OpenAI usage object; `prompt_tokens_details.cached_tokens`: the prompt tokens whose
    K/V a slot already held, each prompt counted once as in `prompt_tokens` (by its first
    choice, seqs[i * n])."""
    return S.Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=S.PromptTokensDetails(cached_tokens=sum(s.cached for s in seqs[::n])),
    )


def _sse(item: BaseModel | str) -> str:
    """One Server-Sent Event carrying a JSON chunk or the final [DONE]."""
    data = item if isinstance(item, str) else item.model_dump_json(exclude_none=False)
    return f"data: {data}\n\n"


def _chat_prompt(state: ServerState, req: S.ChatRequest) -> list[int]:
    """Token ids of the messages rendered with the tokenizer's chat template (blocking: the
    routes call it in a worker thread). A template that refuses the messages is a 400."""
    from jinja2 import TemplateError, TemplateSyntaxError  # what chat templates run on

    tok = state.tokenizer
    if not getattr(tok, "chat_template", None):
        raise APIError(400, "This model's tokenizer has no chat template; use /v1/completions")
    messages = []
    for m in req.messages:
        content = m.content
        if isinstance(content, list):
            # text parts one per line, as vLLM joins them (not glued into one word)
            content = "\n".join(str(p.get("text", "")) for p in content if p.get("type") == "text")
        messages.append(
            {"role": "system" if m.role == "developer" else m.role, "content": content or ""}
        )
    try:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except TemplateSyntaxError:
        raise  # the template itself is broken: a server error
    except TemplateError as e:  # the template refuses these messages (raise_exception)
        raise APIError(
            400, f"The messages do not fit this model's chat template: {e}", param="messages"
        ) from None
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _completion_prompts(state: ServerState, prompt: S.Prompt) -> list[list[int]]:
    """Token ids of each prompt of a completions request: text, token ids, or a batch of
    either (blocking: the route calls it in a worker thread). An empty batch is one empty
    prompt, which _check_prompt refuses."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif not prompt or isinstance(prompt[0], int):
        return [list(cast(list[int], prompt))]
    return [
        list(state.tokenizer(p)["input_ids"]) if isinstance(p, str) else list(p) for p in prompt
    ]


async def _collect(
    state: ServerState, queue: asyncio.Queue[StepOutput], seqs: list[Sequence]
) -> tuple[list[str], list[list[int]], list[list[TokenLogprobs | None]], list[str], int]:
    """Wait for every choice; return texts, token ids, logprobs, finish reasons, output tokens."""
    n = len(seqs)
    texts, ids = [""] * n, [[] for _ in range(n)]  # type: list[str], list[list[int]]
    lps: list[list[TokenLogprobs | None]] = [[] for _ in range(n)]
    reasons, total = [""] * n, 0
    async for out in _outputs(state, queue, seqs):
        texts[out.index] += out.text
        ids[out.index] += out.token_ids
        lps[out.index] += out.logprobs
        if out.finish_reason is not None:
            reasons[out.index] = out.finish_reason
            total += out.completion_tokens
    return texts, ids, lps, reasons, total


async def _collect_unless_gone(
    request: Request, state: ServerState, queue: asyncio.Queue[StepOutput], seqs: list[Sequence]
) -> tuple[list[str], list[list[int]], list[list[TokenLogprobs | None]], list[str], int]:
    """`_collect`, but abort the sequences if the client disconnects before they finish."""
    task = asyncio.ensure_future(_collect(state, queue, seqs))
    while not (await asyncio.wait({task}, timeout=0.5))[0]:
        if await request.is_disconnected():
            task.cancel()  # closes _outputs, whose cleanup aborts the sequences
            raise APIError(499, "Client closed the request", "client_closed_request")
    return task.result()


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI application; the engine thread runs for the app's lifetime."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.engine.start()
        yield
        state.engine.stop()

    app = FastAPI(title="bitserve", lifespan=lifespan)
    name = state.card.id

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error_response(state, exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid" or tuple(first["loc"]) == ("body",):
            return _error_response(state, APIError(400, _body_problem(request, exc, first)))
        param = ".".join(str(x) for x in first["loc"] if x != "body") or None
        message = f"{param}: {first['msg']}" if param else str(first["msg"])
        return _error_response(state, APIError(422, message, param=param))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        response = _error_response(state, APIError(exc.status_code, str(exc.detail)))
        response.headers.update(exc.headers or {})  # e.g. a 405's Allow
        return response

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises it after this answer, so uvicorn logs the traceback as well.
        log.error(
            "internal error answering %s %s: %s: %s",
            request.method,
            request.url.path,
            type(exc).__name__,
            exc,
        )
        err = APIError(
            500,
            "The server had an internal error while processing the request",
            "server_error",
            code="internal_error",
        )
        return _error_response(state, err)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if not state.engine.alive():
            raise APIError(503, "The engine is not running", "server_error", retry_after=5)
        return JSONResponse({"status": "ready", "model": name})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(render(state.metrics), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> S.ModelList:
        return S.ModelList(data=[state.card])

    @app.get("/v1/models/{model_id:path}")  # ids may hold a slash ("org/name")
    async def model(model_id: str) -> S.ModelCard:
        _check_model(state, model_id)
        return state.card

    @app.post("/v1/completions", response_model=None)
    async def completions(req: S.CompletionRequest, request: Request) -> Any:
        arrival = time.perf_counter()
        _check_model(state, req.model)
        _check_supported(req)

        def prepare() -> tuple[list[tuple[list[int], int]], list[Any]]:
            prompts = _completion_prompts(state, req.prompt)
            checked = [(ids, _check_prompt(state, ids, req.max_tokens)) for ids in prompts]
            return checked, _matchers(state, req, len(prompts) * req.n)

        prompts, matchers = await run_in_threadpool(prepare)
        # choice i * n + j is prompt i's choice j, as if each prompt came alone (seed + j)
        choices = [
            (ids, p)
            for ids, max_tokens in prompts
            for p in _params(state, req, max_tokens, req.logprobs)
        ]
        queue, seqs = _submit(
            state,
            [(ids, p, m) for (ids, p), m in zip(choices, matchers, strict=True)],
            arrival,
        )
        prompt_tokens = sum(len(ids) for ids, _ in prompts)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _stream(
                _completion_events(state, req, queue, seqs, prompt_tokens, include_usage)
            )
        texts, ids, lps, reasons, total = await _collect_unless_gone(request, state, queue, seqs)
        choices = [
            S.CompletionChoice(
                index=i,
                text=texts[i],
                finish_reason=reasons[i],
                logprobs=None
                if req.logprobs is None
                else _completion_logprobs(state, ids[i], lps[i], TextOffsets(state.token_bytes)),
            )
            for i in range(len(seqs))
        ]
        usage = _usage(seqs, req.n, prompt_tokens, total)
        return S.CompletionResponse(model=name, choices=choices, usage=usage)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(req: S.ChatRequest, request: Request) -> Any:
        arrival = time.perf_counter()
        _check_model(state, req.model)
        _check_supported(req)

        def prepare() -> tuple[list[int], int, list[Any]]:
            ids = _chat_prompt(state, req)
            max_tokens = req.max_completion_tokens or req.max_tokens
            checked = _check_prompt(state, ids, max_tokens, "messages")
            return ids, checked, _matchers(state, req, req.n)

        prompt_ids, max_tokens, matchers = await run_in_threadpool(prepare)
        top = (req.top_logprobs or 0) if req.logprobs else None
        params = _params(state, req, max_tokens, top)
        choices = [(prompt_ids, p, m) for p, m in zip(params, matchers, strict=True)]
        queue, seqs = _submit(state, choices, arrival)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _stream(_chat_events(state, req, queue, seqs, len(prompt_ids), include_usage))
        texts, ids, lps, reasons, total = await _collect_unless_gone(request, state, queue, seqs)
        choices = [
            S.ChatChoice(
                index=i,
                message=S.AssistantMessage(content=texts[i]),
                finish_reason=reasons[i],
                logprobs=_chat_logprobs(state, ids[i], lps[i]) if req.logprobs else None,
            )
            for i in range(len(seqs))
        ]
        usage = _usage(seqs, req.n, len(prompt_ids), total)
        return S.ChatResponse(model=name, choices=choices, usage=usage)

    return app


def _body_problem(request: Request, exc: RequestValidationError, first: dict[str, Any]) -> str:
    """What is wrong with a request body that is not a JSON object at all: invalid JSON, an
    empty body, a body not sent as JSON, or JSON that is not an object."""
    if first.get("type") == "json_invalid":
        reason = str(first.get("ctx", {}).get("error", "invalid JSON"))
        loc = first["loc"]
        if isinstance(exc.body, str) and loc and isinstance(loc[-1], int):
            err = json.JSONDecodeError(reason, exc.body, loc[-1])
            return (
                f"request body is not valid JSON: {reason} at line {err.lineno} column {err.colno}"
            )
        return f"request body is not valid JSON: {reason}"
    if exc.body is None:
        return "request body is empty: send a JSON object (Content-Type: application/json)"
    if isinstance(exc.body, bytes | bytearray):
        got = request.headers.get("content-type") or "none"
        return f"request body must be JSON sent with Content-Type: application/json (got {got})"
    return f"request body must be a JSON object, not {type(exc.body).__name__}"


def _stream(events: AsyncIterator[str]) -> StreamingResponse:
    """An SSE response over an async iterator of events."""
    return StreamingResponse(
        events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


async def _completion_events(
    state: ServerState,
    req: S.CompletionRequest,
    queue: asyncio.Queue[StepOutput],
    seqs: list[Sequence],
    prompt_tokens: int,
    include_usage: bool,
) -> AsyncIterator[str]:
    """SSE chunks of a streamed completion, then the usage chunk if asked, then [DONE]."""
    base = S.CompletionResponse(model=state.card.id, choices=[])
    offsets, total = [TextOffsets(state.token_bytes) for _ in seqs], 0
    async for out in _outputs(state, queue, seqs):
        if not out.text and out.finish_reason is None and req.logprobs is None:
            continue
        lp = None
        if req.logprobs is not None:
            lp = _completion_logprobs(state, out.token_ids, out.logprobs, offsets[out.index])
        choice = S.CompletionChoice(
            index=out.index, text=out.text, logprobs=lp, finish_reason=out.finish_reason
        )
        total += out.completion_tokens if out.finish_reason is not None else 0
        yield _sse(base.model_copy(update={"choices": [choice]}))
    if include_usage:
        usage = _usage(seqs, req.n, prompt_tokens, total)
        yield _sse(base.model_copy(update={"usage": usage}))
    yield _sse("[DONE]")


async def _chat_events(
    state: ServerState,
    req: S.ChatRequest,
    queue: asyncio.Queue[StepOutput],
    seqs: list[Sequence],
    prompt_tokens: int,
    include_usage: bool,
) -> AsyncIterator[str]:
    """SSE chunks of a streamed chat completion: a role delta per choice, content deltas, a
    final delta with finish_reason, the usage chunk if asked, then [DONE]."""
    base = S.ChatChunk(
        id=S._id("chatcmpl"), created=int(time.time()), model=state.card.id, choices=[]
    )

    def chunk(choice: S.ChatChunkChoice) -> str:
        return _sse(base.model_copy(update={"choices": [choice]}))

    for i in range(len(seqs)):
        yield chunk(S.ChatChunkChoice(index=i, delta=S.Delta(role="assistant", content="")))
    total = 0
    async for out in _outputs(state, queue, seqs):
        if not out.text and out.finish_reason is None and not req.logprobs:
            continue
        lp = _chat_logprobs(state, out.token_ids, out.logprobs) if req.logprobs else None
        delta = S.Delta(content=out.text) if out.text else S.Delta()
        total += out.completion_tokens if out.finish_reason is not None else 0
        yield chunk(
            S.ChatChunkChoice(
                index=out.index, delta=delta, logprobs=lp, finish_reason=out.finish_reason
            )
        )
    if include_usage:
        usage = _usage(seqs, req.n, prompt_tokens, total)
        yield _sse(base.model_copy(update={"usage": usage}))
    yield _sse("[DONE]")
