"""Paged attention: Triton decode kernel over block-table KV caches, varlen prefill via torch SDPA.

KV caches are shaped [num_blocks, block_size, num_kv_heads, head_dim]; a sequence's token t lives
in block block_table[t // block_size] at offset t % block_size. Query heads map to KV heads in
contiguous groups (GQA): kv_head = head // (num_heads // num_kv_heads).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs use paged_decode_reference
    triton = None
    tl = None


if triton is not None:

    @triton.jit
    def _paged_decode_kernel(
        q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, out_ptr,
        scale, block_size, q_per_kv,
        stride_qb, stride_qh, stride_cb, stride_ct, stride_ch, stride_btb, stride_ob, stride_oh,
        D: tl.constexpr, BN: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        kvh = h // q_per_kv
        length = tl.load(lens_ptr + b)
        offs_d = tl.arange(0, D)
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_d).to(tl.float32) * scale
        m_i = tl.full((), float("-inf"), tl.float32)
        l_i = tl.full((), 0.0, tl.float32)
        acc = tl.zeros((D,), dtype=tl.float32)
        for t0 in range(0, length, BN):
            t = t0 + tl.arange(0, BN)
            tmask = t < length
            blk = tl.load(bt_ptr + b * stride_btb + t // block_size, mask=tmask, other=0)
            off = blk.to(tl.int64) * stride_cb + (t % block_size) * stride_ct + kvh * stride_ch
            kv_off = off[:, None] + offs_d[None, :]
            k = tl.load(k_ptr + kv_off, mask=tmask[:, None], other=0.0).to(tl.float32)
            scores = tl.sum(k * q[None, :], axis=1)
            scores = tl.where(tmask, scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=0))
            p = tl.exp(scores - m_new)
            alpha = tl.exp(m_i - m_new)
            v = tl.load(v_ptr + kv_off, mask=tmask[:, None], other=0.0).to(tl.float32)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
            m_i = m_new
        out = acc / l_i
        tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query token per sequence: q [B, H, D] over its first context_lens[b] cached tokens → [B, H, D].

    block_tables int32 [B, max_blocks], context_lens int32 [B] (each ≥ 1). Caches are
    [num_blocks, block_size, KVH, D] with the last two dims contiguous.
    """
    if triton is None:
        raise RuntimeError("triton is not installed")
    bsz, num_heads, d = q.shape
    _, block_size, num_kv_heads, dc = k_cache.shape
    if dc != d or d & (d - 1) or num_heads % num_kv_heads:
        raise ValueError(f"bad shapes q {tuple(q.shape)}, cache {tuple(k_cache.shape)}")
    if k_cache.stride(3) != 1 or k_cache.stride() != v_cache.stride():
        raise ValueError("k/v caches must share strides with a contiguous head_dim")
    if out is None:
        out = torch.empty_like(q)
    scale = scale if scale is not None else d ** -0.5
    _paged_decode_kernel[(bsz, num_heads)](
        q, k_cache, v_cache, block_tables, context_lens, out,
        scale, block_size, num_heads // num_kv_heads,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        D=d, BN=64, num_warps=4,
    )
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
