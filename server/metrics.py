"""Prometheus metrics of one served model (prometheus-client, `bitserve_` prefix, label `model`).
Each server builds its own registry so tests can start several apps in one process."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    1.5,
    2.5,
    5.0,
    10.0,
    20.0,
    40.0,
    80.0,
)


@dataclass
class Metrics:
    """Handles to every metric, already bound to the model label where that applies."""

    registry: CollectorRegistry
    ttft: Histogram
    itl: Histogram
    e2e: Histogram
    queue: Histogram
    prefill_step: Histogram
    decode_step: Histogram
    running: Gauge
    waiting: Gauge
    kv_usage: Gauge
    finished: Counter
    rejected: Counter
    prompt_tokens: Counter
    shared_prompt_tokens: Counter
    generation_tokens: Counter
    prefix_queries: Counter
    prefix_hits: Counter


def create_metrics(model: str) -> Metrics:
    """Register all metrics in a fresh registry, labelled with the served model id."""
    reg = CollectorRegistry()

    def hist(name: str, doc: str) -> Histogram:
        return Histogram(name, doc, ["model"], registry=reg, buckets=LATENCY_BUCKETS)

    def gauge(name: str, doc: str) -> Gauge:
        return Gauge(name, doc, ["model"], registry=reg)

    def counter(name: str, doc: str, *labels: str) -> Counter:
        return Counter(name, doc, ["model", *labels], registry=reg)

    m = Metrics(
        registry=reg,
        ttft=hist(
            "bitserve_time_to_first_token_seconds",
            "Arrival (before tokenizing) to first output token.",
        ),
        itl=hist("bitserve_inter_token_latency_seconds", "Time between two output tokens."),
        e2e=hist("bitserve_e2e_request_latency_seconds", "Arrival to last output token."),
        queue=hist(
            "bitserve_request_queue_time_seconds",
            "Hand-over to the engine to admission into a slot.",
        ),
        prefill_step=hist("bitserve_prefill_step_seconds", "One prefill forward (one chunk)."),
        decode_step=hist("bitserve_decode_step_seconds", "One batched decode forward."),
        running=gauge("bitserve_num_requests_running", "Sequences in KV slots."),
        waiting=gauge("bitserve_num_requests_waiting", "Sequences queued for a slot."),
        kv_usage=gauge("bitserve_kv_cache_usage_ratio", "Fraction of KV-cache slots in use."),
        finished=counter(
            "bitserve_request_success", "Finished sequences by finish reason.", "finish_reason"
        ),
        rejected=counter(
            "bitserve_request_errors", "Requests answered with an error status.", "status"
        ),
        prompt_tokens=counter("bitserve_prompt_tokens", "Prompt tokens prefilled."),
        shared_prompt_tokens=counter(
            "bitserve_prompt_tokens_shared",
            "Prompt tokens whose K/V were copied from another sequence's chunk in the same step.",
        ),
        generation_tokens=counter("bitserve_generation_tokens", "Output tokens generated."),
        prefix_queries=counter(
            "bitserve_prefix_cache_queries",
            "Prompt tokens of admitted sequences, looked up in the slots' K/V.",
        ),
        prefix_hits=counter(
            "bitserve_prefix_cache_hits",
            "Prompt tokens whose K/V a slot held, not prefilled again.",
        ),
    )
    for metric in (
        m.ttft,
        m.itl,
        m.e2e,
        m.queue,
        m.prefill_step,
        m.decode_step,
        m.running,
        m.waiting,
        m.kv_usage,
        m.prompt_tokens,
        m.shared_prompt_tokens,
        m.generation_tokens,
        m.prefix_queries,
        m.prefix_hits,
    ):
        metric.labels(model=model)
    return m


def render(metrics: Metrics) -> bytes:
    """The text exposition format served at /metrics."""
    return generate_latest(metrics.registry)
