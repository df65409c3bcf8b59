"""Paged attention in Triton over block-table KV caches: a decode kernel and a varlen kernel.

KV caches are shaped [num_blocks, block_size, num_kv_heads, head_dim]; a sequence's token t lives
in block block_table[t // block_size] at offset t % block_size. Query heads map to KV heads in
contiguous groups (GQA): kv_head = head // (num_heads // num_kv_heads). A cache is in the query's
dtype or in fp8 (torch.float8_e4m3fn, EngineConfig.kv_cache_dtype): an fp8 cache stores K/V clamped
to ±448 and rounded (no scale), and every kernel widens a loaded tile to the query's dtype before
its math, so the attention itself runs as on a 16-bit cache.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from services.engine.kernels.launch import launch, next_pow2, sm_count

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs use paged_decode_reference
    triton = None
    tl = None


# Triton reads TRITON_INTERPRET once, at import: a loaded value cannot bound a loop there (STEP_STOP)
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

if triton is not None:
    from services.engine.kernels.pdl import pdl_enter

    @triton.jit
    def to_kv_cache(x, cache_ptr):
        """x as the cache at cache_ptr stores it: rounded to its dtype, clamped to ±448 (the largest
        finite e4m3, services.engine.attention.FP8_MAX) first where that is fp8."""
        if cache_ptr.dtype.element_ty == tl.float8e4nv:
            x = tl.clamp(x.to(tl.float32), -448.0, 448.0)
        return x.to(cache_ptr.dtype.element_ty)

    @triton.jit
    def _kv_tile(bt_row_ptr, t0, lo, hi, block_size, stride_cb, stride_ct, head_off, offs_d, BN: tl.constexpr):
        """Tokens t0 .. t0 + BN of a sequence's paged cache: (t [BN], mask lo <= t < hi, element
        offsets [BN, D] of their rows for one KV head), through the sequence's block table row."""
        t = t0 + tl.arange(0, BN)
        tmask = (t >= lo) & (t < hi)
        blk = tl.load(bt_row_ptr + t // block_size, mask=tmask, other=0)
        off = blk.to(tl.int64) * stride_cb + (t % block_size) * stride_ct + head_off
        return t, tmask, off[:, None] + offs_d[None, :]

    @triton.jit
    def _softmax_update(k, v, tmask, q, m_i, l_i, acc):
        """One loaded KV tile of a single query's attention, online softmax: (m_i, l_i, acc) updated
        with the tile's keys and values (fp32; masked tokens count 0, a fully masked prefix gives no NaN)."""
        scores = tl.where(tmask, tl.sum(k.to(tl.float32) * q[None, :], axis=1), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=0))
        m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)
        p = tl.exp(scores - m_ref)
        alpha = tl.exp(m_i - m_ref)
        return m_new, l_i * alpha + tl.sum(p, axis=0), acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)

    @triton.jit
    def _softmax_update_dot(k, v, tmask, q16, m_i, l_i, acc):
        """_softmax_update on tensor cores: q16 [16, D] in the compute dtype holds the query in row 0
        (zeros below, the smallest M of tl.dot), so the scores and the weighted values are two dots
        (which Triton's pipeliner also overlaps with the next tiles' loads); state per row, [16] / [16, D]."""
        scores = tl.where(tmask[None, :], tl.dot(q16, tl.trans(k)), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)
        p = tl.exp(scores - m_ref[:, None])
        alpha = tl.exp(m_i - m_ref)
        return m_new, l_i * alpha + tl.sum(p, axis=1), acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)

    @triton.jit
    def v_slot_offsets(slot, kvh, offs_d, stride_ct, stride_ch, D: tl.constexpr, V_BS: tl.constexpr):
        """Element offsets of one cache slot's V row (one KV head, dims offs_d): K's layout where V_BS is
        0, else token-major within V_BS-token blocks ([blocks, KVH, D, V_BS] storage)."""
        if V_BS > 0:
            off = ((slot // V_BS) * (V_BS * stride_ct) + kvh * (D * V_BS) + slot % V_BS) + offs_d * V_BS
        else:
            off = slot * stride_ct + kvh * stride_ch + offs_d
        return off

    @triton.jit
    def _v_tile_token_major(v_ptr, bt_row_ptr, t0, hi, stride_cb, v_head_off, offs_d, tmask, CDT: tl.constexpr,
                            D: tl.constexpr, BN: tl.constexpr, V_BS: tl.constexpr):
        """The V tile of tokens t0 .. t0 + BN (t0 a multiple of V_BS) from a token-major V cache, read a
        block at a time: [BN / V_BS, D, V_BS] with V_BS contiguous tokens per (block, dim), so the loads
        are wide and tl.dot's operand needs no byte-wise transpose (an fp8 cache), then as [BN, D] in the
        compute dtype CDT, tokens outside tmask 0."""
        NB: tl.constexpr = BN // V_BS
        first = t0 + tl.arange(0, NB) * V_BS
        bmask = first < hi
        blk = tl.load(bt_row_ptr + first // V_BS, mask=bmask, other=0)
        off = ((blk.to(tl.int64) * stride_cb + v_head_off)[:, None, None] + offs_d[None, :, None] * V_BS
               + tl.arange(0, V_BS)[None, None, :])
        v3 = tl.load(v_ptr + off, mask=bmask[:, None, None], other=0.0)
        v = tl.reshape(tl.permute(v3, (0, 2, 1)), (BN, D))
        return tl.where(tmask[:, None], v.to(CDT), 0.0).to(CDT)

    @triton.jit
    def _kv_loads(k_ptr, v_ptr, kv_off, tmask, CDT: tl.constexpr, bt_row_ptr, t0, hi, stride_cb, v_head_off,
                  offs_d, D: tl.constexpr, BN: tl.constexpr, V_BS: tl.constexpr):
        """The K and V tile at kv_off (masked tokens 0) in the compute dtype CDT (an fp8 cache's tile
        widened; a no-op on a cache already in CDT); V token-major where V_BS > 0 (_v_tile_token_major)."""
        k = tl.load(k_ptr + kv_off, mask=tmask[:, None], other=0.0).to(CDT)
        if V_BS > 0:
            v = _v_tile_token_major(v_ptr, bt_row_ptr, t0, hi, stride_cb, v_head_off, offs_d, tmask, CDT, D, BN, V_BS)
        else:
            v = tl.load(v_ptr + kv_off, mask=tmask[:, None], other=0.0).to(CDT)
        return k, v

    @triton.jit
    def _attend(k_ptr, v_ptr, bt_row_ptr, lo, hi, loop_start, loop_end, block_size, stride_cb, stride_ct, head_off,
                offs_d, q, D: tl.constexpr, BN: tl.constexpr, PREFETCH: tl.constexpr, CDT: tl.constexpr,
                DOT: tl.constexpr = False, v_head_off=0, V_BS: tl.constexpr = 0):
        """(m_i, l_i, acc) of one query over the sequence's cached tokens lo .. hi, the loop running
        loop_start .. loop_end (loop_start <= lo, loop_end >= hi; tiles outside lo .. hi are masked).
        CDT: the query's 16-bit dtype, which the tiles are widened to (an fp8 cache) and the dots take.
        PREFETCH: a register double buffer, the next tile's K and V loads issued before this tile's
        math (Triton does not pipeline this loop itself: decode_attention_sass.py). DOT: the tile math
        on tensor cores (_softmax_update_dot; PREFETCH is then ignored). V_BS > 0: the V cache is
        token-major within V_BS-token blocks, its head at v_head_off (v_slot_offsets)."""
        m_i = tl.full((), float("-inf"), tl.float32)
        l_i = tl.full((), 0.0, tl.float32)
        acc = tl.zeros((D,), dtype=tl.float32)
        if DOT:
            row0 = tl.arange(0, 16) == 0
            q16 = tl.where(row0[:, None], q[None, :], 0.0).to(CDT)
            m16 = tl.full((16,), float("-inf"), tl.float32)
            l16 = tl.zeros((16,), dtype=tl.float32)
            acc16 = tl.zeros((16, D), dtype=tl.float32)
            for t0 in range(loop_start, loop_end, BN):
                _, tmask, kv_off = _kv_tile(bt_row_ptr, t0, lo, hi, block_size, stride_cb, stride_ct, head_off,
                                            offs_d, BN)
                k, v = _kv_loads(k_ptr, v_ptr, kv_off, tmask, CDT, bt_row_ptr, t0, hi, stride_cb, v_head_off,
                                 offs_d, D, BN, V_BS)
                m16, l16, acc16 = _softmax_update_dot(k, v, tmask, q16, m16, l16, acc16)
            m_i = tl.max(tl.where(row0, m16, float("-inf")), axis=0)
            l_i = tl.sum(tl.where(row0, l16, 0.0), axis=0)
            acc = tl.sum(tl.where(row0[:, None], acc16, 0.0), axis=0)
        elif PREFETCH:
            _, tmask, kv_off = _kv_tile(bt_row_ptr, loop_start, lo, hi, block_size, stride_cb, stride_ct, head_off,
                                        offs_d, BN)
            k, v = _kv_loads(k_ptr, v_ptr, kv_off, tmask, CDT, bt_row_ptr, loop_start, hi, stride_cb, v_head_off,
                             offs_d, D, BN, V_BS)
            for t0 in range(loop_start, loop_end, BN):
                _, next_mask, next_off = _kv_tile(bt_row_ptr, t0 + BN, lo, hi, block_size, stride_cb, stride_ct,
                                                  head_off, offs_d, BN)
                k_next, v_next = _kv_loads(k_ptr, v_ptr, next_off, next_mask, CDT, bt_row_ptr, t0 + BN, hi, stride_cb,
                                           v_head_off, offs_d, D, BN, V_BS)
                m_i, l_i, acc = _softmax_update(k, v, tmask, q, m_i, l_i, acc)
                k, v, tmask = k_next, v_next, next_mask
        else:
            for t0 in range(loop_start, loop_end, BN):
                _, tmask, kv_off = _kv_tile(bt_row_ptr, t0, lo, hi, block_size, stride_cb, stride_ct, head_off,
                                            offs_d, BN)
                k, v = _kv_loads(k_ptr, v_ptr, kv_off, tmask, CDT, bt_row_ptr, t0, hi, stride_cb, v_head_off,
                                 offs_d, D, BN, V_BS)
                m_i, l_i, acc = _softmax_update(k, v, tmask, q, m_i, l_i, acc)
        return m_i, l_i, acc

    @triton.jit
    def _paged_decode_kernel(
        q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, out_ptr,
        scale, block_size, q_per_kv,
        stride_qb, stride_qh, stride_cb, stride_ct, stride_ch, stride_btb, stride_ob, stride_oh,
        D: tl.constexpr, BN: tl.constexpr,
        PDL: tl.constexpr = False, PREFETCH: tl.constexpr = False, DOT: tl.constexpr = False,
        V_BS: tl.constexpr = 0,
    ):
        pdl_enter(PDL)  # first: nothing is read or written before the previous grid ends
        b = tl.program_id(0)
        h = tl.program_id(1)
        kvh = h // q_per_kv
        length = tl.load(lens_ptr + b)
        offs_d = tl.arange(0, D)
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_d).to(tl.float32) * scale
        m_i, l_i, acc = _attend(k_ptr, v_ptr, bt_ptr + b * stride_btb, 0, length, 0, length, block_size, stride_cb,
                                stride_ct, kvh * stride_ch, offs_d, q, D, BN, PREFETCH, q_ptr.dtype.element_ty, DOT,
                                kvh * (D * V_BS), V_BS)
        out = acc / l_i
        tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty))

    @triton.jit
    def _paged_decode_rope_kernel(
        qkv_ptr, pos_ptr, cos_ptr, sin_ptr, slot_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, out_ptr, part_ptr,
        scale, block_size, num_heads, num_kv_heads, q_per_kv,
        stride_qkv, stride_cb, stride_ct, stride_ch, stride_btb, stride_ob, stride_oh,
        D: tl.constexpr, BN: tl.constexpr, STEP_STOP: tl.constexpr = 0,
        PDL: tl.constexpr = False, PREFETCH: tl.constexpr = False, SPLIT: tl.constexpr = False,
        DOT: tl.constexpr = False, V_BS: tl.constexpr = 0,
    ):
        """_paged_decode_kernel with the RoPE + KV-cache write of _rope_cache_kernel folded in.

        Program (b, h) rotates its query head and its KV head's new key (NeoX halves: element d pairs
        with d ± D/2), attends over the first length - 1 cached tokens and adds the new token from
        registers last, so no program reads a slot another program of this grid writes. The first
        query head of each KV group stores the rotated key and the value into the cache slot.
        q is rounded to qkv's dtype and k to the cache's before use, as the two-kernel path stores them.

        SPLIT (grid (B, H, S), flash-decoding): program (b, h, s) attends over the s-th of S equal
        runs of whole BN tiles of the cached tokens (split 0 also over the new token, and only it
        writes the cache slot) and stores its unnormalised partial, (m, l, acc[D]) in fp32, at
        part_ptr[((b * H + h) * S + s) * (D + 2)]; _split_combine_kernel merges the S partials."""
        pdl_enter(PDL)  # first: nothing is read or written before the previous grid ends
        b = tl.program_id(0)
        h = tl.program_id(1)
        kvh = h // q_per_kv
        HALF: tl.constexpr = D // 2
        offs_d = tl.arange(0, D)
        partner = (offs_d + HALF) % D
        sign = tl.where(offs_d < HALF, -1.0, 1.0)
        pos = tl.load(pos_ptr + b)
        cos = tl.load(cos_ptr + pos * HALF + offs_d % HALF)
        sin = tl.load(sin_ptr + pos * HALF + offs_d % HALF) * sign
        row = qkv_ptr + b * stride_qkv
        q_src = row + h * D
        q = tl.load(q_src + offs_d).to(tl.float32) * cos + tl.load(q_src + partner).to(tl.float32) * sin
        q = q.to(qkv_ptr.dtype.element_ty).to(tl.float32) * scale
        k_src = row + (num_heads + kvh) * D
        k_new = to_kv_cache(tl.load(k_src + offs_d).to(tl.float32) * cos
                            + tl.load(k_src + partner).to(tl.float32) * sin, k_ptr)
        v_new = to_kv_cache(tl.load(row + (num_heads + num_kv_heads + kvh) * D + offs_d), v_ptr)
        cached = tl.load(lens_ptr + b) - 1
        if SPLIT:
            split = tl.program_id(2)
            num_splits = tl.num_programs(2)
            chunk = tl.cdiv(tl.cdiv(cached, num_splits), BN) * BN
            lo = split * chunk
            hi = tl.minimum(lo + chunk, cached)
            writes = (h % q_per_kv == 0) & (split == 0)
        else:
            lo = 0
            hi = cached
            writes = h % q_per_kv == 0
        if writes:
            slot = tl.load(slot_ptr + b).to(tl.int64)
            tl.store(k_ptr + slot * stride_ct + kvh * stride_ch + offs_d, k_new)
            tl.store(v_ptr + v_slot_offsets(slot, kvh, offs_d, stride_ct, stride_ch, D, V_BS), v_new)
        # Under the interpreter a loaded value cannot bound a loop: the loop runs 0 .. STEP_STOP (the
        # batch's longest context, a constant) and tiles outside lo .. hi are fully masked (p = 0, alpha = 1).
        m_i, l_i, acc = _attend(k_ptr, v_ptr, bt_ptr + b * stride_btb, lo, hi,
                                0 if STEP_STOP > 0 else lo, STEP_STOP if STEP_STOP > 0 else hi,
                                block_size, stride_cb, stride_ct, kvh * stride_ch, offs_d, q, D, BN, PREFETCH,
                                qkv_ptr.dtype.element_ty, DOT, kvh * (D * V_BS), V_BS)
        s_new = tl.sum(k_new.to(tl.float32) * q, axis=0)
        if SPLIT:
            s_new = tl.where(tl.program_id(2) == 0, s_new, float("-inf"))
        m_new = tl.maximum(m_i, s_new)
        m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)   # an empty split: m = -inf, l = 0, acc = 0
        p_new = tl.exp(s_new - m_ref)
        alpha = tl.exp(m_i - m_ref)
        acc = acc * alpha + p_new * v_new.to(tl.float32)
        l_i = l_i * alpha + p_new
        if SPLIT:
            part = part_ptr + ((b * num_heads + h) * tl.num_programs(2) + tl.program_id(2)) * (D + 2)
            tl.store(part + offs_d, acc)
            tl.store(part + D, m_new)
            tl.store(part + D + 1, l_i)
        else:
            tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, (acc / l_i).to(out_ptr.dtype.element_ty))

    @triton.jit
    def _split_combine_kernel(part_ptr, out_ptr, num_splits, stride_ob, stride_oh,
                              D: tl.constexpr, SP: tl.constexpr, PDL: tl.constexpr = False):
        """Program (b, h): the S = num_splits partials of _paged_decode_rope_kernel's SPLIT grid merged,
        out = sum_s exp(m_s - M) acc_s / sum_s exp(m_s - M) l_s with M = max_s m_s (split 0 holds the
        new token, so M is finite); SP: S rounded up to a power of two."""
        pdl_enter(PDL)
        b = tl.program_id(0)
        h = tl.program_id(1)
        offs_s = tl.arange(0, SP)
        offs_d = tl.arange(0, D)
        smask = offs_s < num_splits
        part = part_ptr + ((b * tl.num_programs(1) + h) * num_splits + offs_s) * (D + 2)
        m = tl.load(part + D, mask=smask, other=float("-inf"))
        l_s = tl.load(part + D + 1, mask=smask, other=0.0)
        acc = tl.load(part[:, None] + offs_d[None, :], mask=smask[:, None], other=0.0)
        w = tl.exp(m - tl.max(m, axis=0))
        out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l_s * w, axis=0)
        tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty))


# Launch shape of the decode attention kernels: KV tokens per loop iteration, warps, and Triton's
# pipeline depth (None: Triton's default). benchmarks/probe_decode_attention.py sweeps them on a GPU.
DECODE_BLOCK_N = 64
DECODE_WARPS = 4
DECODE_STAGES: int | None = None
# Measured on the H100 (decode_attention_*_97fe563.md, probe_decode_attention.py): one launch with
# the tensor-core tile math is 1.02-1.13x the CUDA-core loop at batch 16-256 (where the loop already
# streams 2.3-2.9 TB/s), 1.14-4.10x with split-KV at batch 1-4; the graphed 7B step 1.02-1.10x at
# batch 4-128 and 1.08 / 1.49x at batch 1 (context 256 / 1024). The register double buffer is
# slower from batch 16 up.
DECODE_PREFETCH = False    # the register double buffer of the KV loop (_attend)
DECODE_DOT = True          # the tile math on tensor cores (_softmax_update_dot)
# Split-KV (flash-decoding) of the fused decode kernel: a batch with fewer than this many (sequence,
# head) programs per SM splits each sequence's cache into up to DECODE_MAX_SPLITS runs so the grid
# fills the GPU (0: never split).
DECODE_SPLIT_PROGRAMS_PER_SM = 4
DECODE_MAX_SPLITS = 16
# Launch shape over one-byte (fp8) caches, where set (None: the settings above). A tile of fp8 K/V
# carries half the bytes of an fp16 one, so at the same BN and depth half as many bytes are in flight
# per program: on the H100 the graphed 7B step with fp8 caches was only 1.08x the fp16 one at batch
# 64 (0.96x at 16; kv_fp8_step_852632c.md) against a 1.8x smaller floor. A wider tile or a deeper
# pipeline restores the bytes in flight; both compile for sm_90 without spills (BN 128 / stages 3,
# BN 64 / stages 5: decode_attention_sass.py). On tensor cores, though, the fp8 V tile (tl.dot's B
# operand, its reduction axis the tokens, strided in the cache) is read from shared memory one byte
# per instruction (64 LDS.U8 per thread per tile at BN 64, decode_attention_sass_fp8_3a15ac8.md; fp16
# takes ldmatrix.trans, which has no 8-bit form on sm_90), while the CUDA-core loop loads fp8 K/V
# with 16-byte LDGs: DECODE_FP8_DOT picks the loop for fp8 caches. Timed on the H200 at c8e629e
# (kv_fp8_shape_c8e629e.md, kv_fp8_shape2_c8e629e.md, the graphed 7B step at context 1024): the
# CUDA-core loop with 128-token tiles over a token-major V cache (EngineConfig.kv_v_layout auto) took
# 10.33 / 4.40 / 3.11 ms at batch 64 / 16 / 4 against the fp16 cache's 12.32 / 4.89 / 3.25 (and the
# old fp8 default's, tensor cores at BN 64, 14.10 / 6.02 / 3.50); 9.16 vs 10.29 ms at batch 128,
# context 256. Deeper pipelines (stages 5) and 8 warps were slower.
DECODE_FP8_BLOCK_N: int | None = 128
DECODE_FP8_STAGES: int | None = None
DECODE_FP8_DOT: bool | None = False


def set_decode_options(dot: bool, split_programs_per_sm: int) -> None:
    """The process's decode attention settings (EngineConfig.decode_attention_dot /
    decode_split_programs_per_sm; the engine applies its config here)."""
    global DECODE_DOT, DECODE_SPLIT_PROGRAMS_PER_SM
    if split_programs_per_sm < 0:
        raise ValueError(f"split_programs_per_sm must be >= 0, got {split_programs_per_sm}")
    DECODE_DOT, DECODE_SPLIT_PROGRAMS_PER_SM = dot, split_programs_per_sm


def launch_settings() -> dict:
    """The process's decode attention launch settings (for benchmark reports): the module's constants and,
    under "fp16" / "fp8", the launch arguments each cache dtype resolves to (_launch_shape's defaults)."""
    return {"block_n": DECODE_BLOCK_N, "warps": DECODE_WARPS, "stages": DECODE_STAGES, "dot": DECODE_DOT,
            "prefetch": DECODE_PREFETCH, "split_programs_per_sm": DECODE_SPLIT_PROGRAMS_PER_SM,
            "fp8_block_n": DECODE_FP8_BLOCK_N, "fp8_stages": DECODE_FP8_STAGES, "fp8_dot": DECODE_FP8_DOT,
            "fp16": _launch_shape(None, None, None, cache_bytes=2),
            "fp8": _launch_shape(None, None, None, cache_bytes=1)}


def decode_splits(batch: int, num_heads: int, device: torch.device) -> int:
    """How many runs the fused decode kernel splits each sequence's cache into at this batch size
    (a function of the batch only, so a captured CUDA graph keeps a grid that fits every replay)."""
    if DECODE_SPLIT_PROGRAMS_PER_SM <= 0 or device.type != "cuda":
        return 1
    want = DECODE_SPLIT_PROGRAMS_PER_SM * sm_count(device)
    return max(1, min(DECODE_MAX_SPLITS, want // (batch * num_heads)))


def v_block_size(k_cache: torch.Tensor, v_cache: torch.Tensor, block_n: int | None = None) -> int:
    """The kernels' V_BS for this pair of caches: 0 when v_cache shares k_cache's strides, its block size
    when V is token-major within blocks (storage [num_blocks, KVH, D, block_size] viewed as k_cache's
    [num_blocks, block_size, KVH, D], see token_major_v); then block_n, the tokens per tile, must be a
    multiple of it. Any other V layout is a ValueError."""
    if v_cache.stride() == k_cache.stride():
        return 0
    nb, bs, kvh, d = v_cache.shape
    if v_cache.stride() != (kvh * d * bs, 1, d * bs, bs) or k_cache.stride(0) != kvh * d * bs or bs & (bs - 1):
        raise ValueError(f"v_cache strides {v_cache.stride()}: neither k_cache's {k_cache.stride()} nor token-major "
                         "within power-of-two blocks")
    if block_n is not None and block_n % bs:
        raise ValueError(f"a token-major V cache of {bs}-token blocks needs tiles of a multiple of {bs} tokens, "
                         f"got {block_n}")
    return bs


def token_major_v(v_cache: torch.Tensor) -> torch.Tensor:
    """v_cache [num_blocks, block_size, KVH, D] copied into token-major storage [num_blocks, KVH, D,
    block_size], returned as a view of v_cache's shape (the kernels take it where they take v_cache)."""
    nb, bs, kvh, d = v_cache.shape
    out = torch.empty(nb, kvh, d, bs, dtype=v_cache.dtype, device=v_cache.device).permute(0, 3, 1, 2)
    if v_cache.element_size() == 1:    # fp8: no copy kernel on every device, so byte-wise
        out.view(torch.uint8).copy_(v_cache.view(torch.uint8))
    else:
        out.copy_(v_cache)
    return out


def _launch_shape(block_n: int | None, num_warps: int | None, num_stages: int | None,
                  prefetch: bool | None = None, dot: bool | None = None, cache_bytes: int = 2) -> dict:
    """The kernels' BN / num_warps / num_stages / PREFETCH / DOT launch arguments (defaults: the
    module's settings; over a cache of cache_bytes == 1 per element, DECODE_FP8_* where set)."""
    fp8 = cache_bytes == 1
    default_bn = DECODE_FP8_BLOCK_N if fp8 and DECODE_FP8_BLOCK_N is not None else DECODE_BLOCK_N
    default_stages = DECODE_FP8_STAGES if fp8 and DECODE_FP8_STAGES is not None else DECODE_STAGES
    default_dot = DECODE_FP8_DOT if fp8 and DECODE_FP8_DOT is not None else DECODE_DOT
    meta = {"BN": block_n or default_bn, "num_warps": num_warps or DECODE_WARPS,
            "PREFETCH": DECODE_PREFETCH if prefetch is None else prefetch, "DOT": default_dot if dot is None else dot}
    stages = num_stages if num_stages is not None else default_stages
    if stages is not None:
        meta["num_stages"] = stages
    return meta


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    block_n: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
    prefetch: bool | None = None, dot: bool | None = None,
) -> torch.Tensor:
    """One query token per sequence: q [B, H, D] over its first context_lens[b] cached tokens → [B, H, D].

    block_tables int32 [B, max_blocks], context_lens int32 [B] (each ≥ 1). Caches are
    [num_blocks, block_size, KVH, D] with the last two dims contiguous. block_n / num_warps /
    num_stages / prefetch / dot: the launch shape (default DECODE_BLOCK_N / DECODE_WARPS / DECODE_STAGES /
    DECODE_PREFETCH / DECODE_DOT).
    """
    if triton is None:
        raise RuntimeError("triton is not installed")
    bsz, num_heads, d = q.shape
    _, block_size, num_kv_heads, dc = k_cache.shape
    if dc != d or d & (d - 1) or num_heads % num_kv_heads:
        raise ValueError(f"bad shapes q {tuple(q.shape)}, cache {tuple(k_cache.shape)}")
    if k_cache.stride(3) != 1:
        raise ValueError("the k cache needs a contiguous head_dim")
    meta = _launch_shape(block_n, num_warps, num_stages, prefetch, dot, k_cache.element_size())
    v_bs = v_block_size(k_cache, v_cache, meta["BN"])
    if out is None:
        out = torch.empty_like(q)
    scale = scale if scale is not None else d ** -0.5
    launch(
        _paged_decode_kernel, (bsz, num_heads),
        q, k_cache, v_cache, block_tables, context_lens, out,
        scale, block_size, num_heads // num_kv_heads,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        D=d, V_BS=v_bs, **meta,
    )
    return out


def paged_decode_rope_attention(
    qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    block_tables: torch.Tensor, context_lens: torch.Tensor, num_heads: int,
    scale: float | None = None, max_context: int = 0,
    block_n: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
    prefetch: bool | None = None, splits: int | None = None, dot: bool | None = None,
) -> torch.Tensor:
    """rope_and_cache then paged_decode_attention in one launch, for a step where every sequence
    computes one token: qkv [B, (H + 2 KVH) D] laid out [q | k | v], positions / slot_mapping [B]
    of the new token, cos / sin fp32 [max_pos, D/2], context_lens [B] counting the new token
    (each ≥ 1) → [B, H, D]; the new token's K/V land in their cache slots as rope_and_cache writes
    them. max_context: the batch's longest context, needed only under TRITON_INTERPRET; block_n /
    num_warps / num_stages as paged_decode_attention. splits: runs each sequence's cache is split
    into (default decode_splits); above 1 the partials are merged by a second launch."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    _, block_size, num_kv_heads, d = k_cache.shape
    bsz = qkv.shape[0]
    if (qkv.shape[1] != (num_heads + 2 * num_kv_heads) * d or d & (d - 1) or num_heads % num_kv_heads
            or qkv.stride(1) != 1):
        raise ValueError(f"bad shapes qkv {tuple(qkv.shape)} for {num_heads} heads, cache {tuple(k_cache.shape)}")
    if k_cache.stride(3) != 1 or k_cache.stride(0) != block_size * k_cache.stride(1):
        raise ValueError("the k cache needs a contiguous head_dim and slot = block * block_size + offset")
    meta = _launch_shape(block_n, num_warps, num_stages, prefetch, dot, k_cache.element_size())
    v_bs = v_block_size(k_cache, v_cache, meta["BN"])
    if _INTERPRET and max_context <= 0:
        raise ValueError("under TRITON_INTERPRET pass max_context (the batch's longest context)")
    splits = splits if splits is not None else decode_splits(bsz, num_heads, qkv.device)
    if splits < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    out = torch.empty(bsz, num_heads, d, dtype=qkv.dtype, device=qkv.device)
    # split: per (sequence, head, run) the unnormalised acc [D], max and sum in fp32
    part = (torch.empty(bsz * num_heads * splits * (d + 2), dtype=torch.float32, device=qkv.device)
            if splits > 1 else out)
    scale = scale if scale is not None else d ** -0.5
    launch(
        _paged_decode_rope_kernel, (bsz, num_heads, splits),
        qkv, positions, cos, sin, slot_mapping, k_cache, v_cache, block_tables, context_lens, out, part,
        scale, block_size, num_heads, num_kv_heads, num_heads // num_kv_heads,
        qkv.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        D=d, STEP_STOP=max_context if _INTERPRET else 0, SPLIT=splits > 1, V_BS=v_bs, **meta,
    )
    if splits > 1:
        launch(_split_combine_kernel, (bsz, num_heads), part, out, splits, out.stride(0), out.stride(1),
               D=d, SP=next_pow2(splits), num_warps=4)
    return out


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """A sequence's first `length` cached tokens as [length, KVH, D] (for references and prefill)."""
    block_size = cache.shape[1]
    t = torch.arange(length, device=cache.device)
    return cache[block_table[t // block_size].long(), t % block_size]


def paged_decode_reference(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float | None = None,
) -> torch.Tensor:
    """float32 reference of paged_decode_attention (any device)."""
    bsz, num_heads, d = q.shape
    scale = scale if scale is not None else d ** -0.5
    outs = []
    for b in range(bsz):
        n = int(context_lens[b])
        k = gather_kv(k_cache, block_tables[b], n).float()  # [n, KVH, D]
        v = gather_kv(v_cache, block_tables[b], n).float()
        rep = num_heads // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        p = torch.softmax(torch.einsum("hd,nhd->hn", q[b].float() * scale, k), dim=-1)
        outs.append(torch.einsum("hn,nhd->hd", p, v))
    return torch.stack(outs)


def prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: list[int], scale: float | None = None
) -> torch.Tensor:
    """Causal attention over packed variable-length prompts (torch SDPA, one call per sequence).

    q [T, H, D], k/v [T, KVH, D], cu_seqlens = [0, len0, len0+len1, ...] → [T, H, D].
    """
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    rep = num_heads // num_kv_heads
    out = torch.empty_like(q)
    for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        qs = q[start:end].transpose(0, 1)  # [H, n, D]
        ks = k[start:end].transpose(0, 1).repeat_interleave(rep, dim=0)
        vs = v[start:end].transpose(0, 1).repeat_interleave(rep, dim=0)
        o = F.scaled_dot_product_attention(qs[None], ks[None], vs[None], is_causal=True, scale=scale)
        out[start:end] = o[0].transpose(0, 1)
    return out


if triton is not None:

    @triton.jit
    def _paged_varlen_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, bt_ptr, q_start_ptr, q_len_ptr, ctx_ptr, tile_seq_ptr, tile_m_ptr,
        scale_log2, block_size, q_per_kv,
        stride_qt, stride_qh, stride_cb, stride_ct, stride_ch, stride_btb, stride_ot, stride_oh,
        D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, STEP_STOP: tl.constexpr,
        PDL: tl.constexpr = False, V_BS: tl.constexpr = 0,
    ):
        pdl_enter(PDL)  # first: nothing is read or written before the previous grid ends
        tile = tl.program_id(0)
        h = tl.program_id(1)
        kvh = h // q_per_kv
        s = tl.load(tile_seq_ptr + tile)
        m0 = tl.load(tile_m_ptr + tile)
        q_start = tl.load(q_start_ptr + s)
        n = tl.load(q_len_ptr + s)
        ctx = tl.load(ctx_ptr + s)
        offs_m = m0 + tl.arange(0, BM)
        offs_d = tl.arange(0, D)
        row_ok = offs_m < n
        rows = (q_start + offs_m).to(tl.int64)
        q = tl.load(q_ptr + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0)                        # [BM, D]
        # Query m sits at position ctx - n + m and sees keys 0..that position. Padding rows
        # (m >= n) sit past ctx - 1 and see every key: no row is ever fully masked (no NaN).
        pos = ctx - n + offs_m
        m_i = tl.full((BM,), float("-inf"), tl.float32)
        l_i = tl.zeros((BM,), dtype=tl.float32)
        acc = tl.zeros((BM, D), dtype=tl.float32)
        hi = ctx - n + m0 + BM   # one past the last key this tile can see
        if hi > ctx:
            hi = ctx
        # Triton's interpreter cannot take a loaded or passed value as a range bound: there the
        # loop runs to the step's longest context (STEP_STOP, a constant; 0 when compiled), and
        # blocks past `hi` are fully masked (p = 0, alpha = 1).
        for t0 in range(0, STEP_STOP if STEP_STOP > 0 else hi, BN):
            t, tmask, kv_off = _kv_tile(bt_ptr + s * stride_btb, t0, 0, hi, block_size, stride_cb, stride_ct,
                                        kvh * stride_ch, offs_d, BN)
            k = tl.load(k_ptr + kv_off, mask=tmask[:, None], other=0.0).to(q_ptr.dtype.element_ty)  # [BN, D]
            qk = tl.dot(q, tl.trans(k)) * scale_log2                        # [BM, BN] fp32
            qk = tl.where((t[None, :] <= pos[:, None]) & tmask[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, axis=1))
            p = tl.exp2(qk - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if V_BS > 0:
                v = _v_tile_token_major(v_ptr, bt_ptr + s * stride_btb, t0, hi, stride_cb, kvh * (D * V_BS), offs_d,
                                        tmask, q_ptr.dtype.element_ty, D, BN, V_BS)
            else:
                v = tl.load(v_ptr + kv_off, mask=tmask[:, None], other=0.0).to(q_ptr.dtype.element_ty)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(out_ptr + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


VARLEN_BLOCK_M = 64   # query rows per program (a tile never spans two sequences)
VARLEN_BLOCK_N = 64   # cached tokens per loop iteration


@dataclass(frozen=True)
class VarlenBatch:
    """Device metadata of one varlen attention launch, built once per step, read by every layer.

    Sequence i owns query rows [q_starts[i], q_starts[i] + q_lens[i]) of the step's token axis
    and attends causally over its first ctx_lens[i] cached tokens (its queries are the last
    q_lens[i] of them); block_tables [B, max_blocks] padded with block 0. Each program takes one
    tile of VARLEN_BLOCK_M rows of one sequence: tile_seq / tile_m = its sequence and first row.
    Index tensors may be int32 or int64 (views of one packed host→device copy).
    """

    q_starts: torch.Tensor
    q_lens: torch.Tensor
    ctx_lens: torch.Tensor
    block_tables: torch.Tensor
    tile_seq: torch.Tensor
    tile_m: torch.Tensor
    max_ctx: int              # longest context of the step (host int)

    @staticmethod
    def host_layout(q_starts: list[int], q_lens: list[int], ctx_lens: list[int],
                    block_tables: list[list[int]]) -> tuple[list[int], tuple[int, ...]]:
        """Flat int list [q_starts, q_lens, ctx_lens, tables (padded), tile_seq, tile_m] and
        (B, max_blocks, num_tiles, max_ctx), for `from_flat` after one copy to the device."""
        num = len(q_lens)
        max_nb = max(len(t) for t in block_tables)
        flat = list(q_starts) + list(q_lens) + list(ctx_lens)
        for t in block_tables:
            flat.extend(t)
            flat.extend([0] * (max_nb - len(t)))
        tile_seq, tile_m = [], []
        for i, n in enumerate(q_lens):
            for m0 in range(0, n, VARLEN_BLOCK_M):
                tile_seq.append(i)
                tile_m.append(m0)
        return flat + tile_seq + tile_m, (num, max_nb, len(tile_seq), max(ctx_lens))

    @classmethod
    def from_flat(cls, flat: torch.Tensor, dims: tuple[int, ...]) -> VarlenBatch:
        num, max_nb, num_tiles, max_ctx = dims
        parts = flat.split([num, num, num, num * max_nb, num_tiles, num_tiles])
        return cls(q_starts=parts[0], q_lens=parts[1], ctx_lens=parts[2],
                   block_tables=parts[3].view(num, max_nb), tile_seq=parts[4], tile_m=parts[5],
                   max_ctx=max_ctx)

    @classmethod
    def build(cls, q_starts: list[int], q_lens: list[int], ctx_lens: list[int],
              block_tables: list[list[int]], device: torch.device | str) -> VarlenBatch:
        flat, dims = cls.host_layout(q_starts, q_lens, ctx_lens, block_tables)
        return cls.from_flat(torch.tensor(flat, dtype=torch.int32).to(device), dims)


def paged_varlen_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: VarlenBatch,
    scale: float | None = None, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of every sequence's new queries over its paged KV, one launch for all.

    q [T, H, D] (fp16/bf16, the K/V of the new tokens already in the caches) → [T, H, D]; rows of
    q that no sequence owns are left untouched in `out`. Prefill, recompute (queries after a
    cached prefix) and decode (one query) rows can share a launch. fp32 accumulation, online
    softmax; GQA maps query head h to KV head h // (H // KVH).
    """
    if triton is None:
        raise RuntimeError("triton is not installed")
    num_heads, d = q.shape[1], q.shape[2]
    _, block_size, num_kv_heads, dc = k_cache.shape
    if dc != d or d & (d - 1) or d < 16 or num_heads % num_kv_heads:
        raise ValueError(f"bad shapes q {tuple(q.shape)}, cache {tuple(k_cache.shape)}")
    if k_cache.stride(3) != 1 or q.stride(2) != 1:
        raise ValueError("q and the k cache need a contiguous head_dim")
    v_bs = v_block_size(k_cache, v_cache, VARLEN_BLOCK_N)
    if out is None:
        out = torch.empty_like(q)
    scale = scale if scale is not None else d ** -0.5
    num_tiles = batch.tile_seq.shape[0]
    if num_tiles == 0:
        return out
    launch(
        _paged_varlen_kernel, (num_tiles, num_heads),
        q, k_cache, v_cache, out, batch.block_tables, batch.q_starts, batch.q_lens,
        batch.ctx_lens, batch.tile_seq, batch.tile_m,
        scale * 1.4426950408889634, block_size, num_heads // num_kv_heads,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        batch.block_tables.stride(0), out.stride(0), out.stride(1),
        D=d, BM=VARLEN_BLOCK_M, BN=VARLEN_BLOCK_N, STEP_STOP=batch.max_ctx if _INTERPRET else 0, V_BS=v_bs,
        num_warps=4, num_stages=2,
    )
    return out


def paged_varlen_reference(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, q_starts: list[int],
    q_lens: list[int], ctx_lens: list[int], block_tables: list[list[int]],
    scale: float | None = None,
) -> torch.Tensor:
    """float32 reference of paged_varlen_attention (any device); unowned rows come back 0."""
    num_heads, d = q.shape[1], q.shape[2]
    scale = scale if scale is not None else d ** -0.5
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for start, n, ctx, table in zip(q_starts, q_lens, ctx_lens, block_tables, strict=True):
        bt = torch.tensor(table, device=q.device)
        k = gather_kv(k_cache, bt, ctx).float()                  # [ctx, KVH, D]
        v = gather_kv(v_cache, bt, ctx).float()
        rep = num_heads // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        s = torch.einsum("nhd,khd->hnk", q[start:start + n].float() * scale, k)
        allowed = torch.ones(n, ctx, dtype=torch.bool, device=q.device).tril(ctx - n)
        p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
        out[start:start + n] = torch.einsum("hnk,khd->nhd", p, v)
    return out
