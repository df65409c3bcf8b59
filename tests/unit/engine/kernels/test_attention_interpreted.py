"""The decode attention kernels under TRITON_INTERPRET on the CPU: the fused one (RoPE + KV-cache
write + paged attention in one launch) against the float32 references of the two-kernel path it
replaces (the output, the cache slots it writes, GQA groups, a first token with nothing cached,
padding blocks), and the plain paged decode kernel. Skipped without triton (the GPU suite runs
them compiled)."""
from __future__ import annotations

import pytest
import torch

from tests.unit.engine.kernels.interpreted import run_interpreted


D, BLOCK_SIZE, NUM_BLOCKS = 64, 16, 24


def decode_layout(seed: int):
    """(lens, tables, positions, slots, cos, sin) of a decode step: four sequences whose contexts (with
    the new token) are 1, 17, 40 and 70 tokens in scattered 16-token blocks of a 24-block cache."""
    from services.engine.kernels.fused_ops import rope_tables

    torch.manual_seed(seed)
    lens = torch.tensor([1, 17, 40, 70], dtype=torch.int32)
    tables = torch.randperm(NUM_BLOCKS)[: lens.shape[0] * 5].reshape(lens.shape[0], 5).int()
    positions = (lens - 1).long()
    slots = torch.stack([tables[b, int(p) // BLOCK_SIZE].long() * BLOCK_SIZE + int(p) % BLOCK_SIZE
                         for b, p in enumerate(positions)])
    return (lens, tables, positions, slots, *rope_tables(128, D, 10000.0, torch.device("cpu")))


def check_interpreted(num_heads: int, num_kv_heads: int) -> None:
    from services.engine.kernels.attention import (
        paged_decode_attention, paged_decode_reference, paged_decode_rope_attention,
    )
    from services.engine.kernels.fused_ops import rope_reference

    d, block_size, num_blocks = D, BLOCK_SIZE, NUM_BLOCKS
    lens, tables, positions, slots, cos, sin = decode_layout(0)
    bsz = lens.shape[0]
    kc = torch.randn(num_blocks, block_size, num_kv_heads, d).half()
    vc = torch.randn(num_blocks, block_size, num_kv_heads, d).half()
    qkv = torch.randn(bsz, (num_heads + 2 * num_kv_heads) * d).half()

    # the two-kernel path in float32: rotate, write k / v into the slots, attend over the cache
    q, k, v = qkv.view(bsz, -1, d).split([num_heads, num_kv_heads, num_kv_heads], dim=1)
    q_ref = rope_reference(q, positions, cos, sin).half()
    k_ref = rope_reference(k, positions, cos, sin).half()
    kc_ref, vc_ref = kc.clone(), vc.clone()
    kc_ref.view(-1, num_kv_heads, d)[slots] = k_ref
    vc_ref.view(-1, num_kv_heads, d)[slots] = v
    ref = paged_decode_reference(q_ref, kc_ref, vc_ref, tables, lens)

    out = paged_decode_rope_attention(qkv, positions, cos, sin, kc, vc, slots, tables, lens, num_heads,
                                      max_context=int(lens.max()))
    assert out.shape == (bsz, num_heads, d) and out.dtype == torch.float16
    err = float((out.float() - ref).norm() / ref.norm())
    assert err < 1e-2, err
    # every slot it wrote holds what rope_and_cache would; every other slot is untouched
    assert float((kc.float() - kc_ref.float()).abs().max()) < 2e-3
    assert torch.equal(vc, vc_ref)
    # the plain decode kernel (same tile helpers) on the caches the two-kernel path leaves
    plain = paged_decode_attention(q_ref, kc_ref, vc_ref, tables, lens)
    assert float((plain.float() - ref).norm() / ref.norm()) < 1e-2
    cuda_cores = paged_decode_attention(q_ref, kc_ref, vc_ref, tables, lens, dot=False)
    assert float((cuda_cores.float() - ref).norm() / ref.norm()) < 1e-2
    # another launch shape (probe_decode_attention's sweep): tiles of 16 tokens, one per cache block
    small = paged_decode_attention(q_ref, kc_ref, vc_ref, tables, lens, block_n=16, num_warps=2, num_stages=2,
                                   dot=False)
    assert float((small.float() - ref).norm() / ref.norm()) < 1e-2
    again = paged_decode_rope_attention(qkv, positions, cos, sin, kc.clone(), vc.clone(), slots, tables, lens,
                                        num_heads, max_context=int(lens.max()), block_n=16, num_warps=2, dot=False)
    assert float((again.float() - ref).norm() / ref.norm()) < 1e-2
    # the register double buffer (next tile loaded before this one's math), both kernels, two tile sizes
    for block_n in (16, 64):
        pre = paged_decode_attention(q_ref, kc_ref, vc_ref, tables, lens, block_n=block_n, prefetch=True, dot=False)
        assert float((pre.float() - ref).norm() / ref.norm()) < 1e-2
        kc_pre, vc_pre = kc.clone(), vc.clone()
        pre = paged_decode_rope_attention(qkv, positions, cos, sin, kc_pre, vc_pre, slots, tables, lens, num_heads,
                                          max_context=int(lens.max()), block_n=block_n, prefetch=True, dot=False)
        assert float((pre.float() - ref).norm() / ref.norm()) < 1e-2
        assert torch.equal(kc_pre, kc) and torch.equal(vc_pre, vc)
    # split-KV: each sequence's cache in 2 / 3 / 8 runs of whole tiles (empty runs included: 8 runs
    # of 16-token tiles over 69 cached tokens, none over the first token's), merged by the combine kernel
    # the tile math on tensor cores (dot) too, split or not
    for splits, block_n, prefetch, dot in ((2, 16, False, False), (3, 16, True, False), (8, 16, False, False),
                                           (2, 64, False, False), (1, 32, False, True), (3, 16, False, True)):
        kc_split, vc_split = kc_ref.clone(), vc_ref.clone()
        kc_split.view(-1, num_kv_heads, d)[slots] = 0
        vc_split.view(-1, num_kv_heads, d)[slots] = 0
        split = paged_decode_rope_attention(qkv, positions, cos, sin, kc_split, vc_split, slots, tables, lens,
                                            num_heads, max_context=int(lens.max()), block_n=block_n,
                                            prefetch=prefetch, splits=splits, dot=dot)
        err = float((split.float() - ref).norm() / ref.norm())
        assert err < 1e-2, (splits, block_n, dot, err)
        assert torch.equal(kc_split, kc) and torch.equal(vc_split, vc)    # the slots written once, as unsplit
    dot = paged_decode_attention(q_ref, kc_ref, vc_ref, tables, lens, block_n=32, dot=True)
    assert float((dot.float() - ref).norm() / ref.norm()) < 1e-2


def check_fp8_interpreted(num_heads: int, num_kv_heads: int) -> None:
    """Both decode kernels on fp8 (e4m3) caches: the fused kernel writes the new K/V into their slots
    only (values exact in e4m3 stored exactly, keys clamped to ±448, never NaN) and attends over the
    widened tiles as the float32 reference does over the same fp8 values; split-KV and the CUDA-core
    loop too; the plain kernel likewise. How the rotated keys round is left to the GPU tests: Triton
    3.9's interpreter rounds fp32 → e4m3 up across a power of two to half the value (1.96 → 1.0)."""
    from services.engine.kernels.attention import (
        paged_decode_attention, paged_decode_reference, paged_decode_rope_attention,
    )
    from services.engine.kernels.fused_ops import rope_and_cache, rope_reference

    fp8 = torch.float8_e4m3fn
    d, block_size, num_blocks = D, BLOCK_SIZE, NUM_BLOCKS
    lens, tables, positions, slots, cos, sin = decode_layout(1)
    bsz = lens.shape[0]
    kc = (torch.randn(num_blocks, block_size, num_kv_heads, d) * 3).to(fp8)
    vc = torch.randn(num_blocks, block_size, num_kv_heads, d).to(fp8)
    qkv = torch.randn(bsz, (num_heads + 2 * num_kv_heads) * d).to(fp8).half()   # values exact in e4m3
    qkv[:, num_heads * d] = 1000.0            # past e4m3's range: the kernel clamps, never NaN
    q, _, v = qkv.view(bsz, -1, d).split([num_heads, num_kv_heads, num_kv_heads], dim=1)
    q_ref = rope_reference(q, positions, cos, sin).half()
    keep = torch.ones(num_blocks * block_size, dtype=torch.bool)
    keep[slots] = False
    for splits, dot in ((1, True), (1, False), (3, True)):
        kc_run, vc_run = kc.clone(), vc.clone()
        out = paged_decode_rope_attention(qkv, positions, cos, sin, kc_run, vc_run, slots, tables, lens, num_heads,
                                          max_context=int(lens.max()), block_n=16, splits=splits, dot=dot)
        assert out.dtype == torch.float16 and torch.isfinite(out).all()
        for run, before in ((kc_run, kc), (vc_run, vc)):
            assert torch.equal(run.view(-1, num_kv_heads, d)[keep].view(torch.uint8),
                               before.view(-1, num_kv_heads, d)[keep].view(torch.uint8))
        assert torch.equal(vc_run.view(-1, num_kv_heads, d)[slots].float(), v.float())
        keys = kc_run.view(-1, num_kv_heads, d)[slots].float()
        assert bool(torch.isfinite(keys).all()) and float(keys.abs().max()) == 448.0
        ref = paged_decode_reference(q_ref, kc_run.float(), vc_run.float(), tables, lens)
        err = float((out.float() - ref).norm() / ref.norm())
        assert err < 1e-2, (splits, dot, err)
    for dot in (True, False):
        plain = paged_decode_attention(q_ref, kc_run, vc_run, tables, lens, block_n=32, dot=dot)
        assert float((plain.float() - ref).norm() / ref.norm()) < 1e-2
    # the two-kernel path's cache write (rope_and_cache) stores the same bytes as the fused kernel
    kc_two, vc_two = kc.clone(), vc.clone()
    q_two = rope_and_cache(qkv, positions, cos, sin, kc_two, vc_two, slots, num_heads, num_kv_heads)
    assert float((q_two.float() - q_ref.float()).abs().max()) < 2e-3
    assert torch.equal(kc_two.view(torch.uint8), kc_run.view(torch.uint8))
    assert torch.equal(vc_two.view(torch.uint8), vc_run.view(torch.uint8))


def test_decode_rope_attention_interpreted() -> None:
    run_interpreted("tests.unit.engine.kernels.test_attention_interpreted", 4, 4)


def test_decode_rope_attention_gqa_interpreted() -> None:
    run_interpreted("tests.unit.engine.kernels.test_attention_interpreted", 8, 2)


def test_decode_splits_fill_the_gpu_by_batch_only(monkeypatch) -> None:
    """decode_splits: runs per sequence where a batch has fewer than DECODE_SPLIT_PROGRAMS_PER_SM
    (sequence, head) programs per SM, capped at DECODE_MAX_SPLITS; 1 on the CPU or when turned off
    (no triton needed: the SM count of a 132-SM card is given)."""
    from services.engine.kernels import attention, launch
    monkeypatch.setitem(launch._sm_counts, 0, 132)
    monkeypatch.setattr(attention, "DECODE_SPLIT_PROGRAMS_PER_SM", 4)
    gpu = torch.device("cuda", 0)
    # 4 x 132 = 528 programs wanted: 32 heads at batch 1 -> 16 (the cap), 4 -> 4, 8 -> 2, 16 -> 1
    assert [attention.decode_splits(b, 32, gpu) for b in (1, 2, 4, 8, 16, 64)] == [16, 8, 4, 2, 1, 1]
    assert attention.decode_splits(1, 9, gpu) == 16 and attention.decode_splits(4, 9, gpu) == 14
    assert attention.decode_splits(1, 32, torch.device("cpu")) == 1
    monkeypatch.setattr(attention, "DECODE_SPLIT_PROGRAMS_PER_SM", 0)
    assert attention.decode_splits(1, 32, gpu) == 1


def test_set_decode_options_sets_the_process_defaults(monkeypatch) -> None:
    """The engine applies EngineConfig.decode_attention_dot / decode_split_programs_per_sm here."""
    from services.engine.kernels import attention
    monkeypatch.setattr(attention, "DECODE_DOT", True)
    monkeypatch.setattr(attention, "DECODE_SPLIT_PROGRAMS_PER_SM", 4)
    attention.set_decode_options(False, 0)
    assert attention.DECODE_DOT is False and attention.DECODE_SPLIT_PROGRAMS_PER_SM == 0
    assert attention._launch_shape(None, None, None)["DOT"] is False
    with pytest.raises(ValueError, match=">= 0"):
        attention.set_decode_options(True, -1)


def test_fp8_caches_take_their_own_launch_shape_where_set(monkeypatch) -> None:
    """DECODE_FP8_BLOCK_N / _STAGES / _DOT apply over one-byte caches only; unset, fp8 launches as fp16."""
    from services.engine.kernels import attention
    monkeypatch.setattr(attention, "DECODE_BLOCK_N", 64)
    monkeypatch.setattr(attention, "DECODE_STAGES", None)
    monkeypatch.setattr(attention, "DECODE_DOT", True)
    for name in ("DECODE_FP8_BLOCK_N", "DECODE_FP8_STAGES", "DECODE_FP8_DOT"):
        monkeypatch.setattr(attention, name, None)
    assert attention._launch_shape(None, None, None, cache_bytes=1) == attention._launch_shape(None, None, None)
    monkeypatch.setattr(attention, "DECODE_FP8_BLOCK_N", 128)
    monkeypatch.setattr(attention, "DECODE_FP8_STAGES", 5)
    monkeypatch.setattr(attention, "DECODE_FP8_DOT", False)
    fp8, fp16 = attention._launch_shape(None, None, None, cache_bytes=1), attention._launch_shape(None, None, None)
    assert (fp8["BN"], fp8["num_stages"], fp8["DOT"]) == (128, 5, False)
    assert fp16["BN"] == 64 and "num_stages" not in fp16 and fp16["DOT"] is True
    assert attention._launch_shape(32, None, 2, cache_bytes=1)["BN"] == 32     # explicit arguments win
    assert attention._launch_shape(32, None, 2, cache_bytes=1)["num_stages"] == 2


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2)])
def test_decode_attention_on_an_fp8_cache_interpreted(num_heads: int, num_kv_heads: int) -> None:
    run_interpreted("tests.unit.engine.kernels.test_attention_interpreted", num_heads, num_kv_heads,
                    func="check_fp8_interpreted")


def check_token_major_v_interpreted(num_heads: int, num_kv_heads: int, fp8: bool) -> None:
    """A V cache token-major within blocks (token_major_v): the fused kernel (split-KV, both loops, the
    register double buffer), the plain kernel and rope_and_cache give the outputs and write the values
    they do on V in K's layout."""
    from services.engine.kernels.attention import (
        paged_decode_attention, paged_decode_rope_attention, token_major_v, v_block_size,
    )
    from services.engine.kernels.fused_ops import rope_and_cache

    dtype = torch.float8_e4m3fn if fp8 else torch.float16
    lens, tables, positions, slots, cos, sin = decode_layout(2)
    bsz = lens.shape[0]
    kc = torch.randn(NUM_BLOCKS, BLOCK_SIZE, num_kv_heads, D).to(dtype)
    vc = torch.randn(NUM_BLOCKS, BLOCK_SIZE, num_kv_heads, D).to(dtype)
    qkv = torch.randn(bsz, (num_heads + 2 * num_kv_heads) * D).half()
    assert v_block_size(kc, vc) == 0 and v_block_size(kc, token_major_v(vc)) == BLOCK_SIZE
    with pytest.raises(ValueError, match="multiple of 16"):
        v_block_size(kc, token_major_v(vc), block_n=8)

    def same(a: torch.Tensor, b: torch.Tensor) -> bool:
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if fp8 else torch.equal(a, b)

    # (None, None, None: the module's launch shape for this cache, as the engine runs it: fp8 BN 128 on CUDA cores)
    for splits, dot, prefetch, block_n in ((1, True, False, 16), (1, False, False, 16), (3, True, False, 16),
                                           (2, False, True, 16), (2, None, None, None)):
        runs = []
        for v_run in (vc.clone(), token_major_v(vc)):
            k_run = kc.clone()
            out = paged_decode_rope_attention(qkv, positions, cos, sin, k_run, v_run, slots, tables, lens, num_heads,
                                              max_context=int(lens.max()), block_n=block_n, splits=splits, dot=dot,
                                              prefetch=prefetch)
            runs.append((out, v_run))
        (out, v_std), (out_tm, v_tm) = runs
        assert torch.isfinite(out).all() and float((out_tm.float() - out.float()).abs().max()) < 1e-3, (splits, dot)
        assert same(v_tm, v_std)
    for dot in (True, False):
        q = qkv.view(bsz, -1, D)[:, :num_heads]
        a = paged_decode_attention(q, kc, v_std, tables, lens, block_n=32, dot=dot)
        b = paged_decode_attention(q, kc, token_major_v(v_std), tables, lens, block_n=32, dot=dot)
        assert float((a.float() - b.float()).abs().max()) < 1e-3, dot
    v_two, v_two_tm = vc.clone(), token_major_v(vc)
    rope_and_cache(qkv, positions, cos, sin, kc.clone(), v_two, slots, num_heads, num_kv_heads)
    rope_and_cache(qkv, positions, cos, sin, kc.clone(), v_two_tm, slots, num_heads, num_kv_heads)
    assert same(v_two_tm, v_two) and not same(v_two, vc)


@pytest.mark.parametrize("fp8", [False, True])
def test_token_major_v_cache_interpreted(fp8: bool) -> None:
    run_interpreted("tests.unit.engine.kernels.test_attention_interpreted", 8, 2, fp8,
                    func="check_token_major_v_interpreted")
