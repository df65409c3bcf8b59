"""Packed fp16x2 PTX for the GEMM kernels (`tl.inline_asm_elementwise`), as plain strings.

Kept apart from the Triton code so that they can be read, tested on any machine
(tests/unit/engine/kernels/test_h2_ptx.py runs them through a small PTX interpreter) and
reviewed without triton installed; w4a16.py wraps them as `tl.constexpr`.

Operand numbering follows LLVM inline asm: outputs first ($0...), then the inputs in order.
"""
from __future__ import annotations

# One packed word of 8 codes → Σ_j x_j (q_j - z) with fp16x2 arithmetic. The code pairs (j, j + 4)
# become two fp16 1024 + q in one register (4-bit: masks 0x000F000F after shifts of 0/4/8/12,
# one lop3 each; 3-bit: the low 2-bit fields and the high bits spread into both halves by byte
# permutes, then two lop3 per pair), sub.f16x2 against (1024 + z, 1024 + z) leaves q - z
# exactly, and four fma.f16x2 with the x pairs (x_j, x_{j+4}) sum eight products two at a time;
# the two halves go to fp32. The whole gemv K loop then issues 4.3 (4-bit) / 5.9 (3-bit) SASS
# instructions per weight against 6.9 / 9.0 on the fp32 path (benchmarks/results/kernel_sass.md).
# Operands: $0 out, then the code plane(s), 4 x pairs, the zero pair.
_H2_TAIL = """
sub.f16x2 h2w0, h2w0, {zz};
sub.f16x2 h2w1, h2w1, {zz};
sub.f16x2 h2w2, h2w2, {zz};
sub.f16x2 h2w3, h2w3, {zz};
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
H2_DOT_ASM = ("""
{
.reg .b32 h2t1, h2t2, h2t3, h2w0, h2w1, h2w2, h2w3, h2acc, h2msk, h2mag;
.reg .b16 h2lo, h2hi;
.reg .f32 h2flo, h2fhi;""" + _H2_PAIRS4.format(q="$1")
              + _H2_TAIL.format(zz="$6", x0="$2", x1="$3", x2="$4", x3="$5"))
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
               + _H2_TAIL.format(zz="$7", x0="$3", x1="$4", x2="$5", x3="$6"))
# the unpacking tail of the DEQ forms: pairs minus the zero pair {zz}, codes j and j + 4 to $j, $j+4
_H2_DEQ_TAIL = """
sub.f16x2 h2w0, h2w0, {zz};
sub.f16x2 h2w1, h2w1, {zz};
sub.f16x2 h2w2, h2w2, {zz};
sub.f16x2 h2w3, h2w3, {zz};
mov.b32 {{$0, $4}}, h2w0;
mov.b32 {{$1, $5}}, h2w1;
mov.b32 {{$2, $6}}, h2w2;
mov.b32 {{$3, $7}}, h2w3;
}}
"""
H2_DEQ_ASM = ("\n{\n.reg .b32 h2t1, h2t2, h2t3, h2w0, h2w1, h2w2, h2w3, h2msk, h2mag;"
              + _H2_PAIRS4.format(q="$8") + _H2_DEQ_TAIL.format(zz="$9"))
# mma8 + zsub, 3-bit: inputs $8 low plane, $9 high plane, $10 the zero pair; outputs as H2_DEQ_ASM.
H2_DEQ3_ASM = "\n{\n" + _H2_REGS3 + _H2_PAIRS3.format(q="$8", qh="$9") + _H2_DEQ_TAIL.format(zz="$10")
