"""An export (`bitserve export`) loaded by transformers against the bitserve checkpoint it came
from: relative difference of the logits on a chat prompt, and whether the greedy answers match.

    .venv/bin/bitserve quantize default --out /tmp/d64 --group-size 64 --sym
    .venv/bin/bitserve export /tmp/d64 --out /tmp/d64ct
    .venv/bin/python bench/export_check.py /tmp/d64 /tmp/d64ct
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM

from bitserve.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="the bitserve checkpoint")
    ap.add_argument("export", help="its export")
    ap.add_argument("--prompt", default="What is the capital of France?")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    args = ap.parse_args()
    ours = load_model(args.checkpoint, backend="reference")
    theirs = AutoModelForCausalLM.from_pretrained(args.export, dtype=torch.float32).eval()
    tok = ours.tokenizer
    text = tok.apply_chat_template(
        [{"role": "user", "content": args.prompt}], add_generation_prompt=True, tokenize=False
    )
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        want, got = ours.model(ids).logits, theirs(ids).logits
        gen = {"bitserve": ours.model, "transformers": theirs}
        answers = {
            name: m.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False)
            for name, m in gen.items()
        }
    print(f"logits: relative difference {float((got - want).norm() / want.norm()):.2e}")
    same = torch.equal(answers["bitserve"], answers["transformers"])
    print(f"greedy answers equal: {same}")
    print(repr(tok.decode(answers["transformers"][0, ids.shape[1] :], skip_special_tokens=True)))


if __name__ == "__main__":
    main()
