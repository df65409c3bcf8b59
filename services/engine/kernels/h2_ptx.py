"""Packed fp16x2 PTX for the GEMM kernels (`tl.inline_asm_elementwise`), as plain strings.

Kept apart from the Triton code so that they can be read, tested on any machine
(tests/unit/engine/kernels/test_h2_ptx.py runs them through a small PTX interpreter) and
reviewed without triton installed; w4a16.py wraps them as `tl.constexpr`.

Operand numbering follows LLVM inline asm: outputs first ($0...), then the inputs in order.
"""
from __future__ import annotations

import os

# Which 4-bit unpacking the strings below use (read once, at import): "shift" (three shifts, four
# lop3, four sub.f16x2 per word) or "fma" (one shift: the odd pairs are masked in place, 16 times too
# large, and one fma.f16x2 by 1/16 takes the zero off and scales them back). INLAID_H2_DEQ picks it,
# so that one GPU run can time both forms in two processes (benchmarks/probe_roofline.py).
H2_DEQ_FORMS = ("shift", "fma")
H2_DEQ_FORM = os.environ.get("INLAID_H2_DEQ", "shift")
if H2_DEQ_FORM not in H2_DEQ_FORMS:
    raise ValueError(f"INLAID_H2_DEQ={H2_DEQ_FORM!r}: expected one of {', '.join(H2_DEQ_FORMS)}")

# One packed word of 8 codes → Σ_j x_j (q_j - z) with fp16x2 arithmetic. The code pairs (j, j + 4)
# become two fp16 1024 + q in one register (4-bit: masks 0x000F000F after shifts of 0/4/8/12,
# one lop3 each; 3-bit: the low 2-bit fields and the high bits spread into both halves by byte
# permutes, then two lop3 per pair), sub.f16x2 against (1024 + z, 1024 + z) leaves q - z
# exactly, and four fma.f16x2 with the x pairs (x_j, x_{j+4}) sum eight products two at a time;
# the two halves go to fp32. The whole gemv K loop then issues 4.3 (4-bit) / 5.9 (3-bit) SASS
# instructions per weight against 6.9 / 9.0 on the fp32 path (benchmarks/results/kernel_sass.md).
# Operands: $0 out, then the code plane(s), 4 x pairs, the zero pair.
# the four pairs minus the zero pair {zz} (the "shift" 4-bit form and 3-bit)
_H2_SUBS = """
sub.f16x2 h2w0, h2w0, {zz};
sub.f16x2 h2w1, h2w1, {zz};
sub.f16x2 h2w2, h2w2, {zz};
sub.f16x2 h2w3, h2w3, {zz};"""
# the products with the x pairs {x0}..{x3} and the fp32 sum into $0
_H2_TAIL = """
mul.rn.f16x2 h2acc, h2w0, {x0};
fma.rn.f16x2 h2acc, h2w1, {x1}, h2acc;
fma.rn.f16x2 h2acc, h2w2, {x2}, h2acc;
fma.rn.f16x2 h2acc, h2w3, {x3}, h2acc;
mov.b32 {{h2lo, h2hi}}, h2acc;
cvt.f32.f16 h2flo, h2lo;
cvt.f32.f16 h2fhi, h2hi;
add.f32 $0, h2flo, h2fhi;
}}
"""
# 4-bit code pairs of the word {q}: h2w<j> = (1024 + q_j, 1024 + q_{j+4}) for j = 0..3.
_H2_PAIRS4 = """
mov.b32 h2msk, 983055;
mov.b32 h2mag, 1677747200;
shr.u32 h2t1, {q}, 4;
shr.u32 h2t2, {q}, 8;
shr.u32 h2t3, {q}, 12;
lop3.b32 h2w0, {q}, h2msk, h2mag, 234;
lop3.b32 h2w1, h2t1, h2msk, h2mag, 234;
lop3.b32 h2w2, h2t2, h2msk, h2mag, 234;
lop3.b32 h2w3, h2t3, h2msk, h2mag, 234;"""
# The same pairs minus the zero, "fma" form: pairs 1 and 3 keep their nibbles at bits 4-7 / 20-23, so
# they read 1024 + 16 q; fma(w, 1/16, 960 - (1024 + z)) = q - z exactly (one rounding of an exact
# small integer). 0x00F000F0 = 15728880, (1/16, 1/16) = 0x2C002C00, (960, 960) = 0x63806380.
_H2_PAIRS4_FMA = """
mov.b32 h2msk, 983055;
mov.b32 h2mskh, 15728880;
mov.b32 h2mag, 1677747200;
mov.b32 h2c16, 738208768;
mov.b32 h2c960, 1669358464;
shr.u32 h2t2, {q}, 8;
lop3.b32 h2w0, {q}, h2msk, h2mag, 234;
lop3.b32 h2w1, {q}, h2mskh, h2mag, 234;
lop3.b32 h2w2, h2t2, h2msk, h2mag, 234;
lop3.b32 h2w3, h2t2, h2mskh, h2mag, 234;
sub.f16x2 h2zn, h2c960, {zz};
sub.f16x2 h2w0, h2w0, {zz};
fma.rn.f16x2 h2w1, h2w1, h2c16, h2zn;
sub.f16x2 h2w2, h2w2, {zz};
fma.rn.f16x2 h2w3, h2w3, h2c16, h2zn;"""
_H2_REGS4_FMA = ".reg .b32 h2t2, h2w0, h2w1, h2w2, h2w3, h2msk, h2mskh, h2mag, h2c16, h2c960, h2zn;"
_H2_REGS4 = ".reg .b32 h2t1, h2t2, h2t3, h2w0, h2w1, h2w2, h2w3, h2msk, h2mag;"


def _pairs4(q: str, zz: str, form: str = H2_DEQ_FORM) -> str:
    """The declarations and the four 4-bit pairs minus the zero pair, in the given unpacking form
    (by default the one INLAID_H2_DEQ picks)."""
    if form == "fma":
        return _H2_REGS4_FMA + _H2_PAIRS4_FMA.format(q=q, zz=zz)
    return _H2_REGS4 + _H2_PAIRS4.format(q=q) + _H2_SUBS.format(zz=zz)


H2_DOT_ASM = ("""
{
.reg .b32 h2acc;
.reg .b16 h2lo, h2hi;
.reg .f32 h2flo, h2fhi;
""" + _pairs4("$1", "$6") + _H2_TAIL.format(x0="$2", x1="$3", x2="$4", x3="$5"))
# mma8 + zsub, 4-bit: one word → its 8 codes minus the zero as fp16 (outputs $0..$7 = codes 0..7;
# input $8 the word, $9 the zero pair): the same lop3 pairs and sub.f16x2 as H2_DOT_ASM, unpacked.

# 3-bit: $1 low plane (int16 in an int32), $2 high plane (int8 in an int32).
# t = [lo.b0, 0, lo.b1, 0]: fields j and j + 4 at bits 2j and 16 + 2j. hb: high bit j at bit
# 2 + j and high bit j + 4 at bit 18 + j (u = [hb, 0, hb, 0]; (u << 2) & 0x3C | (u >> 2) & 0x3C0000).
# Pair j: ((t >> 2j) & 0x00030003) | ((hb >> j) & 0x00040004) | 0x64006400.
# 3-bit code pairs of the planes {q} (low) and {qh} (high): h2w<j> = (1024 + q_j, 1024 + q_{j+4}).
_H2_PAIRS3 = """
mov.b32 h2zero, 0;
mov.b32 h2m2, 196611;
mov.b32 h2m1, 262148;
mov.b32 h2mag, 1677747200;
prmt.b32 h2t, {q}, h2zero, 16704;
prmt.b32 h2u, {qh}, h2zero, 16448;
shl.b32 h2a, h2u, 2;
and.b32 h2a, h2a, 60;
shr.u32 h2b, h2u, 2;
lop3.b32 h2hb, h2b, 3932160, h2a, 234;
lop3.b32 h2w0, h2t, h2m2, h2mag, 234;
lop3.b32 h2w0, h2hb, h2m1, h2w0, 234;
shr.u32 h2s, h2t, 2;
shr.u32 h2r, h2hb, 1;
lop3.b32 h2w1, h2s, h2m2, h2mag, 234;
lop3.b32 h2w1, h2r, h2m1, h2w1, 234;
shr.u32 h2s, h2t, 4;
shr.u32 h2r, h2hb, 2;
lop3.b32 h2w2, h2s, h2m2, h2mag, 234;
lop3.b32 h2w2, h2r, h2m1, h2w2, 234;
shr.u32 h2s, h2t, 6;
shr.u32 h2r, h2hb, 3;
lop3.b32 h2w3, h2s, h2m2, h2mag, 234;
lop3.b32 h2w3, h2r, h2m1, h2w3, 234;"""
_H2_REGS3 = ".reg .b32 h2t, h2u, h2a, h2b, h2hb, h2s, h2r, h2w0, h2w1, h2w2, h2w3, h2acc, h2m2, h2m1, h2mag, h2zero;"
H2_DOT3_ASM = ("""
{
""" + _H2_REGS3 + """
.reg .b16 h2lo, h2hi;
.reg .f32 h2flo, h2fhi;""" + _H2_PAIRS3.format(q="$1", qh="$2")
               + _H2_SUBS.format(zz="$7") + _H2_TAIL.format(x0="$3", x1="$4", x2="$5", x3="$6"))
# the unpacking tail of the DEQ forms: codes j and j + 4 (pair j, zero taken off) to $j, $j+4
_H2_DEQ_TAIL = """
mov.b32 {{$0, $4}}, h2w0;
mov.b32 {{$1, $5}}, h2w1;
mov.b32 {{$2, $6}}, h2w2;
mov.b32 {{$3, $7}}, h2w3;
}}
"""
H2_DEQ_ASM = "\n{\n" + _pairs4("$8", "$9") + _H2_DEQ_TAIL.format()
# mma8 + zsub, 3-bit: inputs $8 low plane, $9 high plane, $10 the zero pair; outputs as H2_DEQ_ASM.
H2_DEQ3_ASM = "\n{\n" + _H2_REGS3 + _H2_PAIRS3.format(q="$8", qh="$9") + _H2_SUBS.format(zz="$10") + _H2_DEQ_TAIL.format()
# mma on fragment-ordered codes without zsub: one word → its 8 codes as fp16 1024 + q (outputs $0..$7 =
# codes 0..7, input $8 the word): the pairs alone, no zero taken off (the kernel takes (1024 + z) · Σx
# off the block's fp32 partial instead).
H2_MAG_ASM = "\n{\n" + _H2_REGS4 + _H2_PAIRS4.format(q="$8") + _H2_DEQ_TAIL.format()
# H2_DEQ_ASM's codes minus the zero in the "fma" unpacking whatever INLAID_H2_DEQ says (the fragment
# kernels take the form as a constant, so one process can time both).
H2_DEQ_FMA_ASM = "\n{\n" + _pairs4("$8", "$9", "fma") + _H2_DEQ_TAIL.format()
H2_DEQ_SHIFT_ASM = "\n{\n" + _pairs4("$8", "$9", "shift") + _H2_DEQ_TAIL.format()
