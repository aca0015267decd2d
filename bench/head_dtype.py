"""The lm_head of the default model in fp32, bf16 (plain, and in oneDNN's layout as `bitserve
serve` runs it on the CPU), int8 per-channel (torch's int8 kernel) and int8 g32 (RTN,
symmetric: `--head-dtype int8`, on the cpu backend's own kernel, and on torch's int4 kernel as
two nibble planes): perplexity on a text and argmax agreement with fp32 (the decoder stays
fp32), then the matmul's time at M=1, 4 and 16 against bf16, in the same run.

    .venv/bin/python bench/head_dtype.py [--text ../shared/data/wikitext-2/test.txt] [--windows 20]
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from kernels_cpu import torch_int4  # bench/ is on the path when run as a script

from bitserve.models import load_model
from bitserve.quantization.grid import QuantSpec, quantize_rtn
from bitserve.server.runner import onednn_linear, onednn_weight


def heads(weight: torch.Tensor) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """fp32, bf16 (plain and oneDNN), int8 per-channel (symmetric absmax) and int8 g32 (ours,
    and torch's kernels) versions of x @ weight.T."""
    wb = weight.bfloat16()
    packed = onednn_weight(wb)  # None where this torch or CPU has no oneDNN bf16 matmul
    g32 = quantize_rtn(weight, QuantSpec(8, 32, sym=True)).to_module()
    assert g32.set_backend() == "cpu"
    with torch_int4():
        planes = quantize_rtn(weight, QuantSpec(8, 32, sym=True)).to_module()
        assert planes.set_backend() == "cpu"
    scale = weight.abs().amax(dim=1) / 127
    q = (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8).contiguous()
    sb = scale.bfloat16()
    fns = {
        "fp32": lambda x: x @ weight.t(),
        "bf16": lambda x: F.linear(x.bfloat16(), wb).float(),
        "bf16 oneDNN": lambda x: onednn_linear(x.bfloat16(), packed, None).float(),
        "int8": lambda x: torch.ops.aten._weight_int8pack_mm(x.bfloat16(), q, sb).float(),
        "int8 g32": lambda x: g32(x),
        "int8 g32, torch's int4 kernel": lambda x: planes(x),
    }
    if packed is None:
        del fns["bf16 oneDNN"]
    return fns


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", default="../shared/data/wikitext-2/test.txt")
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--seqlen", type=int, default=512)
    args = ap.parse_args()
    loaded = load_model("default")
    model = loaded.model
    with open(args.text, encoding="utf-8-sig") as f:
        ids = loaded.tokenizer(f.read(args.windows * args.seqlen * 8))["input_ids"]
    fns = heads(model.lm_head.weight.detach())
    nll = dict.fromkeys(fns, 0.0)
    agree = dict.fromkeys(fns, 0)
    count = 0
    with torch.inference_mode():
        for w in range(args.windows):
            x = torch.tensor([ids[w * args.seqlen : (w + 1) * args.seqlen]])
            h = model.model(x).last_hidden_state[0, :-1]
            target = x[0, 1:]
            ref = fns["fp32"](h).argmax(-1)
            for name, fn in fns.items():
                logits = fn(h)
                nll[name] += float(F.cross_entropy(logits, target, reduction="sum"))
                agree[name] += int((logits.argmax(-1) == ref).sum())
            count += len(target)
        print(
            "| head | perplexity | argmax = fp32's | M=1 us (x bf16) | M=4 us (x bf16) "
            "| M=16 us (x bf16) |"
        )
        print("|---|---|---|---|---|---|")
        times: dict[str, list[float]] = {}
        for name, fn in fns.items():
            times[name] = []
            for m in (1, 4, 16):
                x = torch.randn(m, h.shape[1])
                for _ in range(5):
                    fn(x)
                t0 = time.perf_counter()
                for _ in range(50):
                    fn(x)
                times[name].append((time.perf_counter() - t0) / 50)
        for name in fns:
            cells = " | ".join(
                f"{t * 1e6:.0f} ({times['bf16'][i] / t:.2f}x)" for i, t in enumerate(times[name])
            )
            print(
                f"| {name} | {math.exp(nll[name] / count):.3f} | {agree[name] / count:.4f} "
                f"| {cells} |"
            )
        wb = model.lm_head.weight.detach().bfloat16()
        t0 = time.perf_counter()
        for _ in range(50):
            wb.sum(dim=1)
        read = wb.numel() * 2 / ((time.perf_counter() - t0) / 50)
        one_row = {n: wb.numel() * 2 / times[n][0] for n in ("bf16", "bf16 oneDNN") if n in times}
        print(
            f"\nbytes/s over the bf16 weight: a sum over it {read / 1e9:.1f} GB/s; at M=1 the "
            + ", ".join(f"{n} head {b / 1e9:.1f} GB/s" for n, b in one_row.items())
        )


if __name__ == "__main__":
    main()
