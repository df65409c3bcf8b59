"""Small fused Triton ops of a Llama decoder step: add+RMSNorm, SiLU·mul, RoPE + KV-cache write.

At decode batch sizes each op is a few microseconds; fusing keeps the launch count per layer
near the number of GEMMs, which is what lets a CUDA-graphed step approach the bandwidth floor.
Each op has a torch reference below it for tests and CPU use.
"""
from __future__ import annotations

import torch

from services.engine.kernels.attention import v_block_size
from services.engine.kernels.launch import cdiv, launch, next_pow2

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
    tl = None


if triton is not None:
    from services.engine.kernels.attention import to_kv_cache, v_slot_offsets
    from services.engine.kernels.pdl import pdl_enter

    @triton.jit
    def _add_rmsnorm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, H, eps, zero_ptr, ZN,
                            HAS_RES: tl.constexpr, BLOCK: tl.constexpr, WRITE_RES: tl.constexpr = True,
                            ZERO: tl.constexpr = False, ZBLOCK: tl.constexpr = 1024, PDL: tl.constexpr = False):
        """One row: out = rmsnorm(x + res) * w (res_out = x + res when WRITE_RES); with ZERO it also
        zeroes row `row` of zero_ptr [T, ZN] (the next GEMM's split-K output: no launch of its own)."""
        pdl_enter(PDL)  # first: nothing is read or written before the previous grid ends
        row = tl.program_id(0)
        if ZERO:
            zoffs = tl.arange(0, ZBLOCK)
            for z0 in range(0, ZN, ZBLOCK):
                tl.store(zero_ptr + row * ZN + z0 + zoffs, tl.zeros((ZBLOCK,), dtype=zero_ptr.dtype.element_ty),
                         mask=z0 + zoffs < ZN)
        offs = tl.arange(0, BLOCK)
        mask = offs < H
        x = tl.load(x_ptr + row * H + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            x += tl.load(res_ptr + row * H + offs, mask=mask, other=0.0).to(tl.float32)
        if WRITE_RES:
            tl.store(res_out_ptr + row * H + offs, x.to(res_out_ptr.dtype.element_ty), mask=mask)
        inv = tl.rsqrt(tl.sum(x * x, axis=0) / H + eps)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * H + offs, (x * inv * w).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_mul_kernel(gu_ptr, out_ptr, inter, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
        pdl_enter(PDL)  # first: nothing is read or written before the previous grid ends
        row = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < inter
        g = tl.load(gu_ptr + row * 2 * inter + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + row * 2 * inter + inter + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * inter + offs, (g / (1.0 + tl.exp(-g)) * u).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_cache_kernel(qkv_ptr, pos_ptr, cos_ptr, sin_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                           num_heads, num_kv_heads, stride_qkv, stride_cslot, stride_ch,
                           HALF: tl.constexpr, PDL: tl.constexpr = False, V_BS: tl.constexpr = 0):
        pdl_enter(PDL)  # first: nothing is read or written before the previous grid ends
        t = tl.program_id(0)
        h = tl.program_id(1)  # 0..H-1: query heads, H..H+KVH-1: key/value heads
        offs = tl.arange(0, HALF)
        pos = tl.load(pos_ptr + t)
        cos = tl.load(cos_ptr + pos * HALF + offs)
        sin = tl.load(sin_ptr + pos * HALF + offs)
        base = qkv_ptr + t * stride_qkv + h * 2 * HALF
        x1 = tl.load(base + offs).to(tl.float32)
        x2 = tl.load(base + HALF + offs).to(tl.float32)
        r1 = x1 * cos - x2 * sin
        r2 = x2 * cos + x1 * sin
        if h < num_heads:
            q_dst = q_out_ptr + (t * num_heads + h) * 2 * HALF
            tl.store(q_dst + offs, r1.to(q_out_ptr.dtype.element_ty))
            tl.store(q_dst + HALF + offs, r2.to(q_out_ptr.dtype.element_ty))
        else:
            kvh = h - num_heads
            slot = tl.load(slot_ptr + t).to(tl.int64)
            k_dst = k_cache_ptr + slot * stride_cslot + kvh * stride_ch
            tl.store(k_dst + offs, to_kv_cache(r1, k_cache_ptr))
            tl.store(k_dst + HALF + offs, to_kv_cache(r2, k_cache_ptr))
            vsrc = qkv_ptr + t * stride_qkv + (num_heads + num_kv_heads + kvh) * 2 * HALF
            v1 = tl.load(vsrc + offs)
            v2 = tl.load(vsrc + HALF + offs)
            tl.store(v_cache_ptr + v_slot_offsets(slot, kvh, offs, stride_cslot, stride_ch, 2 * HALF, V_BS),
                     to_kv_cache(v1, v_cache_ptr))
            tl.store(v_cache_ptr + v_slot_offsets(slot, kvh, HALF + offs, stride_cslot, stride_ch, 2 * HALF, V_BS),
                     to_kv_cache(v2, v_cache_ptr))


def add_rmsnorm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
    zero: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(x + residual) * weight, x + residual) for x [T, H]; residual None means 0.
    zero: a contiguous [T, N] tensor the same launch fills with zeros (see _zero_args)."""
    t, h = x.shape
    out = torch.empty_like(x)
    res_out = torch.empty_like(x)
    launch(_add_rmsnorm_kernel, (t,), x, residual if residual is not None else x, weight, out, res_out, h, eps,
           *_zero_args(zero, t, out), HAS_RES=residual is not None, BLOCK=next_pow2(h), ZERO=zero is not None,
           num_warps=8)
    return out, res_out


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, zero: torch.Tensor | None = None) -> torch.Tensor:
    """rmsnorm(x) * weight for a contiguous x [T, H] (add_rmsnorm without the residual); zero as there."""
    t, h = x.shape
    out = torch.empty_like(x)
    launch(_add_rmsnorm_kernel, (t,), x, x, weight, out, out, h, eps, *_zero_args(zero, t, out),
           HAS_RES=False, BLOCK=next_pow2(h), WRITE_RES=False, ZERO=zero is not None, num_warps=8)
    return out


def _zero_args(zero: torch.Tensor | None, t: int, placeholder: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(pointer, row width) of the tensor a norm launch also zeroes (a placeholder when None)."""
    if zero is None:
        return placeholder, 0
    if zero.dim() != 2 or zero.shape[0] != t or not zero.is_contiguous():
        raise ValueError(f"zero must be a contiguous [{t}, N] tensor, got {tuple(zero.shape)}")
    return zero, zero.shape[1]


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [T, 2I] laid out [gate | up] → [T, I]."""
    t, two_i = gate_up.shape
    inter = two_i // 2
    out = torch.empty(t, inter, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    launch(_silu_mul_kernel, (t, cdiv(inter, block)), gate_up, out, inter, BLOCK=block, num_warps=4)
    return out


def rope_and_cache(
    qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    num_heads: int, num_kv_heads: int,
) -> torch.Tensor:
    """Rotate q and k (NeoX/HF-Llama halves), write k and v to the cache slots; return q [T, H, D].

    qkv [T, (H + 2 KVH) * D] laid out [q | k | v]; cos/sin fp32 [max_pos, D/2];
    slot_mapping [T] = block * block_size + offset; caches [num_blocks, block_size, KVH, D], in
    qkv's dtype or fp8 (k and v clamped to ±448 and rounded, as attention.to_kv_cache stores them);
    v_cache may be token-major within blocks (attention.token_major_v).
    """
    t = qkv.shape[0]
    d = k_cache.shape[-1]
    q = torch.empty(t, num_heads, d, dtype=qkv.dtype, device=qkv.device)
    launch(
        _rope_cache_kernel, (t, num_heads + num_kv_heads),
        qkv, positions, cos, sin, q, k_cache, v_cache, slot_mapping,
        num_heads, num_kv_heads, qkv.stride(0), k_cache.stride(1), k_cache.stride(2),
        HALF=d // 2, V_BS=v_block_size(k_cache, v_cache), num_warps=1,
    )
    return q


def rope_tables(max_positions: int, head_dim: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin fp32 [max_positions, head_dim/2] for HF-Llama rotary embeddings."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    ang = torch.arange(max_positions, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return ang.cos(), ang.sin()


def add_rmsnorm_reference(x, weight, eps, residual=None):
    h = x.float() + (residual.float() if residual is not None else 0.0)
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.float()), h


def rope_reference(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] rotated in float32."""
    half = x.shape[-1] // 2
    c, s = cos[positions][:, None, :], sin[positions][:, None, :]
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
