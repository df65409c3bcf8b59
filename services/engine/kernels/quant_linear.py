"""TritonQuantLinear: drop-in nn.Linear over GPTQ v1 4-bit weights (Triton on CUDA, dequantized torch elsewhere)."""
from __future__ import annotations

import torch
from torch import nn

from services.engine.kernels.gemm_tuner import GemmTuner
from services.engine.kernels.gptq_format import (
    GptqTensors,
    KernelWeights,
    concat_kernel_weights,
    dequantize_kernel_weights,
    in_layout,
    repack_values,
    repack_for_kernel,
    slice_kernel_weights,
    unpack_along_rows,
    write_kernel_weights,
)
from services.engine.kernels.w4a16 import HAS_TRITON, needs_zeroed_output, w4a16_matmul


def _runs_triton(x2: torch.Tensor) -> bool:
    """Whether rows x2 [M, K] take the Triton GEMM (CUDA, fp16, at least one row), not the torch fallback."""
    return HAS_TRITON and x2.is_cuda and x2.dtype == torch.float16 and x2.shape[0] > 0


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
        self.kw = kw.with_planes(tuple(p.to(device) for p in kw.planes), kw.zeros.to(device), kw.scales.to(device),
                                 None if kw.perm is None else kw.perm.to(device))
        if self.bias is not None:
            self.bias = self.bias.to(device)
        self._dense = None
        return self

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """Dequantized W [K, N] (cached) — the fallback path and a debugging aid."""
        if self._dense is None or self._dense.dtype != dtype:
            self._dense = dequantize_kernel_weights(self.kw).to(dtype)
        return self._dense

    def forward(self, x: torch.Tensor, accumulate: torch.Tensor | None = None, glu: bool = False) -> torch.Tensor:
        """x W (+ bias); with accumulate (x's leading shape × out_features, e.g. the residual
        stream) the product is added onto it in place and it is returned: on the Triton path the
        GEMM's split partials land there directly, with no zeroed output and no separate add.
        glu: x is [..., 2 × in_features] laid out [gate | up] and the input is silu(gate) · up,
        computed inside the GEMM on the Triton path (w4a16_matmul(glu=True))."""
        width = 2 * self.in_features if glu else self.in_features
        if x.shape[-1] != width:
            raise ValueError(f"expected last dim {width}, got {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, width)
        acc2 = None if accumulate is None else accumulate.view(-1, self.out_features)
        if _runs_triton(x2):
            # the tuner keys on the GEMM's own [M, K] (the first half is a view of that shape)
            cfg = self.tuner.config_for(x2[:, :self.in_features], self.kw)
            y = w4a16_matmul(x2, self.kw, cfg, self.bias, accumulate=acc2, glu=glu)
        else:
            if glu:
                g, u = x2.float().chunk(2, dim=-1)
                x2 = (torch.nn.functional.silu(g) * u).to(x.dtype)
            y = x2 @ self.dense_weight(x.dtype)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
            if acc2 is not None:
                y = acc2.add_(y)
        return y.reshape(*lead, self.out_features)

    def output_to_zero(self, like: torch.Tensor) -> torch.Tensor | None:
        """For an input with like's rows, device and dtype: an uninitialised [rows, out_features]
        output when this layer's GEMM sums split partials into a zeroed output (else None). A
        kernel that runs before the GEMM zeroes it (fused_ops.rmsnorm(zero=...)) and the GEMM
        accumulates into it, so the zeroing costs no launch of its own."""
        like2 = like.reshape(-1, like.shape[-1])
        if like.shape[-1] != self.in_features or not _runs_triton(like2):
            return None
        if not needs_zeroed_output(self.tuner.config_for(like2, self.kw), self.in_features):
            return None
        return torch.empty(like2.shape[0], self.out_features, dtype=like.dtype, device=like.device)

    def set_layout(self, frag: int, block_major: bool = False) -> bool:
        """Hold the codes in the layout KernelWeights.frag = frag (0: tiled; 2 / 4: fragment order,
        4-bit and N % 8 == 0 only; block_major: stored block-major, gptq_format.frag_block_major); False
        where this layer cannot take it (it keeps its own)."""
        if frag and self.kw.bits != 4:
            return False
        try:
            self.kw = in_layout(self.kw, frag, block_major)
        except ValueError:
            return False
        self._dense = None
        return True

    def load_weights_(self, kw: KernelWeights) -> None:
        """Overwrite the weights in place with a layer of the same shape (keeps CUDA graphs valid)."""
        if kw.out_features != self.out_features:
            raise ValueError(f"expected {self.out_features} outputs, got {kw.out_features}")
        write_kernel_weights(self.kw, kw, 0)
        self._dense = None


def kernel_weights_of(module: nn.Module) -> KernelWeights | None:
    """The 3/4-bit weights of a TritonQuantLinear or of a 3/4-bit GPTQ QuantLinear (quantizer), else None.

    A QuantLinear keeps GPTQ v1 row-packed codes (3-bit: codes unpacked once), unpacked zeros,
    scales and g_idx; they are repacked for the kernel on their own device.
    """
    if isinstance(module, TritonQuantLinear):
        return module.kw if module.bias is None else None
    bits = getattr(module, "bits", None)
    if bits not in (3, 4):
        return None
    if bits == 4:
        packed = getattr(module, "qweight", None)
        codes = None if packed is None else unpack_along_rows(packed)
    else:
        codes = getattr(module, "codes", None)
        codes = None if codes is None else codes.T
    if codes is None:
        return None
    zeros, scales, g_idx = module.zeros, module.scales, module.g_idx
    try:
        return repack_values(codes, zeros.round().to(torch.int64), scales, g_idx,
                             g_idx.shape[0] // scales.shape[0], bits=bits)
    except ValueError:  # a layout the kernel cannot take (e.g. group 32): served as given
        return None


class FusedParts(nn.Module):
    """Linears sharing one input computed as one over concatenated output columns: part i is
    columns offsets[i]:offsets[i+1] (`bounds`). Subclasses hold the weights and `part` / `load_part_`."""

    def __init__(self, parts: dict[str, nn.Module]) -> None:
        super().__init__()
        self.names = tuple(parts)
        sizes = [p.out_features for p in parts.values()]
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]

    def bounds(self, name: str) -> tuple[int, int]:
        i = self.names.index(name)
        return self.offsets[i], self.offsets[i + 1]


class FusedQuantLinear(FusedParts):
    """Linears sharing one input (q|k|v, gate|up) run as one W4A16 GEMM over concatenated columns.

    forward(x) → [..., ΣN]; part i is output columns offsets[i]:offsets[i+1]. Parts can be read
    back (`part`) and overwritten in place (`load_part_`), which is how weight swaps reach a
    fused layer without invalidating captured CUDA graphs.
    """

    def __init__(self, parts: dict[str, TritonQuantLinear], tuner: GemmTuner | None) -> None:
        super().__init__(parts)
        self.inner = TritonQuantLinear(concat_kernel_weights([p.kw for p in parts.values()]), None, tuner)
        self.in_features, self.out_features = self.inner.in_features, self.inner.out_features

    def forward(self, x: torch.Tensor, accumulate: torch.Tensor | None = None) -> torch.Tensor:
        return self.inner(x, accumulate)

    def part(self, name: str) -> TritonQuantLinear:
        """A standalone copy of one part."""
        start, end = self.bounds(name)
        return TritonQuantLinear(slice_kernel_weights(self.inner.kw, start, end), None, self.inner.tuner)

    def load_part_(self, name: str, kw: KernelWeights) -> None:
        start, end = self.bounds(name)
        if kw.out_features != end - start:
            raise ValueError(f"{name}: expected {end - start} outputs, got {kw.out_features}")
        write_kernel_weights(self.inner.kw, kw, start)
        self.inner._dense = None
