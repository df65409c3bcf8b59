"""Uniform quantization grid (AutoGPTQ's min/max rule) and round-to-nearest quantization."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from services.quantizer.config import QuantConfig


@dataclass
class QuantResult:
    """One quantized linear, in original column order.

    codes [out, in] integer codes in [0, maxq]; scales/zeros [num_groups, out]
    (scales hold fp16-representable values, zeros are integers); g_idx [in] group of
    each input column; dequant [out, in] fp32 weights exactly as a loader rebuilds them.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    dequant: torch.Tensor


def grid_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero) for w [..., rows, cols], same rule as AutoGPTQ's Quantizer.find_params.

    The scale is rounded to fp16 here, so the weights GPTQ compensates for are exactly the
    weights the fp16-scale checkpoint dequantizes to.
    """
    maxq = 2 ** bits - 1
    zero_t = torch.zeros(w.shape[:-1], dtype=w.dtype, device=w.device)
    xmin = torch.minimum(w.min(dim=-1).values, zero_t)
    xmax = torch.maximum(w.max(dim=-1).values, zero_t)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    both_zero = (xmin == 0) & (xmax == 0)
    xmin = torch.where(both_zero, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(both_zero, torch.full_like(xmax, 1.0), xmax)
    scale = ((xmax - xmin) / maxq).to(torch.float16).to(w.dtype)
    # fp16 underflow of a tiny range would give scale 0 and division by zero.
    scale = torch.where(scale == 0, torch.full_like(scale, 2.0 ** -24), scale)
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.clamp(torch.round(-xmin / scale), 0, maxq)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes (as floats) of w; scale/zero broadcast against w's rows."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """scale · (q − zero): the one formula both GPTQ and the checkpoint loader use (bit-exact)."""
    return scale * (q - zero)


def group_index(num_cols: int, group_size: int) -> torch.Tensor:
    """Group of each column in sweep order."""
    if group_size == -1:
        return torch.zeros(num_cols, dtype=torch.int32)
    return (torch.arange(num_cols) // group_size).to(torch.int32)


def rtn_quantize(weight: torch.Tensor, cfg: QuantConfig) -> QuantResult:
    """Round each weight to the nearest grid point; no calibration data."""
    w = weight.detach().float()
    rows, cols = w.shape
    gsize = cols if cfg.group_size == -1 else cfg.group_size
    codes = torch.empty_like(w)
    dequant = torch.empty_like(w)
    scales, zeros = [], []
    for start in range(0, cols, gsize):
        block = w[:, start:start + gsize]
        scale, zero = grid_params(block, cfg.bits, cfg.sym)
        q = quantize_codes(block, scale[:, None], zero[:, None], cfg.maxq)
        codes[:, start:start + gsize] = q
        dequant[:, start:start + gsize] = dequantize_codes(q, scale[:, None], zero[:, None])
        scales.append(scale)
        zeros.append(zero)
    return QuantResult(codes=codes.to(torch.int32), scales=torch.stack(scales),
                       zeros=torch.stack(zeros).to(torch.int32),
                       g_idx=group_index(cols, cfg.group_size), dequant=dequant)
