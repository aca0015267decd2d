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


NUCLEUS_FIRST_TRY = 256  # top-p looks among this many most likely tokens before sorting all


def _pick(weights: torch.Tensor, generator: torch.Generator) -> int:
    """Index i drawn with probability weights[i] / sum(weights), by inverting the cumulative
    sum with one uniform number (torch.multinomial spends ~1 ms on a 49k vocabulary)."""
    total = weights.double().cumsum(dim=-1)
    if not bool(torch.isfinite(total[-1])) or float(total[-1]) <= 0:
        raise ValueError("cannot sample: the probabilities are not finite (NaN or inf logits)")
    u = torch.rand(1, generator=generator, dtype=total.dtype) * total[-1]
    return int(torch.searchsorted(total, u, right=True).clamp_max(len(total) - 1))


def _draw(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator) -> int:
    """One token from a row of logits [V] under temperature, top-k, then top-p (on the top-k
    renormalized probabilities; the most likely token always stays in play). Sorting the whole
    vocabulary costs ~2 ms a row, so it is avoided: no filter draws from the softmax directly,
    top-k takes the k best, and top-p alone first tries the NUCLEUS_FIRST_TRY best, which
    usually already hold top_p of the mass."""
    vocab = logits.shape[-1]
    scaled = logits / p.temperature
    if not bool(torch.isfinite(scaled).all()) and bool(torch.isfinite(logits).all()):
        return int(logits.argmax())  # a temperature so small it overflows: its limit, greedy
    probs = scaled.softmax(dim=-1)
    if 0 < p.top_k < vocab:
        top, ids = probs.topk(p.top_k)  # sorted, most likely first
        top = top / top.sum()
    elif p.top_p < 1.0:
        top, ids = probs.topk(min(NUCLEUS_FIRST_TRY, vocab))
        if float(top.sum()) < p.top_p:  # the nucleus reaches further
            top, ids = probs.sort(descending=True)
    else:
        return _pick(probs, generator)
    if p.top_p < 1.0:
        keep = top.cumsum(dim=-1) - top < p.top_p  # mass of strictly more likely tokens
        keep[0] = True
        top = top * keep
    return int(ids[_pick(top, generator)])


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator],
    counts: list[torch.Tensor | None],
) -> tuple[list[int], list[TokenLogprobs | None]]:
    """Pick one token per row of `logits` [B, V] (float32) under each row's parameters. NaN or
    +inf logits, or a row with no finite logit (a broken forward), raise ValueError before any
    generator is used, rather than yield an arbitrary token."""
    broken = torch.isnan(logits) | (logits == float("inf"))
    if bool(broken.any()) or not bool(torch.isfinite(logits).any(dim=-1).all()):
        raise ValueError("cannot sample: the logits contain NaN or +inf, or no finite value")
    raw_logprobs = (
        torch.log_softmax(logits, dim=-1) if any(p.logprobs is not None for p in params) else None
    )
    logits = logits.clone()
    apply_penalties(logits, params, counts)
    chosen = logits.argmax(dim=-1).tolist()
    for i, p in enumerate(params):
        if p.temperature > 0:
            chosen[i] = _draw(logits[i], p, generators[i])
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
