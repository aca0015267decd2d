"""Per-token cost of the engine's incremental detokenizer over a long output, against decoding
the whole output on every token (what it did before), in the same run.

    .venv/bin/python bench/detok.py [--tokens 2000] [--text ../shared/data/wikitext-2/valid.txt]
"""

from __future__ import annotations

import argparse
import time

from transformers import AutoTokenizer

from bitserve.models import fetch_default
from bitserve.server.engine import Detokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--text", default="../shared/data/wikitext-2/valid.txt")
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(fetch_default())
    with open(args.text, encoding="utf-8-sig") as f:
        ids = tok(f.read(args.tokens * 8))["input_ids"][: args.tokens]
    detok = Detokenizer(tok, stop=[])
    t0 = time.perf_counter()
    for t in ids:
        detok.add(t)
    windowed = (time.perf_counter() - t0) / len(ids)
    t0 = time.perf_counter()
    for i in range(len(ids)):
        tok.decode(ids[: i + 1], skip_special_tokens=True)
    full = (time.perf_counter() - t0) / len(ids)
    assert detok.text == tok.decode(ids, skip_special_tokens=True)
    print(
        f"{len(ids)} tokens: windowed {windowed * 1e6:.0f} us/token, whole-output decode "
        f"{full * 1e6:.0f} us/token ({full / windowed:.1f}x)"
    )


if __name__ == "__main__":
    main()
