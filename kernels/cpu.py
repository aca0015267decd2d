"""CPU backend: our own int16-activation kernel and PyTorch's packed CPU kernels for QuantLinear.

2/3/4 and 8-bit codes go through bitserve's own kernel (`cpu_native`, compiled at first use;
faster than torch's kernels and as exact as fp32) where it builds and the shape fits. Otherwise
2/3/4-bit codes go through the int4 tinygemm CPU kernel (`_weight_int4pack_mm_for_cpu`, any
code below 16 fits a nibble); 8-bit group-wise codes through it twice (high and low nibbles,
two matmuls that add up); 8-bit per-channel through `_weight_int8pack_mm`. torch's kernels are vectorised only for
bf16 activations (fp32 and fp16 take a scalar path 20-30x slower), so those paths run in bf16
with fp32 accumulation and return the caller's dtype. From DENSE_ROWS rows (prefill) our
kernel's layers and torch's int4 planes run a dense GEMM on weights dequantized a chunk at a
time, in bf16 where the CPU multiplies it natively, else in fp32. Anything else (group
sizes that are not multiples of 32) runs dequantize-then-matmul in the caller's dtype over
chunks of output rows, so no full-precision copy of a whole layer is ever held. Repacking
happens in `prepare`.
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bitserve.kernels import cpu_native
from bitserve.kernels.packing import group_index
from bitserve.kernels.quant_linear import Backend, Direct, QuantLinear, register_backend

KERNEL_GROUPS = (256, 128, 64, 32)  # group sizes the int4 CPU kernel accepts
DEQUANT_CHUNK = 512  # output rows dequantized at a time by the fallback path
# Calls with at least DENSE_ROWS rows (prefill; half as many for torch's two 8-bit planes)
# dequantize DENSE_CHUNK output rows at a time (bf16 or fp32, `cpu_native.dense_dtype`) and run
# a dense GEMM instead of the kernel, where that is faster (docs/kernels.md, "Many rows"). Our
# own kernel's layers do so only from FP32_DENSE_ROWS where that GEMM runs in fp32: there the
# kernel is the faster up to 512 rows at least.
DENSE_ROWS, DENSE_CHUNK = 256, 2048  # the chunk: whole 64-row blocks of the packed layout
FP32_DENSE_ROWS = 1024
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
KERNEL_DTYPE = torch.bfloat16  # the packed kernels' fast activation dtype
log = logging.getLogger("bitserve.kernels")
# Each native layer's kernel call with its pointers looked up once (`cpu_native.caller`), made on
# first use and dropped when the layer is prepared again: building it costs more than a small
# layer's matmul.
_CALLERS: weakref.WeakKeyDictionary[QuantLinear, Callable[[torch.Tensor], torch.Tensor]] = (
    weakref.WeakKeyDictionary()
)


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _int4_geometry(layer: QuantLinear) -> tuple[int, int, int]:
    """(kernel group size, padded K, padded N) for the int4 path."""
    return _geometry(layer.in_features, layer.out_features, layer.group_size)


@functools.cache  # called on every forward: the answer depends only on the shape
def _geometry(k: int, n: int, group_size: int) -> tuple[int, int, int]:
    """_int4_geometry of a [k -> n] layer with `group_size`.

    Our group (or the whole row for per-channel) is split into kernel groups that share its
    scale. The largest kernel group dividing both the group and K needs no padding (K=576 g128:
    kernel groups of 64, the short last group is one of them); failing that, K is padded up to a
    multiple of the group so a short last group becomes a full one whose padding rows meet zero
    activations. N is padded to the kernel's multiple of 16.
    """
    group = k if group_size == -1 or group_size >= k else group_size
    n_pad = _round_up(n, 16)
    kg = next((g for g in KERNEL_GROUPS if group % g == 0 and k % g == 0), 0)
    if kg:
        return kg, k, n_pad
    if group == k:  # per-channel with K=100: pad the single group to a multiple of 32
        return 32, _round_up(k, 32), n_pad
    kg = next((g for g in KERNEL_GROUPS if group % g == 0), 0)
    return kg, _round_up(k, group), n_pad


def _kind(layer: QuantLinear) -> str:
    """Which CPU path runs this layer: "native", "int4", "int8" or "dequant" (the one
    `_prepare` chose: "native" where it packed for our own kernel)."""
    if "native_weight" in layer.prepared:
        return "native"
    return _path(layer.bits, layer.in_features, layer.out_features, layer.group_size)


def _native(layer: QuantLinear) -> cpu_native.Library | None:
    """Our own kernel, where it is built and takes this layer (2-4 or 8 bits, aligned shape)."""
    lib = cpu_native.library()
    k, n, group = layer.in_features, layer.out_features, layer.group_size
    return lib if lib and cpu_native.accepts(lib, layer.bits, k, n, group) else None


@functools.cache
def _path(bits: int, k: int, n: int, group_size: int) -> str:
    """_kind of a [k -> n] layer of `bits` with `group_size` (-1: per-channel)."""
    per_channel = group_size == -1 or group_size >= k
    # The int8 kernel misbehaves on some unaligned shapes in half precision: keep it aligned.
    if bits == 8 and per_channel and n % 16 == 0 and k % 32 == 0:
        return "int8"
    if bits in (2, 3, 4, 8) and _geometry(k, n, group_size)[0]:  # 8-bit: two nibble planes
        return "int4"
    return "dequant"


def _supports(layer: QuantLinear) -> str | None:
    if layer.qweight.device.type != "cpu":
        return f"weights are on {layer.qweight.device.type}, not cpu"
    return None


def _int4_plane(
    layer: QuantLinear, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One weight for the int4 kernel, which computes w = (c - 8) * scale + zero per kernel
    group: codes c in 0..15 [N, K], and our per-group scale and zero [groups, N]; returns the
    packed codes and the [kernel groups, N, 2] scales/zeros, padded per `_int4_geometry`."""
    k, n = layer.in_features, layer.out_features
    kg, k_pad, n_pad = _int4_geometry(layer)
    padded = torch.zeros(n_pad, k_pad, dtype=torch.int32)
    padded[:n, :k] = codes
    g = group_index(k_pad, layer.group_size if layer.group_size < k else -1)
    g = g[::kg].clamp_max(layer.scales.shape[0] - 1)
    sz = torch.zeros(len(g), n_pad, 2)
    sz[:, :n, 0], sz[:, :n, 1] = scale[g], zero[g]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(padded, 1)
    return packed, sz.to(KERNEL_DTYPE).contiguous()


def _prepare_int4(layer: QuantLinear) -> None:
    """Codes below 4 bits are shifted by o = 8 - 2**(bits-1) to centre them on 8 (c = q + o),
    so that with ours, w = (q - z) * s, the kernel's zero (2**(bits-1) - z) * s stays small and
    half precision loses nothing to cancellation. 8-bit codes split into two nibble planes,
    q = 16 h + l, run as two int4 matmuls that add up: (h - 8) * 16s + (128 - z) * s and
    (l - 8) * s + 8s."""
    q = layer.codes().t().to(torch.int32)
    s, z = layer.scales.float(), layer.zero_codes().float()
    if layer.bits <= 4:
        offset = 8 - (1 << (layer.bits - 1))
        planes = [_int4_plane(layer, q + offset, s, (8 - offset - z) * s)]
    else:
        planes = [_int4_plane(layer, q >> 4, 16 * s, (128 - z) * s)]
        planes.append(_int4_plane(layer, q & 15, s, 8 * s))
    for i, (packed, sz) in enumerate(planes):
        layer.prepared[f"int4_weight{i}"] = packed
        layer.prepared[f"int4_sz{i}"] = sz


def _prepare_int8(layer: QuantLinear) -> None:
    # (q - z) * s = (q - 128) * s + (128 - z) * s: a signed int8 matmul plus a rank-1 term.
    q = layer.codes().t().to(torch.int16) - 128
    s = layer.scales.float()[0]
    layer.prepared["int8_weight"] = q.to(torch.int8).contiguous()
    layer.prepared["int8_scale"] = s.to(KERNEL_DTYPE).contiguous()
    layer.prepared["int8_offset"] = ((128 - layer.zero_codes().float()[0]) * s).contiguous()


def _prepare_dequant(layer: QuantLinear) -> None:
    g = group_index(layer.in_features, layer.group_size)
    layer.prepared["codes"] = layer.codes().t().contiguous()  # uint8 [N, K]
    layer.prepared["group"] = g
    layer.prepared["scales"] = layer.scales.float().t().contiguous()  # [N, G]
    layer.prepared["zeros"] = layer.zero_codes().float().t().contiguous()


def _prepare(layer: QuantLinear) -> None:
    """Repack the checkpoint tensors once for the path this layer takes."""
    _CALLERS.pop(layer, None)
    lib = _native(layer)
    if lib is not None:
        codes, zeros = layer.codes(), layer.zero_codes().float()
        layer.prepared.update(cpu_native.pack(lib, codes, layer.scales, zeros, layer.bits))
        return
    {"int4": _prepare_int4, "int8": _prepare_int8, "dequant": _prepare_dequant}[_kind(layer)](layer)


def _int4_columns(
    packed: torch.Tensor, sz: torch.Tensor, kg: int, n0: int, n1: int
) -> torch.Tensor:
    """Output rows n0:n1 of a packed int4 weight, dequantized to fp32 as [K, n1 - n0] (n0, n1
    multiples of 64, or n1 the padded N). The kernel's layout on AVX512 CPUs (torch 2.13; other
    instruction sets use smaller blocks): blocks of 64 output rows, each [K, 32] bytes, row j of
    the block in the low nibble of byte j and row 32 + j in the high one; rows past the last
    whole block as [K, rest / 2] bytes, adjacent rows in the two nibbles of one byte.
    `_layout_ok` checks this once per process."""
    k = packed.shape[1] * 2
    flat = packed.reshape(-1)[n0 * k // 2 : n1 * k // 2]
    if (n1 - n0) % 64 == 0:
        b = flat.view(-1, k, 32)
        codes = torch.cat([b & 15, b >> 4], dim=2).permute(1, 0, 2).reshape(k, n1 - n0)
    else:
        b = flat.view(k, -1)
        codes = torch.stack([b & 15, b >> 4], dim=2).reshape(k, n1 - n0)
    # w = (c - 8) * s + zero in fp32 (the caller rounds once, to bf16): (c - 8) * s and zero
    # are of the size of w (the offsets of `_prepare_int4`), so nothing cancels.
    c = (codes.view(torch.int8) - 8).float().view(k // kg, kg, n1 - n0)
    s, z = sz[:, n0:n1, 0].float().unsqueeze(1), sz[:, n0:n1, 1].float().unsqueeze(1)
    return torch.addcmul(z, c, s).view(k, n1 - n0)


@functools.cache
def _layout_ok() -> bool:
    """Whether `_int4_columns` reads this torch's packed layout right (random codes, whole
    blocks and a tail, compared exactly); if not, many-row calls keep the int4 kernel."""
    codes = torch.randint(0, 16, (112, 64), dtype=torch.int32, generator=torch.Generator())
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    sz = torch.zeros(2, 112, 2, dtype=KERNEL_DTYPE)
    sz[..., 0], sz[..., 1] = 1, 8  # w = c
    got = torch.cat(
        [_int4_columns(packed, sz, 32, 0, 64), _int4_columns(packed, sz, 32, 64, 112)], 1
    )
    ok = torch.equal(got.t().int(), codes)
    if not ok:
        log.warning("unexpected int4 packed layout: many-row matmuls keep the int4 kernel")
    return ok


def _dense_int4(layer: QuantLinear, x: torch.Tensor, kg: int) -> torch.Tensor:
    """x [M, K_pad] (bf16 or fp32, `cpu_native.dense_dtype`) times the layer's int4 planes,
    dequantized DENSE_CHUNK output rows at a time into x's dtype for a dense GEMM (the int4
    kernel is slower than one past a hundred rows or so): [M, N_pad] in x's dtype."""
    p = layer.prepared
    n_pad = p["int4_sz0"].shape[1]
    whole = n_pad // 64 * 64  # rows in whole 64-row blocks; the rest has its own layout
    chunk = DENSE_CHUNK // 64 * 64
    spans = [(n0, min(n0 + chunk, whole)) for n0 in range(0, whole, chunk)]
    spans += [(whole, n_pad)] if whole < n_pad else []
    planes = [(p[f"int4_weight{i}"], p[f"int4_sz{i}"]) for i in range(2) if f"int4_sz{i}" in p]
    parts = []
    for n0, n1 in spans:
        w = _int4_columns(*planes[0], kg, n0, n1)
        for packed, sz in planes[1:]:  # 8-bit: the low nibbles
            w += _int4_columns(packed, sz, kg, n0, n1)
        parts.append(torch.mm(x, w.to(x.dtype)))
    return torch.cat(parts, dim=1)


def _matmul_int4(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    kg, k_pad, _ = _int4_geometry(layer)
    if k_pad != layer.in_features:
        x = F.pad(x, (0, k_pad - layer.in_features))
    p = layer.prepared
    planes = 2 if "int4_weight1" in p else 1
    if x.shape[0] * planes >= DENSE_ROWS and _layout_ok():
        y = _dense_int4(layer, x.to(cpu_native.dense_dtype()), kg)
    else:
        x = x.to(KERNEL_DTYPE)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, p["int4_weight0"], kg, p["int4_sz0"])
        if "int4_weight1" in p:  # the low nibbles of 8-bit codes
            y = y.float() + torch.ops.aten._weight_int4pack_mm_for_cpu(
                x, p["int4_weight1"], kg, p["int4_sz1"]
            )
    return y if y.shape[1] == layer.out_features else y[:, : layer.out_features]


def _matmul_int8(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    y = torch.ops.aten._weight_int8pack_mm(
        x.to(KERNEL_DTYPE), layer.prepared["int8_weight"], layer.prepared["int8_scale"]
    )
    rank1 = x.float().sum(dim=1, keepdim=True) * layer.prepared["int8_offset"]
    return y.float() + rank1


def _matmul_dequant(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    p = layer.prepared
    out = x.new_empty(x.shape[0], layer.out_features)
    for n0 in range(0, layer.out_features, DEQUANT_CHUNK):
        n1 = min(n0 + DEQUANT_CHUNK, layer.out_features)
        s = p["scales"][n0:n1][:, p["group"]]
        z = p["zeros"][n0:n1][:, p["group"]]
        w = ((p["codes"][n0:n1].float() - z) * s).to(x.dtype)
        torch.mm(x, w.t(), out=out[:, n0:n1])
    return out


def _gemv(lib: cpu_native.Library, layer: QuantLinear) -> Callable[[torch.Tensor], torch.Tensor]:
    """The layer's kernel call (`_CALLERS`)."""
    call = _CALLERS.get(layer)
    if call is None:
        call = _CALLERS[layer] = cpu_native.caller(lib, layer.prepared, layer.group_size)
    return call


def native_dense_rows() -> int:
    """The rows from which our own kernel's layers run the dense GEMM instead."""
    return FP32_DENSE_ROWS if cpu_native.dense_dtype() == torch.float32 else DENSE_ROWS


def _matmul_native(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """x [M, K] (made fp32) through our own kernel, or from `native_dense_rows()` rows a dense
    GEMM (bf16 or fp32, `cpu_native.dense_dtype`) on DENSE_CHUNK output rows dequantized at a
    time (as the int4 path): fp32 [M, N]."""
    lib = cpu_native.library()
    assert lib is not None  # the layer was packed for it
    group, n = layer.group_size, layer.out_features
    if x.shape[0] < native_dense_rows():
        return _gemv(lib, layer)(x)
    dtype, chunk = cpu_native.dense_dtype(), DENSE_CHUNK // lib.cols * lib.cols
    xd = x.to(dtype)
    parts = [
        torch.mm(xd, cpu_native.columns(lib, layer.prepared, group, n0, min(n0 + chunk, n), dtype))
        for n0 in range(0, n, chunk)
    ]
    return torch.cat(parts, dim=1).float()


MATMULS = {
    "native": _matmul_native,
    "int4": _matmul_int4,
    "int8": _matmul_int8,
    "dequant": _matmul_dequant,
}


def _direct(layer: QuantLinear) -> Direct | None:
    """Our own kernel on fp32 rows, or the int4 path on bf16 rows, for the runner's decode
    loop: one kernel call where K and N need no padding, else `_matmul_int4`; None for the
    other paths and for layers with a bias (they run through `_forward`)."""
    if layer.bias is not None:
        return None
    if _kind(layer) == "native":
        lib = cpu_native.library()
        assert lib is not None  # the layer was packed for it
        gemv = _gemv(lib, layer)

        def native(x: torch.Tensor) -> torch.Tensor:
            return gemv(x) if x.shape[0] < native_dense_rows() else _matmul_native(layer, x)

        return torch.float32, native
    if _kind(layer) != "int4":
        return None
    kg, k_pad, n_pad = _int4_geometry(layer)
    p = layer.prepared
    if k_pad != layer.in_features or n_pad != layer.out_features or "int4_weight1" in p:
        return KERNEL_DTYPE, functools.partial(_matmul_int4, layer)
    weight, sz, mm = p["int4_weight0"], p["int4_sz0"], torch.ops.aten._weight_int4pack_mm_for_cpu

    def call(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] >= DENSE_ROWS:  # the dense path, as _matmul_int4 takes it
            return _matmul_int4(layer, x)
        return mm(x, weight, kg, sz)

    return KERNEL_DTYPE, call


def _forward(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    shape = x.shape
    dtype = x.dtype
    x2 = x.reshape(-1, shape[-1])
    if dtype not in DTYPES:
        x2 = x2.float()
    x2 = x2.contiguous()
    y = MATMULS[_kind(layer)](layer, x2).to(dtype)  # the packed kernels answer in bf16
    if layer.bias is not None:
        y = y + layer.bias.to(dtype)
    return y.reshape(*shape[:-1], layer.out_features)


def _describe(layer: QuantLinear) -> str:
    """The kernel that runs this layer, as the model card names it."""
    kind = _kind(layer)
    if kind == "native":
        lib = cpu_native.library()
        return f"cpu: bitserve int16-activation kernel ({lib.isa if lib else '?'})"
    return {
        "int4": "cpu: torch int4 kernel (bf16 activations)",
        "int8": "cpu: torch int8 kernel (bf16 activations)",
        "dequant": "cpu: dequantize + matmul",
    }[kind]


BACKEND = register_backend(
    Backend(
        "cpu",
        10,
        supports=_supports,
        prepare=_prepare,
        forward=_forward,
        direct=_direct,
        describe=_describe,
    )
)
