"""Server settings: one pydantic-settings model, read from `BITSERVE_*` environment variables and
overridden by `bitserve serve` flags."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from bitserve.errors import UsageError

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's


class Settings(BaseSettings):
    """Everything the engine and the HTTP layer need to know (env: BITSERVE_<FIELD>)."""

    model_config = SettingsConfigDict(env_prefix="BITSERVE_", protected_namespaces=())

    model: str = Field("default", description="checkpoint dir, HF folder, .gguf or 'default'")
    quantize: str | None = Field(None, description="METHOD:wBITSgGROUP to quantize SRC first")
    calib: Path | None = Field(None, description="calibration text for --quantize")
    quality_gate: float | None = Field(None, description="max perplexity rise in % before refusing")
    gate_text: Path | None = Field(None, description="evaluation text for the quality gate")
    served_model_name: str | None = Field(None, description="model id in the API (default: dir)")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_num_seqs: int = Field(16, ge=1, description="sequences decoded together (KV-cache slots)")
    max_model_len: int = Field(2048, ge=8, description="prompt + output tokens per sequence")
    kv_cache_mib: float | None = Field(
        None, gt=0, description="cap on the KV cache; lowers max_num_seqs to fit"
    )
    kv_cache_dtype: Literal["auto", "float32", "float16"] = Field(
        "auto",
        description="K/V cache element type (auto: float16 for an fp32 model on a CPU where "
        "bitserve's C decode step runs, else the model's dtype)",
    )
    prefill_chunk: int = Field(256, ge=1, description="prompt tokens prefilled per engine step")
    prefix_cache: bool = Field(
        False,
        description="reuse any prefix of a prompt whose K/V a slot holds (a free one, or a "
        "running sequence's), not only whole prefill chunks; greedy texts may then depend on "
        "what was served before",
    )
    max_waiting: int = Field(64, ge=0, description="queued requests before answering 429")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where the model runs (auto: cuda if available; fp16 there, else fp32)"
    )
    backend: str = Field("auto", description="QuantLinear backend")
    cuda_graphs: bool = Field(True, description="replay CUDA decode steps from captured graphs")
    fused_decode: bool = Field(
        True, description="fused Triton kernels between a CUDA decode step's matmuls"
    )
    warmup: bool = Field(
        True, description="on CUDA, tune kernels and capture decode graphs before serving"
    )
    head_dtype: Literal["auto", "bfloat16", "int8", "float32"] = Field(
        "auto",
        description="the lm_head matmul when narrower than the model's: bfloat16 (halves an "
        "fp32 head's memory traffic; on the CPU in oneDNN's layout where the CPU has it), int8 "
        "(on the CPU: an RTN W8 g32 copy through bitserve's own kernel, half bf16's bytes), "
        "float32, or auto: int8 on a CPU where bitserve's kernel runs and oneDNN's bf16 matmul "
        "does not, else bfloat16; a 16-bit model on a GPU keeps its own",
    )
    shutdown_timeout: float | None = Field(
        None,
        ge=0,
        description="seconds a SIGTERM waits for requests in flight before ending them with "
        "finish_reason 'abort' (default: wait for all)",
    )
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: all cores)")
    log_level: str = "info"

    @field_validator("log_level")
    @classmethod
    def _known_log_level(cls, value: str) -> str:
        if value.lower() not in LOG_LEVELS:
            raise ValueError(f"unknown log level (choose from {', '.join(LOG_LEVELS)})")
        return value.lower()

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        from bitserve.quantization.checkpoint import backend_names

        if value not in backend_names():
            raise ValueError(f"unknown backend (available here: {', '.join(backend_names())})")
        return value


def settings_from_flags(flags: dict[str, Any]) -> Settings:
    """Settings from `bitserve serve` flags over BITSERVE_* variables. A bad value is a
    one-line UsageError naming the flag (or the variable) and what is wrong with it."""
    try:
        return Settings(**flags)
    except ValidationError as e:
        errors = e.errors()
        first = errors[0]
        field = str(first["loc"][0]) if first["loc"] else ""
        if field in flags:
            where = f"--{field.replace('_', '-')} {flags[field]}"
        else:
            where = f"BITSERVE_{field.upper()}={first['input']!r}"
        why = str(first["msg"]).removeprefix("Value error, ")
        more = f" (and {len(errors) - 1} more invalid settings)" if len(errors) > 1 else ""
        raise UsageError(f"{where}: {why[:1].lower()}{why[1:]}{more}") from None
