"""GEMM launch configs of the W4A16 / W3A16 kernels and the tuner's candidate list per row count."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class GemmConfig:
    """One launch configuration: kind "gemv_row" (CUDA cores, one x row per program, 2-D tiles),
    "gemv_h2" (gemv_row with packed fp16x2 dequant and products; num_stages 2 is its register double
    buffer, w4a16's PREFETCH, not Triton's pipeliner), "mma8" (8 K=16 dots), "mma8t"
    (mma8 with swapped operands, out^T = W^T x^T, always zsub), "mma8ts" (mma8t scaling the weights
    in fp16: one accumulator), "mma1t" (mma8t with one K=128 dot per block), "mma" (one K=128 dot),
    "mma8_sk" (stream-K form of zsub mma8: split_k is then the programs per SM, num_stages the
    depth of its one pipelined loop) or "dense" (dequantize to fp16, then
    cuBLAS: compute-bound prefill at large M). fast_deq: the mma kinds turn codes into fp16 with the
    1024-exponent trick instead of int→float converts; zsub (with fast_deq): they also subtract the
    zero in fp16 before the dot, which drops the per-block Σx reductions."""

    kind: str
    block_m: int
    block_n: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 3
    unroll: int = 1
    group_m: int = 8
    fast_deq: bool = False
    zsub: bool = False      # mma kinds with fast_deq: zero subtracted in fp16 before the dot (no Σx)
    prefetch: bool = False  # frag kinds: the register double buffer (w4a16_frag PREFETCH)


# kinds of the swapped-operand kernel (w4a16._w4a16_t_kernel)
SWAPPED_KINDS = ("mma8t", "mma8ts", "mma1t")
# kinds of the stream-K kernel (w4a16._w4a16_stream_kernel): split_k is its programs per SM
STREAM_KINDS = ("mma8_sk",)
# kinds of the fragment-ordered layout (KernelWeights.frag, kernels/w4a16_frag.py)
FRAG_KINDS = ("frag", "frag_t", "frag_gemv", "frag_tma", "frag_gemv_tma")
# kinds that fetch their codes by TMA (Hopper's tensor memory accelerator): timed by the tuner only where
# EngineConfig.gemm_tma is on (the engine skips them otherwise)
TMA_KINDS = ("frag_tma", "frag_gemv_tma")


def m_bucket(m: int) -> int:
    """Tuning bucket of a row count: the next power of two (1, 2, 4, ... 128), then 256 and up."""
    return 1 << max(0, math.ceil(math.log2(max(m, 1))))


def candidate_configs(m: int, frag: int = 0) -> list[GemmConfig]:
    """Configs worth timing for M rows (few rows: split-K GEMV on CUDA cores; more: tensor-core tiles).
    The same list serves 3- and 4-bit weights (every kernel takes the width as a constant).

    Pruned by the H100 runs of commit ce90b7a (benchmarks/results/gpu_kernels.md v6 and
    gpu_kernels_w3.md, the tuner's top six per shape; gemm_sweep_h2.md, gemm_sweep_m16_64.md):
    - M <= 16: the mma8 kernel with zsub (the zero subtracted in fp16 before the dot, packed-PTX
      dequant) held the first four places at every shape, 3- and 4-bit, M = 4 and 16, and at M = 1
      on the 4096-row shapes; BN 64 won everywhere, BN 128 placed 2nd-4th a few times.
    - M = 1: gemv_h2 (packed fp16x2 GEMV) won on the wide shapes; gemv_row never placed in the top
      four, at either width.
    - M = 64: zsub mma8 with BM 64 won every shape; the Σx-path mma8 and single-dot mma came 2nd-3rd.
    - mma8t (swapped operands: the dequantized weights are wgmma's register operand, x the
      shared-memory one; no shared-memory stores of the weights) is offered at every M > 1
      bucket. H100, e403c5f (gemm_sweep_t.md, gpu_kernels_v7.md): at M = 64 it is 1.38-1.42x
      faster than zsub mma8 and the tuner picks it on three of five shapes, at M = 128 on four;
      at M <= 16 mma8 stays ahead. The sweep's M = 64 best on 4096x4096 was BM 64 BN 128
      split-K 8 with 2 stages (6 % under the tuner set then): now a candidate too.
    - mma8ts (mma8t with the group scale applied to the dequantized weights in fp16, so the dots
      accumulate into one fp32 tile instead of two): compiled for sm_90 here, it has no spills
      at BM 256 BN 128 (8 warps) or BM 128 BN 128 (4 warps), where mma8t spills 115 and 196
      registers per loop; BM 256 dequantizes each weight once per 256 rows of x. Offered at
      M > 16. H100, 7b3744f (gpu_kernels_v8.md): within ±5 % of mma8t, the tuner's pick on 3 of
      15 shapes at M = 64-256.
    - mma1t (mma8t with the 8 dequantized tiles of a block joined into one [BN, 128] operand and
      one K=128 dot): sm_90 SASS compiled here shows the block's wgmmas issued back to back with
      one wait, where mma8t and mma8ts wait after each of the 8 (ptxas gives every K=16 slice of
      the register operand the same registers); no spills at BM 128 / BN 128 with 8 warps, where
      mma8t spills. It keeps mma8t's two accumulators: a K=128 dot accumulating straight into the
      loop-carried tile (the scale folded into the weights, even inside the packed dequant PTX)
      compiles back to 8 waits per block (sm_90 SASS, tried at e1630af+). Offered in every bucket. H100, d932bda (gpu_kernels_v9.md): the tuner's pick at
      every M >= 32 shape but one (M = 256, 13824x5120: dense), BM 128 / BN 64 / 4 warps at
      M = 128-256 and BN 64 mostly below; at M <= 16 mma8 stays ahead (mma1t 4th-6th). Against
      v8: x fp16 at M = 32 / 64 / 128 went from 1.26-1.51 / 0.94-1.20 / 0.63-0.82 to
      1.40-1.84 / 1.13-1.30 / 0.90-1.11.
    - M > 64 after v9: no mma8 / mma config placed in any top six, so the bucket keeps one Σx-path
      mma8 (the no-PTX fallback) of the 24 it had; BM 128 and 256 with BN 64 and 8 warps join
      (no spills in sm_90 SASS; BN 32 has no wgmma).
    - gemv_h2 with num_stages 2 (its register double buffer, w4a16 PREFETCH) at M <= 4. H100, a65fe19
      (roofline_prefetch_a65fe19.md, gemm_stream_a65fe19.md): faster than without it in 22 of 40 configs
      timed both ways (1-warp BN 128 most: 31.4 -> 21.8 us at 13824 x 5120), the tuner's pick at M = 1
      on four of five shapes, 2.49-2.90x fp16 streamed.
    - mma8_sk (stream-K: equal runs of (column tile, K block) units, split_k programs per SM, each
      run one pipelined loop across tiles) at M <= 16. H100, 900b7dc (stream_k_m1_16_900b7dc.md,
      stream_k_m2_4_8_900b7dc.md): 0.83-1.04x the best split-K config's time streamed, faster
      (by <= 4 %) on 3 of 25 cells (M = 8-16, 4096 x 11008 and 5120 x 13824); the graphed 7B decode
      1.011x / 1.008x at batch 1 / 16. A gemv_h2 form (gemv_sk, BN 32-128) never beat it and BN 128
      or 5 stages never placed, so only BN 64, 3 stages, 2 or 4 programs per SM remain. So
      split-K's short per-program pipelines are not what holds the small-M bandwidth down.
    Each bucket keeps one config without inline PTX (gemv_row at M <= 4, the Σx-path mma8 above),
    so a GPU where the packed PTX misbehaves still has a correct candidate (the tuner rejects any
    candidate whose output is off, gemm_tuner.MAX_REL_ERR). Split-K is a runtime argument (no extra
    compile); every other field difference is a Triton compile during engine warm-up.
    """
    if frag:
        return frag_candidate_configs(m)
    cands: list[GemmConfig] = []
    if m <= 16:
        if m <= 4:
            cands += [GemmConfig("gemv_h2", 1, 32, sk, w, 1, 1) for sk in (4, 8, 16) for w in (2, 4)]
            cands += [GemmConfig("gemv_h2", 1, 64, sk, 4, 1, 1) for sk in (8, 16)]
            # num_stages 2: gemv_h2's register double buffer (block b + 1's loads before block b's work).
            # (num_stages 3, which also asks L2 for block b + 2, has not run on a GPU: it stays out of this
            # list until benchmarks/probe_roofline.py has timed it)
            cands += [GemmConfig("gemv_h2", 1, bn, sk, w, 2, 1) for bn, w in ((32, 4), (128, 1), (128, 2), (128, 4))
                      for sk in ((4, 8, 16, 32) if bn == 128 and w < 4 else (8, 16, 32))]
            cands.append(GemmConfig("gemv_row", 1, 32, 8, 4, 1, 2))
        cands += [GemmConfig("mma8", 16, bn, sk, 4, st, fast_deq=True, zsub=True)
                  for bn in (64, 128) for sk in (4, 8, 16) for st in (2, 3)]
        cands += [GemmConfig("mma8t", 16, 64, sk, 4, 3, fast_deq=True, zsub=True) for sk in (4, 8, 16)]
        cands += [GemmConfig("mma1t", 16, bn, sk, 4, 3, fast_deq=True, zsub=True) for bn in (64, 128) for sk in (4, 8, 16)]
        cands.append(GemmConfig("mma8", 16, 64, 8, 4, 3, fast_deq=True))
        cands += [GemmConfig("mma8_sk", 16, 64, per_sm, 4, 3, fast_deq=True, zsub=True) for per_sm in (2, 4)]
        return cands
    if m <= 64:
        return [
            GemmConfig("mma8", bm, bn, sk, 4, 3, fast_deq=True, zsub=True)
            for bm in (16, 32, 64) if bm >= m // 2 or bm == 64
            for bn in (64, 128)
            for sk in (2, 4)
        ] + [GemmConfig("mma8t", bm, 64, sk, 4, 3, fast_deq=True, zsub=True)
             for bm in (32, 64) if bm >= m // 2 or bm == 64 for sk in (2, 4)
        ] + [GemmConfig("mma8t", 64, 128, sk, 4, 2, fast_deq=True, zsub=True) for sk in (4, 8)
        ] + [GemmConfig("mma8ts", 64, bn, sk, 4, 3, fast_deq=True, zsub=True) for bn in (64, 128) for sk in (2, 4, 8)
        ] + [GemmConfig("mma1t", bm, bn, sk, 4, 3, fast_deq=True, zsub=True)
             for bm in (32, 64) if bm >= m // 2 or bm == 64 for bn in (64, 128) for sk in (2, 4, 8)
        ] + [GemmConfig(kind, 64, 64, 4, 4, 3, fast_deq=True) for kind in ("mma8", "mma")]
    # BM 128 / BN 128 takes 8 warps: with 4 its [128, 128] fp32 accumulators spill to local memory (SASS)
    return [
        GemmConfig("mma1t", bm, bn, sk, w, 3, fast_deq=True, zsub=True)
        for bm, bn, w in ((64, 64, 4), (64, 128, 4), (128, 64, 4), (128, 64, 8), (128, 128, 8), (256, 64, 8))
        for sk in (1, 2)
    ] + [GemmConfig("mma8t", 64, 64, 2, 4, 3, fast_deq=True, zsub=True)
    ] + [GemmConfig("mma8ts", 256, 128, sk, 8, 3, fast_deq=True, zsub=True) for sk in (1, 2)
    ] + [GemmConfig("mma8", 64, 64, 1, 4, 3, fast_deq=True)
    ] + [GemmConfig("dense", 0, 128, 1)]


def _frag(bm: int, bn: int, sk: int, warps: int, prefetch: bool) -> GemmConfig:
    """A "frag" config: zero subtracted in fp16 by the one-shift unpacking; prefetch (the register
    double buffer) or else Triton's 2-stage pipeline."""
    return GemmConfig("frag", bm, bn, sk, warps, 1 if prefetch else 2, fast_deq=True, zsub=True, prefetch=prefetch)


def tma_candidate_configs(m: int) -> list[GemmConfig]:
    """TMA-fed configs (block-major fragment codes fetched by TMA, w4a16_frag) at M <= 64: frag_tma (tensor
    cores) and, at M <= 4, frag_gemv_tma (one x row per program); Triton's pipeline depth (num_stages) is how
    many blocks' code boxes are in flight per program."""
    gemv = [GemmConfig("frag_gemv_tma", 1, bn, sk, w, st) for bn, w, st in ((64, 1, 4), (128, 1, 4), (128, 2, 3))
            for sk in (8, 16, 32)] if m <= 4 else []
    if m <= 16:
        return gemv + [GemmConfig("frag_tma", 16, bn, sk, 4, st, fast_deq=True, zsub=True)
                       for bn, st in ((256, 3), (256, 4), (128, 4), (128, 6)) for sk in (4, 8, 16)]
    if m <= 64:
        return [GemmConfig("frag_tma", bm, 128, sk, 4, st, fast_deq=True, zsub=True)
                for bm in ((32, 64) if m <= 32 else (64,)) for sk in (2, 4) for st in (3, 4)]
    return []


def frag_candidate_configs(m: int) -> list[GemmConfig]:
    """Configs for fragment-ordered 4-bit weights (KernelWeights.frag), from the fragment-order config
    grids timed on the H100 with Triton 3.6 at fbc3079 (frag_small / frag_large / frag_m64_kw2_fbc3079.md,
    k_width 4 except the last): every config in a top five there, split-K around them.
    - M <= 16: BM 16 BN 256 with 4 warps and the register double buffer won every M = 4 and 16 row
      (2.33-2.68x fp16; 1.03-1.21x faster than the tiled layout's tuned GEMM at M = 4, 1.14-1.29x
      at 16); BN 64 / 128 with 2-4 warps placed.
    - M = 1: the GEMV on CUDA cores (BN 64, 1 warp) won three of five shapes, BM 16 tensor-core
      tiles the other two (0.90-1.01x the tiled layout's tuned GEMV).
    - M = 32-64: BM 64 with BN 64 (2-stage pipeline) or BN 128 (double buffer) and 4 warps.
    - M > 64: BM 128 with BN 64 (4 warps) or BN 128 (8 warps); these were 0.69-0.91x fp16 at M = 128
      where the tiled layout's wgmma kinds reach 0.86-1.08, and the dense kind (dequantize, then
      cuBLAS) is offered for the compute-bound rows.
    """
    # frag_t (swapped operands: the weights wgmma's register operand) is offered beside the other kinds and the
    # tuner keeps it only where it is faster: on the H100 one fragment order or the other picked it at M = 1-256
    # on some shapes (frag_engine_gemm_7ff25bc.md). sm_90 SASS compiled here with Triton 3.6
    # (frag_sass_t36_039fb8d.md): 3.09 instructions / weight at BM 64 BN 128 in the k_width 2 order with no
    # shuffles (the frag kind: 3.51), and 5.16 against 6.12 at BM 128 BN 64; with a double buffer it spills.
    swapped = [GemmConfig("frag_t", bm, bn, sk, w, 2, fast_deq=True, zsub=True)
               for bm, bn, w, splits in ((16, 64, 4, (4, 8, 16)), (16, 128, 4, (4, 8)), (64, 64, 4, (2, 4)),
                                         (64, 128, 4, (2, 4, 8)), (128, 64, 4, (1, 2)), (128, 128, 8, (1, 2)))
               if (bm == 16) == (m <= 16) and (bm < 128 or m > 64) for sk in splits]
    cands: list[GemmConfig] = list(swapped) + tma_candidate_configs(m)
    if m <= 16:
        if m <= 4:
            cands += [GemmConfig("frag_gemv", 1, bn, sk, w, 1, prefetch=pf)
                      for bn, w in ((64, 1), (128, 1), (128, 2)) for sk in (8, 16, 32) for pf in (False, True)]
        cands += [_frag(16, 256, sk, 4, True) for sk in (4, 8, 16, 32)]
        cands += [_frag(16, 256, sk, 4, False) for sk in (4, 8, 16)]
        cands += [_frag(16, 256, sk, 8, True) for sk in (16, 32)]
        cands += [_frag(16, 128, sk, 2, False) for sk in (4, 8, 16)]
        cands += [_frag(16, 64, sk, w, True) for w in (2, 4) for sk in (2, 4, 8)]
        return cands
    if m <= 64:
        bms = (32, 64) if m <= 32 else (64,)
        return (cands + [_frag(bm, 64, sk, 4, pf) for bm in bms for sk in (2, 4, 8) for pf in (False, True)]
                + [_frag(bm, 128, sk, 4, True) for bm in bms for sk in (2, 4, 8)])
    return (cands + [_frag(128, 64, sk, 4, pf) for sk in (1, 2, 4) for pf in (False, True)]
            + [_frag(128, 128, sk, 8, pf) for sk in (2, 4, 8) for pf in (False, True)]
            + [_frag(64, 64, sk, 4, False) for sk in (1, 2)]
            + [GemmConfig("dense", 0, 128, 1)])
