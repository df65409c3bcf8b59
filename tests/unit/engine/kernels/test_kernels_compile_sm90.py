"""Every GEMM tuner candidate compiles for Hopper (sm_90) on this machine, with Triton's bundled
ptxas, no GPU needed (services/engine/kernels/aot.py). Catches PTX that ptxas rejects (gemv_h2's
inline assembly) and layouts a target cannot lower before a GPU run does. Skipped without triton;
slow (one compile per distinct config, ~60 kernels)."""
from __future__ import annotations

import pytest

from services.engine.kernels.gemm_configs import GemmConfig, candidate_configs

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("bits", [4, 3])
def test_every_candidate_compiles_for_sm90(bits: int) -> None:
    pytest.importorskip("triton")
    from services.engine.kernels.aot import compile_config
    seen = set()
    for m in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        for cfg in candidate_configs(m):
            key = (cfg.kind, cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages, cfg.unroll,
                   cfg.fast_deq, cfg.zsub)
            if cfg.kind == "dense" or key in seen:
                continue
            seen.add(key)
            cubin = compile_config(cfg, bits)
            assert cubin and len(cubin) > 1000, cfg
            if cfg.kind in ("gemv_h2", "mma8", "mma8t", "mma8ts", "mma1t") and cfg.split_k == min(c.split_k for c in candidate_configs(m)
                                                                        if c.kind == cfg.kind):
                # the bias + plain-store form (one split over K), once per kind and shape of tile
                assert compile_config(cfg, bits, has_bias=True, use_atomic=False), cfg
                assert compile_config(cfg, bits, serial=True), cfg   # serial split-K (w4a16.SERIAL_SPLIT_K)
                assert compile_config(cfg, bits, glu=True), cfg      # [gate | up] input (down_proj, fused SiLU·mul)
    assert any(k[0] == "gemv_h2" for k in seen)
    # gemv_h2's double buffer with the L2 prefetch of the block after (num_stages 3): not a candidate yet
    assert compile_config(GemmConfig("gemv_h2", 1, 128, 8, 1, 3, 1), bits)


def test_every_fragment_candidate_compiles_for_sm90() -> None:
    """The frag kinds' candidates (the fragment-ordered layout, gemm_configs.frag_candidate_configs) in the
    fragment order of the installed Triton, plus the bias / plain-store, [gate | up] and block-major forms once
    per tile."""
    pytest.importorskip("triton")
    from services.engine.kernels.aot import compile_config
    from services.engine.kernels.w4a16_frag import frag_k_width
    k_width = frag_k_width()
    seen = set()
    for m in (1, 4, 16, 32, 64, 128):
        for cfg in candidate_configs(m, k_width):
            key = (cfg.kind, cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages, cfg.prefetch)
            if cfg.kind == "dense" or key in seen:
                continue
            seen.add(key)
            assert len(compile_config(cfg, 4, frag=k_width)) > 1000, cfg
            if not any(k[:3] == key[:3] for k in seen - {key}):
                assert compile_config(cfg, 4, has_bias=True, use_atomic=False, frag=k_width), cfg
                assert compile_config(cfg, 4, glu=True, frag=k_width), cfg
                assert compile_config(cfg, 4, frag=k_width, block_major=True), cfg
    assert {k[0] for k in seen} == {"frag", "frag_t", "frag_gemv", "frag_tma", "frag_gemv_tma"}


def test_tma_kernel_pipelines_its_code_boxes_sm90() -> None:
    """frag_tma's code loads are TMA bulk copies that Triton's pipeliner issues num_stages - 1 blocks ahead
    of the one in use (PTX of the smallest and largest M <= 16 configs and an M = 64 one, with PDL and
    the GLU input), and its PDL wait comes first."""
    pytest.importorskip("triton")
    import re

    from services.engine.kernels.aot import compile_frag
    from services.engine.kernels.gemm_configs import tma_candidate_configs
    from services.engine.kernels.w4a16_frag import frag_k_width
    for cfg in (tma_candidate_configs(16)[0], tma_candidate_configs(16)[-1], tma_candidate_configs(64)[0],
                tma_candidate_configs(1)[0], tma_candidate_configs(1)[-1]):
        ptx = compile_frag(cfg, frag_k_width(), pdl=1, glu=True, asm="ptx")
        copies = len(re.findall(r"cp\.async\.bulk\.tensor", ptx))
        # the GEMV's loop (no dot) asks for its pipelining; the pipeliner may also unroll its prologue
        assert copies == cfg.num_stages if cfg.kind == "frag_tma" else copies >= 2, (cfg, copies)
        assert ptx.index("griddepcontrol.wait") < ptx.index("cp.async.bulk.tensor"), cfg
