"""The fragment-ordered W4A16 layout and kernels (kernels/w4a16_frag.py).

The packing is checked word by word against the mma.m16n8k16 B-fragment map it promises; the
kernels run under TRITON_INTERPRET against the float32 reference (inline PTX replaced by its fp32
emulation there); the PTX strings they use on the GPU run through test_h2_ptx's small interpreter.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from services.engine.kernels import h2_ptx
from services.engine.kernels.gptq_format import pack_fragments, unpack_fragments
from tests.unit.engine.kernels.interpreted import run_interpreted
from tests.unit.engine.kernels.test_h2_ptx import _pack, codes_of, run_ptx


@pytest.mark.parametrize("k_width", [2, 4])
def test_pack_round_trips_and_rejects_ragged_shapes(k_width: int) -> None:
    codes = torch.randint(0, 16, (384, 40))
    qf = pack_fragments(codes, k_width)
    assert qf.shape == (5, 3, 128) and qf.dtype == torch.int32
    assert torch.equal(unpack_fragments(qf, k_width), codes)
    assert not torch.equal(unpack_fragments(qf, 6 - k_width), codes)
    for shape in ((100, 40), (384, 12)):
        with pytest.raises(ValueError, match="fragment order needs"):
            pack_fragments(torch.zeros(shape, dtype=torch.int64), k_width)
    with pytest.raises(ValueError, match="k_width must be 2 or 4"):
        pack_fragments(codes, 8)


@pytest.mark.parametrize("k_width", [2, 4])
@pytest.mark.parametrize("lane,w,j", [(0, 0, 0), (5, 2, 3), (31, 3, 7), (12, 1, 4), (7, 0, 5)])
def test_each_word_holds_its_lanes_fragment_rows(lane: int, w: int, j: int, k_width: int) -> None:
    """Nibble j = 4e + 2a + h of word 4·lane + w is the code of column 8c + g (lane = 4g + t) and, in
    K=16 step 2w + a of the block, of row 8h + 2t + e (k_width 2: fragment rows 2t, 2t + 1, 2t + 8,
    2t + 9) or 4t + 2h + e (k_width 4: rows 4t .. 4t + 3)."""
    k, n = 256, 16
    codes = torch.arange(k * n).reshape(k, n) % 16
    qf = pack_fragments(codes, k_width)
    g, t = divmod(lane, 4)
    e, a, h = j // 4, (j // 2) % 2, j % 2
    for c in range(n // 8):
        for b in range(k // 128):
            word = int(qf[c, b, 4 * lane + w]) & 0xFFFFFFFF
            step_row = 8 * h + 2 * t + e if k_width == 2 else 4 * t + 2 * h + e
            assert (word >> (4 * j)) & 0xF == codes[128 * b + 32 * w + 16 * a + step_row, 8 * c + g]


def test_mag_asm_gives_1024_plus_every_code() -> None:
    rng = np.random.default_rng(3)
    for _ in range(200):
        q = int(rng.integers(0, 2**32))
        regs = run_ptx(h2_ptx.H2_MAG_ASM, [q], num_outputs=8)
        assert [float(regs[f"${j}"]) for j in range(8)] == [1024 + c for c in codes_of(4, q, 0)]


@pytest.mark.parametrize("asm", ["H2_DEQ_FMA_ASM", "H2_DEQ_SHIFT_ASM"])
def test_fixed_form_deq_asm_gives_every_code_minus_the_zero(asm: str) -> None:
    rng = np.random.default_rng(4)
    for _ in range(200):
        q, z = int(rng.integers(0, 2**32)), int(rng.integers(0, 16))
        zz = _pack(np.float16(1024 + z), np.float16(1024 + z))
        regs = run_ptx(getattr(h2_ptx, asm), [q, zz], num_outputs=8)
        assert [float(regs[f"${j}"]) for j in range(8)] == [c - z for c in codes_of(4, q, 0)]


def check_interpreted() -> None:
    from services.engine.kernels.gptq_format import dequantize_codes, repack_values, rtn_codes
    from services.engine.kernels.gptq_format import to_fragment_order
    from services.engine.kernels.w4a16_frag import frag_matmul

    torch.manual_seed(0)
    k, n = 384, 72                       # 3 K blocks; N not a multiple of the tiles (rows masked)
    w = torch.randn(k, n)
    perm = torch.randperm(k)             # act-order: x is gathered first
    codes, zeros, scales, g_idx = rtn_codes(w, 128, 4, perm)
    kw = repack_values(codes, zeros, scales, g_idx, 128, bits=4)
    ref_w = dequantize_codes(codes, zeros, scales, g_idx)
    cases = [("frag", 16, 32, 2, dict(zsub=True)), ("frag", 16, 64, 1, dict(zsub=False)),
             ("frag", 32, 32, 3, dict(zsub=True, prefetch=True)), ("frag_gemv", 1, 32, 2, {}),
             ("frag_gemv", 1, 64, 1, dict(prefetch=True)), ("frag_t", 16, 32, 2, dict(zsub=True)),
             ("frag_t", 32, 64, 1, dict(zsub=True, prefetch=True))]
    fws = {kw_: to_fragment_order(kw, kw_) for kw_ in (2, 4)}
    for m in (1, 3, 20):
        x = (torch.randn(m, k) * 4).half()
        bias = torch.randn(n).half()
        ref = x.float() @ ref_w + bias.float()
        for (kind, bm, bn, split, extra), k_width in zip(cases * 2, [2] * len(cases) + [4] * len(cases)):
            out = frag_matmul(x, fws[k_width], kind, bm, bn, split, **extra, bias=bias)
            err = ((out.float() - ref).norm() / ref.norm()).item()
            assert err < 1e-2, (kind, bm, bn, split, extra, m, k_width, err)
        onto = torch.randn(m, n).half()
        want = onto.float() + x.float() @ ref_w
        frag_matmul(x, fws[2], "frag", 16, 32, 2, zsub=True, accumulate=onto)
        assert ((onto.float() - want).norm() / want.norm()).item() < 1e-2
    # through the engine's entry points: w4a16_matmul dispatches the frag kinds of the tuner's lists
    # (act-order gather included), dequantize_fp16 (the tuner's reference, the dense kind) reads the order
    from services.engine.kernels.gemm_configs import candidate_configs
    from services.engine.kernels.w4a16 import dequantize_fp16, needs_zeroed_output, w4a16_matmul
    x = (torch.randn(5, k) * 4).half()
    ref = x.float() @ ref_w
    picked = [candidate_configs(4, 4)[0], candidate_configs(16, 4)[-1], candidate_configs(64, 4)[0]]
    for cfg in picked + [candidate_configs(256, 4)[-1]]:
        out = w4a16_matmul(x, fws[4], cfg)
        assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2, cfg
        if cfg.kind != "dense":
            assert needs_zeroed_output(cfg, k) == (min(cfg.split_k, 3) > 1)
    with pytest.raises(ValueError, match="does not read the weights' layout"):
        w4a16_matmul(x, kw, picked[0])
    for k_width in (2, 4):
        assert torch.equal(dequantize_fp16(fws[k_width]), dequantize_fp16(kw))
    # block-major storage (the same codes, other strides): every kind gives the same output bits
    blocked = to_fragment_order(fws[4], 4, block_major=True)
    assert blocked.qweight.stride() != fws[4].qweight.stride()
    assert torch.equal(dequantize_fp16(blocked), dequantize_fp16(kw))
    for kind, bm, bn, split, extra in cases:
        assert torch.equal(frag_matmul(x, blocked, kind, bm, bn, split, **extra),
                           frag_matmul(x, fws[4], kind, bm, bn, split, **extra)), kind
    # [gate | up] input without act-order: silu(gate) · up inside the loads of both kinds
    codes, zeros, scales, g_idx = rtn_codes(w, 128, 4)
    kw_plain = repack_values(codes, zeros, scales, g_idx, 128, bits=4)
    fw_plain = to_fragment_order(kw_plain, 4)
    ref_plain = dequantize_codes(codes, zeros, scales, g_idx)
    gate_up = torch.randn(3, 2 * k).half()
    g, u = gate_up.float().chunk(2, dim=1)
    want = (torch.nn.functional.silu(g) * u).half().float() @ ref_plain
    for kind, bm, bn in (("frag", 16, 32), ("frag_t", 16, 32), ("frag_gemv", 1, 64)):
        out = frag_matmul(gate_up, fw_plain, kind, bm, bn, 2, zsub=True, glu=True)
        assert ((out.float() - want).norm() / want.norm()).item() < 1e-2, kind


def test_kernels_match_the_reference_interpreted() -> None:
    run_interpreted("tests.unit.engine.kernels.test_w4a16_frag")


def check_tma_interpreted() -> None:
    """frag_tma and frag_gemv_tma (codes fetched through a TMA descriptor) against the reference: act-order, bias, split-K,
    N off the tile (a box's last rows run into the next block's codes), onto a residual, the GLU input;
    and the engine's dispatch of its configs."""
    from services.engine.kernels.gemm_configs import tma_candidate_configs
    from services.engine.kernels.gptq_format import dequantize_codes, repack_values, rtn_codes, to_fragment_order
    from services.engine.kernels.w4a16 import w4a16_matmul
    from services.engine.kernels.w4a16_frag import frag_matmul

    torch.manual_seed(1)
    k, n = 384, 72
    w = torch.randn(k, n)
    perm = torch.randperm(k)
    codes, zeros, scales, g_idx = rtn_codes(w, 128, 4, perm)
    kw = repack_values(codes, zeros, scales, g_idx, 128, bits=4)
    ref_w = dequantize_codes(codes, zeros, scales, g_idx)
    for k_width in (2, 4):
        fw = to_fragment_order(kw, k_width, block_major=True)
        for m, bm, bn, split in ((1, 16, 32, 1), (3, 16, 64, 2), (20, 32, 32, 3)):
            x = (torch.randn(m, k) * 4).half()
            bias = torch.randn(n).half()
            ref = x.float() @ ref_w + bias.float()
            out = frag_matmul(x, fw, "frag_tma", bm, bn, split, num_stages=3, zsub=True, fma=True, bias=bias)
            err = ((out.float() - ref).norm() / ref.norm()).item()
            assert err < 1e-2, (k_width, m, bm, bn, split, err)
            onto = torch.randn(m, n).half()
            want = onto.float() + x.float() @ ref_w
            frag_matmul(x, fw, "frag_tma", bm, bn, split, zsub=True, accumulate=onto)
            assert ((onto.float() - want).norm() / want.norm()).item() < 1e-2
    fw = to_fragment_order(kw, 4, block_major=True)
    for m, bn, split in ((1, 32, 1), (3, 64, 2)):     # the GEMV form: one x row per program
        x = (torch.randn(m, k) * 4).half()
        bias = torch.randn(n).half()
        out = frag_matmul(x, to_fragment_order(kw, 2, block_major=True), "frag_gemv_tma", 1, bn, split, num_stages=3,
                          bias=bias)
        ref = x.float() @ ref_w + bias.float()
        assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2, (m, bn, split)
    x = (torch.randn(5, k) * 4).half()
    ref = x.float() @ ref_w
    assert {c.kind for c in tma_candidate_configs(4)} == {"frag_tma", "frag_gemv_tma"}
    for cfg in (tma_candidate_configs(4)[0], tma_candidate_configs(4)[-1], tma_candidate_configs(64)[-1]):
        out = w4a16_matmul(x, fw, cfg)
        assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2, cfg
    with pytest.raises(ValueError, match="block-major"):
        frag_matmul(x, to_fragment_order(kw, 4), "frag_tma", 16, 32, 1, zsub=True)
    with pytest.raises(ValueError, match="needs zsub"):
        frag_matmul(x, fw, "frag_tma", 16, 32, 1)
    codes, zeros, scales, g_idx = rtn_codes(w, 128, 4)
    plain = to_fragment_order(repack_values(codes, zeros, scales, g_idx, 128, bits=4), 4, block_major=True)
    gate_up = torch.randn(3, 2 * k).half()
    g, u = gate_up.float().chunk(2, dim=1)
    want = (torch.nn.functional.silu(g) * u).half().float() @ dequantize_codes(codes, zeros, scales, g_idx)
    for kind, bm in (("frag_tma", 16), ("frag_gemv_tma", 1)):
        out = frag_matmul(gate_up, plain, kind, bm, 32, 2, zsub=kind == "frag_tma", glu=True)
        assert ((out.float() - want).norm() / want.norm()).item() < 1e-2, kind


def test_tma_kernel_matches_the_reference_interpreted() -> None:
    run_interpreted("tests.unit.engine.kernels.test_w4a16_frag", func="check_tma_interpreted")
