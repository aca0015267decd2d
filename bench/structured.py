"""What structured outputs cost a decode step: the engine's greedy decode steps with every
sequence under a JSON-schema grammar (llguidance's mask each step, -inf on the rest of the
vocabulary, the token consumed) against the same batch in free text, interleaved in one run.
Only steps where the whole batch is decoding are timed.

    OMP_NUM_THREADS=2 .venv/bin/python bench/structured.py [--checkpoint checkpoints/rtn-w4g128]
"""

from __future__ import annotations

import argparse
import statistics
import time

from bitserve.models import load_model
from bitserve.server.api import ServerState
from bitserve.server.cli import build_state
from bitserve.server.sampling import SamplingParams
from bitserve.server.settings import Settings
from bitserve.server.structured import json_grammar

# one long free string, so that a sequence rarely ends before max_tokens
STORY = {
    "type": "object",
    "properties": {"title": {"type": "string"}, "story": {"type": "string"}},
    "required": ["title", "story"],
}


def step_times(state: ServerState, batch: int, grammar: str | None, tokens: int) -> list[float]:
    """Seconds of each engine step while all `batch` sequences decode."""
    engine, tok = state.engine, state.tokenizer
    messages = [{"role": "user", "content": "Write a long story about a dragon, as JSON."}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    seqs = [
        engine.new_sequence(
            i,
            list(prompt),
            params,
            lambda out: None,
            matcher=None if grammar is None else state.constraints.matchers(grammar, 1)[0],
        )
        for i in range(batch)
    ]
    engine.submit(seqs)
    times = []
    while engine.running or engine.waiting:
        full = len(engine.running) == batch and all(s.prefilled() for s in engine.running)
        t0 = time.perf_counter()
        engine.step()
        if full and len(engine.running) == batch:
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="checkpoints/rtn-w4g128")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    state = build_state(load_model(args.checkpoint), Settings(max_num_seqs=8))
    grammar = json_grammar(STORY)
    state.constraints.table()  # built once, before timing
    print("| batch | free text ms/step | JSON schema ms/step | JSON / free | steps timed |")
    print("|---:|---:|---:|---:|---:|")
    for batch in (1, 8):
        free: list[float] = []
        json_: list[float] = []
        for _ in range(args.rounds):
            free += step_times(state, batch, None, args.tokens)
            json_ += step_times(state, batch, grammar, args.tokens)
        a, b = statistics.median(free) * 1e3, statistics.median(json_) * 1e3
        print(f"| {batch} | {a:.2f} | {b:.2f} | {b / a:.3f} | {len(free)} / {len(json_)} |")


if __name__ == "__main__":
    main()
