"""GPTQ v1 pack/unpack/repack round trips and the torch fallback of TritonQuantLinear (CPU)."""
from __future__ import annotations

import pytest
import torch

from services.engine.kernels.gptq_format import (
    dequantize_kernel_weights, dequantize_reference, quantize_gptq_v1, repack_for_kernel,
    unpack_along_cols, unpack_along_rows, GptqTensors,
)
from services.engine.kernels.lora import lora_apply_reference
from services.engine.kernels.quant_linear import TritonQuantLinear
from services.engine.kernels.gemm_configs import candidate_configs, m_bucket

torch.set_num_threads(1)


def test_v1_layout_bit_positions() -> None:
    # qweight row 0 col 0 holds k=0..7 at bits 0..28; qzeros stores zero - 1.
    w = torch.zeros(128, 8)
    t = quantize_gptq_v1(w + torch.linspace(-1, 1, 128)[:, None], 128)
    q = unpack_along_rows(t.qweight)
    assert q.shape == (128, 8)
    assert ((t.qweight[0, 0].item() >> 4) & 0xF) == q[1, 0].item()
    zeros = unpack_along_cols(t.qzeros) + 1
    assert zeros.shape == (1, 8)
    assert ((t.qzeros[0, 0].item() & 0xF) + 1) == zeros[0, 0].item()


@pytest.mark.parametrize("group_size,act_order", [(128, False), (128, True), (256, False), (512, True)])
def test_quantize_error_small_and_repack_exact(group_size: int, act_order: bool) -> None:
    k, n = 512, 48
    w = torch.randn(k, n)
    perm = torch.randperm(k) if act_order else None
    t = quantize_gptq_v1(w, group_size, perm)
    ref = dequantize_reference(t)
    # 4-bit RTN of Gaussian weights: relative error ≈ 0.1, and never wild.
    assert ((ref - w).norm() / w.norm()).item() < 0.2
    kw = repack_for_kernel(t)
    assert (kw.perm is not None) == (act_order and group_size < k)  # one group: no reorder needed
    assert torch.equal(dequantize_kernel_weights(kw), ref)


def test_act_order_g_idx_is_scrambled_and_groups_follow_perm() -> None:
    perm = torch.randperm(256)
    t = quantize_gptq_v1(torch.randn(256, 8), 128, perm)
    assert not torch.equal(t.g_idx, torch.arange(256, dtype=torch.int32) // 128)
    assert torch.equal(t.g_idx[perm].long(), torch.arange(256) // 128)


def test_repack_rejects_uneven_groups_and_bad_sizes() -> None:
    t = quantize_gptq_v1(torch.randn(256, 8), 128)
    bad = GptqTensors(t.qweight, t.qzeros, t.scales, torch.zeros(256, dtype=torch.int32), 128)
    with pytest.raises(ValueError, match="group"):
        repack_for_kernel(bad)
    t64 = quantize_gptq_v1(torch.randn(256, 8), 64)
    with pytest.raises(ValueError, match="multiples"):
        repack_for_kernel(t64)


def test_quant_linear_cpu_fallback_matches_dense() -> None:
    t = quantize_gptq_v1(torch.randn(256, 40), 128, torch.randperm(256))
    bias = torch.randn(40)
    lin = TritonQuantLinear.from_gptq(t, bias=bias)
    x = torch.randn(2, 5, 256)
    out = lin(x)
    assert out.shape == (2, 5, 40)
    torch.testing.assert_close(out, x @ dequantize_reference(t) + bias, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError):
        lin(torch.randn(3, 255))


@pytest.mark.parametrize("m,bucket", [(1, 1), (3, 4), (16, 16), (17, 32), (64, 64), (100, 128), (300, 512)])
def test_m_bucket_and_candidates(m: int, bucket: int) -> None:
    assert m_bucket(m) == bucket
    cands = candidate_configs(bucket)
    assert cands and all(c.split_k >= 1 and c.kind in ("gemv_row", "gemv_h2", "mma8", "mma8t", "mma8ts", "mma1t", "mma", "dense", "mma8_sk") for c in cands)
    assert all(c.block_m >= 16 for c in cands if c.kind in ("mma8", "mma8t", "mma8ts", "mma1t", "mma"))  # tl.dot needs 16 rows


def test_lora_reference_per_slice() -> None:
    # Two slices of rank 16: slice j of the output uses rows j*16.. of A's output.
    x = torch.randn(3, 32)
    a = torch.randn(2, 32, 32)
    b = torch.randn(2, 8, 16)
    y = torch.zeros(3, 8)
    out = lora_apply_reference(y, x, a, b, torch.tensor([1, -1, 0]), n_slice=4)
    v = a[1] @ x[0]
    torch.testing.assert_close(out[0, :4], b[1, :4] @ v[:16])
    torch.testing.assert_close(out[0, 4:], b[1, 4:] @ v[16:])
    assert torch.equal(out[1], torch.zeros(8))
