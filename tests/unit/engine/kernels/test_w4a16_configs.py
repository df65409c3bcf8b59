"""W4A16 launch configs and the tuner's rotation size (no GPU, no triton needed)."""
from __future__ import annotations


import pytest

from services.engine.kernels.gemm_tuner import MAX_COPIES, num_copies
from services.engine.kernels.gemm_configs import candidate_configs, m_bucket

KINDS = {"gemv_row", "gemv_h2", "mma8", "mma8t", "mma8ts", "mma1t", "mma", "dense", "mma8_sk"}


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 16, 17, 40, 64, 65, 128, 300])
def test_candidates_are_launchable(m: int) -> None:
    cands = candidate_configs(m_bucket(m))
    assert cands
    assert len(set(cands)) == len(cands)
    for cfg in cands:
        assert cfg.kind in KINDS
        assert 128 % cfg.block_n == 0        # a tile never straddles two 128-column weight tiles
        assert cfg.split_k >= 1 and cfg.num_warps in (1, 2, 4, 8)


def test_candidate_kinds_follow_the_sweep() -> None:
    # gemv_row reads the weights once per row: only for a few rows; the [BM, 16, BN] gemv kernel
    # was 30-60x slower at M = 4 on the H100 and is no longer offered for small M.
    # (mma8_sk: the stream-K form of zsub mma8, offered where that wins)
    few = {"gemv_row", "gemv_h2", "mma8", "mma8t", "mma1t", "mma8_sk"}
    assert {c.kind for c in candidate_configs(1)} == few
    assert {c.kind for c in candidate_configs(4)} == few
    assert {c.kind for c in candidate_configs(16)} == {"mma8", "mma8t", "mma1t", "mma8_sk"}
    assert all(c.kind != "mma8_sk" for m in (32, 64, 128, 256) for c in candidate_configs(m))
    # mma8t subtracts the zero in fp16 like zsub (the launcher requires fast_deq with zsub)
    assert all(c.zsub and c.fast_deq for m in (1, 16, 64, 256) for c in candidate_configs(m) if c.kind in ("mma8t", "mma8ts", "mma1t"))
    assert "dense" in {c.kind for c in candidate_configs(256)}
    assert all(c.fast_deq for m in (1, 16, 64, 256) for c in candidate_configs(m) if c.kind in ("mma8", "mma"))
    # zsub needs the fast dequant's 1024 + q codes; it won every tensor-core shape at M <= 64 on the
    # H100, and every bucket keeps a config without inline PTX (a fallback the tuner can pick if the
    # packed PTX is off on some GPU)
    for m in (1, 4, 16, 32, 64, 128):
        cands = candidate_configs(m)
        assert any(c.zsub for c in cands)
        assert any(c.kind in ("gemv_row", "mma", "dense") or (c.kind == "mma8" and not c.zsub) for c in cands)


def test_rotation_exceeds_the_l2_within_bounds() -> None:
    l2 = 50 * 2**20
    n = num_copies(8 * 2**20, l2)                  # a 4096x4096 4-bit layer: 19 copies > 3x L2
    assert n * 8 * 2**20 >= 3 * l2 and (n - 1) * 8 * 2**20 < 3 * l2
    assert num_copies(400 * 2**20, l2) == 2        # always at least two, so no call reuses a warm copy
    assert num_copies(1000, l2) == MAX_COPIES      # tiny layers: capture stays bounded
    assert num_copies(0, l2) == MAX_COPIES


def test_gemv_num_stages_map_to_the_kernels_buffering() -> None:
    """gemv_h2's num_stages 2 / 3 are its own double buffer (3 with the L2 prefetch), both at 1 Triton
    stage; any other gemv launch passes num_stages to Triton unchanged (launcher and AOT compile alike)."""
    from services.engine.kernels.w4a16 import gemv_buffering
    assert gemv_buffering(True, 1, 1) == (False, False, 1)
    assert gemv_buffering(True, 2, 1) == (True, False, 1)
    assert gemv_buffering(True, 3, 1) == (True, True, 1)
    assert gemv_buffering(True, 2, 2) == (False, False, 2)    # unrolled gemv_h2: Triton's stages
    assert gemv_buffering(False, 2, 1) == (False, False, 2)   # gemv_row has no buffer
    assert all(gemv_buffering(c.kind == "gemv_h2", c.num_stages, c.unroll)[1] is False
               for m in (1, 2, 4) for c in candidate_configs(m))   # the L2-ahead form is not a candidate yet
