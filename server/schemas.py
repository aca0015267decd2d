"""OpenAI request and response bodies (the subset bitserve serves) as pydantic models."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

# A seed may be any signed or unsigned 64-bit integer; choice i of a request draws from
# (seed + i) mod 2**64 (sampling.make_generator), the range torch.Generator takes.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


def _valid_unicode(value: Any) -> Any:
    """`value` unchanged, unless a string in it holds an unpaired UTF-16 surrogate (valid JSON,
    "\\ud800", sent by clients that cut strings by UTF-16 units), which no tokenizer can encode."""
    texts = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    for t in texts:
        if isinstance(t, dict):
            _valid_unicode(t.get("text"))
        elif isinstance(t, str):
            try:
                t.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(
                    "contains an unpaired UTF-16 surrogate (not valid Unicode)"
                ) from None
    return value


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaSpec(BaseModel):
    """`response_format.json_schema`: the schema the output must match (`strict` is accepted;
    the output always matches, strict or not)."""

    model_config = ConfigDict(populate_by_name=True)

    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: free text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a json_schema object")
        return self

    def output_schema(self) -> dict[str, Any] | None:
        """The JSON schema the output must match; None for free text."""
        if self.type == "json_object":
            return {"type": "object"}
        if self.type == "json_schema" and self.json_schema is not None:
            return self.json_schema.schema_
        return None


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs` extension: the output matches exactly one of a JSON schema
    (`json`), a regular expression, one of the given strings (`choice`) or a grammar (Lark,
    or llama.cpp's GBNF)."""

    model_config = ConfigDict(populate_by_name=True)

    json_: dict[str, Any] | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        given = [self.json_, self.regex, self.choice, self.grammar]
        if sum(g is not None for g in given) != 1:
            raise ValueError("set exactly one of json, regex, choice and grammar")
        return self


class Unsupported(BaseModel):
    """A request field set to something bitserve does not implement (answered with a 400)."""

    param: str
    message: str
    code: str | None = "unsupported_parameter"


class SamplingFields(BaseModel):
    """Parameters shared by completions and chat completions (top_k, stop_token_ids and
    ignore_eos are extensions, as in vLLM). An explicit JSON null for any top-level field means
    "not set", as in the OpenAI API. Fields that would change the answer but are not
    implemented are declared so that `unsupported()` can name them; unknown fields are
    ignored. `logit_bias` maps token ids (as strings) to a bias in [-100, 100];
    `structured_outputs` is vLLM's extension."""

    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)  # 0 or -1 (vLLM's spelling): no top-k
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    ignore_eos: bool = False
    user: str | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """Drop top-level fields sent as JSON null, so that they take their defaults."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data

    valid_stop = field_validator("stop")(_valid_unicode)

    def unsupported(self) -> Unsupported | None:
        """The first field set to a value that bitserve would otherwise silently ignore."""
        if self.stream_options is not None and not self.stream:
            return Unsupported(
                param="stream_options",
                message="stream_options is only allowed with stream: true",
                code=None,
            )
        fmt = self.response_format
        if self.structured_outputs is not None and fmt is not None and fmt.type != "text":
            return Unsupported(
                param="structured_outputs",
                message="set response_format or structured_outputs, not both",
                code=None,
            )
        return None


# A prompt as text or token ids, or a batch of either (one choice set per prompt). Token ids
# are strict: in lax mode ["12", "7"] or [true] would silently read as token ids.
Prompt = str | list[StrictInt] | list[str] | list[list[StrictInt]]


class CompletionRequest(SamplingFields):
    prompt: Prompt
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt_shape(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Prompt:
        """One error naming the accepted shapes, rather than the first failed union member's."""
        try:
            prompt = handler(value)
        except ValidationError:
            raise ValueError(
                "must be a string, a list of token ids (integers), or a list of either"
            ) from None
        return _valid_unicode(prompt)

    def unsupported(self) -> Unsupported | None:
        if self.echo:
            return Unsupported(param="echo", message="echo is not supported")
        if self.best_of is not None and self.best_of != self.n:
            return Unsupported(
                param="best_of",
                message=f"best_of is not supported (best_of {self.best_of} != n {self.n})",
            )
        if self.suffix:
            return Unsupported(param="suffix", message="suffix is not supported")
        return super().unsupported()


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    valid_content = field_validator("content")(_valid_unicode)


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None

    def unsupported(self) -> Unsupported | None:
        for name in ("tools", "functions"):
            if getattr(self, name):
                return Unsupported(param=name, message=f"{name} (tool calling) is not supported")
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none"):
                return Unsupported(param=name, message=f"{name} (tool calling) is not supported")
        if self.top_logprobs is not None and not self.logprobs:
            return Unsupported(
                param="top_logprobs",
                message="top_logprobs needs logprobs: true",
                code=None,
            )
        for m in self.messages:
            for part in m.content if isinstance(m.content, list) else []:
                if part.get("type") != "text":
                    return Unsupported(
                        param="messages",
                        message=f"message content parts of type {part.get('type')!r} are not "
                        "supported (only 'text')",
                    )
        return super().unsupported()


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float] = []
    top_logprobs: list[dict[str, float]] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: _id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatResponse(BaseModel):
    id: str = Field(default_factory=lambda: _id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    """An OpenAI model object plus what bitserve knows about its quantization and quality."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "bitserve"
    max_model_len: int
    device: str = "cpu"
    dtype: str = "float32"
    quantization: dict[str, Any] | None = None
    quality: dict[str, Any] | None = None
    # cuda_graphs, fused_kernels (Triton on CUDA, `cpu_native.decoder` on the CPU), prefix_cache
    decode: dict[str, bool] | None = None
    lm_head: str | None = None  # how the vocabulary projection runs (dtype, int8 copy)
    kv_cache_dtype: str | None = None  # the K/V cache's element type


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
