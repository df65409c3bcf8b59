"""GPTQ v1 4-bit checkpoint layout: pack (for tests/benchmarks), unpack, reference dequant, kernel repack.

GPTQ v1 tensors of one linear with K inputs, N outputs and group size G:
  qweight int32 [K/8, N]   8 4-bit values along K; value j of row i is k = 8i + j at bits 4j
  qzeros  int32 [K/G, N/8] 8 4-bit zeros along N; v1 stores zero - 1 (so the zero is stored + 1)
  scales  fp16  [K/G, N]
  g_idx   int32 [K]        group of each input row (a permutation of groups under act-order)
Dequantized weight: W[k, n] = (q[k, n] - zero[g_idx[k], n]) * scale[g_idx[k], n], y = x @ W.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

# The kernel consumes K in blocks of this many rows: 16 packed int32 rows, each holding one
# value from each of 8 contiguous 16-row slices of the block (see repack_for_kernel).
KERNEL_K_BLOCK = 128
# Column tiles of the kernel layout: one [16, 128] int32 tile (8 KB) is contiguous in memory, so a
# program streams whole DRAM pages instead of 128-512 B pieces of rows N*4 bytes apart.
KERNEL_N_TILE = 128
# Columns of one row of the fragment-ordered layout (KernelWeights.frag): an n8 tensor-core tile.
FRAG_COLS = 8


def k_splits(split_k: int, k: int) -> tuple[int, int]:
    """(splits, 128-row blocks per split) that a split-K GEMM asked for split_k splits runs with at
    reduction length k: no empty split, none past the last block."""
    num_blocks = k // KERNEL_K_BLOCK
    per_split = -(-num_blocks // max(1, min(split_k, num_blocks)))
    return -(-num_blocks // per_split), per_split


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
    bits 3 (W3A16): the same tile geometry in two planes, qweight int16 holding the low two bits
    of each code at bits 2j and qweight_hi int8 holding the third bit at bit j (same k ↔ (row, j)
    map as the nibbles), 3 bits per weight with aligned 2- and 1-byte loads; qweight_hi is None at 4.
    frag 2 or 4 (4-bit only): qweight is instead int32 [N/8, K/128, 128], the codes in the order of
    the tensor-core operand fragments with that k_width (pack_fragments, kernels/w4a16_frag.py),
    contiguous or, block-major, a strided view of a [K/128, N/8, 128] buffer (frag_block_major);
    0: the tiled layout above.
    """

    qweight: torch.Tensor
    zeros: torch.Tensor
    scales: torch.Tensor
    perm: torch.Tensor | None
    group_size: int
    qweight_hi: torch.Tensor | None = None
    bits: int = 4
    frag: int = 0

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1] * (KERNEL_K_BLOCK if self.frag else 8)

    @property
    def planes(self) -> tuple[torch.Tensor, ...]:
        """The tiled code planes: (int32 nibbles,) at 4 bits, (int16 low 2 bits, int8 high bit) at 3."""
        return (self.qweight,) if self.bits == 4 else (self.qweight, self.qweight_hi)

    def with_planes(self, planes: tuple[torch.Tensor, ...], zeros: torch.Tensor, scales: torch.Tensor,
                    perm: torch.Tensor | None) -> KernelWeights:
        return KernelWeights(qweight=planes[0], zeros=zeros, scales=scales, perm=perm, group_size=self.group_size,
                             qweight_hi=planes[1] if len(planes) > 1 else None, bits=self.bits, frag=self.frag)

    @property
    def out_features(self) -> int:
        return self.scales.shape[1]


def _to_int32_wrapped(x: torch.Tensor) -> torch.Tensor:
    """int64 holding a 32-bit pattern → int32 with the same bits (nibble 7 can set the sign bit)."""
    return _wrapped(x, torch.int32)


def _wrapped(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int64 holding a bit pattern of dtype's width → dtype with the same bits."""
    width = torch.iinfo(dtype).bits
    x = x & ((1 << width) - 1)
    return torch.where(x >= 2 ** (width - 1), x - 2 ** width, x).to(dtype)


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
    # v1 stores zero - 1, so a zero of 0 would wrap to 16 on reading: keep zeros in [1, 15].
    codes, zero, scale, g_idx = rtn_codes(w, group_size, 4, act_order_perm, min_zero=1)
    return GptqTensors(
        qweight=_pack_rows(codes),
        qzeros=_pack_cols(zero.to(torch.int64) - 1),
        scales=scale,
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
    return repack_values(unpack_along_rows(t.qweight), zeros_of(t), t.scales, t.g_idx, t.group_size, bits=4)


def repack_values(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
                  g_idx: torch.Tensor, g: int, bits: int) -> KernelWeights:
    """Kernel layout of integer codes q [K, N] (original row order) at 3 or 4 bits."""
    k, n = q.shape
    if bits not in (3, 4):
        raise ValueError(f"the kernel layout holds 3- or 4-bit codes, not {bits}")
    if k % KERNEL_K_BLOCK or g % KERNEL_K_BLOCK:
        raise ValueError(f"kernel needs K ({k}) and group size ({g}) to be multiples of {KERNEL_K_BLOCK}")
    if g_idx.shape != (k,):
        raise ValueError(f"g_idx must have shape ({k},), got {tuple(g_idx.shape)}")
    g_idx = g_idx.long()
    perm = torch.argsort(g_idx, stable=True)
    if not torch.equal(g_idx[perm], torch.arange(k, device=g_idx.device) // g):
        raise ValueError("g_idx groups are not all of group_size rows; cannot repack")
    q = q.to(torch.int64)
    if torch.equal(perm, torch.arange(k, device=perm.device)):
        perm_out = None
    else:
        q = q[perm]
        perm_out = perm
    planes = tuple(_tile(p) for p in _pack_planes(q, bits))
    return KernelWeights(
        qweight=planes[0],
        zeros=zeros.to(torch.float16).contiguous(),
        scales=scales.to(torch.float16).contiguous(),
        perm=perm_out,
        group_size=g,
        qweight_hi=planes[1] if bits == 3 else None,
        bits=bits,
    )


def _pack_planes(q: torch.Tensor, bits: int) -> tuple[torch.Tensor, ...]:
    """Codes [K, N] (kernel row order) → packed planes [K/8, N]: field j of packed row (b, i) is
    the code of k = 128b + 16j + i (int32 nibbles at 4 bits; int16 2-bit fields + int8 bits at 3)."""
    k, n = q.shape
    # [b, j, i, n] → [b, i, j, n]
    blocks = q.reshape(k // KERNEL_K_BLOCK, 8, KERNEL_K_BLOCK // 8, n).permute(0, 2, 1, 3)
    j = torch.arange(8, device=q.device, dtype=torch.int64)[None, None, :, None]
    if bits == 4:
        return (_wrapped((blocks << (4 * j)).sum(dim=2).reshape(k // 8, n), torch.int32),)
    lo = ((blocks & 3) << (2 * j)).sum(dim=2).reshape(k // 8, n)
    hi = (((blocks >> 2) & 1) << j).sum(dim=2).reshape(k // 8, n)
    return _wrapped(lo, torch.int16), _wrapped(hi, torch.int8)


def kernel_codes(kw: KernelWeights) -> torch.Tensor:
    """int64 codes [K, N] in the kernel's row order (after kw.perm) of repacked weights."""
    if kw.frag:
        return unpack_fragments(kw.qweight, kw.frag)
    k, n = kw.in_features, kw.out_features
    j = torch.arange(8, device=kw.qweight.device, dtype=torch.int64)[None, None, :, None]

    def fields(plane: torch.Tensor, width: int) -> torch.Tensor:
        packed = plane.permute(1, 0, 2).reshape(k // 8, -1)[:, :n].to(torch.int64)
        vals = (packed.reshape(k // KERNEL_K_BLOCK, KERNEL_K_BLOCK // 8, 1, n) >> (width * j)) & ((1 << width) - 1)
        return vals.permute(0, 2, 1, 3).reshape(k, n)

    if kw.bits == 4:
        return fields(kw.qweight, 4)
    return fields(kw.qweight, 2) | (fields(kw.qweight_hi, 1) << 2)


def _check_k_width(k_width: int) -> None:
    if k_width not in (2, 4):
        raise ValueError(f"fragment k_width must be 2 or 4, got {k_width}")


def pack_fragments(codes: torch.Tensor, k_width: int) -> torch.Tensor:
    """int codes [K, N] (0..15, kernel row order) → fragment-ordered int32 [N/8, K/128, 128]: for
    columns n = 8c + g and 128-row block b, word 4·lane + w (lane = 4g + t) holds at nibble
    j = 4e + 2a + h the code of k = 128b + 32w + 16a + 8h + 2t + e (k_width 2) or
    k = 128b + 32w + 16a + 4t + 2h + e (k_width 4); see kernels/w4a16_frag.py."""
    _check_k_width(k_width)
    k, n = codes.shape
    if k % KERNEL_K_BLOCK or n % FRAG_COLS:
        raise ValueError(f"fragment order needs K % {KERNEL_K_BLOCK} == 0 and N % {FRAG_COLS} == 0, got {k}x{n}")
    nb, c = k // KERNEL_K_BLOCK, n // FRAG_COLS
    if k_width == 2:   # k = 128b + 32w + 16a + 8h + 2t + e  →  [c, b, g, t, w, j = 4e + 2a + h]
        q = codes.to(torch.int64).reshape(nb, 4, 2, 2, 4, 2, c, FRAG_COLS)    # b w a h t e c g
        q = q.permute(6, 0, 7, 4, 1, 5, 2, 3)
    else:              # k = 128b + 32w + 16a + 4t + 2h + e
        q = codes.to(torch.int64).reshape(nb, 4, 2, 4, 2, 2, c, FRAG_COLS)    # b w a t h e c g
        q = q.permute(6, 0, 7, 3, 1, 5, 2, 4)
    words = (q.reshape(c, nb, 128, 8) << (4 * torch.arange(8, device=codes.device))).sum(dim=-1)
    return _wrapped(words, torch.int32)


def unpack_fragments(qf: torch.Tensor, k_width: int) -> torch.Tensor:
    """The inverse of pack_fragments: int64 codes [K, N]."""
    _check_k_width(k_width)
    c, nb = qf.shape[0], qf.shape[1]
    q = (qf.to(torch.int64)[..., None] >> (4 * torch.arange(8, device=qf.device))) & 0xF   # c b (g t w) j
    q = q.reshape(c, nb, 8, 4, 4, 2, 2, 2)          # c b g t w e a h
    order = (1, 4, 6, 7, 3, 5, 0, 2) if k_width == 2 else (1, 4, 6, 3, 7, 5, 0, 2)   # b w a h t e c g / b w a t h e c g
    return q.permute(*order).reshape(nb * KERNEL_K_BLOCK, c * FRAG_COLS)


def frag_block_major(kw: KernelWeights) -> bool:
    """Whether fragment-ordered codes are stored block-major: qweight is then the [N/8, K/128, 128] view
    of a contiguous [K/128, N/8, 128] buffer, so one K block of consecutive 8-column rows is one run
    in memory (the kernels read qweight's strides; every layout operation works on either)."""
    return bool(kw.frag) and kw.qweight.shape[1] > 1 and kw.qweight.stride(1) != KERNEL_K_BLOCK


def to_fragment_order(kw: KernelWeights, k_width: int, block_major: bool = False) -> KernelWeights:
    """4-bit tiled weights with their codes in fragment order (KernelWeights.frag = k_width), row-major
    ([N/8, K/128, 128] contiguous) or block_major (frag_block_major); weights already in that form come
    back as they are. Raises ValueError for 3-bit or N % 8 != 0."""
    if kw.frag == k_width and frag_block_major(kw) == block_major:
        return kw
    if kw.bits != 4:
        raise ValueError("fragment order is 4-bit only")
    qf = kw.qweight if kw.frag == k_width else pack_fragments(kernel_codes(kw), k_width)
    return dataclasses.replace(kw, qweight=_frag_storage(qf, block_major), frag=k_width)


def _frag_storage(qf: torch.Tensor, block_major: bool) -> torch.Tensor:
    """Fragment-ordered codes [N/8, K/128, 128] stored contiguous, or block-major (frag_block_major)."""
    if block_major:
        return qf.transpose(0, 1).contiguous().transpose(0, 1)
    return qf.contiguous()


def to_tiled(kw: KernelWeights) -> KernelWeights:
    """Weights in the tiled layout (KernelWeights.frag = 0); tiled weights come back as they are."""
    if not kw.frag:
        return kw
    return dataclasses.replace(kw, qweight=_tile(_pack_planes(kernel_codes(kw), 4)[0]), frag=0)


def in_layout(kw: KernelWeights, frag: int, block_major: bool = False) -> KernelWeights:
    """kw in the layout of KernelWeights.frag = frag (0: tiled; block_major: a fragment order's storage)."""
    return to_fragment_order(kw, frag, block_major) if frag else to_tiled(kw)


def in_order(kw: KernelWeights, frag: int) -> KernelWeights:
    """kw with its codes in the order of KernelWeights.frag = frag, stored as they come when the order
    already matches (callers that copy or concatenate the codes read either storage)."""
    return kw if kw.frag == frag else in_layout(kw, frag)


def rtn_codes(w: torch.Tensor, group_size: int, bits: int, act_order_perm: torch.Tensor | None = None,
              min_zero: int = 0) -> tuple[torch.Tensor, ...]:
    """Round-to-nearest asymmetric codes of w [K, N]: (codes int64 [K, N], zeros, scales fp16 [K/G, N], g_idx).

    For tests, benchmarks and random-weight serving (quantize_gptq_v1 packs its 4-bit codes into
    the checkpoint layout). Groups are formed over rows in act_order_perm's order when given, as
    GPTQ's act-order does. Zero points are clamped to [min_zero, 2^bits - 1].
    """
    k, n = w.shape
    if k % group_size:
        raise ValueError(f"K={k} is not a multiple of the group size {group_size}")
    maxq = 2 ** bits - 1
    w = w.float()
    perm = act_order_perm if act_order_perm is not None else torch.arange(k, device=w.device)
    wp = w[perm].reshape(k // group_size, group_size, n)
    lo = wp.amin(dim=1).clamp(max=0.0)
    hi = wp.amax(dim=1).clamp(min=0.0)
    scale = ((hi - lo) / maxq).clamp(min=1e-8)
    zero = torch.round(-lo / scale).clamp(min_zero, maxq)
    q = torch.clamp(torch.round(wp / scale[:, None, :]) + zero[:, None, :], 0, maxq).to(torch.int64)
    codes = torch.empty(k, n, dtype=torch.int64, device=w.device)
    codes[perm] = q.reshape(k, n)
    g_idx = torch.empty(k, dtype=torch.int32, device=w.device)
    g_idx[perm] = (torch.arange(k, device=w.device) // group_size).to(torch.int32)
    return codes, zero, scale.to(torch.float16), g_idx


def dequantize_codes(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
                     g_idx: torch.Tensor) -> torch.Tensor:
    """float32 W [K, N] = (code − zero[g]) · scale[g] (the reference for 3-bit kernel tests)."""
    g = g_idx.long()
    return (codes.float() - zeros.float()[g]) * scales.float()[g]


def rtn_kernel_weights(weight: torch.Tensor, group_size: int, bits: int = 4) -> KernelWeights:
    """Round-to-nearest 3- or 4-bit of an nn.Linear weight [N, K] straight into the kernel layout.

    Used when a model is served quantized without a GPTQ checkpoint (random-weight benchmarks);
    runs wherever the weight lives (a 4096×11008 layer takes milliseconds on a GPU).
    """
    if bits == 4:
        return repack_for_kernel(quantize_gptq_v1(weight.t(), group_size))
    codes, zeros, scales, g_idx = rtn_codes(weight.t(), group_size, bits)
    return repack_values(codes, zeros, scales, g_idx, group_size, bits)


def _untile(plane: torch.Tensor, n: int) -> torch.Tensor:
    """Packed plane [K/8, N] (kernel field order, no column padding) of a tiled plane."""
    return plane.permute(1, 0, 2).reshape(plane.shape[1], -1)[:, :n]


def _tile(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of _untile: [K/8, N] → [ceil(N/128), K/8, 128] column tiles, zero padded."""
    k8, n = packed.shape
    n_pad = -(-n // KERNEL_N_TILE) * KERNEL_N_TILE
    out = torch.zeros(k8, n_pad, dtype=packed.dtype, device=packed.device)
    out[:, :n] = packed
    return out.reshape(k8, n_pad // KERNEL_N_TILE, KERNEL_N_TILE).permute(1, 0, 2).contiguous()


def concat_kernel_weights(parts: list[KernelWeights]) -> KernelWeights:
    """Several layers with the same input, side by side along N (q|k|v, gate|up): one GEMM."""
    first = parts[0]
    for p in parts:
        if (p.in_features, p.group_size, p.bits) != (first.in_features, first.group_size, first.bits) \
                or p.perm is not None:
            raise ValueError("only layers of equal K, group size and bits without act-order fuse")
    parts = [in_order(p, first.frag) for p in parts]
    if first.frag:    # rows of 8 columns: the parts' rows one after the other, stored as the first part's
        planes = (_frag_storage(torch.cat([p.qweight for p in parts]), frag_block_major(first)),)
    else:
        planes = tuple(_tile(torch.cat([_untile(p.planes[i], p.out_features) for p in parts], dim=1))
                       for i in range(len(first.planes)))
    return first.with_planes(planes, torch.cat([p.zeros for p in parts], dim=1).contiguous(),
                             torch.cat([p.scales for p in parts], dim=1).contiguous(), None)


def _check_frag_cols(start: int, end: int) -> None:
    if start % FRAG_COLS or end % FRAG_COLS:
        raise ValueError(f"fragment-ordered weights split at multiples of {FRAG_COLS} columns, got [{start}, {end})")


def slice_kernel_weights(kw: KernelWeights, start: int, end: int) -> KernelWeights:
    """Output columns [start, end) of repacked weights as a layer of their own (a copy)."""
    if kw.frag:
        _check_frag_cols(start, end)
        return kw.with_planes((_frag_storage(kw.qweight[start // FRAG_COLS:end // FRAG_COLS].clone(),
                                             frag_block_major(kw)),),
                              kw.zeros[:, start:end].contiguous(), kw.scales[:, start:end].contiguous(), kw.perm)
    planes = tuple(_tile(_untile(p, kw.out_features)[:, start:end]) for p in kw.planes)
    return kw.with_planes(planes, kw.zeros[:, start:end].contiguous(), kw.scales[:, start:end].contiguous(),
                          kw.perm)


def write_kernel_weights(dst: KernelWeights, src: KernelWeights, start: int) -> None:
    """Overwrite dst's columns [start, start + src N) with src, in place (CUDA graphs stay valid)."""
    end = start + src.out_features
    if (src.in_features, src.group_size, src.bits) != (dst.in_features, dst.group_size, dst.bits) \
            or end > dst.out_features:
        raise ValueError("weights do not fit the destination columns")
    if src.perm is not None or dst.perm is not None:
        if start or end != dst.out_features or src.perm is None or dst.perm is None \
                or not torch.equal(src.perm.to(dst.perm.device), dst.perm):
            raise ValueError("act-order weights can only replace a layer of the same permutation")
    src = in_order(src, dst.frag)
    if dst.frag:
        _check_frag_cols(start, end)
        dst.qweight[start // FRAG_COLS:end // FRAG_COLS].copy_(src.qweight)
    else:
        for d, s in zip(dst.planes, src.planes):
            packed = _untile(d, dst.out_features).clone()
            packed[:, start:end] = _untile(s, src.out_features).to(packed.device)
            d.copy_(_tile(packed))
    dst.zeros[:, start:end].copy_(src.zeros)
    dst.scales[:, start:end].copy_(src.scales)


def dequantize_kernel_weights(kw: KernelWeights) -> torch.Tensor:
    """float32 W [K, N] in the original row order from repacked weights (the CPU fallback path)."""
    k = kw.in_features
    q = kernel_codes(kw).float()
    grp = torch.arange(k, device=q.device) // kw.group_size
    w = (q - kw.zeros.float()[grp]) * kw.scales.float()[grp]
    if kw.perm is not None:
        out = torch.empty_like(w)
        out[kw.perm] = w
        w = out
    return w
