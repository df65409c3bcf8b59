"""The GPU benchmarks' markdown writers on recorded results: a writer that raises on the device
loses the run's report (bench_e2e_gpu writes it after every section), so each renders here."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.mark.parametrize("stem,expect", [
    ("gpu_kernels_v15_lora_rows", ["segments expand)", "| adapters | per-token expand ms | × no-LoRA | shrink only ms"]),
    ("gpu_kernels_v14_lora_split", ["## Decode step with multi-LoRA"]),      # before the expand variants
    ("gpu_kernels_v10", ["## Decode step"]),
])
def test_bench_gpu_kernels_markdown(tmp_path: Path, stem: str, expect: list[str]) -> None:
    from bench_gpu_kernels_report import write_markdown
    write_markdown(json.loads((RESULTS / f"{stem}.json").read_text()), tmp_path / "out.md")
    text = (tmp_path / "out.md").read_text()
    for line in expect:
        assert line in text


def test_bench_gpu_kernels_markdown_pdl_rows(tmp_path: Path) -> None:
    """The PDL tables of the H100 run at c73667d render as recorded (its LoRA rows timed mode 2,
    before the key that names the mode); then, edited by hand only to exercise the writer, LoRA rows
    timed in mode 1 against the mode-1 no-LoRA step, and a failed PDL capture."""
    from bench_gpu_kernels_report import write_markdown
    res = json.loads((RESULTS / "gpu_kernels_v17_pdl_c73667d.json").read_text())
    write_markdown(res, tmp_path / "out.md")
    text = (tmp_path / "out.md").read_text()
    assert "| 1 | 3.336 | 3.161 | 1.06 | 3.973 | 0.84 | 2.47 |" in text
    assert "| 64 | 8.661 | 8.647 | 1.00 | 9.116 | 0.95 | 2.11 |" in text
    assert "The same steps with PDL mode 2:" in text and "| 32 | 12.242 | 1.34 |" in text
    last = res["decode"][-1]
    res["decode_lora"][-1].update(pdl_mode=1, step_ms_pdl=last["graph_ms_pdl"] * 1.25)
    del last["graph_ms_pdl_prefetch"]
    last["graph_ms_pdl_prefetch_error"] = "RuntimeError: capture failed"
    write_markdown(res, tmp_path / "out.md")
    text = (tmp_path / "out.md").read_text()
    assert "PDL runs that failed: batch 64 graph_ms_pdl_prefetch: RuntimeError: capture failed" in text
    assert f"| 64 | 8.661 | {last['graph_ms_pdl']:.3f} | 1.00 | – | – |" in text
    assert "The same steps with PDL mode 1:" in text and "| 32 | 10.809 | 1.25 |" in text


def test_bench_gpu_kernels_markdown_fused_attention_rows(tmp_path: Path) -> None:
    """The fused RoPE + attention table, on the c73667d run's rows with fused timings added by hand
    (only to exercise the writer): a row with both timings, one whose PDL timing is missing."""
    from bench_gpu_kernels_report import write_markdown
    res = json.loads((RESULTS / "gpu_kernels_v17_pdl_c73667d.json").read_text())
    first, last = res["decode"][0], res["decode"][-1]
    first.update(graph_ms_fused_attn=3.2, graph_ms_fused_attn_pdl=3.0, graph_ms_fused_all_pdl=2.9,
                 fused_attn_pdl_mode=1)
    last.update(graph_ms_fused_attn=8.5, fused_attn_pdl_mode=1)
    write_markdown(res, tmp_path / "out.md")
    text = (tmp_path / "out.md").read_text()
    assert "| batch | plain graph ms | fused attn ms | plain / fused attn | PDL 1 ms | fused attn + PDL 1 ms |" in text
    assert (f"| 1 | 3.336 | 3.200 | 1.04 | 3.161 | 3.000 | 2.900 | 1.09 | {2.9 / first['floor_ms']:.2f} |") in text
    assert "| 64 | 8.661 | 8.500 | 1.02 | 8.647 | – | – | – | – |" in text


@pytest.mark.parametrize("stem,expect", [
    ("e2e_gpu_lora_9662f2e", ["Configured expand: per-token (rows)", "| 32 | 12.708 | 1.34 | 10.910 | 1.26 | 13.270",
                              "| 1 | 64 × 64 | 151.90 | 131.50 | 1.16 |"]),
    ("e2e_gpu_lora_b4f8672", ["## LoRA overhead", "| 32 | 12.561 | 1.38 | 11.541 | 1.34 | 13.136"]),
])
def test_bench_e2e_gpu_markdown(stem: str, expect: list[str]) -> None:
    from bench_e2e_gpu import markdown
    text = markdown(json.loads((RESULTS / f"{stem}.json").read_text()))
    for line in expect:
        assert line in text


def test_probe_gemm_stream_markdown(tmp_path: Path) -> None:
    """The streamed GEMM table of the H100 run at 285f137 renders as recorded: both timings of a
    cell, the ratios of the fastest streamed form, and the per-M summary of the no-PDL form."""
    from probe_gemm_stream import write_markdown
    write_markdown(json.loads((RESULTS / "gemm_stream_285f137.json").read_text()), tmp_path / "out.md")
    text = (tmp_path / "out.md").read_text()
    assert "| 4096×4096 | 1 | 7.8 | 9.0 | 7.2 | 8.7 | 16.0 | 7.0 | 10.2 | 2.21 | 0.96 | 1.94 | 0.93 |" in text
    assert "- M = 16: ours (no PDL) ×fp16 streamed 1.89–2.14, ×int4 2.55–3.76" in text


def test_probe_stream_k_markdown(tmp_path: Path) -> None:
    """The stream-K probe of the H100 run at 900b7dc renders as recorded: a cell of each timing, the
    per-M summary and the decode A/B table from the header's decode_ab."""
    from probe_stream_k import write_markdown
    write_markdown(json.loads((RESULTS / "stream_k_m2_4_8_900b7dc.json").read_text()), tmp_path / "out.md")
    text = (tmp_path / "out.md").read_text()
    assert "| 4096×4096 | 2 | 7.8 | 8.3 | 16.0 | 7.2 | 0.94 | 2.04 | 2.04 | 0.92 |" in text
    assert "- M = 8: stream ×split 0.90–0.99; best of both ×fp16 1.80–2.31" in text
    assert "| 16 | 3.968 | 2.04 | 3.936 | 2.02 | 1.008 |" in text
    write_markdown(json.loads((RESULTS / "stream_k_m1_16_900b7dc.json").read_text()), tmp_path / "out.md")
    assert "- M = 1: stream ×split 0.83–0.95; best of both ×fp16 2.06–2.59" in (tmp_path / "out.md").read_text()


def test_probe_roofline_markdown(tmp_path: Path) -> None:
    """The roofline probe of the H100 runs at ddf8b31 and a65fe19 renders as recorded: a read row with
    both forms' times and its GB/s, and a GEMM row with its error, fp16 time, ratio and GB/s."""
    from probe_roofline import markdown
    markdown(json.loads((RESULTS / "roofline_ddf8b31.json").read_text()), tmp_path / "out.md")
    text = (tmp_path / "out.md").read_text()
    assert "## 4096×4096 (8.9 MB)" in text and "| flat 2048/4w | 4.3 | 4.3 | 1961 |" in text
    markdown(json.loads((RESULTS / "roofline_prefetch_a65fe19.json").read_text()), tmp_path / "out.md")
    text = (tmp_path / "out.md").read_text()
    assert "| M1 gemv_h2 BM1 BN128 sk16 w1 st2 | 21.8 (7e-04) | 20.9 (7e-04) | 51.5 | 2.46 | 1798 |" in text


def test_probe_frag_markdown(tmp_path: Path) -> None:
    """The fragment-order probe of the H100 runs at fcd1f62 and 96e0d9b renders as recorded: a row with
    both kernels' times and ratios, and the five fastest configs."""
    from probe_frag import write_markdown
    write_markdown(json.loads((RESULTS / "frag_m4_64_fcd1f62.json").read_text()), tmp_path / "out.md")
    text = (tmp_path / "out.md").read_text()
    assert "| 11008×4096 | 64 | 38.4 | 29.3 | 21.4 | 1.31 | 1.80 | 1.37 | BM64 BN128 w4 s8 pf fma |" in text
    assert "Configs that failed or exceeded the error bound: 0." in text
    write_markdown(json.loads((RESULTS / "frag_small_96e0d9b.json").read_text()), tmp_path / "out.md")
    text = (tmp_path / "out.md").read_text()
    assert "- 4096×4096 M=16: BM16 BN64 w2 s8 pf fma 18.4;" in text


def test_probe_frag_engine_markdown(tmp_path: Path) -> None:
    """probe_frag_engine's report from a result of its shape (GEMM and decode parts, two fragment
    orders; a run cut before the decode part has no decode table)."""
    from probe_frag_engine import write_markdown
    res = {"script": "probe_frag_engine.py", "device": "GPU", "commit": "abc", "torch": "2", "triton": "3.6.0",
           "command": "python benchmarks/probe_frag_engine.py", "reps": 20, "k_widths": [4, 2], "rows": [
               {"part": "gemm", "K": 4096, "N": 4096, "M": 16, "fp16_us": 16.0, "tiles_us": 8.0, "frag4_us": 6.4,
                "frag2_us": 8.0, "tiles_config": "mma8", "frag4_config": "frag", "frag2_config": "frag_t"},
               {"part": "decode", "batch": 16, "context": 256, "floor_ms": 2.0, "copy_gbs": 3000.0,
                "tiles_ms": 4.1, "frag4_ms": 3.6, "frag2_ms": 4.0, "tiles_again_ms": 4.0}]}
    write_markdown(res, tmp_path / "out.md")
    text = (tmp_path / "out.md").read_text()
    assert "| 4096×4096 | 16 | 16.0 | 8.0 | 6.4 | 8.0 | 2.00 | 2.50 | 2.00 | frag | frag_t |" in text
    assert "| 16 | 4.100 | 3.600 | 4.000 | 4.000 | 1.11 | 1.00 | 2.000 |" in text
    res["rows"] = res["rows"][:1]
    write_markdown(res, tmp_path / "out.md")
    assert "| batch |" not in (tmp_path / "out.md").read_text()


def test_probe_frag_engine_markdown_with_pdl(tmp_path: Path) -> None:
    """--pdl: each layout's step also with programmatic dependent launch, in a table of its own; a
    layout whose PDL capture failed shows "error", the best PDL time is divided by the floor."""
    from probe_frag_engine import write_markdown
    res = {"script": "probe_frag_engine.py", "device": "GPU", "commit": "abc", "torch": "2", "triton": "3.6.0",
           "command": "python benchmarks/probe_frag_engine.py --pdl 1", "reps": 20, "k_widths": [4],
           "block_major": [4], "pdl": 1, "rows": [
               {"part": "decode", "batch": 1, "context": 256, "floor_ms": 1.25, "copy_gbs": 3000.0,
                "tiles_ms": 2.7, "tiles_pdl_ms": 2.55, "frag4_ms": 2.73, "frag4_pdl_ms_error": "RuntimeError: x",
                "frag4b_ms": 2.69, "frag4b_pdl_ms": 2.5, "tiles_again_ms": 2.71}]}
    write_markdown(res, tmp_path / "out.md")
    text = (tmp_path / "out.md").read_text()
    assert "With programmatic dependent launch (mode 1" in text
    assert "| 1 | 2.700 | 2.550 | 2.730 | error | 2.690 | 2.500 | 2.00 |" in text


def test_probe_frag_engine_markdown_with_tma(tmp_path: Path) -> None:
    """--tma: each block-major order once more with the TMA kinds in its tuner's list (fragWb_tma columns), GEMM
    and decode; without the flag frag_layouts adds none (the tests above: results with no "tma" key)."""
    from probe_frag_engine import frag_layouts, write_markdown
    assert frag_layouts([], [4], tma=True) == [("frag4b", 4, True, False), ("frag4b_tma", 4, True, True)]
    assert frag_layouts([4], [4]) == [("frag4", 4, False, False), ("frag4b", 4, True, False)]
    res = {"script": "probe_frag_engine.py", "device": "GPU", "commit": "abc", "torch": "2", "triton": "3.6.0",
           "command": "python benchmarks/probe_frag_engine.py --tma", "reps": 20, "k_widths": [],
           "block_major": [4], "pdl": 0, "tma": True, "rows": [
               {"part": "gemm", "K": 4096, "N": 4096, "M": 16, "fp16_us": 16.0, "tiles_us": 8.0, "frag4b_us": 6.4,
                "frag4b_tma_us": 5.0, "tiles_config": "mma8", "frag4b_config": "frag", "frag4b_tma_config": "frag_tma"},
               {"part": "decode", "batch": 16, "context": 256, "floor_ms": 2.0, "copy_gbs": 3000.0,
                "tiles_ms": 3.7, "frag4b_ms": 3.1, "frag4b_tma_ms": 2.9, "tiles_again_ms": 3.6}]}
    write_markdown(res, tmp_path / "out.md")
    text = (tmp_path / "out.md").read_text()
    assert "| 4096×4096 | 16 | 16.0 | 8.0 | 6.4 | 5.0 | 2.00 | 2.50 | 3.20 | frag | frag_tma |" in text
    assert "| 16 | 3.700 | 3.100 | 2.900 | 3.600 | 1.16 | 1.24 | 2.000 |" in text


def test_serve_gpu_launch_text_states_the_resolved_shapes() -> None:
    """The serving report's launch line is what kernels/attention resolves per cache dtype (not a copy of its
    defaulting rules); results recorded before those shapes were stored print the raw constants."""
    from bench_serve_gpu_report import _launch_text
    from services.engine.kernels import attention
    text = _launch_text(attention.launch_settings())
    fp16, fp8 = (attention._launch_shape(None, None, None, cache_bytes=b) for b in (2, 1))
    assert text.startswith(f"BN {fp16['BN']}, {fp16['num_warps']} warps, ")
    assert f"(fp8 caches: BN {fp8['BN']}, " in text
    assert ("CUDA cores)" if not fp8["DOT"] else "tensor cores)") in text
    legacy = {"block_n": 64, "warps": 4, "fp8_dot": False, "split_programs_per_sm": 4}
    assert _launch_text(legacy) == "block_n 64, warps 4, fp8_dot False; split-KV below 4 programs per SM"
