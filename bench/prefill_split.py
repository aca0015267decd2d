"""Whether a prompt prefilled in two chunks gives the logits of one prefill (the question a
prefix cache raises: reusing a cached prefix is the two-chunk case). Default model's W4
checkpoint; random prompts of 40, 100 and 300 tokens split at several points; prints whether
the last logits and the KV cache are bit-identical, the largest logit difference, the relative
difference (norm of the difference over the norm of the logits) and whether the argmax agrees.

    OMP_NUM_THREADS=2 .venv/bin/python bench/prefill_split.py [--checkpoint checkpoints/rtn-w4g128]
"""

from __future__ import annotations

import argparse

import torch

from bitserve.models import load_model
from bitserve.server.runner import LlamaRunner


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="checkpoints/rtn-w4g128")
    args = ap.parse_args()
    runner = LlamaRunner(load_model(args.checkpoint).model, 2, 512, torch.bfloat16)
    vocab = runner.lm_head.out_features
    g = torch.Generator().manual_seed(0)
    print(
        "| prompt | split at | logits equal | KV equal | max logit difference | relative | argmax |"
    )
    print("|---:|---:|---|---|---:|---:|---|")
    for total in (40, 100, 300):
        ids = torch.randint(0, vocab, (1, total), generator=g)
        whole = runner.forward(ids, torch.tensor([0]), torch.tensor([0]))
        keys = runner.k_cache[:, 0, :, :total].clone()
        for split in (1, total // 3, total // 2, total - 1):
            runner.forward(ids[:, :split], torch.tensor([1]), torch.tensor([0]))
            two = runner.forward(ids[:, split:], torch.tensor([1]), torch.tensor([split]))
            same_kv = torch.equal(runner.k_cache[:, 1, :, :total], keys)
            diff = float((two - whole).abs().max())
            rel = float((two - whole).norm() / whole.norm())
            same = bool(two.argmax() == whole.argmax())
            print(
                f"| {total} | {split} | {torch.equal(two, whole)} | {same_kv} | {diff:.3f} "
                f"| {rel:.2%} | {'same' if same else 'differs'} |"
            )


if __name__ == "__main__":
    main()
