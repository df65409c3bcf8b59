"""benchmarks/probe_tma.py on the CPU: its TMA kernels compile for sm_90 with their code loads as
pipelined bulk tensor copies (a probe whose loads waited on each copy would time the wrong thing),
the descriptors' views match the layouts they read, and the report renders."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))


def _ptx(kernel, sig: dict, consts: dict, warps: int, stages: int, aligned: tuple) -> str:
    from services.engine.kernels.aot import compile_kernel
    return compile_kernel(kernel, sig, consts, warps, stages, asm="ptx", aligned=aligned)


def test_tma_kernels_pipeline_their_code_loads_sm90() -> None:
    pytest.importorskip("triton")
    from benchmarks import probe_tma as P
    read = _ptx(P.tma_read, {"qw_desc": "tensordesc<i32[16, 128]>", "out_ptr": "*i32", "N": "i32", "K": "i32",
                             "blocks_per_split": "i32", "BN": "constexpr", "STAGES": "constexpr"},
                {"BN": 128, "STAGES": 4}, 4, 4, (1, 2, 3))
    from services.engine.kernels.aot import compile_frag
    from services.engine.kernels.gemm_configs import GemmConfig
    frag = compile_frag(GemmConfig("frag_tma", 16, 256, 1, 4, 3, fast_deq=True, zsub=True), P.frag_k_width(),
                        asm="ptx")    # the probe's "frag" kind is the engine's kernel
    # stages - 1 copies issued ahead of the loop plus one inside it: more than one means pipelined
    assert len(re.findall(r"cp\.async\.bulk\.tensor", read)) == 4
    assert len(re.findall(r"cp\.async\.bulk\.tensor", frag)) == 3
    assert "mma" in frag


def test_descriptor_views_cover_the_layouts() -> None:
    pytest.importorskip("triton")
    import torch
    from benchmarks import probe_tma as P
    from benchmarks.bench_gpu_kernels import quantized_layer
    from services.engine.kernels.gptq_format import to_fragment_order
    from services.engine.kernels.w4a16_frag import code_descriptor

    _, _, kw = quantized_layer(torch.randn(256, 384), 4)
    d = P.code_desc(kw, 64)
    assert list(d.shape) == [384 // 128 * 256 // 8, 128] and list(d.block_shape) == [16, 64]
    # row (tile t, packed row r) of the view is the tiled layout's qweight[t, r]
    assert torch.equal(d.base[1 * 32 + 5], kw.qweight[1, 5])
    kwf = to_fragment_order(kw, 4, block_major=True)
    f = code_descriptor(kwf, 128)      # the engine's, which the probe's "frag" kind launches through
    assert list(f.shape) == [256 // 128 * 384 // 8, 128] and list(f.block_shape) == [16, 128]
    # row (block b, 8-column row c) is qweight[c, b] of the [N/8, K/128, 128] view
    assert torch.equal(f.base[1 * 48 + 7], kwf.qweight[7, 1])
    with pytest.raises(ValueError, match="block-major"):
        code_descriptor(to_fragment_order(kw, 4), 128)


def test_markdown() -> None:
    from benchmarks.probe_tma import markdown
    res = {"device": "GPU", "commit": "abc", "torch": "t", "triton": "3.6", "reps": 20,
           "command": "python benchmarks/probe_tma.py", "rows": [{
               "K": 4096, "N": 4096, "weight_bytes": 9_000_000, "code_bytes": 8_388_608,
               "reads": {"tma read 128/8/4st": 4.0, "torch.amax": 5.0, "tma read 64/8/3st": "CompilationError: x"},
               "fp16": {1: 19.0}, "ours": {1: {"config": "gemv_h2", "us": 7.6}},
               "tma": {"M1 tma mma 16/64/8/4/3": {"us": 6.0, "rel_err": 1e-3, "M": 1},
                       "M1 tma frag 16/256/4/4/3": {"error": "OutOfResources: shared memory"}}}]}
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "t.md"
        markdown(res, path)
        text = path.read_text()
    assert "| tma read 128/8/4st | 4.0 | 2097 |" in text
    assert "| 1 | tma mma 16/64/8/4/3 | 6.0 | 1e-03 | 3.17 | 1.27 | 1500 |" in text
    assert "OutOfResources" in text and "CompilationError" in text
