"""GPTQ v1 4-bit checkpoint layout: pack (for tests/benchmarks), unpack, reference dequant, kernel repack.

GPTQ v1 tensors of one linear with K inputs, N outputs and group size G:
  qweight int32 [K/8, N]   8 4-bit values along K; value j of row i is k = 8i + j at bits 4j
  qzeros  int32 [K/G, N/8] 8 4-bit zeros along N; v1 stores zero - 1 (so the zero is stored + 1)
  scales  fp16  [K/G, N]
  g_idx   int32 [K]        group of each input row (a permutation of groups under act-order)
Dequantized weight: W[k, n] = (q[k, n] - zero[g_idx[k], n]) * scale[g_idx[k], n], y = x @ W.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# The kernel consumes K in blocks of this many rows: 16 packed int32 rows, each holding one
# value from each of 8 contiguous 16-row slices of the block (see repack_for_kernel).
KERNEL_K_BLOCK = 128
# Column tiles of the kernel layout: one [16, 128] int32 tile (8 KB) is contiguous in memory, so a
# program streams whole DRAM pages instead of 128-512 B pieces of rows N*4 bytes apart.
KERNEL_N_TILE = 128


@dataclass(frozen=True)
class GptqTensors:
    """The four GPTQ v1 tensors of one linear layer (see module docstring for shapes)."""

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    group_size: int

    @property
    def in_features(self) -> int:
        return self.qweight.shape[0] * 8

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]


@dataclass(frozen=True)
class KernelWeights:
    """Weights repacked for the Triton kernel.

    qweight int32 [ceil(N/128), K/8, 128]: column tile t holds columns 128t..128t+127 (zero padded);
    per 128-row K block b, packed row 16b + i holds at bits 4j the value of k = 128b + 16j + i
    (after the act-order permutation), so the 8 nibbles of a [16, 128] tile pair with 8 contiguous
    16-wide slices of x. zeros/scales fp16 [K/G, N] (zeros unpacked, exact ints).
    perm int64 [K] or None: x must be gathered as x[:, perm] (act-order checkpoints only).
    """

    qweight: torch.Tensor
    zeros: torch.Tensor
    scales: torch.Tensor
    perm: torch.Tensor | None
    group_size: int

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1] * 8

    @property
    def out_features(self) -> int:
        return self.scales.shape[1]


def _to_int32_wrapped(x: torch.Tensor) -> torch.Tensor:
    """int64 holding a 32-bit pattern → int32 with the same bits (nibble 7 can set the sign bit)."""
    x = x & 0xFFFFFFFF
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def unpack_along_rows(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C] with 8 nibbles per value along rows → int64 [8R, C] (row 8r + j = nibble j)."""
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int64)
    vals = (packed.to(torch.int64)[:, None, :] >> shifts[None, :, None]) & 0xF
    return vals.reshape(packed.shape[0] * 8, packed.shape[1])


def unpack_along_cols(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C] with 8 nibbles per value along columns → int64 [R, 8C]."""
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int64)
    vals = (packed.to(torch.int64)[:, :, None] >> shifts[None, None, :]) & 0xF
    return vals.reshape(packed.shape[0], packed.shape[1] * 8)


def _pack_rows(vals: torch.Tensor) -> torch.Tensor:
    """int64 [8R, C] of nibbles → int32 [R, C] (row 8r + j at bits 4j)."""
    r8, c = vals.shape
    shifts = torch.arange(0, 32, 4, device=vals.device, dtype=torch.int64)
    packed = (vals.reshape(r8 // 8, 8, c) << shifts[None, :, None]).sum(dim=1)
    return _to_int32_wrapped(packed)


def _pack_cols(vals: torch.Tensor) -> torch.Tensor:
    """int64 [R, 8C] of nibbles → int32 [R, C]."""
    r, c8 = vals.shape
    shifts = torch.arange(0, 32, 4, device=vals.device, dtype=torch.int64)
    packed = (vals.reshape(r, c8 // 8, 8) << shifts[None, None, :]).sum(dim=2)
    return _to_int32_wrapped(packed)


def quantize_gptq_v1(
    w: torch.Tensor, group_size: int = 128, act_order_perm: torch.Tensor | None = None
) -> GptqTensors:
    """Round-to-nearest asymmetric 4-bit quantization of w [K, N] into the GPTQ v1 layout.

    For tests and benchmarks (the real GPTQ lives in services/quantizer). With act_order_perm,
    groups are formed over rows in that order, as GPTQ's act-order does, giving a scrambled g_idx.
    """
    k, n = w.shape
    if k % group_size or k % 8 or n % 8:
        raise ValueError(f"shape {tuple(w.shape)} not divisible by group {group_size} / 8")
    w = w.float()
    perm = act_order_perm if act_order_perm is not None else torch.arange(k, device=w.device)
    wp = w[perm].reshape(k // group_size, group_size, n)
    lo = wp.amin(dim=1).clamp(max=0.0)
    hi = wp.amax(dim=1).clamp(min=0.0)
    scale = ((hi - lo) / 15.0).clamp(min=1e-8)
    # v1 stores zero - 1, so a zero of 0 would wrap to 16 on reading: keep zeros in [1, 15].
    zero = torch.round(-lo / scale).clamp(1, 15)
    q = torch.clamp(torch.round(wp / scale[:, None, :]) + zero[:, None, :], 0, 15).to(torch.int64)
    q_orig = torch.empty(k, n, dtype=torch.int64, device=w.device)
    q_orig[perm] = q.reshape(k, n)
    g_idx = torch.empty(k, dtype=torch.int32, device=w.device)
    g_idx[perm] = (torch.arange(k, device=w.device) // group_size).to(torch.int32)
    return GptqTensors(
        qweight=_pack_rows(q_orig),
        qzeros=_pack_cols(zero.to(torch.int64) - 1),
        scales=scale.to(torch.float16),
        g_idx=g_idx,
        group_size=group_size,
    )


def zeros_of(t: GptqTensors) -> torch.Tensor:
    """Unpacked zero points [K/G, N] as int64 (v1: stored + 1)."""
    return unpack_along_cols(t.qzeros) + 1


def dequantize_reference(t: GptqTensors) -> torch.Tensor:
    """float32 W [K, N] exactly as the checkpoint defines it (the reference for kernel tests)."""
    q = unpack_along_rows(t.qweight).float()
    g = t.g_idx.long()
    z = zeros_of(t).float()
    return (q - z[g]) * t.scales.float()[g]


def repack_for_kernel(t: GptqTensors) -> KernelWeights:
    """Reorder a GPTQ v1 layer for the Triton kernel (see KernelWeights); done once at load time.

    Act-order checkpoints are made contiguous by sorting rows by g_idx (x is gathered with the
    same permutation at run time), which needs every group to hold exactly group_size rows.
    """
    return repack_codes(t.qweight, zeros_of(t), t.scales, t.g_idx, t.group_size)


def repack_codes(qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
                 g_idx: torch.Tensor, g: int) -> KernelWeights:
    """repack_for_kernel from row-packed codes [K/8, N] and already unpacked zeros [K/G, N]."""
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    if k % KERNEL_K_BLOCK or g % KERNEL_K_BLOCK:
        raise ValueError(f"kernel needs K ({k}) and group size ({g}) to be multiples of {KERNEL_K_BLOCK}")
    if g_idx.shape != (k,):
        raise ValueError(f"g_idx must have shape ({k},), got {tuple(g_idx.shape)}")
    g_idx = g_idx.long()
    perm = torch.argsort(g_idx, stable=True)
    if not torch.equal(g_idx[perm], torch.arange(k, device=g_idx.device) // g):
        raise ValueError("g_idx groups are not all of group_size rows; cannot repack")
    q = unpack_along_rows(qweight)
    if torch.equal(perm, torch.arange(k, device=perm.device)):
        perm_out = None
    else:
        q = q[perm]
        perm_out = perm
    # [b, j, i, n] → packed row (b, i) holds nibble j = q[128b + 16j + i]
    blocks = q.reshape(k // KERNEL_K_BLOCK, 8, KERNEL_K_BLOCK // 8, n).permute(0, 2, 1, 3)
    shifts = torch.arange(0, 32, 4, device=q.device, dtype=torch.int64)
    packed = (blocks << shifts[None, None, :, None]).sum(dim=2).reshape(k // 8, n)
    n_pad = -(-n // KERNEL_N_TILE) * KERNEL_N_TILE
    packed = torch.nn.functional.pad(packed, (0, n_pad - n))
    tiled = packed.reshape(k // 8, n_pad // KERNEL_N_TILE, KERNEL_N_TILE).permute(1, 0, 2)
    return KernelWeights(
        qweight=_to_int32_wrapped(tiled).contiguous(),
        zeros=zeros.to(torch.float16).contiguous(),
        scales=scales.to(torch.float16).contiguous(),
        perm=perm_out,
        group_size=g,
    )


def rtn_kernel_weights(weight: torch.Tensor, group_size: int) -> KernelWeights:
    """Round-to-nearest 4-bit of an nn.Linear weight [N, K] straight into the kernel layout.

    Used when a model is served 4-bit without a GPTQ checkpoint (random-weight benchmarks);
    runs wherever the weight lives (a 4096×11008 layer takes milliseconds on a GPU).
    """
    return repack_for_kernel(quantize_gptq_v1(weight.t(), group_size))


def _untile(kw: KernelWeights) -> torch.Tensor:
    """Packed codes [K/8, N] (kernel nibble order, no column padding) of repacked weights."""
    k, n = kw.in_features, kw.out_features
    return kw.qweight.permute(1, 0, 2).reshape(k // 8, -1)[:, :n]


def _tile(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of _untile: [K/8, N] int32 → [ceil(N/128), K/8, 128] column tiles, zero padded."""
    k8, n = packed.shape
    n_pad = -(-n // KERNEL_N_TILE) * KERNEL_N_TILE
    out = torch.zeros(k8, n_pad, dtype=packed.dtype, device=packed.device)
    out[:, :n] = packed
    return out.reshape(k8, n_pad // KERNEL_N_TILE, KERNEL_N_TILE).permute(1, 0, 2).contiguous()


def concat_kernel_weights(parts: list[KernelWeights]) -> KernelWeights:
    """Several layers with the same input, side by side along N (q|k|v, gate|up): one GEMM."""
    first = parts[0]
    for p in parts:
        if (p.in_features, p.group_size) != (first.in_features, first.group_size) or p.perm is not None:
            raise ValueError("only layers of equal K and group size without act-order fuse")
    return KernelWeights(qweight=_tile(torch.cat([_untile(p) for p in parts], dim=1)),
                         zeros=torch.cat([p.zeros for p in parts], dim=1).contiguous(),
                         scales=torch.cat([p.scales for p in parts], dim=1).contiguous(),
                         perm=None, group_size=first.group_size)


def slice_kernel_weights(kw: KernelWeights, start: int, end: int) -> KernelWeights:
    """Output columns [start, end) of repacked weights as a layer of their own (a copy)."""
    return KernelWeights(qweight=_tile(_untile(kw)[:, start:end]),
                         zeros=kw.zeros[:, start:end].contiguous(),
                         scales=kw.scales[:, start:end].contiguous(),
                         perm=kw.perm, group_size=kw.group_size)


def write_kernel_weights(dst: KernelWeights, src: KernelWeights, start: int) -> None:
    """Overwrite dst's columns [start, start + src N) with src, in place (CUDA graphs stay valid)."""
    end = start + src.out_features
    if (src.in_features, src.group_size) != (dst.in_features, dst.group_size) or end > dst.out_features:
        raise ValueError("weights do not fit the destination columns")
    if src.perm is not None or dst.perm is not None:
        if start or end != dst.out_features or src.perm is None or dst.perm is None \
                or not torch.equal(src.perm.to(dst.perm.device), dst.perm):
            raise ValueError("act-order weights can only replace a layer of the same permutation")
    packed = _untile(dst).clone()
    packed[:, start:end] = _untile(src).to(packed.device)
    dst.qweight.copy_(_tile(packed))
    dst.zeros[:, start:end].copy_(src.zeros)
    dst.scales[:, start:end].copy_(src.scales)


def dequantize_kernel_weights(kw: KernelWeights) -> torch.Tensor:
    """float32 W [K, N] in the original row order from repacked weights (the CPU fallback path)."""
    k, n = kw.in_features, kw.out_features
    packed = kw.qweight.to(torch.int64).permute(1, 0, 2).reshape(k // 8, -1)[:, :n]
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int64)
    blocks = (packed.reshape(k // KERNEL_K_BLOCK, KERNEL_K_BLOCK // 8, 1, n) >> shifts[None, None, :, None]) & 0xF
    q = blocks.permute(0, 2, 1, 3).reshape(k, n).float()
    grp = torch.arange(k, device=packed.device) // kw.group_size
    w = (q - kw.zeros.float()[grp]) * kw.scales.float()[grp]
    if kw.perm is not None:
        out = torch.empty_like(w)
        out[kw.perm] = w
        w = out
    return w
