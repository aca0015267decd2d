"""Per-request sampling applied to a batch of logits: penalties, greedy, temperature, top-k,
top-p, a seeded generator per request (so a draw does not depend on the rest of the batch), and
top-k logprobs. Logits stay on the model's device (on a GPU, drawing rows are drawn there too):
only token ids, and the requested log-probabilities, cross to the host. Generators stay on the
CPU, which gives each draw its uniform number."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from bitserve.server.runner import to_device


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
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit


@dataclass
class TokenLogprobs:
    """Log-probability of the chosen token and the `k` most likely alternatives."""

    logprob: float
    top: list[tuple[int, float]]


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator for one sequence: seeded if asked, else from fresh entropy. Any integer
    is taken modulo 2**64 (torch.Generator only takes [-2**63, 2**64), and maps a negative seed
    s to s + 2**64 itself), so a request's seed + i never overflows."""
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed % 2**64)
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


def _adjusted(
    logits: torch.Tensor,
    params: list[SamplingParams],
    counts: list[torch.Tensor | None],
    allowed: torch.Tensor | None,
) -> torch.Tensor:
    """The logits tokens are chosen from: penalties, `logit_bias` and -inf wherever `allowed`
    [B, V] is False (a structured output's grammar), applied to a copy; the caller's logits,
    which logprobs report, stay as they are."""
    penalized = [
        c is not None and (p.presence_penalty or p.frequency_penalty)
        for p, c in zip(params, counts, strict=True)
    ]
    biased = [i for i, p in enumerate(params) if p.logit_bias]
    if not any(penalized) and not biased and allowed is None:
        return logits
    logits = logits.clone()
    if any(penalized):
        apply_penalties(logits, params, counts)
    for i in biased:
        bias = params[i].logit_bias
        values = torch.tensor(list(bias.values()), dtype=logits.dtype)
        logits[i, list(bias)] += to_device(values, logits.device)
    if allowed is not None:
        logits.masked_fill_(~allowed, float("-inf"))
    return logits


NUCLEUS_FIRST_TRY = 256  # top-p looks among this many most likely tokens before sorting all


def _uniform(generator: torch.Generator) -> float:
    """The one uniform number in [0, 1) that a draw uses (every draw takes exactly one, so a
    seeded sequence's numbers do not depend on how each step was drawn)."""
    return float(torch.rand(1, generator=generator, dtype=torch.float64))


def _pick(weights: torch.Tensor, u: float) -> int:
    """Index i drawn with probability weights[i] / sum(weights), by inverting the cumulative
    sum at u (torch.multinomial spends ~1 ms on a 49k vocabulary)."""
    total = weights.double().cumsum(dim=-1)
    if not bool(torch.isfinite(total[-1])) or float(total[-1]) <= 0:
        raise ValueError("cannot sample: the probabilities are not finite (NaN or inf logits)")
    return int(torch.searchsorted(total, total[-1:] * u, right=True).clamp_max(len(total) - 1))


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
    vocab, u = logits.shape[-1], _uniform(generator)
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
        return _pick(probs, u)
    if p.top_p < 1.0:
        keep = top.cumsum(dim=-1) - top < p.top_p  # mass of strictly more likely tokens
        keep[0] = True
        top = top * keep
    return int(ids[_pick(top, u)])


def _draw_rows(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]
) -> list[int]:
    """`_draw` for rows [B, V] at once on the logits' device (a GPU, where a sort of the
    vocabulary is cheap and a row copied to the CPU is not): the same filters and the same
    uniform number from each row's generator, so a row picks the token `_draw` picks (up to
    rounding and ties). The rows' settings go over in one copy, the tokens come back in one."""
    dev, vocab = logits.device, logits.shape[-1]
    rows = [
        [p.temperature, p.top_k if 0 < p.top_k < vocab else vocab, p.top_p, _uniform(g)]
        for p, g in zip(params, generators, strict=True)
    ]
    settings = to_device(torch.tensor(rows, dtype=torch.float64), dev)
    temperature, top_k, top_p, u = settings.split(1, dim=1)
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
    allowed: torch.Tensor | None = None,
) -> tuple[list[int], list[TokenLogprobs | None]]:
    """Pick one token per row of `logits` [B, V] (float32, on any device) under each row's
    parameters, among the tokens `allowed` [B, V] (default all). NaN or +inf logits, or a row
    with no finite logit left (a broken forward, or a grammar that allows nothing), raise
    ValueError before any generator is used, rather than yield an arbitrary token. Greedy rows
    never leave the device: their argmax comes back with the validity check in one small copy,
    rows that draw are drawn there too (`_draw_rows`), and only the asked-for logprobs copy.
    On the CPU, rows draw one by one (`_draw`), which avoids sorting the vocabulary."""
    broken = (torch.isnan(logits) | (logits == float("inf"))).any(dim=-1)
    broken |= ~torch.isfinite(logits).any(dim=-1)
    want_lp = [i for i, p in enumerate(params) if p.logprobs is not None]
    raw, logits = logits, _adjusted(logits, params, counts, allowed)
    if logits is not raw:
        broken |= ~torch.isfinite(logits).any(dim=-1)
    chosen, bad = torch.stack([logits.argmax(dim=-1), broken.long()]).tolist()  # one sync
    if any(bad):
        raise ValueError("cannot sample: the logits contain NaN or +inf, or no finite value")
    drawn = [i for i, p in enumerate(params) if p.temperature > 0]
    if drawn:
        rows = logits if len(drawn) == len(params) else logits[drawn]
        ps, gs = [params[i] for i in drawn], [generators[i] for i in drawn]
        if logits.device.type == "cpu":
            picks = [_draw(r, p, g) for r, p, g in zip(rows, ps, gs, strict=True)]
        else:
            picks = _draw_rows(rows, ps, gs)
        for i, token in zip(drawn, picks, strict=True):
            chosen[i] = token
    info: list[TokenLogprobs | None] = [None] * len(params)
    if want_lp:  # of the raw logits; one copy each way
        lp = torch.log_softmax(raw if len(want_lp) == len(params) else raw[want_lp], dim=-1)
        picked = to_device(torch.tensor([[chosen[i]] for i in want_lp]), lp.device)
        k = max(params[i].logprobs or 0 for i in want_lp)
        best = lp.topk(k)
        columns = [lp.gather(1, picked), best.values, best.indices]  # own, k values, k ids
        got = torch.cat([c.double() for c in columns], dim=1).tolist()
        for j, i in enumerate(want_lp):
            n = params[i].logprobs or 0
            ids, values = got[j][1 + k : 1 + k + n], got[j][1 : 1 + n]
            info[i] = TokenLogprobs(
                got[j][0], [(int(t), v) for t, v in zip(ids, values, strict=True)]
            )
    return chosen, info
