"""Paged attention over per-layer KV block tensors, with plain torch ops (SDPA).

Layout: k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim]. A token at
position p of a sequence lives in slot block_table[p // block_size] * block_size + p % block_size.
On CUDA (the GPU fast path) `paged_attention_cuda` runs Triton kernels: one varlen launch per
layer for a step with any prefill, the paged decode kernel for pure-decode steps.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from services.engine.kernels.attention import VarlenBatch


@dataclass
class AttentionMetadata:
    """Per-step batch layout, built once by the model runner and shared by all layers.

    Tokens of all sequences are flattened into one [T] axis, sequence i owning
    [query_starts[i], query_starts[i+1]). Sequences computing one token (decode)
    are attended together; the rest (prefill/recompute) one by one.
    """

    slot_mapping: torch.Tensor          # [T] long: KV slot of each new token
    query_starts: list[int]             # [B+1] offsets into the token axis
    context_lens: list[int]             # [B] tokens of KV each sequence attends to (incl. new)
    prefill_ids: list[int]              # indices of sequences computing > 1 token
    prefill_blocks: list[torch.Tensor]  # per prefill seq: its block ids [nb] long
    decode_token_idx: torch.Tensor | None = None  # [D] token positions of the decode seqs
    decode_blocks: torch.Tensor | None = None     # [D, max_nb] long, padded with block 0
    decode_mask: torch.Tensor | None = None       # [D, 1, 1, max_nb*block_size] bool: valid keys
    decode_lens: torch.Tensor | None = None       # [D] int32 context lengths (GPU fast path)
    is_all_decode: bool = False                   # every sequence computes one token
    varlen: VarlenBatch | None = None             # GPU fast path, steps with a prefill: all seqs
    last_token_idx: torch.Tensor | None = None    # [B] long: each sequence's last token (fast path)


FP8_MAX = 448.0   # largest finite float8_e4m3fn (kernels/attention.py clamps to it too)


def is_fp8(cache: torch.Tensor) -> bool:
    return cache.dtype == torch.float8_e4m3fn


def as_cached(x: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """x rounded as `cache` stores it (an fp8 cache: clamped to ±448, then e4m3), in x's dtype."""
    if not is_fp8(cache):
        return x
    return x.clamp(-FP8_MAX, FP8_MAX).to(cache.dtype).to(x.dtype)


def _write(cache: torch.Tensor, slots: torch.Tensor, x: torch.Tensor) -> None:
    """x [T, Hkv, D] into the cache slots (torch has no fp8 index_copy_: those go as bytes)."""
    flat = cache.view(-1, *x.shape[1:])
    if is_fp8(cache):
        flat.view(torch.uint8).index_copy_(0, slots, x.clamp(-FP8_MAX, FP8_MAX).to(cache.dtype).view(torch.uint8))
    else:
        flat.index_copy_(0, slots, x)


def _gather(cache: torch.Tensor, blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """cache [NB, bs, Hkv, D], blocks [..., nb] → [..., nb*bs, Hkv, D] in dtype."""
    g = cache[blocks]
    return g.flatten(-4, -3).to(dtype)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata) -> torch.Tensor:
    """q [T, H, D], k/v [T, Hkv, D] of the new tokens → attention output [T, H, D].

    Writes the new K/V into their slots first, so each query sees its own token. With an fp8 cache
    every key and value is attended as the cache stores it, the new tokens' too.
    """
    num_kv_heads = k.shape[1]
    _write(k_cache, meta.slot_mapping, k)
    _write(v_cache, meta.slot_mapping, v)
    k, v = as_cached(k, k_cache), as_cached(v, v_cache)
    gqa = q.shape[1] != num_kv_heads
    out = torch.empty_like(q)
    for i, blocks in zip(meta.prefill_ids, meta.prefill_blocks):
        start, end = meta.query_starts[i], meta.query_starts[i + 1]
        n, ctx = end - start, meta.context_lens[i]
        qi = q[start:end].transpose(0, 1)                           # [H, n, D]
        if n == ctx:   # nothing cached: the new K/V are the whole context, skip the gather
            o = F.scaled_dot_product_attention(qi, k[start:end].transpose(0, 1),
                                               v[start:end].transpose(0, 1), is_causal=True,
                                               enable_gqa=gqa)
        else:
            keys = _gather(k_cache, blocks, q.dtype)[:ctx].transpose(0, 1)  # [Hkv, ctx, D]
            vals = _gather(v_cache, blocks, q.dtype)[:ctx].transpose(0, 1)
            # Query j sits at position ctx - n + j and may see keys 0..ctx - n + j.
            mask = torch.ones(n, ctx, dtype=torch.bool, device=q.device).tril(ctx - n)
            o = F.scaled_dot_product_attention(qi, keys, vals, attn_mask=mask, enable_gqa=gqa)
        out[start:end] = o.transpose(0, 1)
    if meta.decode_token_idx is not None:
        idx = meta.decode_token_idx
        qd = q[idx][:, :, None, :]                                   # [Dn, H, 1, D]
        keys = _gather(k_cache, meta.decode_blocks, q.dtype).transpose(1, 2)  # [Dn, Hkv, L, D]
        vals = _gather(v_cache, meta.decode_blocks, q.dtype).transpose(1, 2)
        o = F.scaled_dot_product_attention(qd, keys, vals, attn_mask=meta.decode_mask,
                                           enable_gqa=gqa)
        out[idx] = o[:, :, 0, :]
    return out


def paged_attention_cuda(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         meta: AttentionMetadata) -> torch.Tensor:
    """GPU fast path: the new K/V are already in the cache (written by the fused RoPE kernel).

    A pure-decode step goes through the Triton paged decode kernel (CUDA-graph safe); any other
    step through ONE varlen launch for all its sequences (prefill, recompute and decode rows
    alike), reading each sequence's own blocks with no gather and no mask tensor."""
    from services.engine.kernels.attention import paged_decode_attention, paged_varlen_attention
    if meta.is_all_decode:
        return paged_decode_attention(q, k_cache, v_cache, meta.decode_blocks, meta.decode_lens)
    if meta.varlen is None:
        raise ValueError("a step with prefill rows needs meta.varlen on the GPU fast path")
    return paged_varlen_attention(q, k_cache, v_cache, meta.varlen)
