"""Prefill shared by sequences whose prompts hold the same chunks, against each prefilling
alone, in one run: the engine stepped directly (no HTTP), 16 sampled tokens a sequence.
Two cases: a request's n choices of one prompt of about 260 tokens, and n prompts that open
with the same preamble (the same text, 256+ tokens: one whole chunk) and end with their own
question. "Apart" gives each prompt its own first token, so that no chunk is shared: how they
ran before sharing. Prints the time to every sequence's first token and to the end (medians
of interleaved rounds).

    OMP_NUM_THREADS=2 .venv/bin/python bench/shared_prefill.py [--checkpoint checkpoints/rtn-w4g128]
"""

from __future__ import annotations

import argparse
import statistics
import time

from bitserve.models import load_model
from bitserve.server.cli import build_state
from bitserve.server.engine import Engine
from bitserve.server.sampling import SamplingParams
from bitserve.server.settings import Settings

TEXT = (
    "The river town grew around a market where farmers sold grain, wool and timber. "
    "Its bridge, rebuilt three times after floods, carried the road to the capital. "
)
QUESTIONS = [
    "Who built the bridge?",
    "What did farmers sell?",
    "Where did the road go?",
    "Why was it rebuilt?",
    "How old is the town?",
    "What river is it on?",
    "Who ran the market?",
    "When were the floods?",
]


def run(engine: Engine, prompts: list[list[int]]) -> tuple[float, float]:
    """Seconds from submitting the prompts to each one's first token, and to their end."""
    firsts: dict[int, float] = {}
    seqs = [
        engine.new_sequence(
            i,
            p,
            SamplingParams(max_tokens=16, temperature=1.0, seed=i, ignore_eos=True),
            lambda out: firsts.setdefault(out.index, time.perf_counter()),
        )
        for i, p in enumerate(prompts)
    ]
    t0 = time.perf_counter()
    engine.submit(seqs)
    while engine.running or engine.waiting:
        engine.step()
    return max(firsts.values()) - t0, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="checkpoints/rtn-w4g128")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    state = build_state(load_model(args.checkpoint), Settings(max_num_seqs=8))
    tok = state.tokenizer
    preamble = tok(TEXT * 8, add_special_tokens=False)["input_ids"]
    print(f"preamble: {len(preamble)} tokens, prefill chunk {state.engine.prefill_chunk}")
    print("| case | n | apart: first tokens s | shared | x | apart: end s | shared | x |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for case in ("n choices", "one preamble"):
        for n in (1, 2, 4, 8):
            if case == "n choices":
                prompts = [preamble] * n  # one list, as a request's choices share it
            else:
                prompts = [
                    preamble + tok(" " + q, add_special_tokens=False)["input_ids"]
                    for q in QUESTIONS[:n]
                ]
            apart = [[p[0] + i, *p[1:]] for i, p in enumerate(prompts)]
            times: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
            for _ in range(args.rounds):
                times[False].append(run(state.engine, apart))
                times[True].append(run(state.engine, prompts))
            (a1, a2), (s1, s2) = (
                [statistics.median(t[k] for t in times[shared]) for k in (0, 1)]
                for shared in (False, True)
            )
            print(
                f"| {case} | {n} | {a1:.2f} | {s1:.2f} | {a1 / s1:.2f}x "
                f"| {a2:.2f} | {s2:.2f} | {a2 / s2:.2f}x |"
            )


if __name__ == "__main__":
    main()
