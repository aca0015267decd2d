"""RTN quality table for the README: perplexity of the default model at several formats.

python bench/rtn_quality.py --text ../shared/data/wikitext-2/test.txt --out bench/out/rtn
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bitserve.models import fetch_default, load_model
from bitserve.quantization.checkpoint import WEIGHTS, update_manifest
from bitserve.quantization.eval import perplexity
from bitserve.quantization.grid import QuantSpec
from bitserve.quantization.quantize import quantize_to_checkpoint

FORMATS = [QuantSpec(8, -1), QuantSpec(4, 128), QuantSpec(4, 32), QuantSpec(3, 128)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--text", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path("bench/out/rtn"))
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=40)
    args = p.parse_args()
    src = fetch_default()

    def ppl(path: Path) -> float:
        loaded = load_model(path)
        result = perplexity(
            loaded.model, loaded.tokenizer, args.text, args.seqlen, args.max_windows
        )
        if loaded.manifest is not None:
            update_manifest(path, quality=result)
        return float(result["perplexity"])

    fp = ppl(src)
    rows = [("fp32 (source)", fp, (src / WEIGHTS).stat().st_size)]
    for spec in FORMATS:
        ckpt = quantize_to_checkpoint(src, args.out / spec.label(), "rtn", spec, force=True)
        rows.append((f"RTN {spec.label()}", ppl(ckpt), (ckpt / WEIGHTS).stat().st_size))
    print("| model | perplexity | vs fp | model.safetensors MiB |")
    print("|---|---|---|---|")
    for name, value, size in rows:
        print(f"| {name} | {value:.2f} | {value / fp - 1:+.1%} | {size / 2**20:.0f} |")


if __name__ == "__main__":
    main()
