"""GPU kernel benchmark for the Triton QuantLinear backend: correctness against the reference
backend first, then timing in CUDA graphs over rotating weight copies (weights come from HBM, not
L2) against fp16 cuBLAS and torch's int4 tinygemm, with the byte limit of each (bytes moved /
measured copy bandwidth), the M = 1 floors (the GEMV's loads alone, an empty launch) and every
M = 1 config timed as decode runs it and as the tuner does; then
decode tokens/s of a random-init Llama-3-8B-shaped model, W4 g128 vs fp16, at batch 1 and 16
through a minimal static-cache decode step captured in a CUDA graph, and through bitserve's
serving runner (graphs or eager, fused decode kernels or torch's ops, with and without PDL),
with a profile of its W4 steps; then the runner with the Triton and the reference backends.

    python bench/kernels_gpu.py [--skip-check] [--skip-layers] [--skip-e2e] [--e2e-layers 32]
                                [--ms 1,2,4,16,64,256,1024] [--budget-s 280]
"""

from __future__ import annotations

import argparse
import math
import time
import traceback
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from bitserve.kernels import QuantLinear, triton_int
from bitserve.kernels.packing import num_groups, pack_rows
from bitserve.kernels.triton_int import pdl_enter

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)]
MS = (1, 2, 4, 16, 64, 256, 1024)
ROTATE_BYTES = 256 << 20  # rotating copies of at least this many bytes in all: well beyond L2
DEVICE = "cuda"


def random_layer(k: int, n: int, bits: int, group: int, sym: bool, device: str) -> QuantLinear:
    """A QuantLinear with random codes, scales and zeros, packed like a checkpoint."""
    g = num_groups(k, group)
    q = torch.randint(0, 1 << bits, (k, n), dtype=torch.uint8)
    z = torch.full((g, n), 1 << (bits - 1)) if sym else torch.randint(0, 1 << bits, (g, n))
    layer = QuantLinear(k, n, bits, group, sym=sym)
    layer.qweight = pack_rows(q, bits)
    layer.qzeros = pack_rows(z.t().contiguous(), bits).t().contiguous()
    layer.scales = (torch.rand(g, n) * 0.02 + 0.005).half()
    return layer.to(device)


def synthetic_layer(k: int, n: int, bits: int, group: int, device: str) -> QuantLinear:
    """A layer in the Triton backend's prepared layout with random codes (speed does not depend
    on values; repacking a 235M-weight layer through pack_rows would take minutes). The codes
    are uniform in 1 .. 2^bits - 1, whose mean is the zero point, and the scales give weights of
    rms about 0.02, as a random-init model's: codes from 0 (mean half a step below the zero)
    grow a common mode through 32 layers until fp16 overflows, and the logits are NaN."""
    layer = QuantLinear(k, n, bits, group, device="meta")
    k_pad = math.ceil(k / triton_int.K_ALIGN) * triton_int.K_ALIGN
    g = num_groups(k, group)
    if device == "meta":  # a shape-only layer (the timing copies get cloned tensors)
        codes = torch.empty(k_pad, n, dtype=torch.int32, device=device)
    else:
        codes = torch.randint(1, 2**bits, (k_pad, n), dtype=torch.int32, device=device)
    if bits == 3:
        layer.prepared = {
            "qweight": triton_int._pack_words(codes & 3, 2),
            "qhigh": triton_int._pack_words(codes >> 2, 1),
        }
    else:
        layer.prepared = {"qweight": triton_int._pack_words(codes, bits)}
    del codes
    # 2^b - 1 values, evenly spaced around the zero: rms sqrt(((2^b - 1)^2 - 1) / 12) steps
    step = 0.02 / math.sqrt(((2**bits - 1) ** 2 - 1) / 12)
    layer.prepared["scales"] = (torch.rand(g, n, device=device) * step + step / 2).half()
    layer.prepared["zeros"] = torch.full((g, n), 1 << (bits - 1), device=device).half()
    layer.backend = "triton"
    return layer


def decode_prepared_w4(layer: QuantLinear) -> torch.Tensor:
    """Weight [N, K] fp16 decoded from the prepared 4-bit layout with plain torch ops."""
    w = layer.prepared["qweight"]
    shifts = (triton_int._slots(4).to(w.device) * 4).view(1, 8, 1)
    q = ((w[:, None, :] >> shifts) & 15).reshape(-1, w.shape[1])[: layer.in_features]
    g = torch.arange(layer.in_features, device=w.device) // layer.group_size
    s, z = layer.prepared["scales"].float()[g], layer.prepared["zeros"].float()[g]
    return ((q.float() - z) * s).t().half().contiguous()


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm())


def check_correctness(ms: tuple[int, ...] = (1, 16, 64, 300)) -> bool:
    """Every bit width, group size, sym/asym and M regime against the reference backend."""
    ok = True
    print("## correctness vs reference backend (K=576 -> short last group for g128; N=1000)")
    print("| bits | group | sym | M | dtype | config | rel err |")
    print("|---|---|---|---|---|---|---|")
    torch.manual_seed(0)
    for bits in (2, 3, 4, 8):
        for group in (32, 64, 128, -1):
            sym = group in (64, -1)
            layer = random_layer(576, 1000, bits, group, sym, DEVICE)
            layer.set_backend("reference")
            triton_int.BACKEND.prepare(layer)
            runs = [(1, torch.float16), (64, torch.float16)]
            if bits == 4:  # the GEMV over 2 and 4 rows (4-bit fp16 only; 3: a partial tile)
                runs += [(2, torch.float16), (3, torch.float16), (4, torch.float16)]
            if bits == 4 or group == 128:
                runs += [(16, torch.float16), (300, torch.float16)]
            if bits == 4 and group == 128:
                runs += [(1, torch.bfloat16), (16, torch.bfloat16), (300, torch.bfloat16)]
            for m, dtype in runs:
                if m not in ms and not (m == 3 and 4 in ms):
                    continue
                cands = triton_int.CANDIDATES[triton_int.bucket(m)]
                cfg = next(c for c in cands if triton_int._applies(c, layer, dtype))
                x = torch.randn(m, 576, device=DEVICE).to(dtype)
                ref = layer(x.float())
                out = torch.full((m, 1000), float("nan"), device=DEVICE, dtype=dtype)
                try:
                    y = triton_int._launch(layer, x, out, cfg)
                except Exception as e:  # report and go on with the other cases
                    ok = False
                    print(f"| {bits} | {group} | {sym} | {m} | {dtype} | {cfg} | FAIL {e!r:.200} |")
                    continue
                err = rel_err(y, ref)
                good = bool(torch.isfinite(y).all()) and err < (
                    2e-2 if dtype == torch.bfloat16 else 3e-3
                )
                ok &= good
                flag = "" if good else " FAIL"
                print(f"| {bits} | {group} | {sym} | {m} | {dtype} | {cfg} | {err:.1e}{flag} |")
    # Every autotune candidate of every bucket once (W4 g128 fp16; a wrong result from a config
    # the tuner could pick shows up here), at N = 1000 (masked columns; `_launch` runs a
    # candidate that does not apply there as the plain kernel, as the tuner would) and
    # N = 1008 (a multiple of 16: every candidate applies); then the tuned path on a benchmark
    # shape against a torch decode of the same layout, twice (the split-K counters must be
    # re-armed).
    bad = []
    for n in (1000, 1008):
        layer = random_layer(576, n, 4, 128, False, DEVICE)
        layer.set_backend("reference")
        triton_int.BACKEND.prepare(layer)
        for b, cands in triton_int.CANDIDATES.items():
            if over_budget():
                print("(budget: candidate sweep stopped)")
                break
            m = 1 if b == 1 else max(2, min(b, 300) - 3)
            x = torch.randn(m, 576, device=DEVICE, dtype=torch.float16)
            ref = layer(x.float())
            out = torch.empty(m, n, device=DEVICE, dtype=torch.float16)
            triton_int._precompile(layer, x, out, cands)
            for cfg in cands:
                try:
                    err = rel_err(triton_int._launch(layer, x, out.fill_(float("nan")), cfg), ref)
                except Exception as e:  # compile failure: the tuner skips it, so not a FAIL
                    print(
                        f"| 4 | 128 | False | {m} | fp16 N={n} | {cfg} | did not run: {e!r:.150} |"
                    )
                    continue
                if not err < 3e-3:
                    bad.append((n, cfg, err))
    ok &= not bad
    print(
        f"| 4 | 128 | False | all buckets | fp16 | every candidate | {'FAIL ' + str(bad) if bad else 'ok'} |"
    )
    for k, n in [(4096, 4096)]:
        layer = synthetic_layer(k, n, 4, 128, DEVICE)
        w = decode_prepared_w4(layer)
        for m in sorted({1, *ms}):
            if over_budget():
                break
            x = torch.randn(m, k, device=DEVICE, dtype=torch.float16)
            errs = [rel_err(triton_int.matmul(layer, x), F.linear(x, w)) for _ in range(2)]
            ok &= max(errs) < 3e-3
            cfg = triton_int._TUNED.get((k, n, 4, 128, triton_int.bucket(m), torch.float16))
            print(f"| 4 (tuned) | 128 | - | {m} | fp16 {k}x{n} | {cfg} | {max(errs):.1e} |")
    print("correctness:", "PASS" if ok else "FAIL", flush=True)
    return ok


DEADLINE = float("inf")  # time.perf_counter() after which sections stop (set by --budget-s)


def over_budget() -> bool:
    return time.perf_counter() > DEADLINE


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read and written."""
    a = torch.empty(1 << 29, dtype=torch.float16, device=DEVICE)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    return 2 * a.numel() * 2 * 20 / (start.elapsed_time(end) / 1e3)


def graph_time(calls: list[Callable[[], Any]], budget_s: float = 0.2) -> float:
    """Seconds per call: all calls (one per weight copy) captured in one CUDA graph, replayed."""
    for c in calls:  # warm-up and autotuning happen outside the graph
        c()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    graph.replay()
    torch.cuda.synchronize()
    reps = max(2, min(200, int(budget_s / (time.perf_counter() - t0))))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / (reps * len(calls))


def copies_for(nbytes: int) -> int:
    return max(2, min(64, math.ceil(ROTATE_BYTES / nbytes)))


def prepared_bytes(layer: QuantLinear) -> int:
    return sum(t.numel() * t.element_size() for t in layer.prepared.values())


def synthetic_copies(k: int, n: int, bits: int) -> list[QuantLinear]:
    """A g128 synthetic layer and clones of it, enough to rotate through (`copies_for`)."""
    base = synthetic_layer(k, n, bits, 128, DEVICE)
    layers = [base]
    for _ in range(copies_for(prepared_bytes(base)) - 1):
        c = synthetic_layer(k, n, bits, 128, "meta")
        c.prepared = {key: t.clone() for key, t in base.prepared.items()}
        layers.append(c)
    return layers


def tinygemm_calls(k: int, n: int, x: torch.Tensor) -> list[Callable[[], Any]]:
    """torch's int4 kernel (bf16 activations, g128) over rotating weight copies."""
    xb = x.bfloat16()
    q = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=DEVICE)
    packed = torch.ops.aten._convert_weight_to_int4pack(q, 8)
    sz = torch.rand(k // 128, n, 2, device=DEVICE, dtype=torch.bfloat16) * 0.01
    copies = [
        (packed.clone(), sz.clone())
        for _ in range(copies_for(packed.numel() * packed.element_size()))
    ]
    return [partial(torch.ops.aten._weight_int4pack_mm, xb, p, 128, s) for p, s in copies]


def bench_layers(bw: float, ms: tuple[int, ...] = MS) -> None:
    """The timing table: fp16 cuBLAS, torch int4, Triton W4 g128 (and W3/W8/W2 at M=1)."""
    print(f"\n## timing (CUDA graphs, rotating weight copies); copy bandwidth {bw / 1e12:.2f} TB/s")
    print(
        "| K x N | M | fp16 us | fp16 limit us | torch int4 us (x fp16) | W4g128 us (x fp16) "
        "| W4 limit us | W4 x limit | W3 us (x fp16) | W8 us (x fp16) | W2 us (x fp16) "
        "| W4 without PDL us (x fp16) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for k, n in SHAPES:
        if over_budget():
            print("(budget: timing stopped)")
            return
        w16 = torch.randn(n, k, device=DEVICE, dtype=torch.float16) * 0.02
        w16s = [w16] + [w16.clone() for _ in range(copies_for(w16.numel() * 2) - 1)]
        layers = {bits: synthetic_copies(k, n, bits) for bits in (4, 3, 8, 2)}
        w4_bytes = prepared_bytes(layers[4][0])
        for m in ms:
            if over_budget():
                break
            x = torch.randn(m, k, device=DEVICE, dtype=torch.float16)
            t16 = graph_time([partial(F.linear, x, w) for w in w16s])
            io = (m * k + m * n) * 2
            lim16, lim4 = (n * k * 2 + io) / bw, (w4_bytes + io) / bw
            try:
                ti4 = graph_time(tinygemm_calls(k, n, x))
                cell_ti4 = f"{ti4 * 1e6:.1f} ({t16 / ti4:.2f}x)"
            except Exception as e:  # not every torch build or M has the int4 kernel
                cell_ti4 = f"n/a ({type(e).__name__})"
            cells = {}
            for bits in (4, 3, 8, 2) if m == 1 else (4,):
                t = graph_time([partial(triton_int.matmul, q, x) for q in layers[bits]])
                cells[bits] = (t, f"{t * 1e6:.1f} ({t16 / t:.2f}x)")
            t4 = cells[4][0]
            # The same launches without programmatic dependent launch, which lets each of the
            # graph's kernels start while the one before it finishes (cuBLAS's do not).
            saved, triton_int.PDL_ENABLED = triton_int.PDL_ENABLED, False
            try:
                t = graph_time([partial(triton_int.matmul, q, x) for q in layers[4]])
            finally:
                triton_int.PDL_ENABLED = saved
            no_pdl = f"{t * 1e6:.1f} ({t16 / t:.2f}x)"
            print(
                f"| {k}x{n} | {m} | {t16 * 1e6:.1f} | {lim16 * 1e6:.1f} | {cell_ti4} | {cells[4][1]} "
                f"| {lim4 * 1e6:.1f} | {lim4 / t4:.2f} | {cells.get(3, (0, '-'))[1]} "
                f"| {cells.get(8, (0, '-'))[1]} | {cells.get(2, (0, '-'))[1]} | {no_pdl} |",
                flush=True,
            )
        del w16s, layers
        torch.cuda.empty_cache()


# ---- M = 1 floors: what the GEMV's loads alone, and an empty launch, cost ----
# Tilings (BLOCK_N, BLOCK_K, SPLIT_K, warps) of the loads-only kernel: the GEMV candidates' and
# larger blocks per program (more bytes in flight), to see what a tiling can reach at all.
FLOOR_TILINGS = [
    (64, 128, 16, 2),
    (128, 128, 8, 4),
    (128, 256, 8, 4),
    (256, 128, 8, 4),
    (64, 256, 16, 2),
    (128, 512, 4, 4),
    (256, 512, 4, 8),
    (128, 1024, 2, 4),
    (512, 256, 2, 8),
    (32, 256, 32, 1),
]


@triton.jit
def _words_xor_kernel(
    qw_ptr,
    out_ptr,
    N,
    stride_w,
    k_blocks,
    split_k,
    BLOCK_N: tl.constexpr,
    WORDS: tl.constexpr,
    PDL: tl.constexpr,
):
    """The 4-bit GEMV's weight traffic without its arithmetic: program (n-block, k-slice) loads
    the [WORDS, BLOCK_N] word tiles of its K-blocks as `_gemv_kernel` does and XORs them into
    out[k-slice, n] (a floor for the GEMV's tiling, not a result; no scales, zeros or x, about
    6% of the GEMV's bytes). Launched with PDL where the GEMV is."""
    pdl_enter(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs_n < N
    row = tl.arange(0, WORDS)
    acc = tl.zeros((WORDS, BLOCK_N), dtype=tl.int32)
    for kb in range(pid_k, k_blocks, split_k):
        rows = kb * WORDS + row
        acc ^= tl.load(qw_ptr + rows[:, None] * stride_w + offs_n[None, :], mask=mask[None, :])
    tl.store(out_ptr + pid_k * N + offs_n, tl.xor_sum(acc, 0), mask=mask)


def words_xor(
    qw: torch.Tensor, block_n: int, block_k: int, split_k: int, warps: int
) -> torch.Tensor:
    """Launch `_words_xor_kernel` over 4-bit words qw [K / 8, N]: out [split_k, N]."""
    words, n = block_k // 8, qw.shape[1]
    assert qw.shape[0] % words == 0, "K must be a multiple of BLOCK_K"
    k_blocks = qw.shape[0] // words
    split_k = min(split_k, k_blocks)  # as `_launch` clamps it
    out = torch.empty(split_k, n, dtype=torch.int32, device=qw.device)
    grid = (triton.cdiv(n, block_n), split_k)
    pdl = triton_int.use_pdl(qw.device)
    _words_xor_kernel[grid](
        qw,
        out,
        n,
        qw.stride(0),
        k_blocks,
        split_k,
        BLOCK_N=block_n,
        WORDS=words,
        PDL=pdl,
        num_warps=warps,
        **triton_int.pdl_launch(pdl),
    )
    return out


@triton.jit
def _empty_kernel(x_ptr):
    """Does nothing: the cost of one launch in a CUDA graph."""
    pass


def bench_floors(bw: float) -> None:
    """At M = 1, W4 g128, per benchmark shape: the tuned GEMV against the same tiling's loads
    alone, the fastest loads-only tiling of FLOOR_TILINGS, and one empty launch (all in CUDA
    graphs over rotating copies, like the layer table). Loads-only near the GEMV: the tiling's
    memory access is what bounds it; far below: its arithmetic, finish or launch."""
    print("\n## M = 1 floors (W4 g128; CUDA graphs, rotating weight copies)")
    print(
        "| K x N | W4 limit us | GEMV us (tuned config) | loads only, same tiling us "
        "| loads only, best tiling us (BLOCK_N, BLOCK_K, SPLIT_K, warps) | empty launch us |"
    )
    print("|---|---|---|---|---|---|")
    dummy = torch.zeros(1, device=DEVICE)
    empty = graph_time([partial(_empty_kernel[(132,)], dummy) for _ in range(64)])
    for k, n in SHAPES:
        if over_budget():
            print("(budget: floors stopped)")
            return
        layers = synthetic_copies(k, n, 4)
        nbytes = prepared_bytes(layers[0])
        x = torch.randn(1, k, device=DEVICE, dtype=torch.float16)
        t_gemv = graph_time([partial(triton_int.matmul, q, x) for q in layers])
        cfg = triton_int._TUNED[(k, n, 4, 128, 1, torch.float16)]
        words = [q.prepared["qweight"] for q in layers]

        def loads(tiling: tuple[int, int, int, int], words: list[torch.Tensor] = words) -> float:
            return graph_time([partial(words_xor, w, *tiling) for w in words])

        same = loads((cfg.block_n, cfg.block_k, cfg.split_k, cfg.warps))
        k_pad = words[0].shape[0] * 8
        best_t, best = min((loads(t), t) for t in FLOOR_TILINGS if k_pad % t[1] == 0)
        print(
            f"| {k}x{n} | {(nbytes + 2 * (k + n)) / bw * 1e6:.1f} | {t_gemv * 1e6:.1f} "
            f"({cfg.block_n}, {cfg.block_k}, {cfg.split_k}, {cfg.warps}, {cfg.variant or 'plain'}) "
            f"| {same * 1e6:.1f} | {best_t * 1e6:.1f} {best} | {empty * 1e6:.2f} |",
            flush=True,
        )
        del layers, words
        torch.cuda.empty_cache()


def m1_sweep_configs(layer: QuantLinear, tuned: triton_int.Config) -> list[triton_int.Config]:
    """The M = 1 configs the chain sweep times for `layer`: every GEMV candidate that runs as
    itself on it (fp16 x), then the tuned config with other split-K counts, with the "red"
    finish (fp32 atomics into one slice), which no candidate has (fewer k-slices mean fewer
    partials for the last program to add up, and fewer programs to hide memory latency), and
    with masked loads ("odd": what whole tiles, `EVEN`, save in the same run)."""
    cands = [c for c in triton_int.CANDIDATES[1] if triton_int._applies(c, layer, torch.float16)]
    k_blocks = triton.cdiv(layer.in_features, tuned.block_k)
    extra = [tuned._replace(split_k=s) for s in (1, 2, 4, 8, 16, 32) if s <= k_blocks]
    flags = tuned.flags() - {"atomic"}
    extra.append(tuned._replace(variant="+".join(sorted(flags | {"red"}))))
    extra.append(tuned._replace(variant="+".join(sorted(tuned.flags() | {"odd"}))))
    return list(dict.fromkeys(cands + extra))


def bench_m1_chain() -> None:
    """Each M = 1 configuration of `m1_sweep_configs`, W4 g128, timed the way a decode step runs
    it (back to back in a CUDA graph over rotating weight copies, with PDL where the GPU has
    it) and the way the tuner times it (`triton_int._do_bench`: one launch after an L2 flush,
    in a CUDA graph). A chain best far ahead of the tuned config, or a ranking that differs,
    says the tuner should time configs in a chain."""
    print("\n## M = 1 configs in a graph chain (as decode runs them) and as the tuner times them")
    print(
        "| K x N | config (BLOCK_N, BLOCK_K, SPLIT_K, warps, stages, variant) | chain us "
        "| tuner us | |"
    )
    print("|---|---|---|---|---|")
    for k, n in SHAPES:
        if over_budget():
            print("(budget: sweep stopped)")
            return
        layers = synthetic_copies(k, n, 4)
        x = torch.randn(1, k, device=DEVICE, dtype=torch.float16)
        triton_int.matmul(layers[0], x)  # tunes it, if no earlier section did
        tuned = triton_int._TUNED[(k, n, 4, 128, 1, torch.float16)]
        outs = [torch.empty(1, n, device=DEVICE, dtype=torch.float16) for _ in layers]
        rows = []
        for cfg in m1_sweep_configs(layers[0], tuned):
            try:
                chain = graph_time(
                    [
                        partial(triton_int._launch, q, x, o, cfg)
                        for q, o in zip(layers, outs, strict=True)
                    ],
                    budget_s=0.05,
                )
                single = triton_int._do_bench(
                    partial(triton_int._launch, layers[0], x, outs[0], cfg)
                )
                rows.append((chain * 1e6, single * 1e3, cfg))
            except Exception as e:  # e.g. out of resources on this card
                print(f"| {k}x{n} | {tuple(cfg)[2:]} | {type(e).__name__} | | |")
        for chain, single, cfg in sorted(rows):
            mark = "tuned" if cfg == tuned else ""
            print(
                f"| {k}x{n} | {tuple(cfg)[2:]} | {chain:.1f} | {single:.1f} | {mark} |", flush=True
            )
        del layers, outs
        torch.cuda.empty_cache()


# ---- end to end: a Llama-3-8B-shaped decoder, one token per step, CUDA graph ----
LLAMA3_8B = {
    "hidden": 4096,
    "layers": 32,
    "heads": 32,
    "kv_heads": 8,
    "ffn": 14336,
    "vocab": 128256,
}


def make_linear(k: int, n: int, w4: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    if w4:
        return synthetic_layer(k, n, 4, 128, DEVICE)
    w = torch.randn(n, k, device=DEVICE, dtype=torch.float16) * 0.02
    return lambda x: F.linear(x, w)


def capture(fn: Callable[[], Any]) -> torch.cuda.CUDAGraph:
    """fn captured in a CUDA graph after a warm-up call (autotuning happens there, outside the
    capture) and one on a side stream."""
    fn()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def replay_s(graph: torch.cuda.CUDAGraph, steps: int) -> float:
    """Seconds per replay."""
    graph.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def build_step(
    w4: bool, batch: int, n_layers: int, ctx: int, w4_head: bool = False
) -> tuple[Callable[[], None], Callable[[], None], torch.Tensor]:
    """One greedy decode step of a random-init model with a static KV cache, written to be
    captured in a CUDA graph (positions advance on the device) with few small kernels: fused
    QKV and gate/up projections (as serving engines load them), F.rms_norm, RoPE with the
    step's cos/sin gathered once, GQA attention as two batched matmuls over the cache with an
    additive mask. Returns the step, a call of the same linears alone (what the weights cost),
    and the position tensor."""
    c = LLAMA3_8B
    h, nh, nkv, hd, ffn = (
        c["hidden"],
        c["heads"],
        c["kv_heads"],
        c["hidden"] // c["heads"],
        c["ffn"],
    )
    g = nh // nkv
    embed = torch.randn(c["vocab"], h, device=DEVICE, dtype=torch.float16) * 0.02
    head = make_linear(h, c["vocab"], w4_head)
    ones = torch.ones(h, device=DEVICE, dtype=torch.float16)
    layers: list[dict[str, Any]] = []
    for _ in range(n_layers):
        layers.append(
            {
                "qkv": make_linear(h, (nh + 2 * nkv) * hd, w4),
                "o": make_linear(nh * hd, h, w4),
                "gate_up": make_linear(h, 2 * ffn, w4),
                "down": make_linear(ffn, h, w4),
                "kc": torch.zeros(batch, nkv, ctx, hd, device=DEVICE, dtype=torch.float16),
                "vc": torch.zeros(batch, nkv, ctx, hd, device=DEVICE, dtype=torch.float16),
            }
        )
    inv = 1.0 / (500000.0 ** (torch.arange(0, hd, 2, device=DEVICE).float() / hd))
    ang = torch.arange(ctx, device=DEVICE).float()[:, None] * inv[None]
    cos = torch.cat([ang.cos(), ang.cos()], -1).half()  # [ctx, hd]
    sin = torch.cat([-ang.sin(), ang.sin()], -1).half()  # rotate-half signs folded in
    tok = torch.zeros(batch, dtype=torch.long, device=DEVICE)
    pos = torch.full((1,), 16, dtype=torch.long, device=DEVICE)
    span = torch.arange(ctx, device=DEVICE)
    scale = hd**-0.5

    def step() -> None:
        x = embed[tok]
        mask = torch.where(span <= pos, 0.0, float("-inf")).half()
        cs, sn = cos[pos].view(1, 1, hd), sin[pos].view(1, 1, hd)
        for lyr in layers:
            qkv = lyr["qkv"](F.rms_norm(x, (h,), ones, 1e-5))
            qk = qkv[:, : (nh + nkv) * hd].view(batch, nh + nkv, hd)
            qk = torch.addcmul(qk * cs, torch.roll(qk, hd // 2, -1), sn)
            v = qkv[:, (nh + nkv) * hd :].view(batch, nkv, 1, hd)
            lyr["kc"].index_copy_(2, pos, qk[:, nh:].unsqueeze(2))
            lyr["vc"].index_copy_(2, pos, v)
            q = qk[:, :nh].reshape(batch, nkv, g, hd)
            att = torch.softmax(torch.add(mask, q @ lyr["kc"].transpose(-1, -2), alpha=scale), -1)
            x = x + lyr["o"]((att @ lyr["vc"]).reshape(batch, nh * hd))
            gu = lyr["gate_up"](F.rms_norm(x, (h,), ones, 1e-5))
            x = x + lyr["down"](F.silu(gu[:, :ffn]) * gu[:, ffn:])
        logits = head(F.rms_norm(x, (h,), ones, 1e-5))
        tok.copy_(logits.argmax(-1))
        pos.add_(1)

    r = torch.randn(batch, h, device=DEVICE, dtype=torch.float16)
    f = torch.randn(batch, ffn, device=DEVICE, dtype=torch.float16)

    def linears() -> None:
        for lyr in layers:
            lyr["qkv"](r)
            lyr["o"](r)
            lyr["gate_up"](r)
            lyr["down"](f)
        head(r)

    return step, linears, pos


def decode_tps(
    w4: bool, batch: int, n_layers: int, ctx: int = 512, steps: int = 64, w4_head: bool = False
) -> tuple[float, float, float]:
    """Tokens/s of greedy decode steps replayed from a CUDA graph, us per step, and us per
    step of the linears alone (also replayed from a graph)."""
    with torch.inference_mode():
        step, linears, pos = build_step(w4, batch, n_layers, ctx, w4_head)
        graph = capture(step)
        pos.fill_(16)
        t_step = replay_s(graph, steps)
        del graph
        t_lin = replay_s(capture(linears), 16)
    return batch / t_step, t_step * 1e6, t_lin * 1e6


def bench_e2e(n_layers: int) -> None:
    print(f"\n## end to end: random-init Llama-3-8B shapes ({n_layers} layers), decode, CUDA graph")
    print("| batch | weights | tok/s | x fp16 | step us | linears us | other us |")
    print("|---|---|---|---|---|---|---|")
    runs = [(1, False, False), (1, True, False), (1, True, True)]
    runs += [(16, False, False), (16, True, False)]
    base = 0.0
    for batch, w4, w4_head in runs:
        if over_budget():
            print("(budget: end to end stopped)")
            return
        tps, t_step, t_lin = decode_tps(w4, batch, n_layers, w4_head=w4_head)
        torch.cuda.empty_cache()
        base = tps if not w4 else base
        name = "fp16" if not w4 else "W4 g128 + W4 lm_head" if w4_head else "W4 g128 (fp16 lm_head)"
        print(
            f"| {batch} | {name} | {tps:.1f} | {tps / base:.2f}x | {t_step:.0f} | {t_lin:.0f} "
            f"| {t_step - t_lin:.0f} |",
            flush=True,
        )


def llama3_shaped(n_layers: int, w4: bool) -> Any:
    """A random-init HF Llama with Llama-3-8B's shapes in fp16 on the GPU; with `w4`, the
    projections are W4 g128 QuantLinears already fused the way LlamaRunner fuses them."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    c = LLAMA3_8B
    config = LlamaConfig(
        hidden_size=c["hidden"],
        intermediate_size=c["ffn"],
        num_hidden_layers=n_layers,
        num_attention_heads=c["heads"],
        num_key_value_heads=c["kv_heads"],
        vocab_size=c["vocab"],
    )
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16).eval()
    if w4:
        h, hd, ffn = c["hidden"], c["hidden"] // c["heads"], c["ffn"]
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                delattr(attn, name)
            for name in ("gate_proj", "up_proj", "down_proj"):
                delattr(mlp, name)
            qkv = (c["heads"] + 2 * c["kv_heads"]) * hd
            attn.qkv_proj = synthetic_layer(h, qkv, 4, 128, DEVICE)
            attn.o_proj = synthetic_layer(h, h, 4, 128, DEVICE)
            mlp.gate_up_proj = synthetic_layer(h, 2 * ffn, 4, 128, DEVICE)
            mlp.down_proj = synthetic_layer(ffn, h, 4, 128, DEVICE)
    return model


def runner_tps(
    model: Any,
    batch: int,
    graphs: bool,
    fused: bool,
    pdl: bool = True,
    steps: int = 32,
    ctx: int = 512,
    start: int = 16,
    host_logits: bool = False,
    temperature: float = 0.0,
) -> float:
    """Greedy decode tokens/s of bitserve's serving runner (decode steps from CUDA graphs, or
    eager; the ops between matmuls fused or torch's; Triton kernels launched with programmatic
    dependent launch or not): one forward and one `sample` per step for `batch` sequences at
    position `start` onwards (a cache of `ctx` positions), as the engine runs them: argmax on
    the GPU, token ids to the host. host_logits: copy the logits to the CPU and sample there
    (what the engine did before sampling moved to the logits' device). temperature > 0: draw
    under top-p 0.95, seeded per sequence, instead of greedy."""
    from bitserve.server.runner import LlamaRunner
    from bitserve.server.sampling import SamplingParams, sample

    runner = LlamaRunner(model, batch, ctx, decode_graphs=graphs, fused_decode=fused)
    ids, slots = torch.zeros(batch, 1, dtype=torch.long), torch.arange(batch)
    params = [SamplingParams(max_tokens=steps, temperature=temperature, top_p=0.95)] * batch
    gens = [torch.Generator().manual_seed(i) for i in range(batch)]
    counts: list[torch.Tensor | None] = [None] * batch
    saved, triton_int.PDL_ENABLED = triton_int.PDL_ENABLED, pdl
    try:
        # Warm-up steps, sampled as the timed ones: tuning, capture and first uses (CUDA loads
        # kernels lazily). In GPU runs 9-12, with one unsampled warm-up step, the first row
        # timed (fp16, batch 1) ran 8-36% below the next; in run 12 also with PDL kept out of
        # its step, so the order, not PDL, slowed it.
        for i in range(3):
            logits = runner.forward(ids, slots, torch.full((batch,), start + 1 + i))
            sample(logits.cpu() if host_logits else logits, params, gens, counts)
        torch.cuda.synchronize()
        if graphs and not runner.decode_graphs:
            print(f"(batch {batch}: capture failed, this run decoded eager)", flush=True)
        if pdl and not triton_int.PDL_ENABLED:
            print(f"(batch {batch}: a failed capture turned PDL off for this run)", flush=True)
        t0 = time.perf_counter()
        for i in range(steps):
            logits = runner.forward(ids, slots, torch.full((batch,), start + 1 + i))
            tokens, _ = sample(logits.cpu() if host_logits else logits, params, gens, counts)
            ids = torch.tensor(tokens).unsqueeze(1)
        torch.cuda.synchronize()
    finally:
        triton_int.PDL_ENABLED = saved
    return batch * steps / (time.perf_counter() - t0)


def profile_decode(model: Any, batch: int, graphs: bool, steps: int = 8) -> None:
    """Where a decode step's GPU time goes: kernels of `steps` runner steps (graph replays or
    eager) under torch.profiler, summed by kernel name, per step; against the wall time."""
    from torch.profiler import ProfilerActivity, profile

    from bitserve.server.runner import LlamaRunner

    runner = LlamaRunner(model, batch, 512, decode_graphs=graphs)
    ids, slots = torch.zeros(batch, 1, dtype=torch.long), torch.arange(batch)
    for i in range(2):  # tuning, capture
        runner.forward(ids, slots, torch.full((batch,), 16 + i))
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for i in range(steps):
            runner.forward(ids, slots, torch.full((batch,), 18 + i))
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / steps * 1e6
    per_name: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type.name == "CUDA" and e.device_time_total > 0:
            per_name.setdefault(e.name, []).append(e.device_time_total)
    total = sum(sum(v) for v in per_name.values()) / steps
    print(
        f"\nW4 decode step, batch {batch}, {'graphs' if graphs else 'eager'}: wall {wall:.0f} us "
        f"a step, GPU kernels {total:.0f} us ({len(per_name)} kernel names)"
    )
    print("| kernel | calls a step | us a step | share |")
    print("|---|---|---|---|")
    ranked = sorted(per_name.items(), key=lambda kv: -sum(kv[1]))
    for name, times in ranked[:12]:
        t = sum(times) / steps
        print(f"| {name[:90]} | {len(times) / steps:.0f} | {t:.0f} | {t / max(total, 1e-9):.0%} |")


def bench_engine(n_layers: int) -> None:
    """The same model shapes through the serving runner, as `bitserve serve --device cuda`
    decodes: decode steps replayed from CUDA graphs with the fused decode kernels and
    programmatic dependent launch (the default), the same without PDL, from graphs with torch's
    ops between the matmuls, and eager (fused). Batch 4 (the GEMV over 4 rows where it is
    tuned in) only in the default mode."""
    modes = {"graphs, fused": (True, True, True), "graphs, fused, no PDL": (True, True, False)}
    modes |= {"graphs, torch ops": (True, False, True), "eager, fused": (False, True, True)}
    print(f"\n## serving runner, random-init Llama-3-8B shapes ({n_layers} layers)")
    print("(x fp16: against fp16 in the same mode)")
    print(f"| batch | weights | {' | '.join(f'{m} tok/s | x fp16' for m in modes)} |")
    print(f"|---|---|{'---|---|' * len(modes)}")
    base: dict[tuple[int, str], float] = {}
    for w4 in (False, True):
        if over_budget():
            print("(budget: serving runner stopped)")
            return
        model = llama3_shaped(n_layers, w4)
        with torch.inference_mode():
            for batch in (1, 4, 16):
                cells = []
                for mode, (graphs, fused, pdl) in modes.items():
                    if batch == 4 and mode != "graphs, fused":
                        cells.append("- | -")
                        continue
                    try:  # one failed cell (say, non-finite logits) keeps the rest of the table
                        tps = runner_tps(model, batch, graphs, fused, pdl)
                    except Exception as e:
                        cells.append(f"failed: {type(e).__name__}: {e} | -")
                        continue
                    base.setdefault((batch, mode), tps)
                    cells.append(f"{tps:.1f} | {tps / base[batch, mode]:.2f}x")
                    torch.cuda.empty_cache()
                name = "W4 g128 (fp16 lm_head)" if w4 else "fp16"
                print(f"| {batch} | {name} | {' | '.join(cells)} |", flush=True)
            if w4 and not over_budget():  # sampling on the GPU vs logits to the CPU
                for batch, temp in ((1, 0.0), (16, 0.0), (16, 0.8)):
                    dev = runner_tps(model, batch, True, True, temperature=temp)
                    host = runner_tps(model, batch, True, True, host_logits=True, temperature=temp)
                    kind = f"temperature {temp}, top-p 0.95" if temp else "greedy"
                    print(
                        f"W4, batch {batch}, {kind} (graphs, fused): sampling on the GPU "
                        f"{dev:.1f} tok/s, logits to the CPU {host:.1f} ({dev / host:.2f}x)",
                        flush=True,
                    )
            for batch in (1, 16) if w4 else ():
                if not over_budget():
                    try:
                        profile_decode(model, batch, graphs=True)
                    except Exception as e:  # a profiler without CUPTI: say so, go on
                        print(f"(profile of batch {batch} failed: {type(e).__name__}: {e})")
            if w4 and not over_budget():  # long contexts: attention reads 4000 positions a row
                fused_tps = runner_tps(model, 16, True, True, ctx=4096, start=4000)
                torch_ops = runner_tps(model, 16, True, False, ctx=4096, start=4000)
                print(
                    f"W4, batch 16 at positions 4001-4032 (graphs): fused {fused_tps:.1f} tok/s, "
                    f"torch ops {torch_ops:.1f} ({fused_tps / torch_ops:.2f}x)",
                    flush=True,
                )
        del model
        torch.cuda.empty_cache()


SMOLLM2: dict[str, Any] = dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, vocab_size=49152
)


def smollm2_w4(backend: str) -> Any:
    """A random-init llama with SmolLM2-135M's shapes (K = 576: a short last g128 group) in fp16
    on the GPU, every projection RTN W4 g128 on `backend` (the same weights for every call)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from bitserve.quantization.grid import QuantSpec, quantize_rtn
    from bitserve.quantization.pipeline import set_module

    config = LlamaConfig(
        **SMOLLM2, num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    for name, mod in list(model.named_modules()):
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            set_module(model, name, quantize_rtn(mod.weight.data, QuantSpec(4, 128)).to_module())
    model = model.half().to(DEVICE)
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            mod.set_backend(backend)
    return model


def bench_runner_backends(steps: int = 16) -> None:
    """The serving runner on the GPU: the reference backend with torch's ops between the
    matmuls, against the Triton backend with torch's ops and with the fused decode kernels (the
    default on CUDA). Logits of a 32-token prefill and `steps` decode steps fed the same tokens
    (relative error, argmax agreement), then decode tokens/s at batch 1 and 16 (decode steps
    from CUDA graphs)."""
    from bitserve.server.runner import LlamaRunner

    print(
        "\n## serving runner on the GPU: triton backend (torch ops / fused decode kernels) vs "
        "reference backend, SmolLM2-135M shapes (9 heads, 3 kv heads), W4 g128"
    )
    variants = {"reference": ("reference", False), "triton": ("triton", False)}
    variants["triton + fused"] = ("triton", True)
    logits: dict[str, list[torch.Tensor]] = {}
    speed: dict[str, dict[int, float]] = {}
    for name, (backend, fused) in variants.items():
        model = smollm2_w4(backend)
        runner = LlamaRunner(model, 16, 256, fused_decode=fused)
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(0, SMOLLM2["vocab_size"], (1, 32 + steps), generator=gen)
        slot = torch.tensor([0])
        out = [runner.forward(ids[:, :32], slot, torch.tensor([0]))]
        for i in range(steps):
            out.append(runner.forward(ids[:, 32 + i : 33 + i], slot, torch.tensor([32 + i])))
        logits[name] = out
        del runner  # runner_tps takes the (already fused) model over again, per batch
        speed[name] = {b: runner_tps(model, b, True, fused, ctx=256, start=64) for b in (1, 16)}
        del model
        torch.cuda.empty_cache()
    for name in ("triton", "triton + fused"):
        pairs = list(zip(logits[name], logits["reference"], strict=True))
        errs = [rel_err(t, r) for t, r in pairs]
        agree = sum(bool(t.argmax() == r.argmax()) for t, r in pairs)
        print(
            f"{name} vs reference: logits rel err prefill {errs[0]:.1e}, decode max "
            f"{max(errs[1:]):.1e}; argmax agreement {agree}/{len(pairs)} positions"
        )
    print(
        "| batch | reference tok/s | triton tok/s | x reference | triton + fused tok/s | x triton |"
    )
    print("|---|---|---|---|---|---|")
    for batch in (1, 16):
        ref, tri, fus = (speed[n][batch] for n in variants)
        print(
            f"| {batch} | {ref:.1f} | {tri:.1f} | {tri / ref:.2f}x | {fus:.1f} | {fus / tri:.2f}x |",
            flush=True,
        )


def print_tuning() -> None:
    """Tuned config per (K, N, bits, group, M bucket, dtype) and the time each tuning took."""
    print("\n## tuned configs (K, N, bits, group, M bucket, dtype): config, tuning s")
    spent = dict(triton_int.TUNE_LOG)
    for key, cfg in triton_int._TUNED.items():
        print(f"- {key}: {tuple(cfg)}, {spent.get(key, 0.0):.1f} s")
    print(f"total tuning time {sum(spent.values()):.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--skip-layers", action="store_true")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--e2e-layers", type=int, default=32)
    ap.add_argument("--ms", default="1,2,4,16,64,256,1024", help="M values to check and time")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=float("inf"),
        help="wall time after which sections stop at their next step (and later ones are skipped)",
    )
    args = ap.parse_args()
    ms = tuple(int(m) for m in args.ms.split(","))
    global DEADLINE
    DEADLINE = time.perf_counter() + args.budget_s
    import triton

    props = torch.cuda.get_device_properties(0)
    print(
        f"# {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, triton {triton.__version__}"
    )
    pdl = triton_int.use_pdl(torch.device(DEVICE))
    print(
        f"# programmatic dependent launch: {'on' if pdl else 'off'} (sm_{props.major}{props.minor})"
    )
    sections: list[tuple[bool, Callable[[], Any]]] = [
        (args.skip_check, lambda: check_correctness(ms + (300,) if 256 in ms else ms)),
        (args.skip_layers, lambda: bench_layers(copy_bandwidth(), ms)),
        (args.skip_layers, lambda: bench_floors(copy_bandwidth())),
        (args.skip_layers, bench_m1_chain),
        (args.skip_e2e, lambda: bench_e2e(args.e2e_layers)),
        (args.skip_e2e, lambda: bench_engine(args.e2e_layers)),
        (args.skip_e2e, bench_runner_backends),
        (False, print_tuning),
    ]
    for skip, section in sections:
        if skip:
            continue
        if over_budget() and section is not print_tuning:
            print("(budget: section skipped)")
            continue
        t0 = time.perf_counter()
        try:
            section()
        except Exception:
            traceback.print_exc()
        print(f"(section took {time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
