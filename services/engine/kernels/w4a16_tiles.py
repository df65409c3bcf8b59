"""Device helpers shared by the W4A16 / W3A16 GEMM kernels of w4a16.py: unpacking code tiles
(4-bit words, or the two 3-bit planes), the packed fp16x2 dequantize / dot of gemv_h2 and zsub
(inline PTX from h2_ptx.py, an fp32 emulation under the interpreter), a program's tile and K
range, the joined register operand of mma1t, and the serial split-K store."""
from __future__ import annotations

from services.engine.kernels.h2_ptx import H2_DEQ3_ASM, H2_DEQ_ASM, H2_DOT3_ASM, H2_DOT_ASM

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the GEMM falls back to torch
    triton = None
    tl = None

if triton is not None:
    from services.engine.kernels.pdl import pdl_enter

    @triton.jit
    def nibble_fp16(q, FAST_DEQ: tl.constexpr):
        """int32 values 0..15 → fp16. FAST_DEQ: OR in the exponent of 1024 and reinterpret, giving
        1024 + q exactly with two integer ops instead of a quarter-rate int→float convert (the
        caller subtracts 1024 through the zero point); otherwise a plain convert."""
        if FAST_DEQ:
            return (q | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
        return q.to(tl.float16)

    @triton.jit
    def load_planes(qw_ptr, qh_ptr, offs, BITS: tl.constexpr):
        """The code planes of one tile as int32: (nibbles, same) at 4 bits, (low 2-bit fields,
        high bits) at 3 (int16/int8 loads sign-extend; every field is masked after its shift)."""
        q = tl.load(qw_ptr + offs).to(tl.int32)
        if BITS == 3:
            qh = tl.load(qh_ptr + offs).to(tl.int32)
        else:
            qh = q
        return q, qh

    @triton.jit
    def prefetch_codes_l2(qw_ptr, qh_ptr, tile, offs_c, b_start, b_end, BN: tl.constexpr, BITS: tl.constexpr):
        """Ask L2 for a program's code rows (blocks b_start..b_end of its column tile), with no
        registers bound: the kernels call it before pdl_enter under PDL mode 2, so the weight reads
        overlap the previous kernel. The codes never change while kernels run (a weight swap is an
        ordered copy, and L2 is the device's point of coherence), so this is safe before the wait."""
        offs_i = tl.arange(0, 16)
        # one address per 32 codes: a 128-byte line of the 4-bit plane (half or a quarter of one for
        # the 3-bit planes' int16 / int8 words), not one per code as the loads take them
        lines = tl.min(offs_c, axis=0) + tl.arange(0, BN // 32) * 32
        for b in range(b_start, b_end):
            offs = (b * 16 + offs_i)[:, None] * 128 + lines[None, :]
            tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // $0", "=r,l", [qw_ptr + tile + offs],
                                      dtype=tl.int32, is_pure=False, pack=1)
            if BITS == 3:
                tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // $0", "=r,l", [qh_ptr + tile + offs],
                                          dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def gemm_pdl_enter(qw_ptr, qh_ptr, tile, offs_c, b_start, b_end, prefetcher, BN: tl.constexpr,
                       BITS: tl.constexpr, PDL: tl.constexpr):
        """A GEMM kernel's PDL entry, after its index math and before any read of x or write of out:
        in mode 2 the `prefetcher` programs (one per column tile and split) first ask L2 for their
        weight codes, so the weight stream starts while the previous grid runs; then pdl_enter."""
        if PDL == 2:
            if prefetcher:
                prefetch_codes_l2(qw_ptr, qh_ptr, tile, offs_c, b_start, b_end, BN, BITS)
        pdl_enter(PDL)

    @triton.jit
    def field(q, qh, j, BITS: tl.constexpr):
        """Code j (0..7) of each element: nibble j at 4 bits; 2-bit field j plus high bit j at 3."""
        if BITS == 4:
            return (q >> (4 * j)) & 0xF
        else:
            return ((q >> (2 * j)) & 3) | (((qh >> j) & 1) << 2)

    _H2_DOT_ASM = tl.constexpr(H2_DOT_ASM)
    _H2_DOT3_ASM = tl.constexpr(H2_DOT3_ASM)
    _H2_DEQ_ASM = tl.constexpr(H2_DEQ_ASM)
    _H2_DEQ3_ASM = tl.constexpr(H2_DEQ3_ASM)

    @triton.jit
    def fp16_bits(v):
        """fp16 tensor → its 16 bits in the low half of an int32 (high half zero)."""
        return v.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF

    @triton.jit
    def h2_dot(q, qh, p0, p1, p2, p3, zz, BITS: tl.constexpr, EMULATE: tl.constexpr):
        """_H2_DOT_ASM / _H2_DOT3_ASM on a [16, BN] tile (x pairs [16, 1], zero pair [1, BN]) →
        fp32 [16, BN]. EMULATE (TRITON_INTERPRET, which has no inline PTX): the same sum from the
        same packed operands in plain fp32 ops, so the CPU check covers the packing."""
        if EMULATE:
            z = (zz & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) - 1024.0
            out = tl.zeros(q.shape, dtype=tl.float32)
            for j in tl.static_range(4):
                if j == 0:
                    p = p0
                elif j == 1:
                    p = p1
                elif j == 2:
                    p = p2
                else:
                    p = p3
                x_lo = (p & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
                x_hi = ((p >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
                out += x_lo * (field(q, qh, j, BITS).to(tl.float32) - z)
                out += x_hi * (field(q, qh, j + 4, BITS).to(tl.float32) - z)
            return out
        if BITS == 3:
            return tl.inline_asm_elementwise(_H2_DOT3_ASM, "=r,r,r,r,r,r,r,r", [q, qh, p0, p1, p2, p3, zz],
                                             dtype=tl.float32, is_pure=True, pack=1)
        return tl.inline_asm_elementwise(_H2_DOT_ASM, "=r,r,r,r,r,r,r", [q, p0, p1, p2, p3, zz],
                                         dtype=tl.float32, is_pure=True, pack=1)

    @triton.jit
    def h2_deq(q, qh, zz, BITS: tl.constexpr):
        """_H2_DEQ_ASM / _H2_DEQ3_ASM on a [16, BN] tile (zero pair [1, BN]) → the 8 fp16 tiles
        q_j - z, j = 0..7 (a tuple)."""
        if BITS == 3:
            return tl.inline_asm_elementwise(_H2_DEQ3_ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r", [q, qh, zz],
                                             dtype=(tl.float16,) * 8, is_pure=True, pack=1)
        return tl.inline_asm_elementwise(_H2_DEQ_ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r,r", [q, zz],
                                         dtype=(tl.float16,) * 8, is_pure=True, pack=1)

    @triton.jit
    def load_x(ptrs, mask, K, GLU: tl.constexpr):
        """The GEMM's input at ptrs (masked lanes 0). GLU: each row of x holds [gate | up], 2K wide,
        and the input is silu(gate) · up, computed in fp32 and rounded to fp16 exactly as
        fused_ops._silu_mul_kernel stores it, so the GEMM sees the same operand without that launch."""
        if GLU:
            g = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
            u = tl.load(ptrs + K, mask=mask, other=0.0).to(tl.float32)
            return (g / (1.0 + tl.exp(-g)) * u).to(tl.float16)
        return tl.load(ptrs, mask=mask, other=0.0)

    @triton.jit
    def x_pair(x_blk, j: tl.constexpr, offs_i, K, GLU: tl.constexpr, EMULATE: tl.constexpr):
        """(x_j, x_{j+4}) of one 128-row block, /32 (see H2 in the gemv kernel), as fp16x2 [16]. On the
        GPU (not EMULATE) the two halves are joined and scaled by one mul.f16x2 (x · 2^-5 is exact in
        fp16 as in fp32, subnormals included: the same bits as the fp32 path, with 2 instructions
        instead of about 10)."""
        every = offs_i < 16
        lo = load_x(x_blk + 16 * j + offs_i, every, K, GLU)
        hi = load_x(x_blk + 16 * (j + 4) + offs_i, every, K, GLU)
        if EMULATE:
            lo = (lo.to(tl.float32) * 0.03125).to(tl.float16)
            hi = (hi.to(tl.float32) * 0.03125).to(tl.float16)
            return fp16_bits(lo) | (fp16_bits(hi) << 16)
        return tl.inline_asm_elementwise(
            "{ .reg .b32 xp, c; mov.b32 xp, {$1, $2}; mov.b32 c, 671098880; mul.rn.f16x2 $0, xp, c; }",
            "=r,h,h", [lo, hi], dtype=tl.int32, is_pure=True, pack=1)

    @triton.jit
    def h2_block_loads(qw_tile, qh_tile, s_ptr, z_ptr, x_row, b, offs_i, offs_c, offs_n, mask_n, N, K, group_size,
                       BITS: tl.constexpr, GLU: tl.constexpr, EMULATE: tl.constexpr):
        """Everything gemv_h2 reads for 128-row block b: the code planes [16, BN], the group's scale
        and zero [BN] (fp32) and the four x pairs [16] (x_pair)."""
        q, qh = load_planes(qw_tile, qh_tile, (b * 16 + offs_i)[:, None] * 128 + offs_c[None, :], BITS)
        g = (b * 128) // group_size
        s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        x_blk = x_row + b * 128
        return (q, qh, s, z, x_pair(x_blk, 0, offs_i, K, GLU, EMULATE), x_pair(x_blk, 1, offs_i, K, GLU, EMULATE),
                x_pair(x_blk, 2, offs_i, K, GLU, EMULATE), x_pair(x_blk, 3, offs_i, K, GLU, EMULATE))

    @triton.jit
    def h2_block_dot(q, qh, s, z, p0, p1, p2, p3, BITS: tl.constexpr, EMULATE: tl.constexpr):
        """gemv_h2's partial of one block from h2_block_loads' operands: h2_dot of the [16, BN] code
        tile with the x pairs and the zero pair, times the group scale s [BN] (fp32 [16, BN])."""
        zz = fp16_bits((z + 1024.0).to(tl.float16)) * 65537
        return h2_dot(q, qh, p0[:, None], p1[:, None], p2[:, None], p3[:, None], zz[None, :], BITS, EMULATE) * s[None, :]

    @triton.jit
    def store_out(out, v, mask, USE_ATOMIC: tl.constexpr):
        """A program's fp32 result v into the fp16 output at out: fp16 atomics (split-K partials, or a
        product added onto `accumulate`) or a plain store."""
        if USE_ATOMIC:
            tl.atomic_add(out, v.to(tl.float16), mask=mask, sem="relaxed")
        else:
            tl.store(out, v.to(tl.float16), mask=mask)

    @triton.jit
    def serial_split_store(acc, out, omask, ws_ptr, lock_ptr, local, tile_id, num_tiles, pid_k, split_k,
                            TILE: tl.constexpr):
        """Split-K without a zeroed output ("serial" split-K): each split stores its fp32 partial
        in its own workspace slot and counts itself in on the tile's lock; the split that arrives
        last sums all slots in split order (deterministic, own partial from registers), stores the
        fp16 result and resets the lock for the next call. The barrier orders every thread's slot
        store before the acquire-release count; the last split reads the slots past L1 (.cg)."""
        slot = ws_ptr + tile_id.to(tl.int64) * TILE + local
        tl.store(slot + pid_k.to(tl.int64) * num_tiles * TILE, acc)
        tl.debug_barrier()
        arrived = tl.atomic_add(lock_ptr + tile_id, 1, sem="acq_rel", scope="gpu")
        if arrived == split_k - 1:
            total = tl.zeros_like(acc)
            for s in range(0, split_k):
                if s == pid_k:
                    total += acc
                else:
                    total += tl.load(slot + s * num_tiles.to(tl.int64) * TILE, cache_modifier=".cg")
            tl.store(out, total.to(tl.float16), mask=omask)
            tl.atomic_xchg(lock_ptr + tile_id, 0, sem="relaxed", scope="gpu")

    @triton.jit
    def tile_of(pid, pid_k, M, N, K, blocks_per_split, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
        """(offs_m, offs_n, mask_m, mask_n, tile, offs_c, b_start, b_end) of one tensor-core program:
        its rows and columns with their bounds masks, the start of its [K/8, 128] weight column
        tile with the columns inside it, and its range of 128-row K blocks. Grouped ordering:
        programs sharing weight columns run close together (L2 reuse at large M)."""
        num_pid_m = tl.cdiv(M, BM)
        width = GROUP_M * tl.cdiv(N, BN)
        first_m = (pid // width) * GROUP_M
        size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % size_m
        pid_n = (pid % width) // size_m
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        # weights are stored in contiguous [K/8, 128] column tiles (gptq_format.KernelWeights)
        tile = tl.multiple_of(((pid_n * BN) // 128) * (K // 8 * 128), 128)  # hint: keeps 16-byte loads
        # the hints restore 16-byte loads: divisibility of (pid_n * BN) % 128 is not inferred
        offs_c = tl.max_contiguous(tl.multiple_of((pid_n * BN) % 128 + tl.arange(0, BN), BN), BN)
        b_start = pid_k * blocks_per_split
        b_end = tl.minimum(b_start + blocks_per_split, K // 128)
        return offs_m, offs_n, offs_m < M, offs_n < N, tile, offs_c, b_start, b_end

    @triton.jit
    def deq_tiles(q, qh, z16, BITS: tl.constexpr):
        """The 8 tiles q_j - z of a [16, BN] code tile in fp16 without inline PTX (as h2_deq gives them)."""
        return (nibble_fp16(field(q, qh, 0, BITS), True) - z16, nibble_fp16(field(q, qh, 1, BITS), True) - z16,
                nibble_fp16(field(q, qh, 2, BITS), True) - z16, nibble_fp16(field(q, qh, 3, BITS), True) - z16,
                nibble_fp16(field(q, qh, 4, BITS), True) - z16, nibble_fp16(field(q, qh, 5, BITS), True) - z16,
                nibble_fp16(field(q, qh, 6, BITS), True) - z16, nibble_fp16(field(q, qh, 7, BITS), True) - z16)

    @triton.jit
    def block_t(ws, BN: tl.constexpr):
        """The 8 dequantized [16, BN] tiles of one 128-row block (tile j holds rows 16 j .. 16 j + 15)
        as W^T [BN, 128] in row order, for one K=128 dot: a join tree puts j on three trailing
        axes (j = 4 c + 2 b + a), a permute brings them ahead of the 16 rows of each tile."""
        r = tl.join(tl.join(tl.join(ws[0], ws[1]), tl.join(ws[2], ws[3])),
                    tl.join(tl.join(ws[4], ws[5]), tl.join(ws[6], ws[7])))   # [16, BN, a, b, c]
        return tl.reshape(tl.permute(r, (1, 4, 3, 2, 0)), (BN, 128))
