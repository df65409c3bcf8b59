"""W4A16 GEMM on fragment-ordered codes: each thread's 16-byte load is exactly its tensor-core operand.

The tiled layout of gptq_format.KernelWeights gives a thread 4 adjacent columns of one packed row,
while mma.m16n8k16 wants each thread to hold, for one column n = g, the rows k = 2t, 2t + 1, 2t + 8,
2t + 9 of every K=16 step (lane = 4g + t). Triton moves the dequantized tile between those two
layouts through shared memory: about 0.9 of the zsub mma8 kernel's 4.28 SASS instructions per weight at
BN 64 (kernel_sass_shift_d9ea4b0.md against frag_sass_t39_afad211.md). Here the codes are stored in
the order the fragments want them:

  qweight int32 [N/8, K/128, 128]: for 8 columns (n = 8c + g) and one 128-row K block b, word
  4·lane + w (lane = 4g + t) holds at nibble j = 4e + 2a + h the code of
  k = 128b + 32w + 16a + 8h + 2t + e      (k_width 2: fragment rows 2t, 2t + 1, 2t + 8, 2t + 9)
  k = 128b + 32w + 16a + 4t + 2h + e      (k_width 4: rows 4t .. 4t + 3 of each K=16 step).

Which of the two a Triton version gives its fp16 mma.sync operands (the dot operand layout's
kWidth) decides which order is free: Triton 3.6 picks 4 on sm_90 and 3.9 picks 2 (both compiled here;
with the other order the operand reaches its layout through warp shuffles, ~2 SASS instructions per
weight). frag_k_width() maps the installed version; the packing (gptq_format.to_fragment_order, which
makes KernelWeights with frag = k_width) and the kernels take it explicitly.

So lane 4g + t loads its 4 words with one 16-byte load, the 128 words of (c, b) are one coalesced
512-byte warp read, and the packed fp16x2 unpack (h2_ptx) yields the pairs (k, k + 1) that a
fragment register holds: with the order that matches the Triton version, the reshape of the unpacked
codes to the [128, BN] dot operand is a relabelling of registers that Triton's linear layouts resolve
with no data movement.

Kernels: "frag" (tensor cores, BM rows × BN columns per program, split-K by fp16 atomics), "frag_t"
(the same with swapped operands, out^T = W^T x^T: the weights are the left operand, which Hopper's
wgmma reads from registers),
"frag_gemv" (one row of x per program on CUDA cores, gemv_h2's packed fp16x2 dot; the x pairs of
a word are two adjacent halves, so each is one 32-bit load) and frag_dequantize_fp16 (W in fp16 for
the GEMM tuner's reference and its "dense" kind). 4-bit weights only. The engine serves this layout
with EngineConfig.w4_layout = "frag" (w4a16.w4a16_matmul dispatches the frag kinds here).

Code tiles load as 2-D [C, 128] (C = BN / 8 rows of 128 words). A [C, 32, 4] form of the same
addresses compiled to the same sm_90 SASS counts here (Triton 3.9) but ran 2-7x slower on the H100
with Triton 3.6 (frag_small_96e0d9b.md against frag_m1_16_fcd1f62.md), so the 2-D form stays.
"""
from __future__ import annotations

import os

import torch

from services.engine.kernels.gptq_format import FRAG_COLS, KERNEL_K_BLOCK, KernelWeights, frag_block_major, k_splits
from services.engine.kernels.launch import cdiv, launch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the engine falls back to torch
    triton = None
    tl = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"   # no inline PTX there: the unpack is emulated


def frag_k_width() -> int:
    """The fragment order whose operand layout the installed Triton uses for fp16 mma.sync (see above)."""
    if triton is None:
        return 2
    major, minor = (int(v) for v in triton.__version__.split(".")[:2])
    return 4 if (major, minor) < (3, 9) else 2


if triton is not None:
    from services.engine.kernels.h2_ptx import H2_DEQ_FMA_ASM, H2_DEQ_SHIFT_ASM, H2_MAG_ASM
    from services.engine.kernels.pdl import pdl_enter
    from services.engine.kernels.w4a16_tiles import fp16_bits, h2_dot, load_x, store_out

    _H2_MAG_ASM = tl.constexpr(H2_MAG_ASM)
    _H2_DEQ_FMA_ASM = tl.constexpr(H2_DEQ_FMA_ASM)
    _H2_DEQ_SHIFT_ASM = tl.constexpr(H2_DEQ_SHIFT_ASM)

    @triton.jit
    def _mag(q, j: tl.constexpr):
        """Nibble j of each word as the fp16 1024 + q (the emulation of H2_MAG_ASM's output j)."""
        return (((q >> (4 * j)) & 0xF) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)

    @triton.jit
    def frag_codes(q, zz, ZSUB: tl.constexpr, FMA: tl.constexpr, EMULATE: tl.constexpr):
        """The 8 codes of each word as fp16 (a tuple, code j = nibble j): q - z with ZSUB (zz the zero
        pair of each word's column; FMA: h2_ptx's one-shift "fma" unpacking), else 1024 + q."""
        if EMULATE:
            o = (_mag(q, 0), _mag(q, 1), _mag(q, 2), _mag(q, 3), _mag(q, 4), _mag(q, 5), _mag(q, 6), _mag(q, 7))
            if ZSUB:
                z = (zz & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
                return o[0] - z, o[1] - z, o[2] - z, o[3] - z, o[4] - z, o[5] - z, o[6] - z, o[7] - z
            return o
        if ZSUB:
            if FMA:
                return tl.inline_asm_elementwise(_H2_DEQ_FMA_ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r,r", [q, zz],
                                                 dtype=(tl.float16,) * 8, is_pure=True, pack=1)
            return tl.inline_asm_elementwise(_H2_DEQ_SHIFT_ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r,r", [q, zz],
                                             dtype=(tl.float16,) * 8, is_pure=True, pack=1)
        return tl.inline_asm_elementwise(_H2_MAG_ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r", [q],
                                         dtype=(tl.float16,) * 8, is_pure=True, pack=1)

    @triton.jit
    def frag_operand(o, C: tl.constexpr, BN: tl.constexpr, KW: tl.constexpr):
        """The 8 unpacked code tiles [C, 128] of a block (frag_codes) → the dot operand W [128, BN]."""
        r = tl.join(tl.join(tl.join(o[0], o[1]), tl.join(o[2], o[3])),
                    tl.join(tl.join(o[4], o[5]), tl.join(o[6], o[7])))    # [C, 128, h, a, e]
        r = tl.reshape(r, (C, 8, 4, 4, 2, 2, 2))                        # c g t w h a e
        if KW == 2:
            return tl.reshape(tl.permute(r, (3, 5, 4, 2, 6, 0, 1)), (128, BN))   # (w a h t e) (c g)
        return tl.reshape(tl.permute(r, (3, 5, 2, 4, 6, 0, 1)), (128, BN))       # (w a t h e) (c g)

    @triton.jit
    def per_word(v, C: tl.constexpr):
        """A per-column vector [8 C] → [C, 128]: the value of each word's column (n = 8c + g)."""
        return tl.reshape(tl.broadcast_to(tl.reshape(v, (C, 8))[:, :, None], (C, 8, 16)), (C, 128))

    @triton.jit
    def zero_pairs(z1024, C: tl.constexpr):
        """Each word's zero pair [C, 128]: 1024 + z [BN] (fp32) as an fp16x2 of two equal halves."""
        return per_word(fp16_bits(z1024.to(tl.float16)) * 65537, C)

    @triton.jit
    def block_offset(b, stride_qb, BLOCK_MAJOR: tl.constexpr):
        """Words from block 0's codes to block b's: stride_qb apart when stored block-major
        (gptq_format.frag_block_major), else 128 as a constant (the row-major loops compile as before)."""
        if BLOCK_MAJOR:
            off = b * stride_qb
        else:
            off = b * 128
        return off

    @triton.jit
    def frag_block_loads(codes, stride_qb, BLOCK_MAJOR: tl.constexpr, mask_c, s_ptr, z_ptr, x_rows, mask_x, b, N, K,
                         offs_n, mask_n, group_size, GLU: tl.constexpr):
        """Everything the tensor-core path reads for 128-row block b: codes [C, 128], the group's
        scale and 1024 + zero [BN] (fp32) and the x tile [BM, 128] (or x^T [128, BM]: x_rows and its
        row mask mask_x come shaped; load_x: GLU as in w4a16). codes: block 0's words; stride_qb: words
        from one block to the next."""
        q = tl.load(codes + block_offset(b, stride_qb, BLOCK_MAJOR), mask=mask_c, other=0)
        return (q,) + frag_block_operands(s_ptr, z_ptr, x_rows, mask_x, b, N, K, offs_n, mask_n, group_size, GLU)

    @triton.jit
    def frag_block_operands(s_ptr, z_ptr, x_rows, mask_x, b, N, K, offs_n, mask_n, group_size, GLU: tl.constexpr):
        """frag_block_loads but the codes: the group's scale and 1024 + zero [BN] (fp32) and the x tile."""
        g = (b * 128) // group_size
        s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        z1024 = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32) + 1024.0
        return s, z1024, load_x(x_rows + b * 128, mask_x, K, GLU)

    @triton.jit
    def frag_block_dot(q, s, z1024, xt, C: tl.constexpr, BN: tl.constexpr, ZSUB: tl.constexpr,
                       FMA: tl.constexpr, KW: tl.constexpr, EMULATE: tl.constexpr, SWAP: tl.constexpr = False):
        """The tensor-core partial [BM, BN] of one block from frag_block_loads' operands; with SWAP
        ([BN, BM], ZSUB only) the weights are the left operand W^T and xt is x^T [128, BM]."""
        # (one return at the end: code after a return inside a static if is still compiled)
        if ZSUB:     # (SWAP comes with ZSUB: frag_matmul)
            w = frag_operand(frag_codes(q, zero_pairs(z1024, C), True, FMA, EMULATE), C, BN, KW)
            if SWAP:
                part = tl.dot(tl.trans(w), xt) * s[:, None]
            else:
                part = tl.dot(xt, w) * s[None, :]
        else:
            part = tl.dot(xt, frag_operand(frag_codes(q, q, False, False, EMULATE), C, BN, KW))
            xs = tl.sum(xt.to(tl.float32), axis=1)
            part = part * s[None, :] - xs[:, None] * (z1024 * s)[None, :]
        return part

    @triton.jit
    def frag_tile(M, N, BM: tl.constexpr, BN: tl.constexpr):
        """(pid_n, offs_m, mask_m, offs_n, mask_n) of a tensor-core program (grid axis 0 over row tiles
        fastest, so the row tiles of one column tile run together: L2 reuse of its codes)."""
        num_m = tl.cdiv(M, BM)
        pid_m = tl.program_id(0) % num_m
        pid_n = tl.program_id(0) // num_m
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        return pid_n, offs_m, offs_m < M, offs_n, offs_n < N

    @triton.jit
    def _frag_kernel(
        x_ptr, qf_ptr, z_ptr, s_ptr, out_ptr, bias_ptr,
        M, N, K, stride_xm, stride_om, stride_qr, stride_qb, group_size, blocks_per_split,
        HAS_BIAS: tl.constexpr, USE_ATOMIC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
        ZSUB: tl.constexpr, KW: tl.constexpr = 2, FMA: tl.constexpr = False, PREFETCH: tl.constexpr = False,
        EMULATE: tl.constexpr = False, PDL: tl.constexpr = False, GLU: tl.constexpr = False,
        SWAP: tl.constexpr = False, BLOCK_MAJOR: tl.constexpr = False,
    ):
        """Tensor-core path: one K=128 dot per block on the fragment-ordered operand (frag_operand).
        ZSUB: codes minus the zero in fp16 (FMA: the one-shift unpacking); otherwise 1024 + q codes
        and (part - (1024 + z) Σx) · s per block (Σx over the block's 128 columns of x, fp32).
        PREFETCH: a register double buffer, block b + 1's loads issued before block b's dot.
        GLU: x rows are [gate | up], the input silu(gate) · up (w4a16_tiles.load_x).
        SWAP ("frag_t", with ZSUB): out^T [BN, BM] = W^T x^T, the dequantized weights the left operand,
        which Hopper's wgmma can read from registers (x^T from shared memory), as w4a16's mma1t does."""
        pid_k = tl.program_id(1)
        pid_n, offs_m, mask_m, offs_n, mask_n = frag_tile(M, N, BM, BN)
        C: tl.constexpr = BN // 8
        nb = K // 128
        rows = pid_n * C + tl.arange(0, C)
        codes = qf_ptr + rows[:, None].to(tl.int64) * stride_qr + tl.arange(0, 128)[None, :]
        mask_c = (rows < N // 8)[:, None]
        b_start = pid_k * blocks_per_split
        b_end = tl.minimum(b_start + blocks_per_split, nb)
        if SWAP:     # x^T [128, BM]: the loads below take it as they take x [BM, 128]
            x_rows = x_ptr + offs_m[None, :] * stride_xm + tl.arange(0, 128)[:, None]
            mask_x = mask_m[None, :]
            acc = tl.zeros((BN, BM), dtype=tl.float32)
        else:
            x_rows = x_ptr + offs_m[:, None] * stride_xm + tl.arange(0, 128)[None, :]
            mask_x = mask_m[:, None]
            acc = tl.zeros((BM, BN), dtype=tl.float32)
        pdl_enter(PDL)   # after the index math, before any read of x or write of out
        if PREFETCH:
            q_n, s_n, z_n, x_n = frag_block_loads(codes, stride_qb, BLOCK_MAJOR, mask_c, s_ptr, z_ptr, x_rows, mask_x,
                                                  b_start, N, K, offs_n, mask_n, group_size, GLU)
            for b in range(b_start, b_end):
                q, s, z1024, xt = q_n, s_n, z_n, x_n
                q_n, s_n, z_n, x_n = frag_block_loads(codes, stride_qb, BLOCK_MAJOR, mask_c, s_ptr, z_ptr, x_rows,
                                                      mask_x, tl.minimum(b + 1, b_end - 1), N, K, offs_n, mask_n,
                                                      group_size, GLU)
                acc += frag_block_dot(q, s, z1024, xt, C, BN, ZSUB, FMA, KW, EMULATE, SWAP)
        else:
            for b in range(b_start, b_end):
                q, s, z1024, xt = frag_block_loads(codes, stride_qb, BLOCK_MAJOR, mask_c, s_ptr, z_ptr, x_rows, mask_x,
                                                   b, N, K, offs_n, mask_n, group_size, GLU)
                acc += frag_block_dot(q, s, z1024, xt, C, BN, ZSUB, FMA, KW, EMULATE, SWAP)
        if SWAP:
            if HAS_BIAS:
                bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
                acc += bias[:, None] * (pid_k == 0).to(tl.float32)
            store_out(out_ptr + offs_m[None, :] * stride_om + offs_n[:, None], acc, mask_n[:, None] & mask_m[None, :],
                      USE_ATOMIC)
        else:
            if HAS_BIAS:
                bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
                acc += bias[None, :] * (pid_k == 0).to(tl.float32)
            store_out(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc, mask_m[:, None] & mask_n[None, :],
                      USE_ATOMIC)

    @triton.jit
    def _frag_tma_kernel(
        x_ptr, qf_desc, z_ptr, s_ptr, out_ptr, bias_ptr,
        M, N, K, stride_xm, stride_om, group_size, blocks_per_split,
        HAS_BIAS: tl.constexpr, USE_ATOMIC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
        KW: tl.constexpr = 2, FMA: tl.constexpr = False, EMULATE: tl.constexpr = False, PDL: tl.constexpr = False,
        GLU: tl.constexpr = False,
    ):
        """_frag_kernel (ZSUB, block-major codes) with each block's [BN/8, 128] codes fetched by Hopper's
        TMA: qf_desc views the [K/128, N/8, 128] code buffer as [K/128 · N/8, 128] int32 with box
        [BN/8, 128], and Triton's pipeliner keeps num_stages - 1 such bulk copies in flight per program
        (no registers or per-thread address math for the weight stream). Rows of a box past N/8 read
        the next block's codes (or TMA's zero fill past the end): their columns are masked (scale 0,
        no store)."""
        pid_k = tl.program_id(1)
        pid_n, offs_m, mask_m, offs_n, mask_n = frag_tile(M, N, BM, BN)
        C: tl.constexpr = BN // 8
        x_rows = x_ptr + offs_m[:, None] * stride_xm + tl.arange(0, 128)[None, :]
        b_start = pid_k * blocks_per_split
        b_end = tl.minimum(b_start + blocks_per_split, K // 128)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        pdl_enter(PDL)   # after the index math, before any read of x or write of out
        for b in range(b_start, b_end):
            q = qf_desc.load([b * (N // 8) + pid_n * C, 0])
            s, z1024, xt = frag_block_operands(s_ptr, z_ptr, x_rows, mask_m[:, None], b, N, K, offs_n, mask_n,
                                               group_size, GLU)
            acc += frag_block_dot(q, s, z1024, xt, C, BN, True, FMA, KW, EMULATE)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            acc += bias[None, :] * (pid_k == 0).to(tl.float32)
        store_out(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc, mask_m[:, None] & mask_n[None, :],
                  USE_ATOMIC)

    @triton.jit
    def frag_gemv_loads(codes, stride_qb, BLOCK_MAJOR: tl.constexpr, mask_c, s_ptr, z_ptr, x_row, k_word, b, N, K,
                        offs_n, mask_n, group_size,
                        C: tl.constexpr, KW: tl.constexpr, GLU: tl.constexpr, EMULATE: tl.constexpr):
        """Everything the GEMV reads for block b: codes [C, 128], each word's scale (fp32) and zero pair
        [C, 128], and the four x pairs [128] (frag_x_pair)."""
        q = tl.load(codes + block_offset(b, stride_qb, BLOCK_MAJOR), mask=mask_c, other=0)
        return (q,) + frag_gemv_operands(s_ptr, z_ptr, x_row, k_word, b, N, K, offs_n, mask_n, group_size, C, KW, GLU,
                                         EMULATE)

    @triton.jit
    def frag_gemv_operands(s_ptr, z_ptr, x_row, k_word, b, N, K, offs_n, mask_n, group_size,
                           C: tl.constexpr, KW: tl.constexpr, GLU: tl.constexpr, EMULATE: tl.constexpr):
        """frag_gemv_loads but the codes: each word's scale (fp32) and zero pair [C, 128] and the four x pairs."""
        g = (b * 128) // group_size
        s = per_word(tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32), C)
        zz = zero_pairs(tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32) + 1024.0, C)
        kb = b * 128 + k_word
        h: tl.constexpr = 8 if KW == 2 else 2        # k step of code pair 1 (h = 1) from pair 0
        return (s, zz, frag_x_pair(x_row, kb, K, GLU, EMULATE), frag_x_pair(x_row, kb + h, K, GLU, EMULATE),
                frag_x_pair(x_row, kb + 16, K, GLU, EMULATE), frag_x_pair(x_row, kb + 16 + h, K, GLU, EMULATE))

    @triton.jit
    def frag_gemv_store(acc, bias_ptr, out_ptr, row, stride_om, offs_n, mask_n, pid_k, C: tl.constexpr, BN: tl.constexpr,
                        HAS_BIAS: tl.constexpr, USE_ATOMIC: tl.constexpr):
        """A GEMV program's result: acc [C, 128] (per word) summed per column, the 1/32 of the x pairs undone,
        the bias added by split 0, stored or added with atomics."""
        out_v = tl.reshape(tl.sum(tl.reshape(acc, (C, 8, 16)), axis=2), (BN,)) * 32.0
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            out_v += bias * (pid_k == 0).to(tl.float32)
        store_out(out_ptr + row * stride_om + offs_n, out_v, mask_n, USE_ATOMIC)

    @triton.jit
    def _frag_gemv_tma_kernel(
        x_ptr, qf_desc, z_ptr, s_ptr, out_ptr, bias_ptr,
        M, N, K, stride_xm, stride_om, group_size, blocks_per_split,
        HAS_BIAS: tl.constexpr, USE_ATOMIC: tl.constexpr, BN: tl.constexpr, KW: tl.constexpr = 2,
        STAGES: tl.constexpr = 3, EMULATE: tl.constexpr = False, PDL: tl.constexpr = False, GLU: tl.constexpr = False,
    ):
        """_frag_gemv_kernel (block-major codes) with each block's [BN/8, 128] codes fetched by TMA (qf_desc as in
        _frag_tma_kernel); the loop has no dot, so it asks Triton for its pipelining (STAGES blocks deep)."""
        row = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        C: tl.constexpr = BN // 8
        offs_n = pid_n * BN + tl.arange(0, BN)
        mask_n = offs_n < N
        wi = tl.arange(0, 128)
        k_word = 32 * (wi % 4) + KW * ((wi // 4) % 4)      # k of code 0 of each word, in the block
        x_row = x_ptr + row * stride_xm
        b_start = pid_k * blocks_per_split
        b_end = tl.minimum(b_start + blocks_per_split, K // 128)
        pdl_enter(PDL)   # after the index math, before any read of x or write of out
        acc = tl.zeros((C, 128), dtype=tl.float32)
        for b in tl.range(b_start, b_end, num_stages=STAGES):
            q = qf_desc.load([b * (N // 8) + pid_n * C, 0])
            s, zz, p0, p1, p2, p3 = frag_gemv_operands(s_ptr, z_ptr, x_row, k_word, b, N, K, offs_n, mask_n, group_size,
                                                       C, KW, GLU, EMULATE)
            acc += h2_dot(q, q, p0[None, :], p1[None, :], p2[None, :], p3[None, :], zz, 4, EMULATE) * s
        frag_gemv_store(acc, bias_ptr, out_ptr, row, stride_om, offs_n, mask_n, pid_k, C, BN, HAS_BIAS, USE_ATOMIC)

    @triton.jit
    def _frag_gemv_kernel(
        x_ptr, qf_ptr, z_ptr, s_ptr, out_ptr, bias_ptr,
        M, N, K, stride_xm, stride_om, stride_qr, stride_qb, group_size, blocks_per_split,
        HAS_BIAS: tl.constexpr, USE_ATOMIC: tl.constexpr, BN: tl.constexpr, KW: tl.constexpr = 2,
        PREFETCH: tl.constexpr = False, EMULATE: tl.constexpr = False, PDL: tl.constexpr = False,
        GLU: tl.constexpr = False, BLOCK_MAJOR: tl.constexpr = False,
    ):
        """CUDA-core path, one row of x per program: gemv_h2's packed dot (h2_dot) on each word. The
        x pair of code pair p = 2a + h of word (lane = 4g + t, w) is x[k], x[k + 1] at
        k = 32w + 16a + 8h + 2t (KW 2; 32w + 16a + 4t + 2h with KW 4): one 32-bit load, scaled by 1/32
        against fp16 overflow (as gemv_h2).
        PREFETCH: a register double buffer, as gemv_h2's."""
        row = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        C: tl.constexpr = BN // 8
        nb = K // 128
        offs_n = pid_n * BN + tl.arange(0, BN)
        mask_n = offs_n < N
        rows = pid_n * C + tl.arange(0, C)
        codes = qf_ptr + rows[:, None].to(tl.int64) * stride_qr + tl.arange(0, 128)[None, :]
        mask_c = (rows < N // 8)[:, None]
        wi = tl.arange(0, 128)
        k_word = 32 * (wi % 4) + KW * ((wi // 4) % 4)      # k of code 0 of each word, in the block
        x_row = x_ptr + row * stride_xm
        b_start = pid_k * blocks_per_split
        b_end = tl.minimum(b_start + blocks_per_split, nb)
        pdl_enter(PDL)   # after the index math, before any read of x or write of out
        acc = tl.zeros((C, 128), dtype=tl.float32)
        if PREFETCH:
            nxt = frag_gemv_loads(codes, stride_qb, BLOCK_MAJOR, mask_c, s_ptr, z_ptr, x_row, k_word, b_start, N, K,
                                  offs_n, mask_n, group_size, C, KW, GLU, EMULATE)
            for b in range(b_start, b_end):
                q, s, zz, p0, p1, p2, p3 = nxt
                nxt = frag_gemv_loads(codes, stride_qb, BLOCK_MAJOR, mask_c, s_ptr, z_ptr, x_row, k_word,
                                      tl.minimum(b + 1, b_end - 1), N, K, offs_n, mask_n, group_size, C, KW, GLU,
                                      EMULATE)
                acc += h2_dot(q, q, p0[None, :], p1[None, :], p2[None, :], p3[None, :], zz, 4, EMULATE) * s
        else:
            for b in range(b_start, b_end):
                q, s, zz, p0, p1, p2, p3 = frag_gemv_loads(codes, stride_qb, BLOCK_MAJOR, mask_c, s_ptr, z_ptr, x_row,
                                                           k_word, b, N, K, offs_n, mask_n, group_size, C, KW, GLU,
                                                           EMULATE)
                acc += h2_dot(q, q, p0[None, :], p1[None, :], p2[None, :], p3[None, :], zz, 4, EMULATE) * s
        frag_gemv_store(acc, bias_ptr, out_ptr, row, stride_om, offs_n, mask_n, pid_k, C, BN, HAS_BIAS, USE_ATOMIC)

    @triton.jit
    def frag_x_pair(x_row, k, K, GLU: tl.constexpr, EMULATE: tl.constexpr):
        """(x[k], x[k + 1]) / 32 as one fp16x2 (int32) per element of k (even): one 32-bit load, or with
        GLU the two activations silu(gate) · up (load_x) joined; the 1/32 as in gemv_h2 (exact)."""
        if GLU:
            lo = load_x(x_row + k, k < K, K, True)
            hi = load_x(x_row + k + 1, k < K, K, True)
            p = fp16_bits(lo) | (fp16_bits(hi) << 16)
        else:
            p = tl.load(x_row.to(tl.pointer_type(tl.int32), bitcast=True) + k // 2)
        if EMULATE:
            lo = (p & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            hi = ((p >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            lo, hi = (lo * 0.03125).to(tl.float16), (hi * 0.03125).to(tl.float16)
            return fp16_bits(lo) | (fp16_bits(hi) << 16)
        return tl.inline_asm_elementwise("{ .reg .b32 c; mov.b32 c, 671098880; mul.rn.f16x2 $0, $1, c; }",
                                         "=r,r", [p], dtype=tl.int32, is_pure=True, pack=1)

    @triton.jit
    def _frag_dequant_kernel(qf_ptr, z_ptr, s_ptr, out_ptr, N, K, stride_qr, stride_qb, group_size, BN: tl.constexpr,
                             KW: tl.constexpr):
        """W [K, N] fp16 (kernel row order) of one 128-row block × BN columns: the codes through
        frag_operand (the emulated unpack: no inline PTX), then (q - z) · s in fp32."""
        pid_n = tl.program_id(0)
        b = tl.program_id(1)
        C: tl.constexpr = BN // 8
        rows = pid_n * C + tl.arange(0, C)
        q = tl.load(qf_ptr + rows[:, None].to(tl.int64) * stride_qr + b * stride_qb + tl.arange(0, 128)[None, :],
                    mask=(rows < N // 8)[:, None], other=0)
        w = frag_operand(frag_codes(q, q, False, False, True), C, BN, KW).to(tl.float32)    # 1024 + q
        offs_n = pid_n * BN + tl.arange(0, BN)
        mask_n = offs_n < N
        g = (b * 128) // group_size
        s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        w = (w - (z + 1024.0)[None, :]) * s[None, :]
        offs_k = b * 128 + tl.arange(0, 128)
        tl.store(out_ptr + offs_k[:, None].to(tl.int64) * N + offs_n[None, :], w.to(tl.float16),
                 mask=mask_n[None, :])


def frag_dequantize_fp16(kw: KernelWeights) -> torch.Tensor:
    """W [K, N] fp16 (rows in the kernel's order, i.e. after kw.perm) of fragment-ordered weights,
    one Triton launch."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    if not kw.frag:
        raise ValueError("frag_dequantize_fp16 needs fragment-ordered weights")
    k, n = kw.in_features, kw.out_features
    out = torch.empty(k, n, dtype=torch.float16, device=kw.qweight.device)
    launch(_frag_dequant_kernel, (cdiv(n, 64), k // KERNEL_K_BLOCK), kw.qweight, kw.zeros, kw.scales, out,
           n, k, kw.qweight.stride(0), kw.qweight.stride(1), kw.group_size, BN=64, KW=kw.frag, num_warps=4)
    return out


def gemm_input(x: torch.Tensor, kw: KernelWeights, glu: bool, accumulate: torch.Tensor | None,
               unfuse_glu: bool) -> tuple[torch.Tensor, bool, int, int, int]:
    """The checked, contiguous input of a 4-bit GEMM kernel (both layouts) and (glu, M, N, K). With glu
    (x = [gate | up]) the activation is computed here instead of in the kernel's load when unfuse_glu
    or when act-order gathers x (kw.perm)."""
    if x.dtype != torch.float16 or x.dim() != 2:
        raise ValueError(f"x must be 2-D fp16, got {x.dtype} {tuple(x.shape)}")
    if glu and x.shape[1] != 2 * kw.in_features:
        raise ValueError(f"glu: x must be [M, 2 x {kw.in_features}] (gate | up), got {tuple(x.shape)}")
    if glu and (kw.perm is not None or unfuse_glu):
        from services.engine.kernels.fused_ops import silu_mul
        x, glu = silu_mul(x.contiguous()), False
    if kw.perm is not None:
        x = x[:, kw.perm]
    x = x.contiguous()
    m, k = x.shape[0], x.shape[1] // 2 if glu else x.shape[1]
    n = kw.out_features
    if k != kw.in_features:
        raise ValueError(f"x has K={k}, weights have K={kw.in_features}")
    if accumulate is not None and (accumulate.shape != (m, n) or accumulate.dtype != torch.float16
                                   or accumulate.stride(1) != 1):
        raise ValueError(f"accumulate must be [{m}, {n}] fp16 with unit column stride, got "
                         f"{accumulate.dtype} {tuple(accumulate.shape)} strides {accumulate.stride()}")
    return x, glu, m, n, k


def code_descriptor(kw: KernelWeights, block_n: int):
    """A TMA descriptor (Triton's host TensorDescriptor) over block-major fragment codes: the [K/128, N/8, 128]
    buffer as [K/128 · N/8, 128] int32, box [block_n / 8, 128] (one block of a program's columns). Made per
    call (a few µs; a CUDA graph keeps the encoded descriptor): caching it would keep tensors alive."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    if not frag_block_major(kw):
        raise ValueError("the TMA kinds read block-major fragment codes (gptq_format.to_fragment_order(block_major=True))")
    if block_n // FRAG_COLS > 256:
        raise ValueError(f"a TMA box holds at most 256 rows, block_n {block_n} needs {block_n // FRAG_COLS}")
    codes = kw.qweight.permute(1, 0, 2).reshape(-1, KERNEL_K_BLOCK)     # a view: block-major is that buffer
    return TensorDescriptor.from_tensor(codes, [block_n // FRAG_COLS, KERNEL_K_BLOCK])


def frag_matmul(x: torch.Tensor, kw: KernelWeights, kind: str, block_m: int, block_n: int, split_k: int,
                num_warps: int = 4, num_stages: int = 1, zsub: bool = False, fma: bool = False,
                prefetch: bool = False, bias: torch.Tensor | None = None, accumulate: torch.Tensor | None = None,
                glu: bool = False) -> torch.Tensor:
    """y [M, N] fp16 = x [M, K] fp16 @ W for fragment-ordered weights (kw.frag, gptq_format.to_fragment_order);
    kind "frag" (tensor cores), "frag_t" (swapped operands, zsub only), "frag_gemv", or "frag_tma" /
    "frag_gemv_tma" (frag with zsub / frag_gemv with the codes fetched by TMA: block-major storage only, sm_90+).
    accumulate and glu as in w4a16_matmul."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    if kind not in ("frag", "frag_t", "frag_gemv", "frag_tma", "frag_gemv_tma"):
        raise ValueError(f"unknown fragment kernel {kind!r}")
    if kind in ("frag_t", "frag_tma") and not zsub:
        raise ValueError(f"{kind} subtracts the zero in fp16: it needs zsub")
    if not kw.frag:
        raise ValueError("frag_matmul needs fragment-ordered weights (gptq_format.to_fragment_order)")
    x, glu, m, n, k = gemm_input(x, kw, glu, accumulate, unfuse_glu=False)
    if block_n % FRAG_COLS:
        raise ValueError(f"block_n must be a multiple of {FRAG_COLS}, got {block_n}")
    split_k, per_split = k_splits(split_k, k)
    block_major = frag_block_major(kw)
    use_atomic = accumulate is not None or split_k > 1
    if accumulate is not None:
        out = accumulate
    else:
        out = (torch.zeros if use_atomic else torch.empty)((m, n), dtype=torch.float16, device=x.device)
    if kind == "frag_gemv_tma":
        launch(_frag_gemv_tma_kernel, (m, cdiv(n, block_n), split_k),
               x, code_descriptor(kw, block_n), kw.zeros, kw.scales, out, bias if bias is not None else out,
               m, n, k, x.stride(0), out.stride(0), kw.group_size, per_split, HAS_BIAS=bias is not None,
               USE_ATOMIC=use_atomic, BN=block_n, KW=kw.frag, STAGES=num_stages, EMULATE=INTERPRET, GLU=glu,
               num_warps=num_warps, num_stages=num_stages)
        return out
    if kind == "frag_tma":
        launch(_frag_tma_kernel, (cdiv(m, block_m) * cdiv(n, block_n), split_k),
               x, code_descriptor(kw, block_n), kw.zeros, kw.scales, out, bias if bias is not None else out,
               m, n, k, x.stride(0), out.stride(0), kw.group_size, per_split, HAS_BIAS=bias is not None,
               USE_ATOMIC=use_atomic, BM=block_m, BN=block_n, KW=kw.frag, FMA=fma, EMULATE=INTERPRET, GLU=glu,
               num_warps=num_warps, num_stages=num_stages)
        return out
    args = (x, kw.qweight, kw.zeros, kw.scales, out, bias if bias is not None else out,
            m, n, k, x.stride(0), out.stride(0), kw.qweight.stride(0), kw.qweight.stride(1), kw.group_size, per_split)
    if kind == "frag_gemv":
        launch(_frag_gemv_kernel, (m, cdiv(n, block_n), split_k), *args, HAS_BIAS=bias is not None,
               USE_ATOMIC=use_atomic, BN=block_n, KW=kw.frag, PREFETCH=prefetch, EMULATE=INTERPRET, GLU=glu,
               BLOCK_MAJOR=block_major, num_warps=num_warps, num_stages=num_stages)
    else:
        launch(_frag_kernel, (cdiv(m, block_m) * cdiv(n, block_n), split_k), *args, HAS_BIAS=bias is not None,
               USE_ATOMIC=use_atomic, BM=block_m, BN=block_n, ZSUB=zsub, KW=kw.frag, FMA=fma, PREFETCH=prefetch,
               EMULATE=INTERPRET, GLU=glu, SWAP=kind == "frag_t", BLOCK_MAJOR=block_major, num_warps=num_warps,
               num_stages=num_stages)
    return out
