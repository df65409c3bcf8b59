"""Compile the GEMM kernels ahead of time for an NVIDIA target, on any machine (no GPU needed).

Triton lowers a kernel to PTX and runs the ptxas it bundles, so a CPU machine can check that every
launch config compiles for Hopper (sm_90) and read its SASS (benchmarks/kernel_sass.py). Arguments
get the specialization the launcher gives real tensors: 16-byte aligned pointers, 16-divisible
sizes and strides.
"""
from __future__ import annotations

from services.engine.kernels import w4a16 as W
from services.engine.kernels.gemm_configs import FRAG_KINDS, STREAM_KINDS, SWAPPED_KINDS, GemmConfig

# argument positions of the pointers and the 16-divisible sizes (N, K, strides, group size)
_ALIGNED_ARGS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14)


def compile_kernel(fn, sig: dict, consts: dict, warps: int, stages: int, arch: int = 90, asm: str = "cubin",
                   aligned: tuple[int, ...] = _ALIGNED_ARGS) -> bytes | str:
    """cubin (or asm="ptx") of any @triton.jit kernel: `sig` maps each parameter to its Triton type or
    "constexpr", `consts` gives the constexprs, `aligned` the positions marked 16-divisible (the GEMM
    kernels' pointers and sizes by default; () for other kernels)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": warps, "num_stages": stages})
    return kernel.asm[asm]


def _signature(bits: int, *constexprs: str) -> dict:
    """Argument types shared by both GEMM kernels (code planes: int32 at 4 bits; int16 + int8 at 3)."""
    sig = {"x_ptr": "*fp16", "qw_ptr": "*i32" if bits == 4 else "*i16", "qh_ptr": "*i32" if bits == 4 else "*i8",
           "z_ptr": "*fp16", "s_ptr": "*fp16", "out_ptr": "*fp16", "bias_ptr": "*fp16", "ws_ptr": "*fp32",
           "lock_ptr": "*i32", "M": "i32", "N": "i32",
           "K": "i32", "stride_xm": "i32", "stride_om": "i32", "group_size": "i32", "blocks_per_split": "i32"}
    return sig | {name: "constexpr" for name in ("HAS_BIAS", "USE_ATOMIC", *constexprs)}


def compile_gemv(bn: int, warps: int, unroll: int, bits: int, h2: bool, stages: int = 1, arch: int = 90,
                 has_bias: bool = False, use_atomic: bool = True, serial: bool = False, pdl: int = 0,
                 glu: bool = False) -> bytes:
    """cubin of the gemv_row / gemv_h2 kernel for one launch config (pdl: its PDL mode, kernels/pdl.py;
    glu: the [gate | up] input form, w4a16_matmul(glu=True)); stages as in GemmConfig, mapped by
    w4a16.gemv_buffering as the launcher maps it."""
    prefetch, l2_ahead, triton_stages = W.gemv_buffering(h2, stages, unroll)
    consts = {"HAS_BIAS": has_bias, "USE_ATOMIC": use_atomic and not serial, "BN": bn, "UNROLL": unroll, "BITS": bits,
              "H2": h2, "EMULATE": False, "SERIAL": serial, "PDL": pdl, "GLU": glu, "PREFETCH": prefetch,
              "L2_AHEAD": l2_ahead}
    return compile_kernel(W._w4a16_gemv_row_kernel, _signature(bits, *list(consts)[2:]), consts, warps,
                          triton_stages, arch)


def compile_mma(bm: int, bn: int, warps: int, stages: int, bits: int, fast_deq: bool, single_dot: bool,
                zsub: bool = False, arch: int = 90, has_bias: bool = False, use_atomic: bool = True,
                serial: bool = False, pdl: int = 0, asm: str = "cubin", glu: bool = False) -> bytes | str:
    """cubin (or asm="ptx") of the tensor-core kernel (mma8, or mma with single_dot) for one launch
    config; pdl: the programmatic-dependent-launch form (kernels/pdl.py)."""
    consts = {"HAS_BIAS": has_bias, "USE_ATOMIC": use_atomic and not serial, "BM": bm, "BN": bn, "GROUP_M": 8,
              "SINGLE_DOT": single_dot, "FAST_DEQ": fast_deq, "BITS": bits, "ZSUB": zsub,
              "H2DEQ": zsub and not single_dot, "SERIAL": serial, "PDL": pdl, "GLU": glu}
    return compile_kernel(W._w4a16_kernel, _signature(bits, *list(consts)[2:]), consts, warps, stages, arch, asm)


def compile_mma_t(bm: int, bn: int, warps: int, stages: int, bits: int, arch: int = 90, has_bias: bool = False,
                  use_atomic: bool = True, fp16_scale: bool = False, one_dot: bool = False,
                  serial: bool = False, pdl: int = 0, glu: bool = False) -> bytes:
    """cubin of the swapped-operand tensor-core kernel (mma8t; mma8ts with fp16_scale; mma1t with one_dot)
    for one launch config (pdl: its PDL mode)."""
    consts = {"HAS_BIAS": has_bias, "USE_ATOMIC": use_atomic and not serial, "BM": bm, "BN": bn, "GROUP_M": 8,
              "BITS": bits, "H2DEQ": True, "FP16_SCALE": fp16_scale, "ONE_DOT": one_dot, "SERIAL": serial,
              "PDL": pdl, "GLU": glu}
    return compile_kernel(W._w4a16_t_kernel, _signature(bits, *list(consts)[2:]), consts, warps, stages, arch)


def compile_stream(bm: int, bn: int, warps: int, stages: int, bits: int, arch: int = 90, has_bias: bool = False,
                   pdl: int = 0, glu: bool = False, asm: str = "cubin") -> bytes | str:
    """cubin (or asm="ptx") of the stream-K kernel (mma8_sk) for one launch config."""
    consts = {"HAS_BIAS": has_bias, "BM": bm, "BN": bn, "BITS": bits, "STAGES": stages, "EMULATE": False,
              "PDL": pdl, "GLU": glu}
    sig = {name: t for name, t in _signature(bits).items() if name not in ("ws_ptr", "lock_ptr", "USE_ATOMIC")}
    sig = {("units_per_prog" if name == "blocks_per_split" else name): t for name, t in sig.items()}
    # pointers 0-6, then N, K, the strides and the group size (M and the run length may be anything)
    return compile_kernel(W._w4a16_stream_kernel, sig | {name: "constexpr" for name in consts}, consts, warps,
                          stages, arch, asm, aligned=(0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12))


_FRAG_SIG = {"x_ptr": "*fp16", "qf_ptr": "*i32", "z_ptr": "*fp16", "s_ptr": "*fp16", "out_ptr": "*fp16",
             "bias_ptr": "*fp16", "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_om": "i32",
             "stride_qr": "i32", "stride_qb": "i32", "group_size": "i32", "blocks_per_split": "i32"}


def compile_frag(cfg: GemmConfig, k_width: int, arch: int = 90, has_bias: bool = False, use_atomic: bool = True,
                 glu: bool = False, pdl: int = 0, block_major: bool = False, asm: str = "cubin") -> bytes | str:
    """cubin of a fragment-ordered kernel (kinds "frag" / "frag_t" / "frag_gemv" and the TMA kinds, kernels/w4a16_frag.py) for one
    launch config and fragment order (block_major: codes stored block-major), with the constants frag_matmul
    gives it (asm "ptx": its PTX instead)."""
    from services.engine.kernels import w4a16_frag as F
    if cfg.kind in ("frag_tma", "frag_gemv_tma"):     # codes through a host TMA descriptor (block-major storage only)
        consts = {"HAS_BIAS": has_bias, "USE_ATOMIC": use_atomic, "BN": cfg.block_n, "KW": k_width, "EMULATE": False,
                  "PDL": pdl, "GLU": glu}
        if cfg.kind == "frag_tma":
            consts |= {"BM": cfg.block_m, "FMA": cfg.zsub}
        else:
            consts |= {"STAGES": cfg.num_stages}
        fn = F._frag_tma_kernel if cfg.kind == "frag_tma" else F._frag_gemv_tma_kernel
        sig = {"x_ptr": "*fp16", "qf_desc": f"tensordesc<i32[{cfg.block_n // 8}, 128]>", "z_ptr": "*fp16",
               "s_ptr": "*fp16", "out_ptr": "*fp16", "bias_ptr": "*fp16", "M": "i32", "N": "i32", "K": "i32",
               "stride_xm": "i32", "stride_om": "i32", "group_size": "i32", "blocks_per_split": "i32"}
        return compile_kernel(fn, sig | {c: "constexpr" for c in consts}, consts, cfg.num_warps,
                              cfg.num_stages, arch, asm, aligned=(0, 2, 3, 4, 5, 7, 8, 9, 10, 11))
    consts = {"HAS_BIAS": has_bias, "USE_ATOMIC": use_atomic, "BN": cfg.block_n, "KW": k_width,
              "PREFETCH": cfg.prefetch, "EMULATE": False, "PDL": pdl, "GLU": glu, "BLOCK_MAJOR": block_major}
    fn = F._frag_gemv_kernel
    if cfg.kind in ("frag", "frag_t"):
        consts |= {"BM": cfg.block_m, "ZSUB": cfg.zsub, "FMA": cfg.zsub, "SWAP": cfg.kind == "frag_t"}
        fn = F._frag_kernel
    # pointers, N, K, the strides and the group size as the launcher's tensors give them
    return compile_kernel(fn, _FRAG_SIG | {c: "constexpr" for c in consts}, consts, cfg.num_warps, cfg.num_stages,
                          arch, asm, aligned=(0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12, 13))


def compile_config(cfg: GemmConfig, bits: int, arch: int = 90, has_bias: bool = False,
                   use_atomic: bool = True, serial: bool = False, glu: bool = False, frag: int = 0,
                   block_major: bool = False) -> bytes | None:
    """cubin of one tuner candidate (None for "dense", which is cuBLAS). use_atomic False is the
    split-K 1 form (plain stores), which the launcher uses when K holds a single split; serial the
    serial split-K form (w4a16.SERIAL_SPLIT_K); glu the [gate | up] input form; frag the fragment
    order of the frag kinds (KernelWeights.frag), block_major its block-major storage."""
    if cfg.kind in FRAG_KINDS:
        return compile_frag(cfg, frag, arch, has_bias, use_atomic, glu, block_major=block_major)
    if cfg.kind in ("gemv_row", "gemv_h2"):
        return compile_gemv(cfg.block_n, cfg.num_warps, cfg.unroll, bits, cfg.kind == "gemv_h2", cfg.num_stages,
                            arch, has_bias, use_atomic, serial, glu=glu)
    if cfg.kind in ("mma8", "mma"):
        return compile_mma(cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages, bits, cfg.fast_deq,
                           cfg.kind == "mma", cfg.zsub, arch, has_bias, use_atomic, serial, glu=glu)
    if cfg.kind in STREAM_KINDS:
        return compile_stream(cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages, bits, arch, has_bias, glu=glu)
    if cfg.kind in SWAPPED_KINDS:
        return compile_mma_t(cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages, bits, arch, has_bias, use_atomic,
                             fp16_scale=cfg.kind == "mma8ts", one_dot=cfg.kind == "mma1t", serial=serial, glu=glu)
    return None
