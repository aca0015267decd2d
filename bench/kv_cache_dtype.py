"""The K/V cache in fp32 and in fp16 (`bitserve serve --kv-cache-dtype`) on a W4 checkpoint of
the default model: perplexity of WikiText-2 test excerpts fed token by token through the serving
runner's decode step (each token attends to everything before it, as in a long chat), the
argmax agreement of the two caches, and the mean time of those steps, in the same run.

    OMP_NUM_THREADS=2 .venv/bin/python bench/kv_cache_dtype.py [--checkpoint checkpoints/rtn-w4g128]
        [--text ../shared/data/wikitext-2/test.txt] [--rows 8] [--tokens 1024]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bitserve.models import load_model
from bitserve.server.runner import LlamaRunner


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="checkpoints/rtn-w4g128")
    ap.add_argument("--text", type=Path, default=Path("../shared/data/wikitext-2/test.txt"))
    ap.add_argument("--rows", type=int, default=8, help="excerpts decoded together (1-16)")
    ap.add_argument("--tokens", type=int, default=1024, help="tokens of each excerpt (2-4096)")
    args = ap.parse_args()
    if not 1 <= args.rows <= 16 or not 2 <= args.tokens <= 4096:
        ap.error("--rows takes 1-16 excerpts, --tokens 2-4096")
    if not args.text.is_file():
        ap.error(f"--text {args.text}: no such file")
    loaded = load_model(args.checkpoint)
    text = args.text.read_text(encoding="utf-8-sig")
    ids = torch.tensor(loaded.tokenizer(text)["input_ids"])
    if len(ids) < args.rows * args.tokens:
        ap.error(f"--text has {len(ids)} tokens, fewer than --rows x --tokens")
    # the excerpts: evenly spaced over the text
    step = len(ids) // args.rows
    rows = torch.stack([ids[r * step : r * step + args.tokens] for r in range(args.rows)])
    slots = torch.arange(args.rows)
    results = {}
    for name in ("float32", "float16"):
        model = load_model(args.checkpoint).model
        runner = LlamaRunner(model, args.rows, args.tokens, kv_dtype=getattr(torch, name))
        nll, argmax, times = 0.0, [], []
        for t in range(args.tokens - 1):
            t0 = time.perf_counter()
            logits = runner.forward(rows[:, t : t + 1], slots, torch.full((args.rows,), t))
            times.append(time.perf_counter() - t0)
            nll += float(F.cross_entropy(logits, rows[:, t + 1], reduction="sum"))
            argmax.append(logits.argmax(-1))
        count = args.rows * (args.tokens - 1)
        results[name] = (math.exp(nll / count), torch.stack(argmax), sum(times) / len(times))
        print(
            f"K/V {name}: perplexity {results[name][0]:.4f}, {results[name][2] * 1e3:.1f} ms a step"
        )
    (p32, a32, t32), (p16, a16, t16) = results["float32"], results["float16"]
    same = float((a32 == a16).float().mean())
    print(
        f"{args.rows} excerpts x {args.tokens} tokens: perplexity fp16 / fp32 {p16 / p32:.5f}, "
        f"argmax the same at {same:.2%} of positions, steps {t32 / t16:.2f}x as fast with fp16"
    )


if __name__ == "__main__":
    main()
