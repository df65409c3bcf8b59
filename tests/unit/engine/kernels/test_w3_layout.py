"""The 3-bit kernel layout (W3A16): repack, unpack, fuse, slice and swap on the CPU (no triton).

The kernels themselves are checked against these references on the GPU (tests/gpu/test_kernels.py).
"""
from __future__ import annotations

import pytest
import torch

from services.engine.kernels.gptq_format import (
    concat_kernel_weights, dequantize_codes, dequantize_kernel_weights, kernel_codes, repack_values, rtn_codes,
    rtn_kernel_weights, slice_kernel_weights, write_kernel_weights,
)
from services.engine.kernels.quant_linear import FusedQuantLinear, TritonQuantLinear, kernel_weights_of
from services.quantizer.packing import pack_qweight, pack_qzeros
from services.quantizer.qlinear import QuantLinear


def layer(k: int, n: int, seed: int, act_order: bool = False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(k, n, generator=g)
    perm = torch.randperm(k, generator=g) if act_order else None
    codes, zeros, scales, g_idx = rtn_codes(w, 128, 3, perm)
    return codes, zeros, scales, g_idx


@pytest.mark.parametrize("act_order", [False, True])
def test_repack_round_trip(act_order: bool) -> None:
    codes, zeros, scales, g_idx = layer(384, 200, 0, act_order)
    assert codes.min() >= 0 and codes.max() <= 7 and codes.max() == 7
    kw = repack_values(codes, zeros, scales, g_idx, 128, bits=3)
    assert kw.bits == 3 and kw.qweight.dtype == torch.int16 and kw.qweight_hi.dtype == torch.int8
    assert kw.qweight.shape == kw.qweight_hi.shape == (2, 384 // 8, 128)   # 200 columns → 2 tiles
    assert (kw.in_features, kw.out_features) == (384, 200)
    expect = codes if kw.perm is None else codes[kw.perm]
    assert torch.equal(kernel_codes(kw), expect)
    ref = dequantize_codes(codes, zeros, scales.float(), g_idx)
    torch.testing.assert_close(dequantize_kernel_weights(kw), ref, rtol=0, atol=1e-6)
    # 3 bits per weight, padding aside
    assert (kw.qweight.numel() * 2 + kw.qweight_hi.numel()) * 8 == 3 * 384 * 256


def test_every_field_reaches_its_row() -> None:
    # A single set code per position: catches any swap of field, row or column.
    k, n = 128, 8
    for kk in (0, 15, 16, 127):
        for val in (1, 4, 7):
            codes = torch.zeros(k, n, dtype=torch.int64)
            codes[kk, 3] = val
            kw = repack_values(codes, torch.zeros(1, n), torch.ones(1, n), torch.zeros(k, dtype=torch.int32), 128, 3)
            assert torch.equal(kernel_codes(kw), codes)


def test_fuse_slice_and_swap_keep_both_planes() -> None:
    parts = [repack_values(*layer(256, n, seed), 128, bits=3) for seed, n in ((1, 96), (2, 160))]
    fused = concat_kernel_weights(parts)
    assert fused.bits == 3 and fused.out_features == 256
    whole = dequantize_kernel_weights(fused)
    torch.testing.assert_close(whole[:, :96], dequantize_kernel_weights(parts[0]))
    torch.testing.assert_close(dequantize_kernel_weights(slice_kernel_weights(fused, 96, 256)),
                               dequantize_kernel_weights(parts[1]))
    new = repack_values(*layer(256, 160, 3), 128, bits=3)
    planes_before = [p.data_ptr() for p in fused.planes]
    write_kernel_weights(fused, new, 96)
    assert [p.data_ptr() for p in fused.planes] == planes_before     # in place: CUDA graphs stay valid
    torch.testing.assert_close(dequantize_kernel_weights(fused)[:, 96:], dequantize_kernel_weights(new))
    torch.testing.assert_close(dequantize_kernel_weights(fused)[:, :96], dequantize_kernel_weights(parts[0]))
    with pytest.raises(ValueError, match="bits"):
        concat_kernel_weights([parts[0], rtn_kernel_weights(torch.randn(64, 256), 128, bits=4)])


@pytest.mark.parametrize("act_order", [False, True])
def test_quantizer_checkpoint_repacks_for_the_kernel(act_order: bool) -> None:
    codes, zeros, scales, g_idx = layer(256, 64, 4, act_order)
    module = QuantLinear(pack_qweight(codes.T.to(torch.int32), 3), pack_qzeros(zeros.to(torch.int32), 3),
                         scales, g_idx, 3)
    kw = kernel_weights_of(module)
    assert kw is not None and kw.bits == 3
    torch.testing.assert_close(dequantize_kernel_weights(kw), module.dequantized().T, rtol=0, atol=1e-6)


def test_cpu_forward_and_fused_layer() -> None:
    w = torch.randn(96, 256)                         # nn.Linear layout [out, in]
    lin = TritonQuantLinear(rtn_kernel_weights(w, 128, bits=3), None, None)
    x = torch.randn(2, 5, 256)
    ref = x @ dequantize_kernel_weights(lin.kw)
    torch.testing.assert_close(lin(x), ref)
    # 3-bit RTN error is bounded by half a step of each group's range / 7
    assert (dequantize_kernel_weights(lin.kw) - w.t()).abs().max() <= (w.amax() - w.amin()) / 7
    fused = FusedQuantLinear({"a": lin, "b": TritonQuantLinear(rtn_kernel_weights(w[:32], 128, bits=3), None, None)},
                             None)
    torch.testing.assert_close(fused(x)[..., :96], ref)
