"""The Triton backend's inline PTX (`_CODES_PTX`, `_DEQUANT_PTX`, `_DOT4_PTX`), run on the CPU by a small
interpreter of the few instructions they use, with numpy's fp16 arithmetic (one IEEE rounding
per op, as the GPU's .rn ops). It reads the very strings the kernels compile, so a wrong
constant, operand number or output order fails here; the interpreter tests of the kernels run
the Triton-ops stand-ins instead, and the GPU run checks the rest."""

from __future__ import annotations

import itertools
import os
import re
from fractions import Fraction

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

triton_int = pytest.importorskip("bitserve.kernels.triton_int")
MASK32 = 0xFFFFFFFF


def f16(bits: int) -> np.float16:
    return np.array(bits & 0xFFFF, dtype=np.uint16).view(np.float16)[()]


def bits16(v: float) -> int:
    return int(np.array(v, dtype=np.float16).view(np.uint16))


def pair(v: float) -> int:
    """v as fp16 in both halves of a 32-bit register (what `_h2` builds)."""
    return bits16(v) * 0x10001


def lop3(a: int, b: int, c: int, imm: int) -> int:
    """PTX lop3.b32: bit i of the result is bit (a_i b_i c_i, a as the high bit) of imm."""
    out = 0
    for idx in range(8):
        if imm >> idx & 1:
            term = MASK32
            for value, bit in ((a, 4), (b, 2), (c, 1)):
                term &= value if idx & bit else ~value & MASK32
            out |= term
    return out


def round_f16(x: Fraction) -> int:
    """The fp16 nearest to the exact value x (ties to even), as bits: what a .rn op returns."""
    near = np.float16(float(x))  # within one fp16 step of the answer
    below, above = np.nextafter(near, np.float16(-np.inf)), np.nextafter(near, np.float16(np.inf))
    options = [v for v in (below, near, above) if np.isfinite(v)]
    best = min(options, key=lambda v: (abs(Fraction(float(v)) - x), bits16(v) & 1))
    return bits16(best)


def f16x2(fn, *regs: int) -> int:
    """An f16x2 op: fn on the low halves and on the high halves, computed exactly (Fraction)
    and rounded to fp16 once."""
    lo = fn(*(Fraction(float(f16(r))) for r in regs))
    hi = fn(*(Fraction(float(f16(r >> 16))) for r in regs))
    return round_f16(lo) | round_f16(hi) << 16


def run_ptx(src: str, args: dict[str, int]) -> dict[str, int]:
    """Run PTX `src` with operands $0.. bound in `args` (32-bit or 16-bit register values);
    returns every register, outputs included."""
    regs = dict(args)

    def val(tok: str) -> int:
        return int(tok, 0) if tok[0].isdigit() else regs[tok]

    for line in src.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        if m := re.fullmatch(r"\{(\S+), (\S+)\}, (\S+)", rest):  # mov.b32 {lo, hi}, r
            r = val(m.group(3))
            regs[m.group(1)], regs[m.group(2)] = r & 0xFFFF, r >> 16
            continue
        dst, *ops = [t.strip() for t in rest.split(",")]
        x = [val(t) for t in ops]
        if op == "mov.b32":
            regs[dst] = x[0]
        elif op == "lop3.b32":
            regs[dst] = lop3(*x)
        elif op == "shr.u32":
            regs[dst] = x[0] >> x[1]
        elif op == "sub.f16x2":
            regs[dst] = f16x2(lambda a, b: a - b, *x)
        elif op == "mul.rn.f16x2":
            regs[dst] = f16x2(lambda a, b: a * b, *x)
        elif op == "fma.rn.f16x2":
            regs[dst] = f16x2(lambda a, b, c: a * b + c, *x)
        elif op == "cvt.f32.f16":
            regs[dst] = int(np.array(float(f16(x[0])), dtype=np.float32).view(np.uint32))
        elif op == "add.f32":
            a, b = (np.array(v, dtype=np.uint32).view(np.float32) for v in x)
            regs[dst] = int(np.array(a + b, dtype=np.float32).view(np.uint32))
        else:
            raise AssertionError(f"instruction the emulator does not know: {line}")
    return regs


SLOTS = triton_int._slots(4).tolist()  # where code k of a word sits, in nibbles


def word(codes: list[int]) -> int:
    return sum(q << (4 * SLOTS[k]) for k, q in enumerate(codes))


def cases() -> list[tuple[list[int], int, int]]:
    """Every (code, zero) pair at every position k of a word, the other codes random."""
    rng = np.random.default_rng(0)
    out = []
    for q, z, k in itertools.product(range(16), range(16), range(8)):
        codes = rng.integers(0, 16, 8).tolist()
        codes[k] = q
        out.append((codes, z, k))
    return out


def test_codes_ptx_gives_exact_q_minus_z_in_k_order() -> None:
    """`_CODES_PTX` ($8 word, $9 = 1024 + z, $10 = -(64 + z) as fp16 pairs, as `_codes_kmajor`
    passes them) -> $0..$7 = q_k - z for k = 0..7, exactly."""
    src = triton_int._CODES_PTX.value
    for codes, z, _ in cases():
        regs = run_ptx(src, {"$8": word(codes), "$9": pair(1024 + z), "$10": pair(-(64 + z))})
        got = [float(f16(regs[f"${k}"])) for k in range(8)]
        assert got == [q - z for q in codes], (codes, z, got)


def pairs_dot(codes: list[int], z: int, x: np.ndarray) -> float:
    """`_DEQUANT_PTX` then `_DOT4_PTX`, as `_gemv_kernel` chains them: the word and the negated
    zero terms in, the four fp16 pairs out and into the dot with the x pairs (x[2i], x[2i + 1])."""
    nz = {"$5": pair(-(z / 16 + 64)), "$6": pair(-(z / 16 + 4))}
    regs = run_ptx(triton_int._DEQUANT_PTX.value, {"$4": word(codes), **nz})
    d = {f"${1 + i}": regs[f"${i}"] for i in range(4)}
    xs = {f"${5 + i}": bits16(x[2 * i]) | bits16(x[2 * i + 1]) << 16 for i in range(4)}
    out = run_ptx(triton_int._DOT4_PTX.value, {**d, **xs})["$0"]
    return float(np.array(out, dtype=np.uint32).view(np.float32))


def test_dequant_ptx_gives_exact_pairs_in_k_order() -> None:
    """`_DEQUANT_PTX` -> $0..$3 = fp16 pairs ((q_2i - z) / 16, (q_2i+1 - z) / 16), exactly."""
    for codes, z, _ in cases():
        nz = {"$5": pair(-(z / 16 + 64)), "$6": pair(-(z / 16 + 4))}
        regs = run_ptx(triton_int._DEQUANT_PTX.value, {"$4": word(codes), **nz})
        got = [float(f16(regs[f"${k // 2}"] >> (16 * (k % 2)))) for k in range(8)]
        assert got == [(q - z) / 16 for q in codes], (codes, z, got)


def test_pairs_ptx_dequantize_exactly_and_pair_x_by_k() -> None:
    """The two PTX blocks -> sum_k x_k (q_k - z) / 16 as float32: exactly (q_k - z) / 16 for a
    one-hot x at every k, and within fp16 rounding for random x."""
    rng = np.random.default_rng(1)
    for codes, z, k in cases():
        for x in (np.eye(8)[k], rng.standard_normal(8).astype(np.float16)):
            got = pairs_dot(codes, z, x)
            want = float(np.dot(x.astype(np.float64), (np.array(codes) - z) / 16))
            tol = 0.0 if x.max() == 1 and x.sum() == 1 else 4e-3 * (np.abs(x).sum() + 1)
            assert abs(got - want) <= tol, (codes, z, x, got, want)
