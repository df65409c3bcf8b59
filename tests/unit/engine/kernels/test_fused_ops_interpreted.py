"""The fused norm kernel under TRITON_INTERPRET on the CPU: rmsnorm and add_rmsnorm against the
float32 reference, and the zeroing of the next GEMM's split-K output that rides on the same launch.
Skipped without triton (the GPU suite runs the same kernels compiled)."""
from __future__ import annotations

import pytest
import torch

from services.engine.kernels.gemm_configs import GemmConfig
from tests.unit.engine.kernels.interpreted import run_interpreted


def check_interpreted() -> None:
    from services.engine.kernels.fused_ops import add_rmsnorm, add_rmsnorm_reference, rmsnorm

    torch.manual_seed(0)
    t, h = 3, 320
    x, r = torch.randn(t, h).half(), torch.randn(t, h).half()
    w = torch.rand(h).half()

    def err(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm())

    for zn in (0, 100, 2500):      # no zeroing; one partial block; several blocks, the last partial
        zero = torch.full((t, zn), 7.0).half() if zn else None
        out = rmsnorm(x, w, 1e-5, zero)
        assert err(out, add_rmsnorm_reference(x, w, 1e-5)[0]) < 1e-2
        if zero is not None:
            assert torch.count_nonzero(zero) == 0
        zero = torch.full((t, zn), 7.0).half() if zn else None
        out, res = add_rmsnorm(x, w, 1e-5, r, zero)
        ref_out, ref_res = add_rmsnorm_reference(x, w, 1e-5, r)
        assert err(out, ref_out) < 1e-2 and err(res, ref_res) < 1e-2
        if zero is not None:
            assert torch.count_nonzero(zero) == 0
    with pytest.raises(ValueError, match="contiguous"):
        rmsnorm(x, w, 1e-5, torch.zeros(t, 8).half().t())


def test_fused_norms_interpreted() -> None:
    run_interpreted("tests.unit.engine.kernels.test_fused_ops_interpreted")


@pytest.mark.parametrize("kind,split,k,expect", [
    ("mma8", 8, 4096, True),      # 32 blocks in 8 splits: atomics into a zeroed output
    ("mma8", 1, 4096, False),     # one split: plain stores
    ("mma8", 8, 128, False),      # one 128-row block: the split collapses to 1
    ("dense", 1, 4096, False),    # dequantize + cuBLAS
    ("gemv_h2", 4, 256, True),    # 2 blocks: 2 splits
])
def test_needs_zeroed_output(kind: str, split: int, k: int, expect: bool) -> None:
    from services.engine.kernels.w4a16 import needs_zeroed_output, split_of
    cfg = GemmConfig(kind, 16 if kind.startswith("mma") else 1, 64, split)
    assert needs_zeroed_output(cfg, k) is expect
    splits, per = split_of(cfg, k)
    assert splits * per >= k // 128 > (splits - 1) * per
