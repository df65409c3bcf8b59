"""Every kernel that reads or writes the paged KV cache compiles for Hopper (sm_90) with the cache in
each dtype the engine allocates (fp16, fp8 e4m3), on this machine with Triton's bundled ptxas.

Triton's interpreter (the CPU tests) does not type-check a kernel as its compiler does: a branch that
binds one name to an fp16 pointer and the other to an fp8 pointer runs interpreted and fails to
compile (rope_and_cache at b7eda88 did, first seen on the GPU). Skipped without triton."""
from __future__ import annotations

import itertools

import pytest

triton = pytest.importorskip("triton")

from services.engine.kernels import attention as A  # noqa: E402
from services.engine.kernels import fused_ops as F  # noqa: E402
from services.engine.kernels.aot import compile_kernel  # noqa: E402

CACHE_TYPES = ("*fp16", "*fp8e4nv")
_STRIDES = ("stride_cb", "stride_ct", "stride_ch", "stride_btb", "stride_ob", "stride_oh")


def _sig(pointers: dict, ints: tuple[str, ...], consts: tuple[str, ...], cache: str) -> dict:
    sig = {name: (cache if name in ("k_ptr", "v_ptr", "k_cache_ptr", "v_cache_ptr") else kind)
           for name, kind in pointers.items()}
    sig |= {name: ("fp32" if name.startswith("scale") else "i32") for name in ints}
    return sig | {name: "constexpr" for name in consts}


def _compiles(fn, sig: dict, consts: dict, warps: int = 4, stages: int = 2) -> None:
    cubin = compile_kernel(fn, sig, consts, warps, stages, aligned=())
    assert cubin and len(cubin) > 1000


@pytest.mark.parametrize("cache", CACHE_TYPES)
def test_rope_and_cache_compiles(cache: str) -> None:
    pointers = {"qkv_ptr": "*fp16", "pos_ptr": "*i64", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "q_out_ptr": "*fp16",
                "k_cache_ptr": "", "v_cache_ptr": "", "slot_ptr": "*i64"}
    sig = _sig(pointers, ("num_heads", "num_kv_heads", "stride_qkv", "stride_cslot", "stride_ch"),
               ("HALF", "PDL", "V_BS"), cache)
    for v_bs in (0, 16):     # V in K's layout, token-major within 16-token blocks
        _compiles(F._rope_cache_kernel, sig, {"HALF": 64, "PDL": False, "V_BS": v_bs}, warps=1, stages=1)


@pytest.mark.parametrize("cache", CACHE_TYPES)
def test_decode_attention_compiles(cache: str) -> None:
    """Both decode kernels in every form the engine launches: CUDA-core and tensor-core loops, the fused
    RoPE kernel whole and split over the context (split-KV); V in K's layout and token-major."""
    plain = {"q_ptr": "*fp16", "k_ptr": "", "v_ptr": "", "bt_ptr": "*i32", "lens_ptr": "*i32", "out_ptr": "*fp16"}
    plain_sig = _sig(plain, ("scale", "block_size", "q_per_kv", "stride_qb", "stride_qh", *_STRIDES),
                     ("D", "BN", "PDL", "PREFETCH", "DOT", "V_BS"), cache)
    rope = {"qkv_ptr": "*fp16", "pos_ptr": "*i64", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "slot_ptr": "*i64",
            "k_ptr": "", "v_ptr": "", "bt_ptr": "*i32", "lens_ptr": "*i32", "out_ptr": "*fp16", "part_ptr": "*fp32"}
    rope_sig = _sig(rope, ("scale", "block_size", "num_heads", "num_kv_heads", "q_per_kv", "stride_qkv", *_STRIDES),
                    ("D", "BN", "STEP_STOP", "PDL", "PREFETCH", "SPLIT", "DOT", "V_BS"), cache)
    # BN 64 and the module's default for this cache (fp8: DECODE_FP8_BLOCK_N)
    default_bn = A._launch_shape(None, None, None, cache_bytes=1 if "fp8" in cache else 2)["BN"]
    for bn, dot, v_bs in itertools.product(sorted({64, default_bn}), (False, True), (0, 16)):
        _compiles(A._paged_decode_kernel, plain_sig, {"D": 128, "BN": bn, "PDL": False, "PREFETCH": False, "DOT": dot,
                                                      "V_BS": v_bs})
    for bn, dot, split, v_bs in itertools.product(sorted({64, default_bn}), (False, True), (False, True), (0, 16)):
        _compiles(A._paged_decode_rope_kernel, rope_sig, {"D": 128, "BN": bn, "STEP_STOP": 0, "PDL": False,
                                                           "PREFETCH": False, "SPLIT": split, "DOT": dot, "V_BS": v_bs})


@pytest.mark.parametrize("cache", CACHE_TYPES)
def test_varlen_prefill_attention_compiles(cache: str) -> None:
    pointers = {"q_ptr": "*fp16", "k_ptr": "", "v_ptr": "", "out_ptr": "*fp16", "bt_ptr": "*i32",
                "q_start_ptr": "*i32", "q_len_ptr": "*i32", "ctx_ptr": "*i32", "tile_seq_ptr": "*i32",
                "tile_m_ptr": "*i32"}
    sig = _sig(pointers, ("scale_log2", "block_size", "q_per_kv", "stride_qt", "stride_qh", "stride_cb", "stride_ct",
                          "stride_ch", "stride_btb", "stride_ot", "stride_oh"),
               ("D", "BM", "BN", "STEP_STOP", "PDL", "V_BS"), cache)
    for v_bs in (0, 16):
        _compiles(A._paged_varlen_kernel, sig, {"D": 128, "BM": A.VARLEN_BLOCK_M, "BN": A.VARLEN_BLOCK_N,
                                                "STEP_STOP": 0, "PDL": False, "V_BS": v_bs})
