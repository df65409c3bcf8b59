"""The W4A16/W3A16 GEMM kernels run under TRITON_INTERPRET on the CPU against the float32 reference.

Covers the index math of every kernel kind at small M (row masks, N not a multiple of 128,
act-order, the fp16 zero subtraction of zsub) and, for gemv_h2, the packing of x pairs and zero
pairs. Its inline PTX has no CPU form here: the interpreter runs an fp32 emulation of the same
packed operands; the PTX itself is run by test_h2_ptx.py's small interpreter, compiled for sm_90
by test_kernels_compile_sm90.py, and checked on the GPU by tests/gpu/test_kernels.py and the
tuner's error guard. Skipped without triton.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.unit.engine.kernels.interpreted import run_interpreted


def check_interpreted(bits: int, act_order: bool) -> None:
    from services.engine.kernels.gptq_format import dequantize_codes, repack_values, rtn_codes
    from services.engine.kernels.gemm_configs import SWAPPED_KINDS, GemmConfig, candidate_configs
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
            # gemv_h2's register double buffer (num_stages 2) over both blocks in one program, so the
            # buffer turns over, with the whole K in a single split and with one block per split
            for cfg in (GemmConfig("gemv_h2", 1, 32, 1, 4, 2, 1), GemmConfig("gemv_h2", 1, 128, 2, 1, 2, 1)):
                out = w4a16_matmul(x, kw, cfg, bias)
                err = ((out.float() - ref).norm() / ref.norm()).item()
                assert err < 1e-2, (cfg, err)


@pytest.mark.parametrize("bits,act_order", [(4, False), (4, True), (3, False), (3, True)])
def test_kernels_interpreted_match_the_reference(bits: int, act_order: bool) -> None:
    run_interpreted("tests.unit.engine.kernels.test_w4a16_interpreted", bits, act_order)


def check_serial_split(bits: int) -> None:
    """Serial split-K (w4a16.SERIAL_SPLIT_K): every kernel kind with more than one split, twice
    over (the locks must be back at zero after each call), on masked tiles."""
    from services.engine.kernels import w4a16 as W
    from services.engine.kernels.gemm_configs import GemmConfig
    from services.engine.kernels.gptq_format import dequantize_codes, repack_values, rtn_codes

    W.SERIAL_SPLIT_K = True
    torch.manual_seed(1)
    k, n = 512, 320      # 4 K blocks: split 2 and 4
    codes, zeros, scales, g_idx = rtn_codes(torch.randn(k, n), 128, bits, None)
    ref_w = dequantize_codes(codes, zeros, scales, g_idx)
    kw = repack_values(codes, zeros, scales, g_idx, 128, bits=bits)
    cfgs = [GemmConfig("gemv_h2", 1, 32, 4, 4, 1, 1), GemmConfig("gemv_row", 1, 32, 2, 4, 1, 2),
            GemmConfig("mma8", 16, 64, 4, 4, 3, fast_deq=True, zsub=True), GemmConfig("mma8", 16, 64, 2, 4, 3),
            GemmConfig("mma1t", 32, 64, 2, 4, 3, fast_deq=True, zsub=True),
            GemmConfig("mma8ts", 64, 64, 4, 4, 3, fast_deq=True, zsub=True)]
    for m, cfg in [(3, cfgs[0]), (2, cfgs[1]), (5, cfgs[2]), (20, cfgs[3]), (20, cfgs[4]), (70, cfgs[5])]:
        x = (torch.randn(m, k) * 4).half()
        bias = torch.randn(n).half()
        ref = x.float() @ ref_w + bias.float()
        for _ in range(2):
            out = W.w4a16_matmul(x, kw, cfg, bias)
            err = ((out.float() - ref).norm() / ref.norm()).item()
            assert err < 1e-2, (cfg, m, err)
        assert all(int(buf.abs().sum()) == 0 for buf in W._locks.values()), cfg   # every lock reset
    assert W._locks, "the serial path never ran"


@pytest.mark.parametrize("bits", [4, 3])
def test_serial_split_k_interpreted_matches_the_reference(bits: int) -> None:
    run_interpreted("tests.unit.engine.kernels.test_w4a16_interpreted", bits, func="check_serial_split")


def check_accumulate() -> None:
    """accumulate=residual: residual + x W in place, for every kernel kind with one split and with
    several (the fp16 atomics path either way), and the dense fallback."""
    from services.engine.kernels.gptq_format import dequantize_codes, repack_values, rtn_codes
    from services.engine.kernels.gemm_configs import GemmConfig, candidate_configs
    from services.engine.kernels.w4a16 import w4a16_matmul

    torch.manual_seed(1)
    k, n = 256, 192
    codes, zeros, scales, g_idx = rtn_codes(torch.randn(k, n), 128, 4)
    ref_w = dequantize_codes(codes, zeros, scales, g_idx)
    kw = repack_values(codes, zeros, scales, g_idx, 128, bits=4)
    for m in (1, 3):
        x = (torch.randn(m, k) * 4).half()
        seen = set()
        picks = candidate_configs(m)
        picks += [dataclasses.replace(c, split_k=1) for c in picks] + [GemmConfig("dense", 0, 128, 1)]
        for cfg in picks:
            key = (cfg.kind, cfg.split_k > 1)
            if key in seen:
                continue
            seen.add(key)
            residual = torch.randn(m, n).half() * 8
            ref = residual.float() + x.float() @ ref_w
            out = w4a16_matmul(x, kw, cfg, accumulate=residual)
            assert out.data_ptr() == residual.data_ptr()
            err = ((out.float() - ref).norm() / ref.norm()).item()
            assert err < 1e-2, (cfg, err)
        assert {split for _, split in seen} == {False, True} and ("dense", False) in seen
    try:
        w4a16_matmul(x, kw, candidate_configs(3)[0], accumulate=torch.zeros(3, n + 1).half())
    except ValueError as exc:
        assert "accumulate must be" in str(exc)
    else:
        raise AssertionError("a mis-shaped accumulate was accepted")


def test_accumulate_into_residual_interpreted() -> None:
    run_interpreted("tests.unit.engine.kernels.test_w4a16_interpreted", func="check_accumulate")


def check_glu_interpreted(act_order: bool) -> None:
    """glu=True (silu(gate) · up computed in each kernel's input load) against the same kernel on
    the activation computed beforehand: one config per kind, small M; act-order and a wrong width."""
    from services.engine.kernels.gemm_configs import candidate_configs
    from services.engine.kernels.gptq_format import repack_values, rtn_codes
    from services.engine.kernels.w4a16 import w4a16_matmul

    torch.manual_seed(1)
    k, n = 256, 192
    perm = torch.randperm(k) if act_order else None
    kw = repack_values(*rtn_codes(torch.randn(k, n), 128, 4, perm), 128, bits=4)
    for m in (1, 3, 20):
        gate_up = (torch.randn(m, 2 * k) * 2).half()
        g, u = gate_up.float().chunk(2, dim=-1)
        act = (g / (1.0 + torch.exp(-g)) * u).half()          # fused_ops.silu_mul's rounding
        seen = set()
        for cfg in candidate_configs(m):
            if cfg.kind in seen or (act_order and seen):
                continue
            seen.add(cfg.kind)
            want = w4a16_matmul(act, kw, cfg)
            got = w4a16_matmul(gate_up, kw, cfg, glu=True)
            err = ((got.float() - want.float()).norm() / want.float().norm()).item()
            assert err < 1e-3, (cfg, err)
        assert act_order or {"gemv_h2", "mma8t", "mma1t"} & seen
    with pytest.raises(ValueError, match="gate | up"):
        w4a16_matmul(torch.zeros(2, k).half(), kw, candidate_configs(2)[0], glu=True)


@pytest.mark.parametrize("act_order", [False, True], ids=["plain", "act-order"])
def test_glu_input_interpreted(act_order: bool) -> None:
    run_interpreted("tests.unit.engine.kernels.test_w4a16_interpreted", act_order, func="check_glu_interpreted")


def check_stream_k(bits: int) -> None:
    """mma8_sk with runs that start and end inside column tiles (1 program per SM of the interpreter's
    8 over 3 K blocks x 5 tiles: 2 units a run): partials of one tile from two programs, the bias
    added once per tile, masked rows and columns, and the residual form."""
    from services.engine.kernels import w4a16 as W
    from services.engine.kernels.gemm_configs import GemmConfig
    from services.engine.kernels.gptq_format import dequantize_codes, repack_values, rtn_codes

    torch.manual_seed(2)
    k, n = 384, 320
    codes, zeros, scales, g_idx = rtn_codes(torch.randn(k, n), 128, bits, None)
    ref_w = dequantize_codes(codes, zeros, scales, g_idx)
    kw = repack_values(codes, zeros, scales, g_idx, 128, bits=bits)
    cfg = GemmConfig("mma8_sk", 16, 64, 1, 4, 3, fast_deq=True, zsub=True)
    for m in (1, 20):
        assert W.stream_runs(cfg, m, n, k, W.sm_count(torch.device("cpu")))[1] == (2 if m == 1 else 4)
        x = (torch.randn(m, k) * 4).half()
        bias = torch.randn(n).half()
        ref = x.float() @ ref_w + bias.float()
        out = W.w4a16_matmul(x, kw, cfg, bias)
        assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2, m
        residual = torch.randn(m, n).half()
        want = residual.float() + ref
        got = W.w4a16_matmul(x, kw, cfg, bias, accumulate=residual)
        assert got.data_ptr() == residual.data_ptr()
        assert ((got.float() - want).norm() / want.norm()).item() < 1e-2, m


@pytest.mark.parametrize("bits", [4, 3])
def test_stream_k_interpreted_matches_the_reference(bits: int) -> None:
    run_interpreted("tests.unit.engine.kernels.test_w4a16_interpreted", bits, func="check_stream_k")
