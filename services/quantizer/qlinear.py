"""QuantLinear: a GPTQ v1 linear that dequantizes on the fly, and swapping it into the engine."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from services.quantizer.checkpoint import load_checkpoint
from services.quantizer.packing import unpack_qweight, unpack_qzeros


class QuantLinear(nn.Module):
    """y = x Ŵᵀ (no bias) with Ŵ = scale[g_idx]·(code − zero[g_idx]) rebuilt on every call.

    Codes stay packed (int32 words) for 2/4/8 bits and are unpacked with shifts in forward;
    3-bit codes straddle words, so they are unpacked once into uint8. The dequantized weight
    is bit-identical to `checkpoint.dequantize` (same fp32 arithmetic).
    """

    def __init__(self, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                 g_idx: torch.Tensor, bits: int):
        super().__init__()
        self.bits = bits
        self.in_features = g_idx.shape[0]
        self.out_features = scales.shape[1]
        if bits == 3:
            self.register_buffer("codes", unpack_qweight(qweight, 3).to(torch.uint8))
            self.register_buffer("qweight", None)
        else:
            self.register_buffer("qweight", qweight.contiguous())
            self.register_buffer("codes", None)
            self.register_buffer("shifts", torch.arange(0, 32, bits, dtype=torch.int32))
        self.register_buffer("zeros", unpack_qzeros(qzeros, bits).float())  # [groups, out]
        self.register_buffer("scales", scales.contiguous())                    # fp16 [groups, out]
        self.register_buffer("g_idx", g_idx.long())

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], bits: int) -> "QuantLinear":
        return cls(tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors["g_idx"], bits)

    def _codes(self) -> torch.Tensor:
        """Integer codes [out, in] as fp32."""
        if self.codes is not None:
            return self.codes.float()
        words = self.qweight[:, None, :] >> self.shifts[None, :, None]  # [in·b/32, 32/b, out]
        codes = (words & (2 ** self.bits - 1)).reshape(self.in_features, self.out_features)
        return codes.T.float()

    def dequantized(self) -> torch.Tensor:
        """fp32 weight [out, in]."""
        scale = self.scales.float()[self.g_idx].T
        zero = self.zeros[self.g_idx].T
        return scale * (self._codes() - zero)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized().to(x.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}"


def quant_linears(ckpt_dir: str | Path) -> dict[tuple[int, str], QuantLinear]:
    """{(layer, module name): QuantLinear} for every quantized linear of a checkpoint."""
    ckpt = load_checkpoint(ckpt_dir)
    out = {}
    for prefix in ckpt.linear_names():
        parts = prefix.split(".")  # model.layers.<i>.<self_attn|mlp>.<name>
        out[(int(parts[2]), parts[-1])] = QuantLinear.from_tensors(ckpt.linear_tensors(prefix), ckpt.bits)
    return out


def apply_checkpoint(runner, ckpt_dir: str | Path) -> int:
    """Swap every base linear of an engine ModelRunner for its QuantLinear; returns the count.

    Checks all shapes first, so a checkpoint of another base changes nothing.
    """
    modules = quant_linears(ckpt_dir)
    for (layer, name), module in modules.items():
        current = runner.base_linear(layer, name)
        shape = (getattr(current, "out_features", None), getattr(current, "in_features", None))
        if shape != (module.out_features, module.in_features):
            raise ValueError(f"checkpoint {ckpt_dir} does not fit this model: layer {layer} {name} "
                             f"is {shape}, checkpoint has {(module.out_features, module.in_features)}")
    for (layer, name), module in modules.items():
        runner.set_base_linear(layer, name, module.to(runner.device))
    return len(modules)
