"""A request's `n` choices sharing their prompt's prefill against each prefilling it alone, in
one run: the engine stepped directly (no HTTP), one prompt of about 300 tokens, n choices of
seeded sampling, 16 new tokens each. "Apart" gives each choice's prompt its own first token,
so that no chunk is shared: how every choice ran before sharing. Prints, per n, the time to every choice's first
token and to the end (medians of interleaved rounds).

    OMP_NUM_THREADS=2 .venv/bin/python bench/n_choices.py [--checkpoint checkpoints/rtn-w4g128]
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


def run(engine: Engine, prompt: list[int], n: int, shared: bool) -> tuple[float, float]:
    """Seconds from submitting n choices to each one's first token, and to their end."""
    firsts: dict[int, float] = {}
    seqs = [
        engine.new_sequence(
            i,
            prompt if shared else [prompt[0] + i, *prompt[1:]],
            SamplingParams(max_tokens=16, temperature=1.0, seed=i, ignore_eos=True),
            lambda out: firsts.setdefault(out.index, time.perf_counter()),
        )
        for i in range(n)
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
    prompt = state.tokenizer(TEXT * 8, add_special_tokens=False)["input_ids"]
    print(f"prompt: {len(prompt)} tokens")
    print("| n | apart: first tokens s | shared | x | apart: end s | shared | x |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in (1, 2, 4, 8):
        times: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
        for _ in range(args.rounds):
            for shared in (False, True):
                times[shared].append(run(state.engine, prompt, n, shared))
        (a1, a2), (s1, s2) = (
            [statistics.median(t[k] for t in times[shared]) for k in (0, 1)]
            for shared in (False, True)
        )
        print(
            f"| {n} | {a1:.2f} | {s1:.2f} | {a1 / s1:.2f}x | {a2:.2f} | {s2:.2f} | {a2 / s2:.2f}x |"
        )


if __name__ == "__main__":
    main()
