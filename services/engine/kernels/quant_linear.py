"""TritonQuantLinear: drop-in nn.Linear over GPTQ v1 4-bit weights (Triton on CUDA, dequantized torch elsewhere)."""
from __future__ import annotations

import torch
from torch import nn

from services.engine.kernels.gemm_tuner import GemmTuner
from services.engine.kernels.gptq_format import (
    GptqTensors,
    KernelWeights,
    dequantize_kernel_weights,
    repack_for_kernel,
)
from services.engine.kernels.w4a16 import HAS_TRITON, w4a16_matmul


class TritonQuantLinear(nn.Module):
    """Drop-in replacement for nn.Linear(K, N) over GPTQ v1 4-bit weights.

    forward(x [..., K]) → [..., N] in x's dtype. On CUDA with fp16 input it runs the Triton
    kernel (config from the shared GemmTuner); elsewhere it multiplies by the dequantized
    weight (cached on first use) so CPU runs give the same function.
    Build with TritonQuantLinear.from_gptq(GptqTensors, bias=None, tuner=shared_tuner).
    """

    def __init__(self, kw: KernelWeights, bias: torch.Tensor | None, tuner: GemmTuner | None) -> None:
        super().__init__()
        self.in_features = kw.in_features
        self.out_features = kw.out_features
        self.kw = kw
        self.bias = bias
        self.tuner = tuner if tuner is not None else GemmTuner()
        self._dense: torch.Tensor | None = None

    @classmethod
    def from_gptq(
        cls, t: GptqTensors, bias: torch.Tensor | None = None, tuner: GemmTuner | None = None
    ) -> TritonQuantLinear:
        return cls(repack_for_kernel(t), bias, tuner)

    def to(self, device: torch.device | str) -> TritonQuantLinear:  # type: ignore[override]
        kw = self.kw
        self.kw = KernelWeights(
            qweight=kw.qweight.to(device), zeros=kw.zeros.to(device), scales=kw.scales.to(device),
            perm=None if kw.perm is None else kw.perm.to(device), group_size=kw.group_size,
        )
        if self.bias is not None:
            self.bias = self.bias.to(device)
        self._dense = None
        return self

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """Dequantized W [K, N] (cached) — the fallback path and a debugging aid."""
        if self._dense is None or self._dense.dtype != dtype:
            self._dense = dequantize_kernel_weights(self.kw).to(dtype)
        return self._dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected last dim {self.in_features}, got {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if HAS_TRITON and x.is_cuda and x.dtype == torch.float16 and x2.shape[0] > 0:
            y = w4a16_matmul(x2, self.kw, self.tuner.config_for(x2, self.kw), self.bias)
        else:
            y = x2 @ self.dense_weight(x.dtype)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)
