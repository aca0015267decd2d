"""The engine's parts without HTTP: the lean llama runner against the HF forward, incremental
detokenization, and per-request sampling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from bitserve.server.engine import Detokenizer
from bitserve.server.runner import LlamaRunner
from bitserve.server.sampling import SamplingParams, make_generator, sample

from bitserve.models import load_model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_runner_matches_hf_forward(server_tiny_checkpoint: Path) -> None:
    loaded = load_model(server_tiny_checkpoint)
    model = loaded.model
    runner = LlamaRunner(model, num_slots=3, max_len=64)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (7, 12, 3)]
    for slot, ids in enumerate(seqs):  # chunked prefill, 5 tokens at a time
        for start in range(0, len(ids), 5):
            chunk = ids[start : start + 5]
            logits = runner.forward(
                torch.tensor([chunk]), torch.tensor([slot]), torch.tensor([start])
            )
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0, -1]
        assert rel_err(logits[0], ref) < 1e-4
    for _ in range(4):  # batched decode over slots of different lengths
        nxt = [int(torch.randint(0, 1000, (1,), generator=g)) for _ in seqs]
        logits = runner.forward(
            torch.tensor([[t] for t in nxt]),
            torch.tensor([0, 1, 2]),
            torch.tensor([len(s) for s in seqs]),
        )
        for i, t in enumerate(nxt):
            seqs[i].append(t)
            with torch.no_grad():
                ref = model(torch.tensor([seqs[i]])).logits[0, -1]
            assert rel_err(logits[i], ref) < 1e-4


def test_detokenizer_never_splits_a_character(server_tiny_checkpoint: Path) -> None:
    tok = load_model(server_tiny_checkpoint).tokenizer
    text = "Héllo wörld, 世界 says 🎉🦀 naïve café"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    detok = Detokenizer(tok, stop=[])
    deltas = []
    for t in ids:
        detok.add(t)
        deltas.append(detok.take(final=False))
    deltas.append(detok.take(final=True))
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tok.decode(ids)
    assert "" in deltas[:-1]  # some token ended inside a multi-byte character and was held back


def test_detokenizer_stop_string_is_held_back_and_cut(server_tiny_checkpoint: Path) -> None:
    tok = load_model(server_tiny_checkpoint).tokenizer
    ids = tok("alpha beta STOP gamma", add_special_tokens=False)["input_ids"]
    detok = Detokenizer(tok, stop=["STOP", "zzz"])
    sent, hit = "", False
    for t in ids:
        hit = detok.add(t)
        sent += detok.take(final=hit)
        if hit:
            break
    assert hit and sent == "alpha beta "


def test_sampling_rules() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 100, generator=g)
    greedy = SamplingParams(max_tokens=1, temperature=0)
    topk1 = SamplingParams(max_tokens=1, temperature=1.5, top_k=1)
    tiny_p = SamplingParams(max_tokens=1, temperature=1.0, top_p=1e-6)
    seeded = SamplingParams(max_tokens=1, temperature=1.0, seed=3, logprobs=2)
    params = [greedy, topk1, tiny_p, seeded]
    gens = [make_generator(p.seed) for p in params]
    tokens, lps = sample(logits, params, gens, [None] * 4)
    argmax = logits.argmax(-1).tolist()
    assert tokens[:3] == argmax[:3]
    # the seeded row draws the same token alone as in the batch
    alone, _ = sample(logits[3:], [seeded], [make_generator(3)], [None])
    assert alone[0] == tokens[3]
    lp = lps[3]
    assert lp is not None and len(lp.top) == 2
    assert lp.logprob == pytest.approx(float(torch.log_softmax(logits[3], -1)[tokens[3]]))
    # a frequency penalty on the argmax token moves greedy elsewhere
    counts = torch.zeros(100)
    counts[argmax[0]] = 1
    pen = SamplingParams(max_tokens=1, temperature=0, frequency_penalty=2.0)
    moved, _ = sample(logits[:1] * 0.1, [pen], [make_generator(None)], [counts])
    assert moved[0] != argmax[0]
