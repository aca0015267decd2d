"""GPU benchmark of LUT-GEMM on 3-bit BCQ weights at M=1 (decode) against fp16 torch.matmul
(cuBLAS) and, when its backend loads, the Triton W4 g128 kernel, on Llama-sized shapes.

Correctness first (relative error against the reference dequantize-matmul, outputs poisoned,
fresh inputs; exit 1 on a failure), then timing: CUDA graphs that run the op over rotating weight
copies (more bytes than L2 holds, so weights come from HBM), reported as ratios against fp16
measured in the same run, with the byte limit (bytes read / measured copy bandwidth).

    python bench/lutgemm_gpu.py [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from functools import partial

import torch

from bitserve.kernels.bcq_linear import BCQLinear

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)]  # (K, N)
BITS, GROUP = 3, 128
L2_BYTES = 256 << 20  # rotate through at least this many weight bytes per graph replay


def random_bcq(k: int, n: int, bits: int, group: int, device: str) -> BCQLinear:
    """A BCQ layer with random sign planes, α shrinking with the plane, and offsets."""
    layer = BCQLinear(k, n, bits, group, bias=False, offset=True, device=device)
    layer.qweight.random_(-(1 << 31), (1 << 31) - 1)
    scale = 0.02 / (2.0 ** torch.arange(bits, device=device)).view(1, bits, 1)
    layer.alpha.copy_(torch.rand_like(layer.alpha, dtype=torch.float32) * scale)
    assert layer.offset is not None
    layer.offset.copy_(torch.randn_like(layer.offset, dtype=torch.float32) * 0.002)
    return layer


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read and written."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    return 2 * a.numel() / graph_time([partial(b.copy_, a)])


def graph_time(calls: list[Callable[[], object]], replays: int = 20) -> float:
    """Seconds per call: one CUDA graph runs every call (one per weight copy) once."""
    for fn in calls:  # warm up (compiles, autotunes) outside the capture
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in calls:
            fn()
        with torch.cuda.graph(graph, stream=stream):
            for fn in calls:
                fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / replays / len(calls)


def check(layer: BCQLinear, mu: int, lut_dtype: torch.dtype, failures: list[str]) -> float:
    """Relative error of lutgemm vs the reference on fresh inputs (fp16 M=1, 4; bf16 M=2)."""
    from bitserve.kernels.lutgemm import lutgemm

    worst = 0.0
    w = layer.dequantize()
    for m, dtype in [(1, torch.float16), (4, torch.float16), (2, torch.bfloat16)]:
        x = torch.randn(m, layer.in_features, device="cuda").to(dtype)
        ref = x.float() @ w.t()
        out = torch.full((m, layer.out_features), float("nan"), dtype=dtype, device="cuda")
        try:
            y = lutgemm(layer, x, out=out, mu=mu, lut_dtype=lut_dtype)
        except Exception as e:  # a kernel that does not compile is a failure, not a crash
            failures.append(f"mu={mu} lut {lut_dtype} {dtype}: {type(e).__name__}: {e}")
            return float("inf")
        err = float((y.float() - ref).norm() / ref.norm())
        tol = 1e-2 if dtype == torch.bfloat16 else 3e-3
        if not (torch.isfinite(y).all() and err < tol):
            failures.append(f"mu={mu} lut {lut_dtype} {dtype} M={m}: rel err {err:.2e}")
        worst = max(worst, err)
    return worst


def variant_name(mu: int, lut: torch.dtype) -> str:
    return f"bcq{BITS}_mu{mu}_lut{'16' if lut == torch.float16 else '32'}"


def w4_layers(k: int, n: int, copies: int) -> list[torch.nn.Module] | None:
    """QuantLinears with random W4 g128 codes on the Triton int backend, or None if it is
    missing (speed does not depend on the values)."""
    try:
        from bitserve.kernels import QuantLinear

        layers = []
        for _ in range(copies):
            layer = QuantLinear(k, n, 4, 128, device="cuda")
            layer.qweight.random_(-(1 << 31), (1 << 31) - 1)
            layer.qzeros.random_(-(1 << 31), (1 << 31) - 1)
            layer.scales.copy_(torch.rand_like(layer.scales, dtype=torch.float32) * 0.01)
            layer.set_backend("triton")
            layers.append(layer)
        return layers
    except Exception as e:
        print(f"W4 Triton kernel unavailable: {type(e).__name__}: {e}", file=sys.stderr)
        return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    from bitserve.kernels import lutgemm as lg

    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}, copy bandwidth {bw / 1e12:.2f} TB/s")
    variants = [(8, torch.float32), (8, torch.float16), (4, torch.float16)]  # (mu, LUT dtype)
    failures: list[str] = []
    rows = []
    for k, n in SHAPES:
        bcq_bytes = n * k * BITS / 8 + (k // GROUP) * n * 2 * (BITS + 1)
        copies = max(2, int(L2_BYTES // bcq_bytes) + 1)
        layers = [random_bcq(k, n, BITS, GROUP, "cuda") for _ in range(copies)]
        errs = {v: check(layers[0], *v, failures) for v in variants}
        if layers[0].set_backend("auto") != "lutgemm":
            failures.append(f"BCQLinear on CUDA picked {layers[0].backend!r}, not lutgemm")
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        fp16_copies = max(2, int(L2_BYTES // (2 * n * k)) + 1)
        weights = [
            torch.randn(n, k, device="cuda", dtype=torch.float16) for _ in range(fp16_copies)
        ]
        t_fp16 = graph_time([partial(torch.matmul, x, w.t()) for w in weights])
        del weights
        row: dict[str, object] = {"K": k, "N": n, "fp16_us": t_fp16 * 1e6}
        for mu, lut in variants:
            name = variant_name(mu, lut)
            if errs[(mu, lut)] == float("inf"):
                row[name + "_us"] = None
                continue
            outs = [torch.empty(1, n, device="cuda", dtype=torch.float16) for _ in layers]
            t = graph_time(
                [
                    partial(lg.lutgemm, la, x, out=o, mu=mu, lut_dtype=lut)
                    for la, o in zip(layers, outs, strict=True)
                ]
            )
            row[name + "_us"] = t * 1e6
            row[name + "_config"] = lg._tuned.get((1, n, k, BITS, mu, lut.itemsize))
            row[name + "_rel_err"] = errs[(mu, lut)]
        del layers
        w4 = w4_layers(k, n, max(2, int(L2_BYTES // (n * k / 2)) + 1))
        if w4 is not None:
            row["w4_triton_us"] = 1e6 * graph_time([partial(la, x) for la in w4])
            del w4
        row["fp16_limit_us"] = 2 * n * k / bw * 1e6
        row["bcq3_limit_us"] = bcq_bytes / bw * 1e6
        rows.append(row)
        torch.cuda.empty_cache()
    print(f"\nM=1, BCQ {BITS}-bit g{GROUP} with offsets; times in µs; (x) = speed-up over fp16")
    header = f"{'K x N':>13} {'fp16':>8} {'W4 triton':>15} "
    header += " ".join(f"{variant_name(mu, lut)[5:]:>15}" for mu, lut in variants)
    header += f" {'fp16 limit':>10} {'bcq3 limit':>15}"
    print(header)
    for r in rows:
        base = float(r["fp16_us"])  # type: ignore[arg-type]

        def cell(v: object, base: float = base) -> str:
            return f"{'n/a':>15}" if v is None else f"{v:8.1f} ({base / float(v):4.2f}x)"  # type: ignore[arg-type]

        line = f"{r['K']:>6}x{r['N']:<6} {base:8.1f} {cell(r.get('w4_triton_us'))} "
        line += " ".join(cell(r.get(variant_name(mu, lut) + "_us")) for mu, lut in variants)
        line += f" {float(r['fp16_limit_us']):10.1f} {cell(r['bcq3_limit_us'])}"  # type: ignore[arg-type]
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": torch.cuda.get_device_name(), "copy_bw": bw, "rows": rows}, f, indent=2
            )
    for msg in failures:
        print(f"CORRECTNESS FAILURE: {msg}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
