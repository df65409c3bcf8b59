"""gemv_h2's inline PTX, executed on the CPU by a small interpreter of the instructions it uses.

The interpreter (TRITON_INTERPRET) cannot run inline assembly, so test_w4a16_interpreted.py checks
an fp32 emulation of the packing instead. Here the real asm strings that go to the GPU are run
instruction by instruction (integer ops bit-exact, f16x2 ops rounded to fp16 per operation as the
hardware does): one-hot x pairs read back every code field exactly, random inputs match the
float64 dot product. The strings live outside the triton guard, so this runs without triton.
"""
from __future__ import annotations

import importlib.util
import re

import numpy as np
import pytest

from services.engine.kernels import h2_ptx


def _with_form(form: str):
    """h2_ptx as a process started with INLAID_H2_DEQ=form would import it (the form is read at import)."""
    spec = importlib.util.spec_from_file_location(f"h2_ptx_{form}", h2_ptx.__file__)
    module = importlib.util.module_from_spec(spec)
    mp = pytest.MonkeyPatch()
    mp.setenv("INLAID_H2_DEQ", form)
    try:
        spec.loader.exec_module(module)
    finally:
        mp.undo()
    return module


FORMS = {form: _with_form(form) for form in h2_ptx.H2_DEQ_FORMS}

MASK = 0xFFFFFFFF


def _halves(v: int) -> tuple[np.float16, np.float16]:
    return (np.array([v & 0xFFFF], np.uint16).view(np.float16)[0],
            np.array([(v >> 16) & 0xFFFF], np.uint16).view(np.float16)[0])


def _pack(lo: np.float16, hi: np.float16) -> int:
    a = int(np.array([lo], np.float16).view(np.uint16)[0])
    b = int(np.array([hi], np.float16).view(np.uint16)[0])
    return a | (b << 16)


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    out = 0
    for i in range(8):
        if lut >> i & 1:
            out |= (a if i & 4 else ~a) & (b if i & 2 else ~b) & (c if i & 1 else ~c)
    return out & MASK


def _prmt(a: int, b: int, sel: int) -> int:
    src = (a & MASK) | ((b & MASK) << 32)
    out = 0
    for k in range(4):
        s = (sel >> (4 * k)) & 0xF
        byte = (src >> (8 * (s & 7))) & 0xFF
        if s & 8:  # sign replicate (not used by our strings)
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * k)
    return out


def run_ptx(asm: str, inputs: list[int], num_outputs: int = 1) -> dict[str, object]:
    """Execute the asm block; $<num_outputs>.. are the inputs (32-bit); returns the registers."""
    regs: dict[str, object] = {f"${i + num_outputs}": v & MASK for i, v in enumerate(inputs)}

    def val(tok: str) -> int:
        tok = tok.strip()
        return int(tok) & MASK if re.fullmatch(r"-?\d+", tok) else regs[tok]

    for raw in asm.splitlines():
        line = raw.strip().rstrip(";").strip()
        if not line or line in ("{", "}") or line.startswith(".reg"):
            continue
        op, _, rest = line.partition(" ")
        if op == "mov.b32" and rest.startswith("{"):
            names, src = rest.split("}")
            lo, hi = [n.strip() for n in names.strip("{ ").split(",")]
            regs[lo], regs[hi] = _halves(val(src.strip(", ")))
            continue
        args = [t.strip() for t in rest.split(",")]
        d, srcs = args[0], args[1:]
        if op == "mov.b32":
            regs[d] = val(srcs[0])
        elif op == "shr.u32":
            regs[d] = val(srcs[0]) >> val(srcs[1])
        elif op == "shl.b32":
            regs[d] = (val(srcs[0]) << val(srcs[1])) & MASK
        elif op == "and.b32":
            regs[d] = val(srcs[0]) & val(srcs[1])
        elif op == "lop3.b32":
            regs[d] = _lop3(val(srcs[0]), val(srcs[1]), val(srcs[2]), val(srcs[3]))
        elif op == "prmt.b32":
            regs[d] = _prmt(val(srcs[0]), val(srcs[1]), val(srcs[2]))
        elif op in ("sub.f16x2", "mul.rn.f16x2", "fma.rn.f16x2"):
            a, b = _halves(val(srcs[0])), _halves(val(srcs[1]))
            c = _halves(val(srcs[2])) if op.startswith("fma") else (None, None)
            res = []
            for i in range(2):
                if op == "sub.f16x2":
                    res.append(np.float16(a[i] - b[i]))
                elif op == "mul.rn.f16x2":
                    res.append(np.float16(np.float64(a[i]) * np.float64(b[i])))
                else:  # fused: one rounding
                    res.append(np.float16(np.float64(a[i]) * np.float64(b[i]) + np.float64(c[i])))
            regs[d] = _pack(res[0], res[1])
        elif op == "cvt.f32.f16":
            regs[d] = np.float32(regs[srcs[0]])
        elif op == "add.f32":
            regs[d] = np.float32(np.float32(regs[srcs[0]]) + np.float32(regs[srcs[1]]))
        else:
            raise AssertionError(f"instruction not covered by this interpreter: {line}")
    return regs


def run_dot(asm: str, inputs: list[int]) -> float:
    return float(run_ptx(asm, inputs)["$0"])


def codes_of(bits: int, q: int, qh: int) -> list[int]:
    if bits == 4:
        return [(q >> (4 * j)) & 0xF for j in range(8)]
    return [((q >> (2 * j)) & 3) | (((qh >> j) & 1) << 2) for j in range(8)]


def planes(bits: int, rng: np.random.Generator) -> tuple[int, int]:
    """A code word as the kernel passes it: int32 (4-bit) or sign-extended int16 / int8 (3-bit)."""
    if bits == 4:
        return int(rng.integers(0, 2**32)), 0
    lo = int(rng.integers(-2**15, 2**15)) & MASK   # sign-extended int16
    hi = int(rng.integers(-2**7, 2**7)) & MASK     # sign-extended int8
    return lo, hi


def h2_inputs(bits: int, q: int, qh: int, xs: list[float], z: int) -> list[int]:
    pairs = [_pack(np.float16(xs[j]), np.float16(xs[j + 4])) for j in range(4)]
    zz = _pack(np.float16(1024 + z), np.float16(1024 + z))
    return ([q] if bits == 4 else [q, qh]) + pairs + [zz]


def asm_of(bits: int, form: str) -> str:
    return FORMS[form].H2_DOT_ASM if bits == 4 else FORMS[form].H2_DOT3_ASM


@pytest.mark.parametrize("form", h2_ptx.H2_DEQ_FORMS)
@pytest.mark.parametrize("bits", [4, 3])
def test_one_hot_x_reads_every_code_exactly(bits: int, form: str) -> None:
    rng = np.random.default_rng(bits)
    for _ in range(50):
        q, qh = planes(bits, rng)
        z = int(rng.integers(0, 2**bits))
        codes = codes_of(bits, q, qh)
        for j in range(8):
            xs = [0.0] * 8
            xs[j] = 1.0
            assert run_dot(asm_of(bits, form), h2_inputs(bits, q, qh, xs, z)) == codes[j] - z, (q, qh, j)


@pytest.mark.parametrize("form", h2_ptx.H2_DEQ_FORMS)
@pytest.mark.parametrize("bits", [4, 3])
def test_random_words_match_the_float64_dot(bits: int, form: str) -> None:
    rng = np.random.default_rng(10 + bits)
    for _ in range(200):
        q, qh = planes(bits, rng)
        z = int(rng.integers(0, 2**bits))
        xs = [float(np.float16(v)) for v in rng.normal(0, 1, 8) / 32]   # the kernel's 1/32-scaled x
        ref = sum(x * (c - z) for x, c in zip(xs, codes_of(bits, q, qh)))
        got = run_dot(asm_of(bits, form), h2_inputs(bits, q, qh, xs, z))
        assert abs(got - ref) <= 2e-3 * sum(abs(x) * 15 for x in xs) + 1e-6, (got, ref)


@pytest.mark.parametrize("form", h2_ptx.H2_DEQ_FORMS)
@pytest.mark.parametrize("bits", [4, 3])
def test_deq_asm_gives_every_code_minus_the_zero(bits: int, form: str):
    rng = np.random.default_rng(7 + bits)
    asm = FORMS[form].H2_DEQ_ASM if bits == 4 else FORMS[form].H2_DEQ3_ASM
    for _ in range(200):
        q, qh = planes(bits, rng)
        z = int(rng.integers(0, 2**bits))
        zz = _pack(np.float16(1024 + z), np.float16(1024 + z))
        regs = run_ptx(asm, ([q] if bits == 4 else [q, qh]) + [zz], num_outputs=8)
        got = [float(regs[f"${j}"]) for j in range(8)]
        assert got == [c - z for c in codes_of(bits, q, qh)], (q, qh, z)


def test_fma_form_uses_one_shift_and_an_unknown_form_is_refused(monkeypatch) -> None:
    fma, shift = FORMS["fma"].H2_DEQ_ASM, FORMS["shift"].H2_DEQ_ASM
    assert fma.count("shr.u32") == 1 and shift.count("shr.u32") == 3
    assert fma.count("fma.rn.f16x2") == 2
    with pytest.raises(ValueError, match="INLAID_H2_DEQ='lut'"):
        monkeypatch.setenv("INLAID_H2_DEQ", "lut")
        spec = importlib.util.spec_from_file_location("h2_ptx_bad", h2_ptx.__file__)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
