"""GPTQ for one linear layer, with AutoGPTQ/GPTQModel reference semantics (DESIGN.md §4)."""
from __future__ import annotations

import torch

from services.quantizer.config import QuantConfig
from services.quantizer.grid import dequantize_codes, group_params, quantize_codes
from services.quantizer.rtn import QuantResult

MAX_DAMP_RETRIES = 8


class CholeskyError(RuntimeError):
    """The Hessian stayed indefinite even after raising the damping several times."""


def prepare_hessian(hessian: torch.Tensor, damp_percent: float,
                    dead: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dead-input fix + damping + upper Cholesky factor of H⁻¹; returns (U, dead mask).

    On Cholesky failure the damping is multiplied by 10 and retried (GPTQModel does the
    same with a fixed step), so near-singular Hessians from tiny calibration sets still work.
    """
    h = hessian.clone()
    diag = torch.diagonal(h)
    if dead is None:
        dead = diag == 0
    h[dead, dead] = 1.0
    mean_diag = torch.mean(torch.diagonal(h))
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    damp = damp_percent
    for _ in range(MAX_DAMP_RETRIES):
        try:
            chol = torch.linalg.cholesky(h + damp * mean_diag * eye)
            hinv = torch.cholesky_inverse(chol)
            return torch.linalg.cholesky(hinv, upper=True), dead
        except torch.linalg.LinAlgError:
            damp *= 10.0
    raise CholeskyError(f"Hessian not positive definite even with damping {damp:g}·mean(diag)")


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, cfg: QuantConfig,
                  dead: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> QuantResult:
    """Quantize weight [out, in] minimising ‖(W − Ŵ)X‖² for the Hessian H = 2/n·X Xᵀ [in, in].

    `dead` overrides which inputs count as never active (MLGPTQ passes the AND over tasks);
    by default an input is dead when its Hessian diagonal is 0. `dtype` float64 is for tests.
    """
    return gptq_quantize_many(weight, [hessian], cfg, None if dead is None else [dead], dtype)[0]


def gptq_quantize_many(weight: torch.Tensor, hessians: list[torch.Tensor], cfg: QuantConfig,
                       deads: list[torch.Tensor] | None = None,
                       dtype: torch.dtype = torch.float32) -> list[QuantResult]:
    """GPTQ of one weight [out, in] under several Hessians at once: one QuantResult per Hessian.

    Each Hessian gets its own independent sweep; they run side by side as a leading batch
    dimension because on a GPU the column loop is bound by kernel launches, not arithmetic,
    so C sweeps in one loop cost about as much as one (the quality benchmark's many methods).
    """
    num = len(hessians)
    h = torch.stack([x.detach().to(dtype) for x in hessians])  # [C, in, in]
    cols = weight.shape[1]
    if h.shape[1:] != (cols, cols):
        raise ValueError(f"Hessian shape {tuple(h.shape[1:])} does not match {cols} input features")
    dead = (torch.diagonal(h, dim1=1, dim2=2) == 0) if deads is None else torch.stack(deads)  # [C, in]
    w = weight.detach().to(dtype).unsqueeze(0).expand(num, -1, -1)  # [C, out, in]
    w = torch.where(dead[:, None, :], torch.zeros((), dtype=dtype, device=w.device), w)
    perm = None
    if cfg.desc_act:
        diag = torch.diagonal(h, dim1=1, dim2=2).clone()
        diag[dead] = 1.0
        perm = torch.argsort(diag, dim=1, descending=True)  # [C, in]
        w = torch.gather(w, 2, perm[:, None, :].expand_as(w))
        h = torch.stack([h[c][perm[c]][:, perm[c]] for c in range(num)])
        dead = torch.gather(dead, 1, perm)
    hinv = torch.stack([prepare_hessian(h[c], cfg.damp_percent, dead[c])[0] for c in range(num)])
    w = w.contiguous()

    gsize = cols if cfg.group_size == -1 else cfg.group_size
    codes = torch.zeros_like(w)
    dequant = torch.zeros_like(w)
    scales, zeros = [], []
    scale = zero = None
    for i1 in range(0, cols, cfg.block_size):
        i2 = min(i1 + cfg.block_size, cols)
        w1 = w[:, :, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % gsize == 0:
                # Group parameters come from the weights as updated so far: the current block's
                # working copy, plus columns past the block (only when the group starts at a
                # block boundary, where those columns are already up to date).
                group = torch.cat([w1[:, :, i:i + gsize], w[:, :, i2:col + gsize]], dim=2)
                scale, zero = group_params(group, cfg)  # [C, out] each
                scales.append(scale)
                zeros.append(zero)
            col_w = w1[:, :, i]
            q = quantize_codes(col_w, scale, zero, cfg.maxq)
            deq = dequantize_codes(q, scale, zero)
            codes[:, :, col] = q
            dequant[:, :, col] = deq
            err = (col_w - deq) / hinv1[:, i, i, None]
            w1[:, :, i:] -= err[:, :, None] * hinv1[:, None, i, i:]
            err1[:, :, i] = err
        # Lazy batch update: the rest of the matrix sees this block's errors in one matmul.
        w[:, :, i2:] -= err1 @ hinv[:, i1:i2, i2:]

    g_idx = (torch.arange(cols) // gsize).to(torch.int32)
    scales_all = torch.stack(scales).float()  # [groups, C, out]
    zeros_all = torch.stack(zeros).to(torch.int32)
    results = []
    for c in range(num):
        c_codes, c_dequant, c_gidx = codes[c], dequant[c], g_idx
        if perm is not None:
            invperm = torch.argsort(perm[c]).to(c_codes.device)
            c_codes, c_dequant = c_codes[:, invperm], c_dequant[:, invperm]
            c_gidx = g_idx[invperm.cpu()]
        results.append(QuantResult(codes=c_codes.to(torch.int32), scales=scales_all[:, c].contiguous(),
                                   zeros=zeros_all[:, c].contiguous(), g_idx=c_gidx,
                                   dequant=c_dequant.float()))
    return results
