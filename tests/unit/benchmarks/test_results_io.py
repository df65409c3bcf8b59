"""benchmarks/results_io.py: result files land under the names asked for."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks"))
import results_io  # noqa: E402
from results_io import probe_parser, run_probe, run_probe_parts, write_probe, write_result  # noqa: E402


def test_write_result_keeps_a_dotted_name(tmp_path: Path) -> None:
    """write_result appends .json / .md: a name like run_cut5.7 keeps its dot."""
    write_result(tmp_path / "sim_cut5.7", {"a": 1}, "# x\n")
    write_result(tmp_path / "plain.md", {"b": 2}, "# y\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.json", "plain.md", "sim_cut5.7.json", "sim_cut5.7.md"]


def test_write_probe_writes_both_files_and_echoes_the_report(tmp_path: Path, capsys) -> None:
    write_probe(tmp_path / "new", "glu_probe", {"wall_s": 12.4, "rows": [1]},
                lambda res, path: path.write_text(f"# {len(res['rows'])} row\n"))
    assert json.loads((tmp_path / "new" / "glu_probe.json").read_text())["rows"] == [1]
    out = capsys.readouterr().out
    assert "# 1 row" in out and "done in 12 s" in out


def test_probe_parser_gives_the_shared_arguments_and_row_counts_as_ints() -> None:
    ap = probe_parser("A probe.\n\nmore text", reps=20, ms="1,4,16")
    ap.add_argument("--pdl", action="store_true")
    args = ap.parse_args([])
    assert (args.out, args.commit, args.reps, args.ms, args.pdl) == ("benchmarks/results", "unknown", 20, [1, 4, 16], False)
    args = ap.parse_args(["--ms", "64,128", "--reps", "5", "--commit", "abc", "--pdl"])
    assert (args.ms, args.reps, args.commit, args.pdl) == ([64, 128], 5, "abc", True)
    assert ap.description == "A probe."


def test_run_probe_writes_the_header_rows_and_wall_time(tmp_path: Path, monkeypatch) -> None:
    """run_probe on the CPU, with the GPU header replaced: rows() lands under res["rows"] with the
    extras and reps in the header."""
    monkeypatch.setattr(results_io, "gpu_run_header", lambda script, commit, **extra: {"script": script, "commit": commit, **extra})
    args = probe_parser("p", reps=3, ms="1").parse_args(["--out", str(tmp_path), "--commit", "c1"])
    run_probe("probe_x.py", "x", args, lambda: [{"M": m} for m in args.ms],
              lambda res, path: path.write_text("# x\n"), pdl_modes=[1])
    res = json.loads((tmp_path / "x.json").read_text())
    assert res["script"] == "probe_x.py" and res["commit"] == "c1" and res["reps"] == 3 and res["pdl_modes"] == [1]
    assert res["rows"] == [{"M": 1}] and res["wall_s"] >= 0


def test_run_probe_parts_keeps_the_rows_of_a_cut_run(tmp_path: Path, monkeypatch) -> None:
    """run_probe_parts rewrites the files after each part: when the second part fails (as a device
    timeout would cut it), the first part's rows are on disk."""
    monkeypatch.setattr(results_io, "gpu_run_header", lambda script, commit, **extra: {"commit": commit, **extra})
    args = probe_parser("p", reps=3, ms="1").parse_args(["--out", str(tmp_path), "--commit", "c1"])

    def parts():
        yield [{"shape": 1}]
        raise TimeoutError("cut")

    with pytest.raises(TimeoutError):
        run_probe_parts("probe_x.py", "x", args, parts(), lambda res, path: path.write_text(f"{len(res['rows'])}\n"),
                        k_width=4)
    res = json.loads((tmp_path / "x.json").read_text())
    assert res["rows"] == [{"shape": 1}] and res["k_width"] == 4 and res["wall_s"] >= 0
    assert (tmp_path / "x.md").read_text() == "1\n"


def test_python_loop_ms_times_the_fixed_workload() -> None:
    """The host-speed reference is a positive time, the best of its repetitions."""
    one, best = results_io.python_loop_ms(reps=1), results_io.python_loop_ms(reps=3)
    assert 0 < best < 10_000 and 0 < one < 10_000
