"""Multi-LoRA shrink/expand in Triton over a token → adapter-slot index (segments of sorted tokens).

Adapters live in stacked slot tensors, ranks padded to the slot maximum (zeros in the padding):
  a_stack fp16 [S, R_total, K]  lora_A of every slot; R_total = num_slices * rank when several
                                projections share one input (q|k|v, gate|up), each slice rank rows
  b_stack fp16 [S, N, rank]     lora_B of every slot, the LoRA scaling folded in; output column n
                                belongs to slice n // n_slice and reads rank columns slice*rank...
Tokens are sorted by slot once per step (prepare_lora_batch); every program of a launch owns at
most one chunk of up to 16 tokens of one segment (a run of equal slots), so each adapter's
weights are read once per chunk rather than once per token, for decode and prefill alike. All
index work stays on the device, so a decode step that uses it can be captured in a CUDA graph.
Slot -1 means "no adapter" (the bare base model).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from services.engine.kernels.launch import cdiv, launch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs use lora_apply_reference
    triton = None
    tl = None


@dataclass(frozen=True)
class LoraBatch:
    """Per-step token ordering shared by every LoRA launch of the step.

    order int64 [T]: token indices sorted by slot; sorted_slots int32 [T]; seg_start/seg_end int32
    [T]: for each sorted position, the first position with the same slot and one past the last.
    """

    order: torch.Tensor
    sorted_slots: torch.Tensor
    seg_start: torch.Tensor
    seg_end: torch.Tensor


def prepare_lora_batch(slot_ids: torch.Tensor) -> LoraBatch:
    """Sort a step's tokens by adapter slot (int [T], -1 = none); device-only ops, graph-safe."""
    if slot_ids.dim() != 1:
        raise ValueError(f"slot_ids must be 1-D, got {tuple(slot_ids.shape)}")
    sorted_slots, order = torch.sort(slot_ids.to(torch.int32), stable=True)
    seg_start = torch.searchsorted(sorted_slots, sorted_slots).to(torch.int32)
    seg_end = torch.searchsorted(sorted_slots, sorted_slots, right=True).to(torch.int32)
    return LoraBatch(order=order, sorted_slots=sorted_slots, seg_start=seg_start, seg_end=seg_end)


if triton is not None:
    from services.engine.kernels.pdl import pdl_enter

    @triton.jit
    def _segment(slots_ptr, seg_start_ptr, seg_end_ptr, i, BM: tl.constexpr):
        """(slot, end) of the BM-row chunk of a segment that starts at sorted position i; end = i if none.

        Long segments (one adapter, many tokens) are split into chunks run by different programs.
        """
        s = tl.load(slots_ptr + i)
        is_lead = ((i - tl.load(seg_start_ptr + i)) % BM == 0) & (s >= 0)
        end = tl.where(is_lead, tl.minimum(tl.load(seg_end_ptr + i), i + BM), i)
        return s, end

    @triton.jit
    def _shrink_kernel(
        x_ptr, a_ptr, v_ptr, order_ptr, slots_ptr, seg_start_ptr, seg_end_ptr,
        K, R_TOTAL, stride_xt, stride_as, k_per_split, stride_vsplit,
        BM: tl.constexpr, BK: tl.constexpr, RB: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        """v[split] [T, R_TOTAL] fp32 = the split's share of x · A^T, one slab per K split: every
        element the expand kernel reads is written exactly once, so no zeroing and no atomics."""
        pdl_enter(PDL)  # first: nothing is read or written before the previous grid ends
        i = tl.program_id(0)
        pid_k = tl.program_id(1)
        r0 = tl.program_id(2) * RB
        s, end = _segment(slots_ptr, seg_start_ptr, seg_end_ptr, i, BM)
        offs_r = r0 + tl.arange(0, RB)
        offs_k = tl.arange(0, BK)
        k_lo = pid_k * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        a_base = a_ptr + s.to(tl.int64) * stride_as + offs_r[None, :] * K
        for m0 in range(i, end, BM):
            rows = m0 + tl.arange(0, BM)
            rmask = rows < end
            tok = tl.load(order_ptr + rows, mask=rmask, other=0)
            acc = tl.zeros((BM, RB), dtype=tl.float32)
            for k0 in range(k_lo, k_hi, BK):
                kk = k0 + offs_k
                kmask = kk < k_hi
                xt = tl.load(x_ptr + tok[:, None] * stride_xt + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
                at = tl.load(a_base + kk[:, None], mask=kmask[:, None], other=0.0)
                acc = tl.dot(xt, at, acc)
            vp = v_ptr + pid_k * stride_vsplit + rows[:, None] * R_TOTAL + offs_r[None, :]
            tl.store(vp, acc, mask=rmask[:, None])

    @triton.jit
    def _expand_kernel(
        y_ptr, v_ptr, b_ptr, order_ptr, slots_ptr, seg_start_ptr, seg_end_ptr,
        N, R_TOTAL, n_slice, stride_yt, stride_bs, stride_vsplit,
        RANK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, SPLIT: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        pdl_enter(PDL)  # first: nothing is read or written before the previous grid ends
        i = tl.program_id(0)
        pid_n = tl.program_id(1)
        s, end = _segment(slots_ptr, seg_start_ptr, seg_end_ptr, i, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        nmask = offs_n < N
        offs_r = tl.arange(0, RANK)
        r_off = ((pid_n * BN) // n_slice) * RANK
        bt = tl.load(
            b_ptr + s.to(tl.int64) * stride_bs + offs_n[None, :] * RANK + offs_r[:, None],
            mask=(offs_n < tl.where(end > i, N, 0))[None, :], other=0.0,
        )
        for m0 in range(i, end, BM):
            rows = m0 + tl.arange(0, BM)
            rmask = rows < end
            tok = tl.load(order_ptr + rows, mask=rmask, other=0)
            vp = v_ptr + rows[:, None] * R_TOTAL + r_off + offs_r[None, :]
            vt = tl.load(vp, mask=rmask[:, None], other=0.0)
            for sp in tl.static_range(1, SPLIT):   # the shrink's K splits, one slab each
                vt += tl.load(vp + sp * stride_vsplit, mask=rmask[:, None], other=0.0)
            acc = tl.dot(vt.to(tl.float16), bt)
            yp = y_ptr + tok[:, None] * stride_yt + offs_n[None, :]
            ymask = rmask[:, None] & nmask[None, :]
            y = tl.load(yp, mask=ymask, other=0.0)
            tl.store(yp, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=ymask)

    @triton.jit
    def _expand_rows_kernel(
        y_ptr, v_ptr, b_ptr, order_ptr, slots_ptr,
        T, N, R_TOTAL, n_slice, stride_yt, stride_bs, stride_vsplit,
        RANK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, SPLIT: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        """BM consecutive sorted tokens × BN columns: each token's B tile [BN, RANK] (contiguous
        in the rank-last stack) gathered by its slot, times its v row, summed over the rank."""
        pdl_enter(PDL)  # first: nothing is read or written before the previous grid ends
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        pid_n = tl.program_id(1)
        s = tl.load(slots_ptr + rows, mask=rows < T, other=-1)
        live = s >= 0
        tok = tl.load(order_ptr + rows, mask=live, other=0)
        offs_n = pid_n * BN + tl.arange(0, BN)
        nmask = offs_n < N
        offs_r = tl.arange(0, RANK)
        r_off = ((pid_n * BN) // n_slice) * RANK
        vp = v_ptr + rows[:, None] * R_TOTAL + r_off + offs_r[None, :]
        vt = tl.load(vp, mask=live[:, None], other=0.0)
        for sp in tl.static_range(1, SPLIT):
            vt += tl.load(vp + sp * stride_vsplit, mask=live[:, None], other=0.0)
        bp = (b_ptr + tl.maximum(s, 0).to(tl.int64)[:, None, None] * stride_bs
              + offs_n[None, :, None] * RANK + offs_r[None, None, :])
        bt = tl.load(bp, mask=live[:, None, None] & nmask[None, :, None], other=0.0)
        acc = tl.sum(bt.to(tl.float32) * vt[:, None, :], axis=2)
        yp = y_ptr + tok[:, None] * stride_yt + offs_n[None, :]
        ymask = live[:, None] & nmask[None, :]
        y = tl.load(yp, mask=ymask, other=0.0)
        tl.store(yp, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=ymask)


def _check_stacks(x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor, n_slice: int) -> tuple[int, int]:
    if a_stack.dim() != 3 or b_stack.dim() != 3 or a_stack.shape[0] != b_stack.shape[0]:
        raise ValueError(f"bad stacks: a {tuple(a_stack.shape)}, b {tuple(b_stack.shape)}")
    rank = b_stack.shape[2]
    r_total = a_stack.shape[1]
    n = b_stack.shape[1]
    if a_stack.shape[2] != x.shape[1]:
        raise ValueError(f"a_stack K={a_stack.shape[2]} but x has K={x.shape[1]}")
    if n % n_slice or r_total != (n // n_slice) * rank:
        raise ValueError(f"N={n}, n_slice={n_slice}, rank={rank} do not match R_total={r_total}")
    if rank % 16 or rank & (rank - 1):
        raise ValueError(f"rank must be a power of two >= 16 (pad the slots), got {rank}")
    return rank, r_total


def _expand_block_n(n_slice: int, cap: int = 128) -> int:
    """Largest tile width up to cap that never straddles two slices."""
    for bn in (128, 64, 32, 16):
        if bn <= cap and n_slice % bn == 0:
            return bn
    raise ValueError(f"n_slice {n_slice} must be a multiple of 16")


def _shrink_split(k: int, split_k: int, bk: int) -> tuple[int, int]:
    """(splits, K columns per split) for a shrink over K, each split a whole number of bk blocks."""
    split_k = max(1, min(split_k, cdiv(k, bk)))
    k_per_split = cdiv(cdiv(k, split_k), bk) * bk
    return cdiv(k, k_per_split), k_per_split


def lora_shrink(x: torch.Tensor, a_stack: torch.Tensor, batch: LoraBatch, split_k: int = 4) -> torch.Tensor:
    """v [splits, T, R_total] fp32: each split's share of x · A[slot]ᵀ, rows in sorted-token order.

    Rows of slot -1 stay unwritten (garbage): the expand kernels never read them.
    """
    x = x.contiguous()              # the kernel walks K with unit stride
    t, k = x.shape
    r_total = a_stack.shape[1]
    bk = 128
    split_k, k_per_split = _shrink_split(k, split_k, bk)
    # one fp32 slab per K split, summed by the expand kernel (no memset launch, no atomics)
    v = torch.empty((split_k, t, r_total), dtype=torch.float32, device=x.device)
    if t:
        launch(
            _shrink_kernel, (t, split_k, r_total // 16),
            x, a_stack, v, batch.order, batch.sorted_slots, batch.seg_start, batch.seg_end,
            k, r_total, x.stride(0), a_stack.stride(0), k_per_split, v.stride(0),
            BM=16, BK=bk, RB=16, num_warps=4,
        )
    return v


def lora_expand(y: torch.Tensor, v: torch.Tensor, b_stack: torch.Tensor, batch: LoraBatch,
                n_slice: int, rows: bool = True) -> torch.Tensor:
    """y [T, N] += v · B[slot]ᵀ per token (v from lora_shrink), in place. Returns y.

    rows=False: one program per (segment chunk, N tile) on tensor cores; the grid has a row per
    token, most of them idle (only chunk leads work). rows=True: one program per (16 sorted
    tokens, N tile) whatever their slots, B gathered per token and reduced on CUDA cores: no idle
    programs, T/16 times fewer of them.
    """
    t = y.shape[0]
    if t == 0:
        return y
    rank = b_stack.shape[2]
    n = b_stack.shape[1]
    split_k, _, r_total = v.shape
    if rows:
        # [16, BN, rank] products in registers: keep them near 8K per program
        bn = _expand_block_n(n_slice, cap=max(16, 512 // rank))
        launch(
            _expand_rows_kernel, (cdiv(t, 16), cdiv(n, bn)),
            y, v, b_stack, batch.order, batch.sorted_slots,
            t, n, r_total, n_slice, y.stride(0), b_stack.stride(0), v.stride(0),
            RANK=rank, BM=16, BN=bn, SPLIT=split_k, num_warps=4,
        )
        return y
    bn = _expand_block_n(n_slice)
    launch(
        _expand_kernel, (t, cdiv(n, bn)),
        y, v, b_stack, batch.order, batch.sorted_slots, batch.seg_start, batch.seg_end,
        n, r_total, n_slice, y.stride(0), b_stack.stride(0), v.stride(0),
        RANK=rank, BM=16, BN=bn, SPLIT=split_k, num_warps=4,
    )
    return y


def triton_lora_apply(
    y: torch.Tensor,
    x: torch.Tensor,
    a_stack: torch.Tensor,
    b_stack: torch.Tensor,
    batch: LoraBatch,
    n_slice: int | None = None,
    split_k: int = 4,
    rows: bool = True,
) -> torch.Tensor:
    """y [T, N] += per-token LoRA(x [T, K]) in place, for each token's slot (see module docstring).

    Drop-in for the runner's LoRA step: call right after the base projection. Returns y.
    rows: the expand's per-token variant (lora_expand).
    """
    if triton is None:
        raise RuntimeError("triton is not installed")
    n_slice = n_slice or b_stack.shape[1]
    _check_stacks(x, a_stack, b_stack, n_slice)
    if x.shape[0] == 0:
        return y
    v = lora_shrink(x, a_stack, batch, split_k)
    return lora_expand(y, v, b_stack, batch, n_slice, rows=rows)


def lora_apply_reference(
    y: torch.Tensor,
    x: torch.Tensor,
    a_stack: torch.Tensor,
    b_stack: torch.Tensor,
    slot_ids: torch.Tensor,
    n_slice: int | None = None,
) -> torch.Tensor:
    """float32 reference of triton_lora_apply (returns a new tensor; works on any device)."""
    n_slice = n_slice or b_stack.shape[1]
    rank, _ = _check_stacks(x, a_stack, b_stack, n_slice)
    out = y.float().clone()
    num_slices = b_stack.shape[1] // n_slice
    for t, s in enumerate(slot_ids.tolist()):
        if s < 0:
            continue
        v = a_stack[s].float() @ x[t].float()  # [R_total]
        for j in range(num_slices):
            cols = slice(j * n_slice, (j + 1) * n_slice)
            out[t, cols] += b_stack[s, cols].float() @ v[j * rank:(j + 1) * rank]
    return out
