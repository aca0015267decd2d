"""CPU kernel benchmark: the cpu QuantLinear backend vs an fp32 nn.Linear of the same shape, per
layer shape of the default model and M (W4 g128 and W8 per-channel also with torch's kernels in
place of our own), plus greedy decode tokens/s of the default model W4 vs the unquantized one
(HF generate, and the serving engine's runner, W4 with each kernel). Ratios are against
baselines measured in the same run, interleaved.

    .venv/bin/python bench/kernels_cpu.py [--e2e-tokens 64] [--skip-e2e | --skip-layers]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch
from torch import nn

from bitserve.kernels import QuantLinear, cpu_native
from bitserve.quantization.grid import QuantSpec, quantize_rtn

# (name, K, N) of the default model (SmolLM2-135M): attention, KV, MLP up/gate, MLP down, lm_head.
SHAPES = [
    ("q/o_proj", 576, 576),
    ("k/v_proj", 576, 192),
    ("q/k/v fused", 576, 960),  # the serving runner's fused projections
    ("gate/up", 576, 1536),
    ("gate/up fused", 576, 3072),
    ("down", 1536, 576),
    ("lm_head", 576, 49152),
]
MS = (1, 4, 16, 64)
SPECS = [QuantSpec(4, 128), QuantSpec(8, -1), QuantSpec(3, 128), QuantSpec(8, 128)]
BASELINES = [0, 1]  # the SPECS also timed with torch's kernels (int4, int8) in place of ours


def _once(fn: Callable[[], object], budget_s: float) -> float:
    """Seconds per call of fn, averaged over enough calls to fill about budget_s."""
    fn()
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-6)
    n = max(1, int(budget_s / one))
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def interleaved(
    fns: list[Callable[[], object]], rounds: int = 5, budget_s: float = 0.05
) -> list[float]:
    """Median time of each fn, measured round-robin so load changes hit all of them alike."""
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            samples[i].append(_once(fn, budget_s))
    return [statistics.median(s) for s in samples]


@contextlib.contextmanager
def with_library(lib: cpu_native.Library | None) -> Iterator[None]:
    """Layers set up (and runners built) inside take `lib` as this machine's kernel; None:
    torch's kernels instead of our own (the baseline)."""
    library = cpu_native.library
    cpu_native.library = lambda: lib  # type: ignore[assignment]
    try:
        yield
    finally:
        cpu_native.library = library


def torch_int4() -> contextlib.AbstractContextManager[None]:
    """Layers set up inside run torch's kernels instead of our own (the baseline)."""
    return with_library(None)


def layer_table() -> list[str]:
    """Markdown rows: shape, M, fp32 time, then per spec time and speed-up over fp32, and the
    BASELINES specs through torch's kernels, each followed by our kernel's speed-up over it."""
    header = "| layer | K x N | M | fp32 Linear us | " + " | ".join(
        f"{s.label()} us (x fp32)" for s in SPECS
    )
    for i in BASELINES:
        header += f" | {SPECS[i].label()}, torch's kernel us (x fp32) | ours / torch's"
    rows = [header + " |", "|" + "---|" * (4 + len(SPECS) + 2 * len(BASELINES))]
    print("\n".join(rows), flush=True)
    torch.manual_seed(0)
    for name, k, n in SHAPES:
        dense = nn.Linear(k, n, bias=False).eval()
        quant: list[QuantLinear] = []
        for spec in SPECS:
            layer = quantize_rtn(dense.weight.detach(), spec).to_module()
            assert layer.set_backend() == "cpu"
            quant.append(layer)
        with torch_int4():
            for i in BASELINES:
                quant.append(quantize_rtn(dense.weight.detach(), SPECS[i]).to_module())
                assert quant[-1].set_backend() == "cpu"
        for m in MS:
            x = torch.randn(m, k)
            with torch.inference_mode():
                times = interleaved([partial(mod, x) for mod in [dense, *quant]])
            cells = " | ".join(
                f"{t * 1e6:.0f} ({times[0] / t:.2f}x)" for t in times[1 : 1 + len(SPECS)]
            )
            for j, i in enumerate(BASELINES):
                t = times[1 + len(SPECS) + j]
                cells += f" | {t * 1e6:.0f} ({times[0] / t:.2f}x) | {t / times[1 + i]:.2f}x"
            rows.append(f"| {name} | {k}x{n} | {m} | {times[0] * 1e6:.0f} | {cells} |")
            print(rows[-1], flush=True)
    return rows


def decode_tps(src: str, tokens: int, rounds: int = 3) -> float:
    """Greedy decode tokens/s at batch 1 with HF generate (median of rounds)."""
    from bitserve.models import load_model

    loaded = load_model(src)
    tok = loaded.tokenizer
    ids = tok("The history of the city begins", return_tensors="pt")
    rates = []
    with torch.inference_mode():
        for _ in range(rounds):
            t0 = time.perf_counter()
            out = loaded.model.generate(
                **ids,
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                pad_token_id=tok.eos_token_id,
            )
            dt = time.perf_counter() - t0
            rates.append((out.shape[1] - ids["input_ids"].shape[1]) / dt)
    return statistics.median(rates)


def weight_bytes(runner: Any) -> int:
    """Bytes of weights a decode step of the runner reads: each projection's (packed, as its
    backend keeps them, or float) and the head's."""
    from bitserve.kernels import QuantLinear

    mods = [m for x in runner.layers for m in (*x.qkv, x.o, *x.gate_up, x.down)]
    tensors = [
        t for m in mods for t in (m.prepared.values() if isinstance(m, QuantLinear) else [m.weight])
    ]
    if runner.head_int8 is not None:
        tensors += runner.head_int8.prepared.values()
    else:
        tensors.append(runner.lm_head.weight if runner.head_weight is None else runner.head_weight)
    return sum(t.numel() * t.element_size() for t in tensors)


def runner_decoder(
    src: str, tokens: int, head: torch.dtype | None = None, c_step: bool = True
) -> tuple[Callable[[], float], int]:
    """A greedy decode at batch 1 through the serving engine's runner (fused projections, the
    lm_head in `head`, default `--head-dtype auto`'s, the whole step in one C call where every
    projection runs on our kernel, as `bitserve serve` runs it; c_step=False: torch ops between
    the matmuls instead); each call decodes `tokens` and returns tokens/s. Also the bytes of
    weights a token reads (`weight_bytes`)."""
    from bitserve.models import load_model
    from bitserve.server.runner import LlamaRunner, auto_head_dtype

    loaded = load_model(src)
    prompt = loaded.tokenizer("The history of the city begins")["input_ids"]
    head = head or auto_head_dtype(loaded.model.lm_head.weight)
    runner = LlamaRunner(loaded.model, 1, len(prompt) + tokens, head)
    if not c_step:
        runner.cpu_decode = None
    slot = torch.tensor([0])

    def decode() -> float:
        t0 = time.perf_counter()
        logits = runner.forward(torch.tensor([prompt]), slot, torch.tensor([0]))
        for i in range(tokens - 1):
            nxt = logits.argmax(-1, keepdim=True)
            logits = runner.forward(nxt, slot, torch.tensor([len(prompt) + i]))
        return tokens / (time.perf_counter() - t0)

    return decode, weight_bytes(runner)


def dense_table(checkpoints: list[str]) -> None:
    """`_dense_table`, with the cpu backend's thresholds restored whatever happens."""
    from bitserve.kernels import cpu

    saved = cpu.DENSE_ROWS, cpu.FP32_DENSE_ROWS
    try:
        print(f"our kernel's layers take the dense GEMM from {cpu.native_dense_rows()} rows here")
        _dense_table(checkpoints, cpu.DENSE_ROWS)
    finally:
        cpu.DENSE_ROWS, cpu.FP32_DENSE_ROWS = saved


def _dense_table(checkpoints: list[str], default: int) -> None:
    """The cpu backend's two paths for many rows, in the same run: the kernel (our own where it
    builds, else torch's) against dequantized tiles and a dense GEMM (bf16 or fp32 by the CPU,
    what it takes from `native_dense_rows()` rows), per decoder layer shape at W4 and W8 g128,
    then a prefill through the serving runner per checkpoint."""
    from bitserve.kernels import cpu
    from bitserve.models import load_model
    from bitserve.server.runner import LlamaRunner

    dtype = cpu_native.dense_dtype()
    a, b = torch.randn(512, 576), torch.randn(576, 2048)
    dtypes = (torch.float32, torch.bfloat16)
    gemm: list[Callable[[], object]] = [partial(torch.mm, a.to(d), b.to(d)) for d in dtypes]
    fp32, bf16 = interleaved(gemm, rounds=3, budget_s=0.0)
    print(
        f"torch.mm 512 x 576 x 2048: fp32 {fp32 * 1e3:.1f} ms, bf16 {bf16 * 1e3:.1f} ms "
        f"({fp32 / bf16:.2f}x); dense GEMMs here in {dtype}"
    )
    if cpu_native.library() is None and not (cpu._layout_ok() and dtype == torch.bfloat16):
        print("(torch's int4 kernel keeps every call on this CPU: no comparison)")
        return

    def path(rows: int, fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            cpu.DENSE_ROWS = cpu.FP32_DENSE_ROWS = rows
            return fn()

        return run

    print("| layer | K x N | M | W4 kernel us | W4 dense us (x) | W8 kernel us | W8 dense us (x) |")
    print("|---|---|---|---|---|---|---|")
    torch.manual_seed(0)
    for name, k, n in SHAPES[2:6]:
        w = torch.randn(n, k)
        layers = [quantize_rtn(w, QuantSpec(b, 128)).to_module() for b in (4, 8)]
        for layer in layers:
            layer.set_backend("cpu")
        for m in (128, 256, 512, 1024):
            x = torch.randn(m, k)
            fns = [path(r, partial(layer, x)) for layer in layers for r in (1 << 30, 1)]
            with torch.inference_mode():
                t = interleaved(fns, rounds=3)
            cells = f"{t[0] * 1e6:.0f} | {t[1] * 1e6:.0f} ({t[0] / t[1]:.2f}x) | "
            cells += f"{t[2] * 1e6:.0f} | {t[3] * 1e6:.0f} ({t[2] / t[3]:.2f}x)"
            print(f"| {name} | {k}x{n} | {m} | {cells} |", flush=True)
    for src in checkpoints:
        runner = LlamaRunner(load_model(src).model, 1, 1024, torch.bfloat16)
        for tokens in (128, 256, 512):
            ids = torch.randint(0, 40000, (1, tokens), generator=torch.Generator().manual_seed(0))
            step = partial(runner.forward, ids, torch.tensor([0]), torch.tensor([0]))
            kernel, dense = interleaved([path(1 << 30, step), path(default, step)], 3, 0.0)
            print(
                f"{src}: prefill of {tokens} tokens, kernel only (in the C step where it runs) "
                f"{kernel * 1e3:.0f} ms, with dense GEMMs and torch's ops from {default} rows "
                f"{dense * 1e3:.0f} ms ({kernel / dense:.2f}x)",
                flush=True,
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--e2e-tokens", type=int, default=64)
    ap.add_argument("--checkpoint", default="checkpoints/rtn-w4g128")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--skip-layers", action="store_true", help="only the end-to-end decode")
    ap.add_argument(
        "--dense",
        nargs="*",
        metavar="CKPT",
        help="only compare the kernels with dense GEMMs on dequantized tiles (many rows), "
        "then prefill through the runner for each checkpoint given",
    )
    args = ap.parse_args()
    if args.dense is not None:
        dense_table(args.dense)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if not args.skip_layers:
        layer_table()
    if not args.skip_e2e:
        base = decode_tps("default", args.e2e_tokens)
        w4 = decode_tps(args.checkpoint, args.e2e_tokens)
        print(f"\ndecode batch 1, {args.e2e_tokens} new tokens, greedy, HF generate:")
        print(f"fp32 model {base:.1f} tok/s; {args.checkpoint} {w4:.1f} tok/s ({w4 / base:.2f}x)")
        from bitserve.models import load_model
        from bitserve.server.runner import auto_head_dtype

        head = load_model("default").model.lm_head.weight
        auto = str(auto_head_dtype(head)).removeprefix("torch.")
        ckpt, bf16 = args.checkpoint, torch.bfloat16
        runs = {
            f"fp32 model, {auto} head (auto)": runner_decoder("default", args.e2e_tokens),
            f"{ckpt}, our kernel, {auto} head (auto), one C call a step": runner_decoder(
                ckpt, args.e2e_tokens
            ),
            f"{ckpt}, our kernel, {auto} head (auto), torch ops between matmuls": runner_decoder(
                ckpt, args.e2e_tokens, c_step=False
            ),
            f"{ckpt}, our kernel, bfloat16 head": runner_decoder(ckpt, args.e2e_tokens, bf16),
        }
        with torch_int4():
            runs[f"{ckpt}, torch's kernels, bfloat16 head"] = runner_decoder(
                ckpt, args.e2e_tokens, bf16
            )
        rates: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(3):  # interleaved rounds
            for name, (run, _) in runs.items():
                rates[name].append(run())
        print(f"decode batch 1, {args.e2e_tokens} new tokens, greedy, serving runner:")
        base = statistics.median(rates[next(iter(runs))])
        for name, rate in rates.items():
            tps, read = statistics.median(rate), runs[name][1]
            print(
                f"{name}: {tps:.1f} tok/s ({tps / base:.2f}x the first); weights "
                f"{read / 1e6:.1f} MB a token, read at {tps * read / 1e9:.1f} GB/s"
            )


if __name__ == "__main__":
    main()
