"""The fragment-ordered 4-bit layout as a KernelWeights layout (KernelWeights.frag): conversions, the
column operations weight swaps and fused linears use, the CPU path of TritonQuantLinear, the GEMM
candidates and the engine switch (no GPU, no triton needed)."""
from __future__ import annotations

import pytest
import torch

from services.engine.config import EngineConfig
from services.engine.kernels.gemm_configs import FRAG_KINDS, candidate_configs, m_bucket
from services.engine.kernels.gemm_tuner import GemmTuner
from services.engine.kernels.gptq_format import (
    concat_kernel_weights,
    dequantize_kernel_weights,
    frag_block_major,
    kernel_codes,
    repack_values,
    rtn_codes,
    rtn_kernel_weights,
    slice_kernel_weights,
    to_fragment_order,
    to_tiled,
    write_kernel_weights,
)
from services.engine.kernels.quant_linear import FusedQuantLinear, TritonQuantLinear


def weights(n: int, k: int = 256, seed: int = 0, bits: int = 4):
    gen = torch.Generator().manual_seed(seed)
    if n % 8:   # (GPTQ v1 checkpoints pack zeros 8 columns a word: only codes made here can be this narrow)
        codes, zeros, scales, g_idx = rtn_codes(torch.randn(k, n, generator=gen), 128, bits)
        return repack_values(codes, zeros, scales, g_idx, 128, bits)
    return rtn_kernel_weights(torch.randn(n, k, generator=gen), 128, bits)


@pytest.mark.parametrize("k_width", [2, 4])
def test_conversions_keep_every_code(k_width: int) -> None:
    kw = weights(40, 384)
    fw = to_fragment_order(kw, k_width)
    assert fw.frag == k_width and fw.qweight.shape == (5, 3, 128)
    assert (fw.in_features, fw.out_features) == (384, 40)
    assert torch.equal(kernel_codes(fw), kernel_codes(kw))
    assert torch.equal(dequantize_kernel_weights(fw), dequantize_kernel_weights(kw))
    back = to_tiled(fw)
    assert back.frag == 0 and torch.equal(back.qweight, kw.qweight)
    assert to_fragment_order(fw, k_width) is fw and to_tiled(kw) is kw
    other = to_fragment_order(fw, 6 - k_width)   # from one fragment order to the other
    assert other.frag == 6 - k_width and torch.equal(kernel_codes(other), kernel_codes(kw))
    blocked = to_fragment_order(kw, k_width, block_major=True)   # block-major: the same codes, a strided view
    assert frag_block_major(blocked) and not frag_block_major(fw) and blocked.qweight.shape == (5, 3, 128)
    assert blocked.qweight.transpose(0, 1).is_contiguous() and torch.equal(blocked.qweight, fw.qweight)
    assert to_fragment_order(blocked, k_width, block_major=True) is blocked
    assert not frag_block_major(to_fragment_order(blocked, k_width))
    assert torch.equal(kernel_codes(blocked), kernel_codes(kw))
    part = slice_kernel_weights(blocked, 8, 24)               # column operations read either storage
    assert torch.equal(dequantize_kernel_weights(part), dequantize_kernel_weights(kw)[:, 8:24])
    write_kernel_weights(blocked, weights(16, 384, seed=5), 8)
    assert frag_block_major(blocked)
    assert torch.equal(dequantize_kernel_weights(blocked)[:, 8:24], dequantize_kernel_weights(weights(16, 384, seed=5)))
    with pytest.raises(ValueError, match="4-bit only"):
        to_fragment_order(weights(40, bits=3), k_width)
    with pytest.raises(ValueError, match="N % 8"):
        to_fragment_order(weights(36), k_width)


def test_concat_slice_and_write_in_fragment_order() -> None:
    a, b = weights(24, seed=1), weights(40, seed=2)
    fa = to_fragment_order(a, 4)
    both = concat_kernel_weights([fa, b])                  # the first part's layout; b converted
    assert both.frag == 4 and both.out_features == 64
    assert torch.equal(dequantize_kernel_weights(both), dequantize_kernel_weights(concat_kernel_weights([a, b])))
    part = slice_kernel_weights(both, 24, 64)
    assert part.frag == 4 and torch.equal(dequantize_kernel_weights(part), dequantize_kernel_weights(b))
    with pytest.raises(ValueError, match="multiples of 8"):
        slice_kernel_weights(both, 20, 64)
    c = weights(40, seed=3)
    write_kernel_weights(both, c, 24)                      # a tiled source into fragment order
    assert both.frag == 4
    assert torch.equal(dequantize_kernel_weights(both)[:, 24:], dequantize_kernel_weights(c))
    assert torch.equal(dequantize_kernel_weights(both)[:, :24], dequantize_kernel_weights(a))
    with pytest.raises(ValueError, match="multiples of 8"):
        write_kernel_weights(both, weights(16, seed=4), 4)
    tiled = concat_kernel_weights([a, b])                  # a fragment-ordered source into the tiled layout
    write_kernel_weights(tiled, to_fragment_order(c, 2), 24)
    assert tiled.frag == 0 and torch.equal(dequantize_kernel_weights(tiled)[:, 24:], dequantize_kernel_weights(c))


def test_same_order_other_storage_is_copied_as_it_is(monkeypatch) -> None:
    """A source in the destination's fragment order but the other storage (row-major vs block-major) is
    copied or concatenated straight from its strides: no contiguous conversion first."""
    import services.engine.kernels.gptq_format as gf
    a, b, c = weights(24, seed=1), weights(40, seed=2), weights(16, seed=3)
    row_a, blocked_b = to_fragment_order(a, 4), to_fragment_order(b, 4, block_major=True)
    blocked_c = to_fragment_order(c, 4, block_major=True)
    calls = []
    real = gf._frag_storage
    monkeypatch.setattr(gf, "_frag_storage", lambda qf, bm: calls.append(bm) or real(qf, bm))
    both = concat_kernel_weights([row_a, blocked_b])       # stored as the first part: one storage call
    assert calls == [False] and not frag_block_major(both)
    assert torch.equal(dequantize_kernel_weights(both), dequantize_kernel_weights(concat_kernel_weights([a, b])))
    write_kernel_weights(both, blocked_c, 8)               # no conversion at all
    assert calls == [False]
    assert torch.equal(dequantize_kernel_weights(both)[:, 8:24], dequantize_kernel_weights(c))


def test_quant_linear_takes_the_layout_and_gives_the_same_function() -> None:
    lin = TritonQuantLinear(weights(64), None, None)
    x = torch.randn(3, 256)
    before = lin(x)
    assert lin.set_layout(4) and lin.kw.frag == 4
    assert torch.equal(lin(x), before)
    assert lin.set_layout(0) and lin.kw.frag == 0 and torch.equal(lin(x), before)
    assert not TritonQuantLinear(weights(64, bits=3), None, None).set_layout(4)   # 3-bit keeps its own
    odd = TritonQuantLinear(weights(36), None, None)
    assert not odd.set_layout(4) and odd.kw.frag == 0                              # N % 8 != 0 too
    parts = {"q": TritonQuantLinear(weights(32, seed=5), None, None),
             "k": TritonQuantLinear(weights(16, seed=6), None, None)}
    for p in parts.values():
        p.set_layout(2)
    fused = FusedQuantLinear(parts, None)
    assert fused.inner.kw.frag == 2
    assert torch.equal(fused.part("k").dense_weight(torch.float32), parts["k"].dense_weight(torch.float32))
    new_k = weights(16, seed=7)                            # a swap arrives tiled
    fused.load_part_("k", new_k)
    assert fused.inner.kw.frag == 2
    assert torch.equal(fused(x)[:, 32:], TritonQuantLinear(new_k, None, None)(x))
    for p in parts.values():                               # block-major parts: the fused layer stores so too
        p.set_layout(2, block_major=True)
    blocked = FusedQuantLinear(parts, None)
    assert frag_block_major(blocked.inner.kw) and frag_block_major(blocked.part("k").kw)
    blocked.load_part_("k", new_k)
    assert frag_block_major(blocked.inner.kw) and torch.equal(blocked(x), fused(x))


def test_fragment_candidates_read_only_that_layout() -> None:
    for m in (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024):
        m = m_bucket(m)
        cands = candidate_configs(m, 4)
        assert cands and len(set(cands)) == len(cands)
        assert {c.kind for c in cands} <= set(FRAG_KINDS) | {"dense"}
        for c in cands:
            assert c.block_n % 8 == 0 and c.split_k >= 1
            assert c.kind != "frag" or (c.zsub and c.fast_deq and c.num_stages == (1 if c.prefetch else 2))
            assert c.kind != "frag_t" or (c.zsub and not c.prefetch and (c.block_m == 16) == (m <= 16))
        assert ("frag_gemv" in {c.kind for c in cands}) == (m <= 4)
        assert ("dense" in {c.kind for c in cands}) == (m > 64)
    assert candidate_configs(16, 2) == candidate_configs(16, 4)
    assert not {c.kind for c in candidate_configs(16)} & set(FRAG_KINDS)


def test_tuner_keys_the_layout() -> None:
    tuner = GemmTuner()
    kw = weights(64)
    x = torch.randn(4, 256).half()
    assert tuner.config_for(x, kw).kind not in FRAG_KINDS
    assert tuner.config_for(x, to_fragment_order(kw, 4)).kind in FRAG_KINDS   # CPU: the first candidate
    assert tuner.config_for(x, to_fragment_order(kw, 4, block_major=True)).kind in FRAG_KINDS
    assert len(tuner.best) == 3


def test_engine_config_checks_the_layout() -> None:
    assert EngineConfig().w4_layout == "auto"
    assert EngineConfig(w4_layout="frag").w4_layout == "frag"
    with pytest.raises(ValueError, match="ENGINE_W4_LAYOUT must be one of"):
        EngineConfig(w4_layout="marlin")
    assert EngineConfig.from_env({"ENGINE_W4_LAYOUT": "frag"}).w4_layout == "frag"
    from services.engine.model_runner import w4_frag
    from services.engine.kernels.w4a16_frag import frag_k_width
    assert [w4_frag(layout, 8) for layout in ("tiles", "frag2", "frag4", "frag")] == [0, 2, 4, frag_k_width()]
    from services.engine.model_runner import AUTO_FRAG_MAX_SEQS
    assert w4_frag("auto", AUTO_FRAG_MAX_SEQS) == frag_k_width() and w4_frag("auto", 1) == frag_k_width()
    assert w4_frag("auto", AUTO_FRAG_MAX_SEQS + 1) == 0 and w4_frag("auto", EngineConfig().max_num_seqs) == 0
    from services.engine.model_runner import w4_block_major
    assert [w4_frag(layout, 64) for layout in ("fragb", "frag2b", "frag4b")] == [frag_k_width(), 2, 4]
    layouts = ("fragb", "frag4b", "frag4", "auto", "tiles")
    assert [w4_block_major(layout, 64) for layout in layouts] == [True, True, False, False, False]
    # auto stores the fragment order block-major wherever it takes it
    assert w4_block_major("auto", AUTO_FRAG_MAX_SEQS) and not w4_block_major("auto", AUTO_FRAG_MAX_SEQS + 1)
    assert EngineConfig.from_env({"ENGINE_W4_LAYOUT": "frag4b"}).w4_layout == "frag4b"


def test_replacing_module_keeps_the_fragment_layout_and_storage() -> None:
    """An act-order GPTQ module cannot be written into a layer's weights (another row permutation): the
    new kernel module takes the replaced layer's layout, block-major storage included."""
    from services.engine.kernels.gptq_format import quantize_gptq_v1
    from services.engine.llama import LlamaShape, random_weights
    from services.engine.model_runner import ModelRunner
    from services.quantizer.qlinear import QuantLinear
    shape = LlamaShape(vocab_size=128, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=2,
                       num_kv_heads=2, head_dim=64, rms_norm_eps=1e-5, rope_theta=10000.0,
                       max_position_embeddings=256, tie_word_embeddings=False)
    runner = ModelRunner(EngineConfig(num_kv_blocks=8, block_size=16, device="cpu", dtype="float32", quant_bits=4),
                         shape, random_weights(shape, "cpu", torch.float32, std=0.05), "cpu", torch.float32)
    runner.base_linear(1, "down_proj").set_layout(4, block_major=True)
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(256, 128, generator=gen) * 0.05                       # down_proj [in, out]
    act = quantize_gptq_v1(w, 128, torch.randperm(256, generator=gen))
    module = QuantLinear(act.qweight, act.qzeros, act.scales, act.g_idx, 4)
    runner.set_base_linear(1, "down_proj", module)
    swapped = runner.base_linear(1, "down_proj")
    assert runner.model_epoch == 1 and swapped.kw.perm is not None
    assert swapped.kw.frag == 4 and frag_block_major(swapped.kw)
    x = torch.randn(3, 256, generator=gen)
    assert torch.allclose(swapped(x), module(x), atol=1e-5)
