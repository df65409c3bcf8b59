"""The W4A16/W3A16 GEMM kernels run under TRITON_INTERPRET on the CPU against the float32 reference.

Covers the index math of every kernel kind at small M (row masks, N not a multiple of 128,
act-order, the fp16 zero subtraction of zsub) and, for gemv_h2, the packing of x pairs and zero
pairs. Its inline PTX has no CPU form here: the interpreter runs an fp32 emulation of the same
packed operands; the PTX itself is run by test_h2_ptx.py's small interpreter, compiled for sm_90
by test_kernels_compile_sm90.py, and checked on the GPU by tests/gpu/test_kernels.py and the
tuner's error guard. Skipped without triton.
"""
from __future__ import annotations

import pytest
import torch

from tests.unit.engine.kernels.interpreted import run_interpreted


def check_interpreted(bits: int, act_order: bool) -> None:
    from services.engine.kernels.gptq_format import dequantize_codes, repack_values, rtn_codes
    from services.engine.kernels.gemm_configs import SWAPPED_KINDS, candidate_configs
    from services.engine.kernels.w4a16 import w4a16_matmul

    torch.manual_seed(0)
    k, n = 256, 320
    w = torch.randn(k, n)
    perm = torch.randperm(k) if act_order else None
    codes, zeros, scales, g_idx = rtn_codes(w, 128, bits, perm)
    ref_w = dequantize_codes(codes, zeros, scales, g_idx)
    kw = repack_values(codes, zeros, scales, g_idx, 128, bits=bits)
    for m in (1, 3, 20, 130):
        x = (torch.randn(m, k) * 4).half()
        bias = torch.randn(n).half()
        ref = x.float() @ ref_w + bias.float()
        seen = set()
        for cfg in candidate_configs(m):
            key = (cfg.kind, cfg.block_m, cfg.split_k, cfg.zsub)
            # one config per kind, tile height, split and zero path (interpreting is slow); at M = 20
            # and 130 only the swapped kernels, for their BM 32 to 256 tiles with rows masked off
            if key in seen or (m > 4 and cfg.kind not in SWAPPED_KINDS):
                continue
            seen.add(key)
            out = w4a16_matmul(x, kw, cfg, bias)
            err = ((out.float() - ref).norm() / ref.norm()).item()
            assert err < 1e-2, (cfg, err)
        assert any(kind == "mma8t" for kind, *_ in seen)
        assert any(kind == "mma1t" for kind, *_ in seen)   # one K=128 dot on the joined [BN, 128] operand
        if m > 64:   # the fp16-scaled swapped kernel's largest tile, 126 of its 256 rows masked
            assert any(kind == "mma8ts" and bm == 256 for kind, bm, *_ in seen)
        if m <= 4:
            assert any(kind == "gemv_h2" for kind, *_ in seen)
            assert any(zsub for *_, zsub in seen)


@pytest.mark.parametrize("bits,act_order", [(4, False), (4, True), (3, False), (3, True)])
def test_kernels_interpreted_match_the_reference(bits: int, act_order: bool) -> None:
    run_interpreted("tests.unit.engine.kernels.test_w4a16_interpreted", bits, act_order)
