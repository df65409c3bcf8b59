"""W4A16 / W3A16 GEMM (fp16 activations × GPTQ 4- or 3-bit weights) in Triton: kernels and launcher
(the launch configs and the tuner's candidates: gemm_configs.py).

The kernel reads the repacked layout of gptq_format.repack_for_kernel. Each 128-row K block is
one [16, BN] int32 tile; nibble j of it pairs with x[:, 16j:16j+16] of the block, so the unpack is
a shift and a mask per element and no reshape. Scales and zeros are applied once per block on
the [BM, BN] partial instead of per weight: for a block inside one group,
  Σ_k x_k (q_k - z) s = s · (Σ_k x_k q_k - z · Σ_k x_k),
with Σ x q computed on the tensor cores from exact small-integer fp16 operands.
Small M uses split-K (fp16 atomics into a zeroed output, or with SERIAL_SPLIT_K an fp32 workspace
that the last split sums) to put enough loads in flight.
3-bit weights use the same tiles in two planes (int16 low 2-bit fields, int8 high bits; see
gptq_format.KernelWeights): every kernel takes them through BITS. The device helpers the kernels
share (unpacking, packed fp16x2 dequant, tile indexing, the serial store) are in w4a16_tiles.py.
"""
from __future__ import annotations

import os

import torch

from services.engine.kernels.gptq_format import (
    KERNEL_K_BLOCK,
    KernelWeights,
    k_splits,
)
from services.engine.kernels.gemm_configs import FRAG_KINDS, STREAM_KINDS, SWAPPED_KINDS, GemmConfig
from services.engine.kernels.launch import cdiv, launch, sm_count
from services.engine.kernels.w4a16_frag import frag_dequantize_fp16, frag_matmul, gemm_input

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: TritonQuantLinear falls back to torch
    triton = None
    tl = None

HAS_TRITON = triton is not None
# Serial split-K (serial_split_store): split partials meet in an fp32 workspace instead of fp16
# atomics into a zeroed output, which drops the zero launch of every split GEMM. Off: on the H100 it
# passes its GPU tests but runs 0.75-1.06x as fast as the atomics (gpu_kernels_v11_serial.md). Set
# for the process by set_serial_split_k (the engine applies EngineConfig.serial_split_k).
SERIAL_SPLIT_K = False
_locks: dict[tuple, torch.Tensor] = {}
_retired_locks: list[torch.Tensor] = []
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # no inline PTX there: gemv_h2 is emulated

if triton is not None:
    from services.engine.kernels.pdl import pdl_enter
    from services.engine.kernels.w4a16_tiles import (
        block_t, deq_tiles, field, fp16_bits, gemm_pdl_enter, h2_block_dot, h2_block_loads, h2_deq, load_planes, load_x,
        nibble_fp16, prefetch_codes_l2, serial_split_store, store_out, tile_of,
    )

    @triton.jit
    def _w4a16_gemv_row_kernel(
        x_ptr, qw_ptr, qh_ptr, z_ptr, s_ptr, out_ptr, bias_ptr, ws_ptr, lock_ptr,
        M, N, K, stride_xm, stride_om, group_size, blocks_per_split,
        HAS_BIAS: tl.constexpr, USE_ATOMIC: tl.constexpr, BN: tl.constexpr, UNROLL: tl.constexpr,
        BITS: tl.constexpr, H2: tl.constexpr = False, EMULATE: tl.constexpr = False, SERIAL: tl.constexpr = False,
        PDL: tl.constexpr = False, GLU: tl.constexpr = False, PREFETCH: tl.constexpr = False,
        L2_AHEAD: tl.constexpr = False,
    ):
        """CUDA-core path, one row of x per program: 2-D [16, BN] tiles only (no 3-D broadcast, so
        no layout conversions in the loop). Σ x(q - z)s = s(Σ x q - z Σ x) per 128-row block;
        int4 → fp32 via the 2^23 exponent trick (q | 0x4B000000 read as fp32 is 2^23 + q).
        H2: packed fp16x2 dequant and products (h2_dot), fp32 across words. x is
        scaled by 1/32 first so a word's fp16 partial (≤ 4 · 15 · |x| per half) cannot overflow for
        |x| below ~35 000; the output is scaled back in fp32. PREFETCH (H2, UNROLL 1): a register
        double buffer, every load of block b + 1 (codes, scale, zero, x pairs) issued before block b's
        dequantize-and-dot, so each warp has the next block's DRAM reads in flight while it computes.
        L2_AHEAD (with PREFETCH, not EMULATE): block b + 2's code lines are also asked of L2
        (prefetch.global.L2, no registers), so the register loads of the next turn find them there."""
        row = tl.program_id(0)  # fastest: the M programs of a weight tile run together (L2 reuse)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_n = pid_n * BN + tl.arange(0, BN)
        offs_i = tl.arange(0, 16)
        tile = tl.multiple_of(((pid_n * BN) // 128) * (K // 8 * 128), 128)  # hint: keeps 16-byte loads
        offs_c = tl.max_contiguous(tl.multiple_of((pid_n * BN) % 128 + tl.arange(0, BN), BN), BN)
        mask_n = offs_n < N
        num_blocks = K // 128
        b_start = pid_k * blocks_per_split
        b_end = b_start + blocks_per_split
        if b_end > num_blocks:  # (a scalar branch, not tl.minimum: the interpreter can loop on it)
            b_end = num_blocks
        gemm_pdl_enter(qw_ptr, qh_ptr, tile, offs_c, b_start, b_end, row == 0, BN, BITS, PDL)
        acc = tl.zeros((16, BN), dtype=tl.float32)
        zacc = tl.zeros((BN,), dtype=tl.float32)
        x_row = x_ptr + row * stride_xm
        if PREFETCH:
            q_n, qh_n, s_n, z_n, p0_n, p1_n, p2_n, p3_n = h2_block_loads(
                qw_ptr + tile, qh_ptr + tile, s_ptr, z_ptr, x_row, b_start, offs_i, offs_c, offs_n, mask_n, N, K,
                group_size, BITS, GLU, EMULATE)
            for b in range(b_start, b_end):
                if L2_AHEAD:
                    if b + 2 < b_end:
                        prefetch_codes_l2(qw_ptr, qh_ptr, tile, offs_c, b + 2, b + 3, BN, BITS)
                q, qh, s, z, p0, p1, p2, p3 = q_n, qh_n, s_n, z_n, p0_n, p1_n, p2_n, p3_n
                q_n, qh_n, s_n, z_n, p0_n, p1_n, p2_n, p3_n = h2_block_loads(
                    qw_ptr + tile, qh_ptr + tile, s_ptr, z_ptr, x_row, tl.minimum(b + 1, b_end - 1), offs_i, offs_c,
                    offs_n, mask_n, N, K, group_size, BITS, GLU, EMULATE)
                acc += h2_block_dot(q, qh, s, z, p0, p1, p2, p3, BITS, EMULATE)
        else:
            for b0 in range(b_start, b_end, UNROLL):
                for u in tl.static_range(UNROLL):
                    b = tl.minimum(b0 + u, b_end - 1)
                    live = (b0 + u < b_end).to(tl.float32)  # a block past the split's end counts 0
                    if H2:
                        q, qh, s, z, p0, p1, p2, p3 = h2_block_loads(
                            qw_ptr + tile, qh_ptr + tile, s_ptr, z_ptr, x_row, b, offs_i, offs_c, offs_n, mask_n, N, K,
                            group_size, BITS, GLU, EMULATE)
                        acc += h2_block_dot(q, qh, s * live, z, p0, p1, p2, p3, BITS, EMULATE)
                    else:
                        q, qh = load_planes(qw_ptr + tile, qh_ptr + tile,
                                             (b * 16 + offs_i)[:, None] * 128 + offs_c[None, :], BITS)
                        g = (b * 128) // group_size
                        s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32) * live
                        z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
                        part = tl.zeros((16, BN), dtype=tl.float32)
                        xs = tl.zeros((16,), dtype=tl.float32)
                        for j in tl.static_range(8):
                            xj = load_x(x_row + b * 128 + 16 * j + offs_i, offs_i < 16, K, GLU).to(tl.float32)
                            wj = (field(q, qh, j, BITS) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
                            part += xj[:, None] * wj
                            xs += xj
                        acc += part * s[None, :]
                        zacc += tl.sum(xs, axis=0) * z * s
        if H2:
            out_v = tl.sum(acc, axis=0) * 32.0
        else:
            out_v = tl.sum(acc, axis=0) - zacc
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            out_v += bias * (pid_k == 0).to(tl.float32)
        out = out_ptr + row * stride_om + offs_n
        if SERIAL:
            serial_split_store(out_v, out, mask_n, ws_ptr, lock_ptr, tl.arange(0, BN),
                                row * tl.num_programs(1) + pid_n, tl.num_programs(0) * tl.num_programs(1),
                                pid_k, tl.num_programs(2), BN)
        else:
            store_out(out, out_v, mask_n, USE_ATOMIC)

    @triton.jit
    def _w4a16_kernel(
        x_ptr, qw_ptr, qh_ptr, z_ptr, s_ptr, out_ptr, bias_ptr, ws_ptr, lock_ptr,
        M, N, K, stride_xm, stride_om, group_size, blocks_per_split,
        HAS_BIAS: tl.constexpr, USE_ATOMIC: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr, SINGLE_DOT: tl.constexpr,
        FAST_DEQ: tl.constexpr, BITS: tl.constexpr, ZSUB: tl.constexpr = False, H2DEQ: tl.constexpr = False,
        SERIAL: tl.constexpr = False,
        PDL: tl.constexpr = False, GLU: tl.constexpr = False,
    ):
        """Tensor-core path: per 128-row block, 8 K=16 dots (or one K=128 dot, SINGLE_DOT) on fp16
        codes, then (part - z·Σx)·s. ZSUB (with FAST_DEQ): subtract the zero in fp16 before the dot
        instead, (1024 + q) - (1024 + z) = q - z exactly, so no Σx reductions per block. H2DEQ
        (ZSUB, 8-dot path): the codes and the subtraction come from packed PTX (H2_DEQ_ASM /
        H2_DEQ3_ASM: one or two lop3 and one sub.f16x2 per code pair)."""
        pid_k = tl.program_id(1)
        offs_m, offs_n, mask_m, mask_n, tile, offs_c, b_start, b_end = tile_of(
            tl.program_id(0), pid_k, M, N, K, blocks_per_split, BM, BN, GROUP_M)
        gemm_pdl_enter(qw_ptr, qh_ptr, tile, offs_c, b_start, b_end, tl.min(offs_m, axis=0) < BM, BN, BITS, PDL)
        offs_i = tl.arange(0, 16)

        acc = tl.zeros((BM, BN), dtype=tl.float32)
        x_row = x_ptr + offs_m[:, None] * stride_xm
        for b in range(b_start, b_end):
            k0 = b * 128
            g = k0 // group_size
            s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            if ZSUB:
                z16 = (z + 1024.0).to(tl.float16)[None, :]
            if SINGLE_DOT:
                # One K=128 dot: row k of the tile is nibble k // 16 of packed row k % 16
                # (duplicate addresses, served by the cache), x read contiguously.
                offs_k = tl.arange(0, 128)
                qk, qkh = load_planes(qw_ptr + tile, qh_ptr + tile,
                                       (b * 16 + offs_k % 16)[:, None] * 128 + offs_c[None, :], BITS)
                w = nibble_fp16(field(qk, qkh, (offs_k // 16)[:, None], BITS), FAST_DEQ)
                xt = load_x(x_row + (k0 + offs_k)[None, :], mask_m[:, None], K, GLU)
                if ZSUB:
                    part = tl.dot(xt, w - z16)
                else:
                    part = tl.dot(xt, w)
                    xsum = tl.sum(xt.to(tl.float32), axis=1)
            else:
                q, qh = load_planes(qw_ptr + tile, qh_ptr + tile,
                                     (b * 16 + offs_i)[:, None] * 128 + offs_c[None, :], BITS)
                part = tl.zeros((BM, BN), dtype=tl.float32)
                xsum = tl.zeros((BM,), dtype=tl.float32)
                if H2DEQ:
                    ws = h2_deq(q, qh, fp16_bits(z16) * 65537, BITS)
                for j in tl.static_range(8):
                    xj = load_x(x_row + (k0 + 16 * j + offs_i)[None, :], mask_m[:, None], K, GLU)
                    if H2DEQ:
                        part = tl.dot(xj, ws[j], part)
                    elif ZSUB:
                        wj = nibble_fp16(field(q, qh, j, BITS), FAST_DEQ)
                        part = tl.dot(xj, wj - z16, part)
                    else:
                        wj = nibble_fp16(field(q, qh, j, BITS), FAST_DEQ)
                        part = tl.dot(xj, wj, part)
                        xsum += tl.sum(xj.to(tl.float32), axis=1)
            if ZSUB:
                acc += part * s[None, :]
            else:
                if FAST_DEQ:
                    z += 1024.0  # the fp16 magic below yields 1024 + q
                acc += (part - xsum[:, None] * z[None, :]) * s[None, :]

        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            acc += bias[None, :] * (pid_k == 0).to(tl.float32)
        out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        omask = mask_m[:, None] & mask_n[None, :]
        if SERIAL:
            serial_split_store(acc, out, omask, ws_ptr, lock_ptr,
                                tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :],
                                tl.program_id(0), tl.num_programs(0), pid_k, tl.num_programs(1), BM * BN)
        else:
            store_out(out, acc, omask, USE_ATOMIC)


    @triton.jit
    def _w4a16_t_kernel(
        x_ptr, qw_ptr, qh_ptr, z_ptr, s_ptr, out_ptr, bias_ptr, ws_ptr, lock_ptr,
        M, N, K, stride_xm, stride_om, group_size, blocks_per_split,
        HAS_BIAS: tl.constexpr, USE_ATOMIC: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr, BITS: tl.constexpr, H2DEQ: tl.constexpr,
        FP16_SCALE: tl.constexpr, ONE_DOT: tl.constexpr = False, SERIAL: tl.constexpr = False,
        PDL: tl.constexpr = False, GLU: tl.constexpr = False,
    ):
        """Swapped operands ("mma8t"): out^T [BN, BM] += (W - z)^T [BN, 16] · x^T [16, BM], 8 dots per
        128-row block, zero subtracted in fp16 as in zsub. The dequantized weights are the left
        operand, which Hopper's wgmma reads from registers; in _w4a16_kernel they are the right
        one, which wgmma reads from shared memory only (a store and a fence per dot). The few
        rows of x become wgmma's N side (8 to 256 wide), so BM 16 still gets wgmma.
        FP16_SCALE ("mma8ts"): the group scale multiplies the dequantized weights in fp16 before
        the dots, which then accumulate straight into acc: one [BN, BM] fp32 accumulator instead
        of two (acc and the block's partial sum), so BM 256 tiles fit the registers and a tile
        of x rows reads each weight once. ONE_DOT ("mma1t"): the 8 tiles joined into one [BN, 128]
        operand (block_t) and one K=128 dot per block, whose wgmmas then issue with one wait."""
        pid_k = tl.program_id(1)
        offs_m, offs_n, mask_m, mask_n, tile, offs_c, b_start, b_end = tile_of(
            tl.program_id(0), pid_k, M, N, K, blocks_per_split, BM, BN, GROUP_M)
        gemm_pdl_enter(qw_ptr, qh_ptr, tile, offs_c, b_start, b_end, tl.min(offs_m, axis=0) < BM, BN, BITS, PDL)
        offs_i = tl.arange(0, 16)
        acc = tl.zeros((BN, BM), dtype=tl.float32)
        x_col = x_ptr + offs_m[None, :] * stride_xm
        for b in range(b_start, b_end):
            k0 = b * 128
            g = k0 // group_size
            s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            s16 = s.to(tl.float16)
            z16 = (tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32) + 1024.0).to(tl.float16)
            q, qh = load_planes(qw_ptr + tile, qh_ptr + tile, (b * 16 + offs_i)[:, None] * 128 + offs_c[None, :], BITS)
            if not FP16_SCALE:
                part = tl.zeros((BN, BM), dtype=tl.float32)
            if H2DEQ:
                ws = h2_deq(q, qh, fp16_bits(z16[None, :]) * 65537, BITS)
            else:
                ws = deq_tiles(q, qh, z16[None, :], BITS)
            if ONE_DOT:
                wt = block_t(ws, BN)
                xt = load_x(x_col + (k0 + tl.arange(0, 128))[:, None], mask_m[None, :], K, GLU)
                if FP16_SCALE:
                    acc = tl.dot(wt * s16[:, None], xt, acc)
                else:
                    part = tl.dot(wt, xt)
            else:
                for j in tl.static_range(8):
                    xt = load_x(x_col + (k0 + 16 * j + offs_i)[:, None], mask_m[None, :], K, GLU)
                    if FP16_SCALE:
                        acc = tl.dot(tl.trans(ws[j] * s16[None, :]), xt, acc)
                    else:
                        part = tl.dot(tl.trans(ws[j]), xt, part)
            if not FP16_SCALE:
                acc += part * s[:, None]
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            acc += bias[:, None] * (pid_k == 0).to(tl.float32)
        out = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None]
        omask = mask_n[:, None] & mask_m[None, :]
        if SERIAL:
            serial_split_store(acc, out, omask, ws_ptr, lock_ptr,
                                tl.arange(0, BN)[:, None] * BM + tl.arange(0, BM)[None, :],
                                tl.program_id(0), tl.num_programs(0), pid_k, tl.num_programs(1), BM * BN)
        else:
            store_out(out, acc, omask, USE_ATOMIC)

    @triton.jit
    def _w4a16_stream_kernel(
        x_ptr, qw_ptr, qh_ptr, z_ptr, s_ptr, out_ptr, bias_ptr,
        M, N, K, stride_xm, stride_om, group_size, units_per_prog,
        HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BITS: tl.constexpr, STAGES: tl.constexpr,
        EMULATE: tl.constexpr = False, PDL: tl.constexpr = False, GLU: tl.constexpr = False,
    ):
        """Stream-K for few rows ("mma8_sk"): the GEMM's (column tile, 128-row K block) units, laid
        end to end column tile by column tile, are cut into equal runs, one per program, a fixed
        number of programs per SM. Each program streams its run in one software-pipelined loop that
        crosses column tiles (split-K gives each program a few blocks of one tile instead); where a
        tile ends, or the run does, the partial goes out by fp16 atomics into the zeroed output.
        Per block: zsub mma8's packed dequant and 8 K=16 tensor-core dots on BM rows. EMULATE: no
        inline PTX (TRITON_INTERPRET). H100 (stream_k_*_900b7dc.md): 0.83-1.04x split-K's time."""
        nb = K // 128
        u_start = tl.program_id(1) * units_per_prog
        u_end = tl.minimum(u_start + units_per_prog, tl.cdiv(N, BN) * nb)
        pdl_enter(PDL)
        offs_i = tl.arange(0, 16)
        offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
        mask_m = offs_m < M
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for u in tl.range(u_start, u_end, num_stages=STAGES):
            t = u // nb
            b = u - t * nb
            n0 = t * BN
            tile = tl.multiple_of((n0 // 128) * (K // 8 * 128), 128)  # hint: keeps 16-byte loads
            offs_c = tl.max_contiguous(tl.multiple_of(n0 % 128 + tl.arange(0, BN), BN), BN)
            offs_n = n0 + tl.arange(0, BN)
            mask_n = offs_n < N
            q, qh = load_planes(qw_ptr + tile, qh_ptr + tile, (b * 16 + offs_i)[:, None] * 128 + offs_c[None, :], BITS)
            g = (b * 128) // group_size
            s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            z16 = (tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32) + 1024.0).to(tl.float16)
            if EMULATE:
                ws = deq_tiles(q, qh, z16[None, :], BITS)
            else:
                ws = h2_deq(q, qh, fp16_bits(z16[None, :]) * 65537, BITS)
            x_row = x_ptr + offs_m[:, None] * stride_xm + b * 128
            part = tl.zeros((BM, BN), dtype=tl.float32)
            for j in tl.static_range(8):
                part = tl.dot(load_x(x_row + (16 * j + offs_i)[None, :], mask_m[:, None], K, GLU), ws[j], part)
            acc += part * s[None, :]
            if (b == nb - 1) | (u == u_end - 1):   # the tile or the run ends: its partial goes out
                if HAS_BIAS:   # once per tile: by the program whose run holds its first block
                    first = (t * nb >= u_start).to(tl.float32)
                    acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :] * first
                tl.atomic_add(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(tl.float16),
                              mask=mask_m[:, None] & mask_n[None, :], sem="relaxed")
                acc = tl.zeros_like(acc)

    @triton.jit
    def _dequant_kernel(qw_ptr, qh_ptr, z_ptr, s_ptr, out_ptr, N, K, group_size, BITS: tl.constexpr,
                        PDL: tl.constexpr = False):
        """W [K, N] fp16 from the repacked layout: one program per (128-row K block, 128-col tile)."""
        pdl_enter(PDL)  # first: nothing is read or written before the previous grid ends
        b = tl.program_id(0)
        t = tl.program_id(1)
        offs_i = tl.arange(0, 16)
        offs_c = tl.arange(0, 128)
        q, qh = load_planes(qw_ptr + t * (K // 8 * 128), qh_ptr + t * (K // 8 * 128),
                             (b * 16 + offs_i)[:, None] * 128 + offs_c[None, :], BITS)
        n = t * 128 + offs_c
        nmask = n < N
        g = (b * 128) // group_size
        s = tl.load(s_ptr + g * N + n, mask=nmask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g * N + n, mask=nmask, other=0.0).to(tl.float32)
        for j in tl.static_range(8):
            w = (field(q, qh, j, BITS).to(tl.float32) - z[None, :]) * s[None, :]
            k = b * 128 + 16 * j + offs_i
            tl.store(out_ptr + k[:, None].to(tl.int64) * N + n[None, :], w.to(tl.float16),
                     mask=nmask[None, :])


def gemv_buffering(h2: bool, stages: int, unroll: int) -> tuple[bool, bool, int]:
    """(PREFETCH, L2_AHEAD, Triton num_stages) of a gemv launch: on gemv_h2 (unroll 1) num_stages 2 is
    the kernel's register double buffer and 3 adds the L2 prefetch of the block after, both compiled
    at 1 Triton stage; otherwise num_stages goes to Triton as it is."""
    prefetch = h2 and stages in (2, 3) and unroll == 1
    return prefetch, prefetch and stages == 3, 1 if prefetch else stages


def set_serial_split_k(on: bool) -> None:
    global SERIAL_SPLIT_K
    SERIAL_SPLIT_K = on


def split_locks(device: torch.device, tiles: int) -> torch.Tensor:
    """int32 [>= tiles] zeros for serial split-K, one buffer per device and stream (each GEMM
    leaves its locks at zero). A larger buffer replaces a smaller one; replaced buffers stay alive,
    since captured CUDA graphs keep their addresses."""
    key = (device.type, device.index, torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0)
    buf = _locks.get(key)
    if buf is None or buf.numel() < tiles:
        if buf is not None:
            _retired_locks.append(buf)
        buf = torch.zeros(max(tiles, 4096, 0 if buf is None else 2 * buf.numel()), dtype=torch.int32, device=device)
        _locks[key] = buf
    return buf


def dequantize_fp16(kw: KernelWeights) -> torch.Tensor:
    """W [K, N] fp16 (rows in the kernel's order, i.e. after kw.perm) with one Triton launch."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    if kw.frag:
        return frag_dequantize_fp16(kw)
    k, n = kw.in_features, kw.out_features
    out = torch.empty(k, n, dtype=torch.float16, device=kw.qweight.device)
    launch(_dequant_kernel, (k // KERNEL_K_BLOCK, cdiv(n, 128)),
           kw.qweight, kw.planes[-1], kw.zeros, kw.scales, out, n, k, kw.group_size, BITS=kw.bits, num_warps=4)
    return out


def split_of(cfg: GemmConfig, k: int) -> tuple[int, int]:
    """(splits, 128-row blocks per split) that a config runs with at reduction length k."""
    return k_splits(cfg.split_k, k)


def needs_zeroed_output(cfg: GemmConfig, k: int) -> bool:
    """Whether w4a16_matmul with this config sums split partials with atomics into a zeroed output
    (a caller that zeroes an output inside an earlier kernel passes it as `accumulate`)."""
    if cfg.kind in STREAM_KINDS:
        return True
    if cfg.kind in FRAG_KINDS:   # no serial split-K form
        return split_of(cfg, k)[0] > 1
    return cfg.kind != "dense" and _sums_with_atomics(split_of(cfg, k)[0])


def stream_runs(cfg: GemmConfig, m: int, n: int, k: int, sms: int) -> tuple[int, int]:
    """(programs along the units, units per program) of a stream kind: cfg.split_k programs per SM
    over every row tile, the units (column tiles x 128-row blocks) cut into equal runs."""
    units = cdiv(n, cfg.block_n) * (k // KERNEL_K_BLOCK)
    per_row_tile = max(1, cfg.split_k * sms // cdiv(m, cfg.block_m))
    per_prog = cdiv(units, min(units, per_row_tile))
    return cdiv(units, per_prog), per_prog


def _sums_with_atomics(split_k: int) -> bool:
    """Whether split_k partials meet by fp16 atomics into a zeroed output (not serial split-K)."""
    return split_k > 1 and not SERIAL_SPLIT_K


def w4a16_matmul(
    x: torch.Tensor, kw: KernelWeights, cfg: GemmConfig, bias: torch.Tensor | None = None,
    accumulate: torch.Tensor | None = None, glu: bool = False,
) -> torch.Tensor:
    """y [M, N] fp16 = x [M, K] fp16 @ W with one given config (CUDA or TRITON_INTERPRET only).

    accumulate: an [M, N] fp16 tensor (unit column stride) that the product is added onto in place
    and returned, e.g. the residual stream: every split adds its partial there with fp16 atomics,
    so no zeroed output is launched and no separate add follows.
    glu: x is [M, 2K] laid out [gate | up] and the product is silu(gate) · up @ W, the activation
    computed in the GEMM's input load (as fused_ops.silu_mul rounds it): no launch of its own.
    """
    if triton is None:
        raise RuntimeError("triton is not installed")
    if (cfg.kind in FRAG_KINDS) != bool(kw.frag) and cfg.kind != "dense":
        raise ValueError(f"config kind {cfg.kind!r} does not read the weights' layout (frag={kw.frag})")
    if cfg.kind in FRAG_KINDS:
        return frag_matmul(x, kw, cfg.kind, cfg.block_m, cfg.block_n, cfg.split_k, cfg.num_warps, cfg.num_stages,
                           zsub=cfg.zsub, fma=cfg.zsub, prefetch=cfg.prefetch, bias=bias, accumulate=accumulate,
                           glu=glu)
    x, glu, m, n, k = gemm_input(x, kw, glu, accumulate, unfuse_glu=cfg.kind == "dense")
    if 128 % cfg.block_n:
        raise ValueError(f"block_n {cfg.block_n} must divide the 128-column weight tile")
    if cfg.zsub and not cfg.fast_deq:
        raise ValueError("zsub subtracts 1024 + z from the fast dequant's 1024 + q: it needs fast_deq")
    if cfg.kind == "dense":
        w = dequantize_fp16(kw)
        if accumulate is None:
            out = x @ w
            return out if bias is None else out + bias.to(out.dtype)
        accumulate.addmm_(x, w)      # one GEMM reading the stream as C (beta 1): no separate add
        return accumulate if bias is None else accumulate.add_(bias.to(accumulate.dtype))
    if cfg.kind in STREAM_KINDS:
        out = accumulate if accumulate is not None else torch.zeros((m, n), dtype=torch.float16, device=x.device)
        progs, per_prog = stream_runs(cfg, m, n, k, sm_count(x.device))
        launch(
            _w4a16_stream_kernel, (cdiv(m, cfg.block_m), progs),
            x, kw.qweight, kw.planes[-1], kw.zeros, kw.scales, out, bias if bias is not None else out,
            m, n, k, x.stride(0), out.stride(0), kw.group_size, per_prog,
            HAS_BIAS=bias is not None, BM=cfg.block_m, BN=cfg.block_n, BITS=kw.bits, STAGES=cfg.num_stages,
            EMULATE=INTERPRET, GLU=glu, num_warps=cfg.num_warps,
        )
        return out
    split_k, blocks_per_split = split_of(cfg, k)
    gemv = cfg.kind in ("gemv_row", "gemv_h2")
    tiles, tile = (m * cdiv(n, cfg.block_n), cfg.block_n) if gemv else \
        (cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n), cfg.block_m * cfg.block_n)
    serial = split_k > 1 and SERIAL_SPLIT_K and accumulate is None
    use_atomic = accumulate is not None or _sums_with_atomics(split_k)
    if accumulate is not None:
        out = accumulate
    else:
        out = (torch.zeros if use_atomic else torch.empty)((m, n), dtype=torch.float16, device=x.device)
    if serial:   # one fp32 slot per split and output tile, and the tiles' locks (zero between calls)
        ws = torch.empty(split_k * tiles * tile, dtype=torch.float32, device=x.device)
        locks = split_locks(x.device, tiles)
    else:
        ws = locks = out     # not read
    # planes[-1] is the 3-bit high plane (at 4 bits: qweight again, unused)
    args = (x, kw.qweight, kw.planes[-1], kw.zeros, kw.scales, out, bias if bias is not None else out, ws, locks,
            m, n, k, x.stride(0), out.stride(0), kw.group_size, blocks_per_split)
    if gemv:
        prefetch, l2_ahead, stages = gemv_buffering(cfg.kind == "gemv_h2", cfg.num_stages, cfg.unroll)
        launch(
            _w4a16_gemv_row_kernel, (m, cdiv(n, cfg.block_n), split_k),
            *args, HAS_BIAS=bias is not None, USE_ATOMIC=use_atomic, BN=cfg.block_n, UNROLL=cfg.unroll,
            BITS=kw.bits, H2=cfg.kind == "gemv_h2", EMULATE=INTERPRET, SERIAL=serial, GLU=glu,
            PREFETCH=prefetch, L2_AHEAD=l2_ahead and not INTERPRET, num_warps=cfg.num_warps, num_stages=stages,
        )
        return out
    grid = (tiles, split_k)
    if cfg.kind in SWAPPED_KINDS:
        launch(
            _w4a16_t_kernel, grid,
            *args, HAS_BIAS=bias is not None, USE_ATOMIC=use_atomic,
            BM=cfg.block_m, BN=cfg.block_n, GROUP_M=cfg.group_m, BITS=kw.bits, H2DEQ=not INTERPRET,
            FP16_SCALE=cfg.kind == "mma8ts", ONE_DOT=cfg.kind == "mma1t", SERIAL=serial, GLU=glu,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    else:
        launch(
            _w4a16_kernel, grid,
            *args, HAS_BIAS=bias is not None, USE_ATOMIC=use_atomic,
            BM=cfg.block_m, BN=cfg.block_n, GROUP_M=cfg.group_m, SINGLE_DOT=cfg.kind == "mma",
            FAST_DEQ=cfg.fast_deq, BITS=kw.bits, ZSUB=cfg.zsub,
            # zsub dequantizes through packed PTX (no inline PTX under the interpreter)
            H2DEQ=cfg.zsub and not INTERPRET and cfg.kind == "mma8", SERIAL=serial, GLU=glu,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return out
