"""GPTQ for one linear layer, with AutoGPTQ/GPTQModel reference semantics (DESIGN.md §4)."""
from __future__ import annotations

import torch

from services.quantizer.config import QuantConfig
from services.quantizer.rtn import QuantResult, dequantize_codes, grid_params, quantize_codes

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
    w = weight.detach().to(dtype).clone()
    h = hessian.detach().to(dtype)
    rows, cols = w.shape
    if h.shape != (cols, cols):
        raise ValueError(f"Hessian shape {tuple(h.shape)} does not match {cols} input features")
    dead = (torch.diagonal(h) == 0) if dead is None else dead
    w[:, dead] = 0
    perm = None
    if cfg.desc_act:
        diag = torch.diagonal(h).clone()
        diag[dead] = 1.0
        perm = torch.argsort(diag, descending=True)
        w, h, dead = w[:, perm], h[perm][:, perm], dead[perm]
    hinv, _ = prepare_hessian(h, cfg.damp_percent, dead)

    gsize = cols if cfg.group_size == -1 else cfg.group_size
    codes = torch.zeros_like(w)
    dequant = torch.zeros_like(w)
    scales, zeros = [], []
    scale = zero = None
    for i1 in range(0, cols, cfg.block_size):
        i2 = min(i1 + cfg.block_size, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % gsize == 0:
                # Group parameters come from the weights as updated so far: the current block's
                # working copy, plus columns past the block (only when the group starts at a
                # block boundary, where those columns are already up to date).
                group = torch.cat([w1[:, i:i + gsize], w[:, i2:col + gsize]], dim=1)
                scale, zero = grid_params(group, cfg.bits, cfg.sym)
                scales.append(scale)
                zeros.append(zero)
            col_w = w1[:, i]
            q = quantize_codes(col_w, scale, zero, cfg.maxq)
            deq = dequantize_codes(q, scale, zero)
            codes[:, col] = q
            dequant[:, col] = deq
            err = (col_w - deq) / hinv1[i, i]
            w1[:, i:] -= err[:, None] @ hinv1[i, i:][None, :]
            err1[:, i] = err
        # Lazy batch update: the rest of the matrix sees this block's errors in one matmul.
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    g_idx = (torch.arange(cols) // gsize).to(torch.int32)
    if perm is not None:
        invperm = torch.argsort(perm)
        codes, dequant, g_idx = codes[:, invperm], dequant[:, invperm], g_idx[invperm]
    return QuantResult(codes=codes.to(torch.int32), scales=torch.stack(scales).float(),
                       zeros=torch.stack(zeros).to(torch.int32), g_idx=g_idx,
                       dequant=dequant.float())
