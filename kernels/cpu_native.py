"""bitserve's own CPU matmul for 2-8 bit weights (`cpu_gemv.c`), used by the cpu backend, and
a whole one-token decoder step built on it (`cpu_decode.c`), used by the serving runner.

The C source is compiled at first use with the machine's compiler (`cc -O3 -march=native
-fopenmp`) into the cache directory, keyed by the source, the compiler and the CPU's flags, and
loaded with ctypes; a one-off check against a float matmul guards it. Where there is no
compiler, no AVX2, or the check fails, `library()` logs why and returns None, and the cpu
backend keeps torch's int4 kernel. `BITSERVE_CPU_KERNEL=torch` turns it off.

It runs in the same OpenMP runtime as torch (the libgomp torch has loaded), with torch's thread
count, so the two do not fight over the cores (docs/serving.md, "Threads").
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from bitserve.kernels.packing import group_index
from bitserve.kernels.quant_linear import CACHE_DIR

# cpu_decode.c includes cpu_gemv.c; both go into the cache key.
SOURCES = [Path(__file__).with_name(name) for name in ("cpu_decode.c", "cpu_gemv.c")]
# No contraction of a * b + c into one FMA in the plain C loops (the matmul's FMAs are explicit):
# the decoder step's norms and rotary then round as torch's separate ops do.
FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC"]
log = logging.getLogger("bitserve.kernels")
_P = ctypes.c_void_p
_I = ctypes.c_int


@dataclass(frozen=True)
class Library:
    """The compiled kernels (`bitserve_gemv` and `bitserve_dequant` in cpu_gemv.c,
    `bitserve_decode` in cpu_decode.c), the weight layout's columns per block (16 with AVX512,
    else 8) and the instruction set they use."""

    gemv: Callable[..., int]
    dequant: Callable[..., int]
    decode: Callable[..., int]
    cols: int
    isa: str
    path: Path


def _cpu_flags() -> str:
    """The CPU's feature flags: a library built with -march=native must not be reused on a
    CPU that lacks some of them (a cache directory on a shared volume)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


@functools.cache
def dense_dtype() -> torch.dtype:
    """The dtype of the dense GEMM that many-row calls run on dequantized weights: bf16 where
    the CPU multiplies it natively (AVX512-BF16, AMX), else fp32 (torch's bf16 GEMM on a plain
    AVX2 CPU is about 100x slower than its fp32 one)."""
    flags = _cpu_flags().split()
    return torch.bfloat16 if "avx512_bf16" in flags or "amx_bf16" in flags else torch.float32


def _compile(cc: str, march: str, out: Path) -> None:
    """Compile the source into `out` (written to a temporary file, then renamed, so that a
    concurrent process never loads half a library)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        lib = Path(tmp) / out.name
        cmd = [cc, *FLAGS, f"-march={march}", str(SOURCES[0]), "-o", str(lib)]
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)
        os.replace(lib, out)


def build(march: str = "native", cc: str | None = None) -> Library | None:
    """Compile (or find in the cache), load and check the kernel for `-march=march`; None, with
    a logged warning that says why, where it cannot run here."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        log.info("own CPU kernel: x86-64 only (this is %s); using torch's", platform.machine())
        return None
    cc = cc or os.environ.get("CC", "cc")
    key = hashlib.sha1(
        b"".join(p.read_bytes() for p in SOURCES) + f"{cc} {FLAGS} {march} {_cpu_flags()}".encode()
    ).hexdigest()[:16]
    path = CACHE_DIR / f"cpu-gemv-{key}.so"
    try:
        if not path.exists():
            _compile(cc, march, path)
        lib = ctypes.CDLL(str(path))
    except subprocess.CalledProcessError as e:
        lines = (e.stderr or "").strip().splitlines() or ["no output"]
        why = next((line for line in lines if "error" in line), lines[-1])
        log.warning("own CPU kernel did not compile (%s): using torch's int4 kernel", why)
        return None
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("own CPU kernel unavailable (%s): using torch's int4 kernel", e)
        return None
    gemv = lib.bitserve_gemv
    gemv.argtypes = [_P] * 5 + [_I] * 6
    dequant = lib.bitserve_dequant
    dequant.argtypes = [_P] * 3 + [_I] * 5 + [_P, _I, _I]
    decode = lib.bitserve_decode
    decode.argtypes = [_P, _P, _I, _P, _I, _P, _P, _I]
    gemv.restype, dequant.restype, decode.restype = _I, _I, _I
    lib.bitserve_gemv_isa.restype = ctypes.c_char_p
    isa = lib.bitserve_gemv_isa().decode()
    found = Library(gemv, dequant, decode, int(lib.bitserve_gemv_cols()), isa, path)
    err = _self_check(found)
    if not err < 1e-4:
        log.warning("own CPU kernel gave a relative error of %.2e: using torch's", err)
        return None
    log.info("own CPU kernel (%s, %d-column blocks): %s", isa, found.cols, path)
    return found


@functools.cache
def library() -> Library | None:
    """The kernel for this machine, built once per process (None: use torch's)."""
    if os.environ.get("BITSERVE_CPU_KERNEL", "") == "torch":
        return None
    return build()


def _profiled(name: str, fn: Callable[[], int]) -> int:
    """fn(), inside a torch.profiler range called `name` while a profiler records: ctypes calls
    are no aten ops, so it would not see them otherwise. (The check costs 0.2 us; a range, 10.)"""
    if not torch.autograd._profiler_enabled():
        return fn()
    with torch.profiler.record_function(name):
        return fn()


def accepts(lib: Library, bits: int, k: int, n: int, group: int) -> bool:
    """Whether a [k -> n] layer of `bits` with `group` (-1: per-channel) fits the kernel."""
    group = k if group == -1 or group >= k else group
    return bits in (2, 3, 4, 8) and k % 32 == 0 and n % lib.cols == 0 and group % 32 == 0


def pack(
    lib: Library, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int
) -> dict[str, torch.Tensor]:
    """The kernel's tensors from codes uint8 [K, N] of `bits`, scales and zero codes [G, N]:
    `native_weight` uint8 [N / C, K / 8, C, 4] (codes below 16, two to a byte) or
    [N / C, K / 8, 2, C, 4] (8 bits), `native_s` and `native_zs` (s and s * z) fp32
    [N / C, G, C], C = lib.cols (layout in cpu_gemv.c)."""
    if bits not in (2, 3, 4, 8) or codes.dtype != torch.uint8:
        raise ValueError(f"packs uint8 codes of 2, 3, 4 or 8 bits, not {codes.dtype} of {bits}")
    k, n = codes.shape
    c = lib.cols
    if bits == 8:
        t = codes.t().reshape(n // c, c, k // 8, 2, 4).permute(0, 2, 3, 1, 4)
        weight = t.contiguous()
    else:
        t = codes.t().reshape(n // c, c, k // 8, 2, 4).permute(0, 2, 1, 3, 4)
        weight = (t[..., 0, :] | (t[..., 1, :] << 4)).contiguous()

    def blocked(a: torch.Tensor) -> torch.Tensor:
        return a.float().t().reshape(n // c, c, -1).transpose(1, 2).contiguous()

    s = scales.float()
    return {"native_weight": weight, "native_s": blocked(s), "native_zs": blocked(s * zeros)}


def _bits(lib: Library, weight: torch.Tensor) -> int:
    """4 or 8: the code width a packed weight holds (its bytes per column and 8 codes)."""
    return weight[0, 0].numel() // lib.cols


def caller(
    lib: Library, p: dict[str, torch.Tensor], group: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    """x [M, K] -> fp32 [M, N] through the kernel for the packed weight `p` (from `pack`), with
    its pointers and sizes looked up once (the decode loop calls it on every step)."""
    keep = (p["native_weight"], p["native_s"], p["native_zs"])  # alive as long as the closure
    k, n = keep[0].shape[1] * 8, keep[0].shape[0] * lib.cols
    group = k if group == -1 or group >= k else group
    ptrs, bits = tuple(t.data_ptr() for t in keep), _bits(lib, keep[0])

    def call(x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != k:
            raise ValueError(f"expected rows of {k} values, got a tensor of shape {tuple(x.shape)}")
        if x.dtype != torch.float32 or not x.is_contiguous():
            x = x.float().contiguous()
        m = x.shape[0]
        out = torch.empty(m, n, dtype=torch.float32)  # the kernel writes fp32
        threads = torch.get_num_threads()
        args = (*ptrs, x.data_ptr(), out.data_ptr(), m, k, n, group, bits, threads)
        err = _profiled("bitserve::gemv", lambda: lib.gemv(*args))
        if err == -1:
            raise MemoryError(f"no memory for the int16 copy of {m} x {k} activations")
        if err:
            raise ValueError(f"the kernel takes 4 or 8-bit storage, not {bits} bits")
        assert keep[0].data_ptr() == ptrs[0]  # referencing keep holds all three tensors
        return out

    return call


def matmul(lib: Library, p: dict[str, torch.Tensor], x: torch.Tensor, group: int) -> torch.Tensor:
    """x [M, K] times the packed weight `p`: fp32 [M, N] (see `caller`)."""
    return caller(lib, p, group)(x)


def columns(
    lib: Library, p: dict[str, torch.Tensor], group: int, n0: int, n1: int, dtype: torch.dtype
) -> torch.Tensor:
    """Output columns n0:n1 (multiples of lib.cols) of the packed weight, dequantized as
    [K, n1 - n0] in `dtype` (fp32, or bf16 rounded to nearest even): the weights of the dense
    path for many rows."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dequantizes to float32 or bfloat16, not {dtype}")
    weight = p["native_weight"]
    k = weight.shape[1] * 8
    out = torch.empty(k, n1 - n0, dtype=dtype)
    err = lib.dequant(
        weight.data_ptr(),
        p["native_s"].data_ptr(),
        p["native_zs"].data_ptr(),
        k,
        n0,
        n1,
        k if group == -1 or group >= k else group,
        _bits(lib, weight),
        out.data_ptr(),
        int(dtype == torch.bfloat16),
        torch.get_num_threads(),
    )
    if err:
        raise ValueError(f"the kernel takes 4 or 8-bit storage, not {_bits(lib, weight)} bits")
    return out


def _self_check(lib: Library) -> float:
    """Largest relative error of the kernel against a float matmul on random codes and inputs
    (three rows, two groups, two column blocks), for 4 and 8-bit codes."""
    gen = torch.Generator().manual_seed(0)
    k, n, group = 64, 2 * lib.cols, 32
    errors = []
    for bits in (4, 8):
        codes = torch.randint(0, 1 << bits, (k, n), generator=gen, dtype=torch.uint8)
        scales = torch.rand(2, n, generator=gen) + 0.5
        zeros = torch.randint(0, 1 << bits, (2, n), generator=gen).float()
        x = torch.randn(3, k, generator=gen)
        g = group_index(k, group)
        ref = x.double() @ ((codes.double() - zeros.double()[g]) * scales.double()[g])
        y = matmul(lib, pack(lib, codes, scales, zeros, bits), x, group)
        errors.append(float((y.double() - ref).norm() / ref.norm()))
    return max(errors)


class _Matrix(ctypes.Structure):
    """`bs_matrix` of cpu_decode.c: a packed projection and its bias (or NULL)."""

    _fields_ = [
        ("w", _P),
        ("s", _P),
        ("zs", _P),
        ("bias", _P),
        ("k", _I),
        ("n", _I),
        ("group", _I),
        ("bits", _I),
    ]


class _Layer(ctypes.Structure):
    """`bs_layer` of cpu_decode.c."""

    _fields_ = [
        ("qkv", _Matrix),
        ("o", _Matrix),
        ("gate_up", _Matrix),
        ("down", _Matrix),
        ("attn_norm", _P),
        ("mlp_norm", _P),
        ("attn_eps", ctypes.c_float),
        ("mlp_eps", ctypes.c_float),
        ("k_cache", _P),
        ("v_cache", _P),
    ]


class _Model(ctypes.Structure):
    """`bs_model` of cpu_decode.c."""

    _fields_ = [
        ("dim", _I),
        ("heads", _I),
        ("kv_heads", _I),
        ("head_dim", _I),
        ("max_len", _I),
        ("scale", ctypes.c_float),
        ("cos", _P),
        ("sin", _P),
        ("kv_half", _I),
    ]


# A projection for `decoder`: its tensors from `pack`, its group size (-1: per channel) and its
# bias (None: none).
Projection = tuple[dict[str, torch.Tensor], int, torch.Tensor | None]


@dataclass(frozen=True)
class DecodeLayer:
    """A llama-family decoder layer for `decoder`: q/k/v fused as [q heads, k heads, v heads],
    gate/up fused as [gate, up], the two RMSNorms' weights and epsilons, and the layer's K/V
    cache [slots, kv_heads, max_len, head_dim]; all fp32 but the cache, fp32 or fp16 (the MLP's
    activation is SiLU)."""

    qkv: Projection
    o: Projection
    gate_up: Projection
    down: Projection
    attn_norm: tuple[torch.Tensor, float]
    mlp_norm: tuple[torch.Tensor, float]
    k_cache: torch.Tensor
    v_cache: torch.Tensor


def decoder(
    lib: Library,
    layers: list[DecodeLayer],
    heads: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    scale: float,
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]:
    """`bitserve_decode` over `layers`: step(h, slots, pos) runs h [B, dim] fp32 (the embedded
    tokens; updated in place) through every layer, row b being the token at position pos[b] of
    the sequence whose K/V live in slot slots[b]. cos, sin: the rotary tables [max_len,
    head_dim], sin with its first half negated. Raises ValueError where the shapes do not
    chain, head_dim is not a multiple of 8 or the query heads do not split evenly over the KV
    heads (checked here once, since the C trusts them). A step that fails (no memory) may have
    written some layers' K/V at its positions: a retry writes them again."""
    keep: list[torch.Tensor] = [cos, sin]  # every tensor the C reads, alive with the closure
    max_len, head_dim = cos.shape
    first = layers[0]
    dim, kv_heads = first.attn_norm[0].numel(), first.k_cache.shape[1]
    inner = first.down[0]["native_weight"].shape[1] * 8

    def ptr(t: torch.Tensor, dtype: torch.dtype = torch.float32) -> int:
        if t.dtype != dtype or not t.is_contiguous():
            layout = "a contiguous" if t.is_contiguous() else "a non-contiguous"
            want = "fp16" if dtype == torch.float16 else "fp32"
            raise ValueError(
                f"the decoder step takes contiguous {want} here, not {layout} {t.dtype}"
            )
        keep.append(t)
        return t.data_ptr()

    def matrix(proj: Projection, k: int, n: int) -> _Matrix:
        p, group, bias = proj
        w = p["native_weight"]
        shape = (w.shape[1] * 8, w.shape[0] * lib.cols)
        if shape != (k, n) or (bias is not None and bias.shape != (n,)):
            raise ValueError(f"a projection of shape {shape} where the model needs {(k, n)}")
        keep.extend((w, p["native_s"], p["native_zs"]))
        ptrs = (w.data_ptr(), ptr(p["native_s"]), ptr(p["native_zs"]))
        group = k if group == -1 or group >= k else group
        return _Matrix(*ptrs, None if bias is None else ptr(bias), k, n, group, _bits(lib, w))

    if head_dim % 8 or kv_heads < 1 or heads % kv_heads:
        raise ValueError(
            f"the decoder step takes head sizes of 8k and whole query groups, not {head_dim}"
            f" and {heads} heads over {kv_heads} KV heads"
        )
    cache = (first.k_cache.shape[0], kv_heads, max_len, head_dim)
    kv_dtype = first.k_cache.dtype
    if kv_dtype not in (torch.float32, torch.float16):
        raise ValueError(f"the decoder step keeps K/V in fp32 or fp16, not {kv_dtype}")
    structs = []
    for x in layers:
        if x.k_cache.shape != cache or x.v_cache.shape != cache or sin.shape != cos.shape:
            raise ValueError(f"K/V caches of shape {cache} and rotary tables of {cos.shape}")
        structs.append(
            _Layer(
                matrix(x.qkv, dim, (heads + 2 * kv_heads) * head_dim),
                matrix(x.o, heads * head_dim, dim),
                matrix(x.gate_up, dim, 2 * inner),
                matrix(x.down, inner, dim),
                ptr(x.attn_norm[0]),
                ptr(x.mlp_norm[0]),
                x.attn_norm[1],
                x.mlp_norm[1],
                ptr(x.k_cache, kv_dtype),
                ptr(x.v_cache, kv_dtype),
            )
        )
    half = int(kv_dtype == torch.float16)
    model = _Model(dim, heads, kv_heads, head_dim, max_len, scale, ptr(cos), ptr(sin), half)
    array = (_Layer * len(structs))(*structs)
    slots_held = cache[0]

    def step(h: torch.Tensor, slots: torch.Tensor, pos: torch.Tensor) -> None:
        rows = h.shape[0]
        if h.dtype != torch.float32 or not h.is_contiguous() or h.shape != (rows, dim):
            raise ValueError(f"expected contiguous fp32 rows of {dim}, got {tuple(h.shape)}")
        slots, pos = (t.to(torch.int64).contiguous() for t in (slots, pos))
        s, p = slots.tolist(), pos.tolist()
        if len(s) != rows or len(p) != rows or not all(0 <= i < slots_held for i in s):
            raise ValueError(f"expected {rows} slots below {slots_held}, got {s}")
        if not all(0 <= i < max_len for i in p):
            raise ValueError(f"positions must lie in [0, {max_len}), got {p}")
        threads = torch.get_num_threads()
        args = (ctypes.byref(model), array, len(structs), h.data_ptr(), rows, slots.data_ptr())
        err = _profiled("bitserve::decode", lambda: lib.decode(*args, pos.data_ptr(), threads))
        if err == -1:
            raise MemoryError(f"no memory for the scratch of a {rows}-row decode step")
        if err:
            raise ValueError("a projection's storage is neither 4 nor 8 bits")
        assert keep  # the closure holds every tensor the C reads

    return step
