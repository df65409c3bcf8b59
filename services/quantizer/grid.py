"""Uniform quantization grid: per-row scale/zero (min/max rule or MSE clipping search) and codes."""
from __future__ import annotations

import torch

from services.quantizer.config import QuantConfig

# The clipping search evaluates several candidate ranges per pass (fewer kernel launches);
# capping one pass's elements bounds its temporaries (16 MiB in fp32) however many rows come
# in. On a 2-core CPU 2^22 was ~20 % faster than 2^24 (SmolLM2 shapes, one thread).
MAX_SEARCH_ELEMENTS = 1 << 22


def weight_range(w: torch.Tensor, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (xmin, xmax) of w [..., rows, cols] as AutoGPTQ's Quantizer.find_params takes it:
    always including 0, symmetric about 0 for sym, [-1, 1] for an all-zero row."""
    zero_t = torch.zeros(w.shape[:-1], dtype=w.dtype, device=w.device)
    xmin = torch.minimum(w.min(dim=-1).values, zero_t)
    xmax = torch.maximum(w.max(dim=-1).values, zero_t)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    both_zero = (xmin == 0) & (xmax == 0)
    xmin = torch.where(both_zero, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(both_zero, torch.full_like(xmax, 1.0), xmax)
    return xmin, xmax


def params_from_range(xmin: torch.Tensor, xmax: torch.Tensor, bits: int,
                      sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) mapping [xmin, xmax] onto codes 0..2^bits−1.

    The scale is rounded to fp16 here, so the weights GPTQ compensates for are exactly the
    weights the fp16-scale checkpoint dequantizes to; zeros are integers (GPTQ v1 format).
    """
    maxq = 2 ** bits - 1
    scale = ((xmax - xmin) / maxq).to(torch.float16).to(xmin.dtype)
    # fp16 underflow of a tiny range would give scale 0 and division by zero.
    scale = torch.where(scale == 0, torch.full_like(scale, 2.0 ** -24), scale)
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.clamp(torch.round(-xmin / scale), 0, maxq)
    return scale, zero


def grid_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero) for w [..., rows, cols], same rule as AutoGPTQ's Quantizer.find_params."""
    return params_from_range(*weight_range(w, sym), bits, sym)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes (as floats) of w; scale/zero broadcast against w's rows."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """scale · (q − zero): the one formula both GPTQ and the checkpoint loader use (bit-exact)."""
    return scale * (q - zero)


def clip_error(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int,
               norm: float) -> torch.Tensor:
    """Per-row Σ|q(w) − w|^norm of w [..., rows, cols] on the grid (scale, zero) [..., rows].

    The same operations as quantize_codes + dequantize_codes, done in place on one buffer:
    the search runs this once per candidate range, and allocation dominates on a CPU.
    """
    s, z = scale[..., None], zero[..., None]
    d = torch.div(w, s)
    d.round_().add_(z).clamp_(0, maxq).sub_(z).mul_(s).sub_(w).abs_().pow_(norm)
    return d.sum(dim=-1)


def mse_grid_params(w: torch.Tensor, bits: int, sym: bool, grid: int, max_shrink: float,
                    norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero) for w [..., rows, cols] minimising Σ|q(w) − w|^norm over clipped ranges.

    Candidates are [p·xmin, p·xmax] of the min/max rule's range for p = 1, 1 − 1/grid, …,
    1 − max_shrink. p = 1 is exactly the min/max rule and ties keep the earlier (wider)
    candidate, so every row's error is at most the min/max rule's. The choice is deterministic;
    on a CPU it is also the same whatever batch the row sits in (a GPU's reduction order may
    depend on the batch shape, which changes a choice only at an exact tie of float sums).
    """
    maxq = 2 ** bits - 1
    xmin, xmax = weight_range(w, sym)
    num_candidates = int(round(max_shrink * grid)) + 1
    # 1 − i/grid is exactly 1.0 for i = 0, so the first candidate reproduces grid_params bit for bit.
    shrink = 1.0 - torch.arange(num_candidates, dtype=w.dtype, device=w.device) / grid  # [K]
    # Start from the min/max rule so a row whose every error is NaN (non-finite weights) keeps it.
    best_scale, best_zero = params_from_range(xmin, xmax, bits, sym)
    best_err = torch.full_like(xmin, float("inf"))
    per_pass = max(1, MAX_SEARCH_ELEMENTS // max(1, w.numel()))
    bcast = (-1,) + (1,) * xmin.dim()
    for chunk in shrink.split(per_pass):
        p = chunk.view(bcast)
        scale, zero = params_from_range(p * xmin, p * xmax, bits, sym)  # [k, ..., rows]
        err = clip_error(w, scale, zero, maxq, norm)
        # min over dim 0 returns the first minimum, so ties keep the wider range within a chunk.
        chunk_err, idx = err.min(dim=0)
        better = chunk_err < best_err
        best_err = torch.where(better, chunk_err, best_err)
        best_scale = torch.where(better, scale.gather(0, idx[None])[0], best_scale)
        best_zero = torch.where(better, zero.gather(0, idx[None])[0], best_zero)
    return best_scale, best_zero


def group_params(w: torch.Tensor, cfg: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero) of one group w [..., rows, cols] under cfg's grid rule."""
    if cfg.mse:
        return mse_grid_params(w, cfg.bits, cfg.sym, cfg.mse_grid, cfg.mse_max_shrink, cfg.mse_norm)
    return grid_params(w, cfg.bits, cfg.sym)
