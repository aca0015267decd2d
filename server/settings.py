"""Server settings: one pydantic-settings model, read from `BITSERVE_*` environment variables and
overridden by `bitserve serve` flags."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


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
    prefill_chunk: int = Field(256, ge=1, description="prompt tokens prefilled per engine step")
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
    head_dtype: Literal["bfloat16", "int8", "float32"] = Field(
        "bfloat16",
        description="the lm_head matmul when narrower than the model's: bfloat16 (halves an "
        "fp32 head's memory traffic), int8 (on the CPU: an RTN W8 g32 copy, faster than bf16 "
        "for 1-4 concurrent sequences, slower for 8 and more) or float32; a 16-bit model on a "
        "GPU keeps its own",
    )
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: all cores)")
    log_level: str = "info"
