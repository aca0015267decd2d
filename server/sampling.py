"""Per-request sampling applied to a batch of logits: penalties, greedy, temperature, top-k,
top-p, a seeded generator per request (so a draw does not depend on the rest of the batch), and
top-k logprobs. Logits stay on the model's device (on a GPU, drawing rows are drawn there too):
only token ids, and the requested log-probabilities, cross to the host. Generators stay on the
CPU, which gives each draw its uniform number."""

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
    """OpenAI presence/frequency penalties, in place: subtract per generated-token counts (the
    engine keeps them on the logits' device)."""
    for i, (p, c) in enumerate(zip(params, counts, strict=True)):
        if c is not None and (p.presence_penalty or p.frequency_penalty):
            c = c.to(logits.device)
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


def _overflows(logits: torch.Tensor, scaled: torch.Tensor) -> torch.Tensor:
    """Where a finite logit became infinite when divided by a tiny temperature (-inf logits,
    masked tokens, stay -inf and are fine)."""
    return torch.isinf(scaled) & torch.isfinite(logits)


def _draw(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator) -> int:
    """One token from a row of logits [V] under temperature, top-k, then top-p (on the top-k
    renormalized probabilities; the most likely token always stays in play). Sorting the whole
    vocabulary costs ~2 ms a row, so it is avoided: no filter draws from the softmax directly,
    top-k takes the k best, and top-p alone first tries the NUCLEUS_FIRST_TRY best, which
    usually already hold top_p of the mass."""
    vocab = logits.shape[-1]
    scaled = logits / p.temperature
    if bool(_overflows(logits, scaled).any()):
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


def _draw_rows(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]
) -> list[int]:
    """`_draw` for rows [B, V] at once on the logits' device (a GPU, where a sort of the
    vocabulary is cheap and a row copied to the CPU is not): the same filters and the same
    uniform number from each row's generator, so a row picks the token `_draw` picks (up to
    rounding and ties). The rows' settings go over in one copy, the tokens come back in one."""
    dev, vocab = logits.device, logits.shape[-1]
    uniforms = [float(torch.rand(1, generator=g, dtype=torch.float64)) for g in generators]
    rows = [
        [p.temperature, p.top_k if 0 < p.top_k < vocab else vocab, p.top_p, u]
        for p, u in zip(params, uniforms, strict=True)
    ]
    temperature, top_k, top_p, u = torch.tensor(rows, dtype=torch.float64).to(dev).split(1, 1)
    scaled = logits / temperature.to(logits.dtype)
    overflow = _overflows(logits, scaled).any(dim=-1)
    probs = torch.where(overflow.unsqueeze(1), logits, scaled).softmax(dim=-1)
    order = None
    if any(0 < p.top_k < vocab or p.top_p < 1.0 for p in params):
        # Rows with a filter look at the vocabulary most likely first; the others keep its
        # order, as `_draw` does, so that one uniform number picks the same token.
        has_k, has_p = top_k < vocab, top_p < 1.0
        ranked, order = probs.sort(dim=-1, descending=True, stable=True)
        rank = torch.arange(vocab, device=dev)
        probs = torch.where(has_k | has_p, ranked, probs)
        order = torch.where(has_k | has_p, order, rank)
        probs = probs * (rank < top_k)
        probs = torch.where(has_k, probs / probs.sum(dim=-1, keepdim=True), probs)
        keep = (probs.cumsum(dim=-1) - probs < top_p.to(probs.dtype)) | ~has_p
        keep[:, 0] = True
        probs = probs * keep
    total = probs.double().cumsum(dim=-1)
    picks = torch.searchsorted(total, u * total[:, -1:], right=True).clamp_max(vocab - 1)
    if order is not None:
        picks = order.gather(1, picks)
    return torch.where(overflow, logits.argmax(dim=-1), picks.squeeze(1)).tolist()


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator],
    counts: list[torch.Tensor | None],
) -> tuple[list[int], list[TokenLogprobs | None]]:
    """Pick one token per row of `logits` [B, V] (float32, on any device) under each row's
    parameters. NaN or +inf logits, or a row with no finite logit (a broken forward), raise
    ValueError before any generator is used, rather than yield an arbitrary token. Greedy rows
    never leave the device: their argmax comes back with the validity check in one small copy,
    rows that draw are drawn there too (`_draw_rows`), and only the asked-for logprobs copy.
    On the CPU, rows draw one by one (`_draw`), which avoids sorting the vocabulary."""
    broken = (torch.isnan(logits) | (logits == float("inf"))).any(dim=-1)
    broken |= ~torch.isfinite(logits).any(dim=-1)
    want_lp = [i for i, p in enumerate(params) if p.logprobs is not None]
    raw_logprobs = torch.log_softmax(logits[want_lp], dim=-1) if want_lp else None
    logits = logits.clone()
    apply_penalties(logits, params, counts)
    chosen, bad = torch.stack([logits.argmax(dim=-1), broken.long()]).tolist()  # one sync
    if any(bad):
        raise ValueError("cannot sample: the logits contain NaN or +inf, or no finite value")
    drawn = [i for i, p in enumerate(params) if p.temperature > 0]
    if drawn:
        rows, ps, gs = logits[drawn], [params[i] for i in drawn], [generators[i] for i in drawn]
        if logits.device.type == "cpu":
            picks = [_draw(r, p, g) for r, p, g in zip(rows, ps, gs, strict=True)]
        else:
            picks = _draw_rows(rows, ps, gs)
        for i, token in zip(drawn, picks, strict=True):
            chosen[i] = token
    info: list[TokenLogprobs | None] = [None] * len(params)
    if raw_logprobs is not None:
        picked = torch.tensor([chosen[i] for i in want_lp], device=logits.device)
        own = raw_logprobs.gather(1, picked.unsqueeze(1)).squeeze(1).tolist()
        best = raw_logprobs.topk(max(params[i].logprobs or 0 for i in want_lp))
        values, ids = best.values.tolist(), best.indices.tolist()
        for j, i in enumerate(want_lp):
            n = params[i].logprobs or 0
            info[i] = TokenLogprobs(own[j], list(zip(ids[j][:n], values[j][:n], strict=True)))
    return chosen, info
