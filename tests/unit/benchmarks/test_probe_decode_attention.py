"""benchmarks/probe_decode_attention.py on the CPU: its inputs and float32 reference under
TRITON_INTERPRET (a wrong reference would make every GPU row look broken), the sweep's grid and
its report."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from tests.unit.engine.kernels.interpreted import run_interpreted  # noqa: E402


def check_interpreted() -> None:
    import torch
    from probe_decode_attention import Inputs
    inp = Inputs(2, 40, device="cpu")
    base = inp.run((64, 4, None, False, 1, False))
    assert inp.reference_error(base) < 1e-2
    for shape in ((16, 2, 2, False, 1, False), (16, 4, None, True, 1, False), (16, 4, None, False, 3, False),
                  (32, 4, None, False, 2, True)):
        other = inp.run(shape)
        assert float((other.float() - base.float()).norm() / base.float().norm()) < 1e-2
    assert inp.kv_bytes == 2 * 2 * 39 * 32 * 128 * 2
    fp8 = Inputs(2, 40, device="cpu", kv_dtype=torch.float8_e4m3fn)
    out8 = fp8.run((32, 4, None, False, 2, False))
    assert fp8.reference_error(out8) < 1e-2 and fp8.kv_bytes == inp.kv_bytes // 2


def test_inputs_and_reference_interpreted() -> None:
    run_interpreted("tests.unit.benchmarks.test_probe_decode_attention")


def test_grid_and_shapes() -> None:
    from probe_decode_attention import launch_shapes, parse_shapes, parse_variant
    grid = launch_shapes([32, 64], [4], [0, 2], [0, 1], [1])      # the engine's default first (tensor cores)
    assert grid[0] == (64, 4, None, False, 1, True) and len(grid) == len(set(grid)) == 9
    grid = launch_shapes([64], [4], [0], [0], [1, 4], dots=[1], default_splits=2)
    assert grid == [(64, 4, None, False, 2, True), (64, 4, None, False, 1, True), (64, 4, None, False, 4, True)]
    grid = launch_shapes([64], [4], [0], [0, 1], [1], dots=[0, 1])     # no double buffer with dot
    assert grid == [(64, 4, None, False, 1, True), (64, 4, None, False, 1, False), (64, 4, None, True, 1, False)]
    assert parse_variant("base") == {}
    assert parse_variant("prefetch+split4+bn128") == {"DECODE_PREFETCH": True, "DECODE_SPLIT_PROGRAMS_PER_SM": 4,
                                                      "DECODE_BLOCK_N": 128}
    assert parse_variant("dot+warps8") == {"DECODE_DOT": True, "DECODE_WARPS": 8}
    assert parse_variant("kv8+vtm") == {"KV8": True, "VTM": True}
    assert parse_variant("kv8+fp8bn128+fp8stages5+stages4+fp8nodot") == {
        "KV8": True, "DECODE_FP8_BLOCK_N": 128, "DECODE_FP8_STAGES": 5, "DECODE_STAGES": 4, "DECODE_FP8_DOT": False}
    assert parse_variant("nodot+split0") == {"DECODE_DOT": False, "DECODE_SPLIT_PROGRAMS_PER_SM": 0}
    with pytest.raises(SystemExit, match="unknown setting 'splits'"):
        parse_variant("splits")
    assert parse_shapes("1x2048,256x512") == [(1, 2048), (256, 512)] and parse_shapes("") == []
    with pytest.raises(SystemExit, match="BATCHxCONTEXT"):
        parse_shapes("256")
    with pytest.raises(SystemExit, match="context >= 2"):
        parse_shapes("4x1")


def test_report(tmp_path: Path) -> None:
    from probe_decode_attention import write_markdown
    base = {"batch": 256, "context": 1024, "kv_bytes": 10**9, "copy_gbs": 3000.0}
    res = {"device": "GPU", "commit": "abc", "torch": "2", "triton": "3.6", "reps": 20, "copy_gbs": 3000.0,
           "command": "python benchmarks/probe_decode_attention.py", "rows": [
               {**base, "block_n": 64, "num_warps": 4, "num_stages": None, "prefetch": False, "ms": 0.5, "gbs": 2000.0,
                "rel_err_vs_default": 0.0, "rel_err_vs_reference": 3e-4},
               {**base, "block_n": 128, "num_warps": 8, "num_stages": 3, "prefetch": True, "splits": 4, "ms": 0.4,
                "gbs": 2500.0, "rel_err_vs_default": 1e-4},
               {**base, "block_n": 32, "num_warps": 2, "num_stages": 4, "prefetch": False,
                "error": "OutOfResources: shared memory"}]}
    write_markdown(res, tmp_path / "out.md")
    text = (tmp_path / "out.md").read_text()
    assert "## batch 256, context 1024" in text and "reference: 3.0e-04" in text
    lines = text.splitlines()
    first = lines.index("| BN | warps | stages | prefetch | splits | dot | ms | GB/s | × copy | × default |")
    assert lines[first + 2] == "| 64 | 4 | - | off | 1 | off | 0.500 | 2000 | 0.67 | 1.00 |"      # the default first
    assert lines[first + 3] == "| 128 | 8 | 3 | on | 4 | off | 0.400 | 2500 | 0.83 | 1.25 |"
    assert "| 32 | 2 | 4 | off | 1 | off | – | – | – | OutOfResources: shared memory |" in text
    assert "## The whole decode step" not in text
    res["rows"].append({"part": "step", "batch": 1, "context": 256, "floor_ms": 1.25,
                        "variants": ["base", "split4", "base"], "ms": [2.7, 2.5, 2.75]})
    write_markdown(res, tmp_path / "out.md")
    text = (tmp_path / "out.md").read_text()
    assert "| batch | context | base ms | split4 ms | base ms | split4 × base | best ÷ floor |" in text
    assert "| 1 | 256 | 2.700 | 2.500 | 2.750 | 1.08 | 2.00 |" in text
    assert text.count("## batch") == 1          # the step row is not a sweep shape
