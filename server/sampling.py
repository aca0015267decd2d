"""Per-request sampling applied to a batch of logits: penalties, greedy, temperature, top-k,
top-p, a seeded generator per request (so a draw does not depend on the rest of the batch), and
top-k logprobs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """How one sequence picks its tokens and when it stops (temperature 0 = greedy)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    ignore_eos: bool = False


@dataclass
class TokenLogprobs:
    """Log-probability of the chosen token and the `k` most likely alternatives."""

    logprob: float
    top: list[tuple[int, float]]


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator for one sequence: seeded if asked, else from fresh entropy."""
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def apply_penalties(
    logits: torch.Tensor, params: list[SamplingParams], counts: list[torch.Tensor | None]
) -> None:
    """OpenAI presence/frequency penalties, in place: subtract per generated-token counts."""
    for i, (p, c) in enumerate(zip(params, counts, strict=True)):
        if c is not None and (p.presence_penalty or p.frequency_penalty):
            logits[i] -= p.frequency_penalty * c + p.presence_penalty * (c > 0).float()


def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> tuple[torch.Tensor, ...]:
    """Temperature, top-k and top-p on sorted logits; returns (probs, token index) sorted."""
    temps = torch.tensor([p.temperature for p in params]).unsqueeze(1)
    scaled = logits / temps
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1]).unsqueeze(0)
    ks = torch.tensor([p.top_k if p.top_k > 0 else logits.shape[-1] for p in params])
    sorted_logits = sorted_logits.masked_fill(rank >= ks.unsqueeze(1), float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    top_ps = torch.tensor([p.top_p for p in params]).unsqueeze(1)
    before = probs.cumsum(dim=-1) - probs  # mass of strictly more likely tokens
    probs = probs.masked_fill((before >= top_ps) & (rank > 0), 0.0)
    return probs, order


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator],
    counts: list[torch.Tensor | None],
) -> tuple[list[int], list[TokenLogprobs | None]]:
    """Pick one token per row of `logits` [B, V] (float32) under each row's parameters."""
    raw_logprobs = (
        torch.log_softmax(logits, dim=-1) if any(p.logprobs is not None for p in params) else None
    )
    logits = logits.clone()
    apply_penalties(logits, params, counts)
    tokens = logits.argmax(dim=-1)
    sampled = [i for i, p in enumerate(params) if p.temperature > 0]
    if sampled:
        probs, order = _filtered_probs(logits[sampled], [params[i] for i in sampled])
        for row, i in enumerate(sampled):
            pick = torch.multinomial(probs[row], 1, generator=generators[i])
            tokens[i] = order[row, pick]
    chosen = tokens.tolist()
    info: list[TokenLogprobs | None] = [None] * len(params)
    if raw_logprobs is not None:
        for i, p in enumerate(params):
            if p.logprobs is not None:
                top: list[tuple[int, float]] = []
                if p.logprobs:
                    vals, idx = raw_logprobs[i].topk(p.logprobs)
                    top = list(zip(idx.tolist(), vals.tolist(), strict=True))
                info[i] = TokenLogprobs(float(raw_logprobs[i, chosen[i]]), top)
    return chosen, info
