"""Round-to-nearest quantization, and the QuantResult every method returns."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from services.quantizer.config import QuantConfig
from services.quantizer.grid import dequantize_codes, group_params, quantize_codes


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
        scale, zero = group_params(block, cfg)
        q = quantize_codes(block, scale[:, None], zero[:, None], cfg.maxq)
        codes[:, start:start + gsize] = q
        dequant[:, start:start + gsize] = dequantize_codes(q, scale[:, None], zero[:, None])
        scales.append(scale)
        zeros.append(zero)
    return QuantResult(codes=codes.to(torch.int32), scales=torch.stack(scales),
                       zeros=torch.stack(zeros).to(torch.int32),
                       g_idx=group_index(cols, cfg.group_size), dequant=dequant)
