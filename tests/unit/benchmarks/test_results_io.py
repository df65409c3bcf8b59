"""benchmarks/results_io.py: result files land under the names asked for."""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks"))
from results_io import write_probe, write_result  # noqa: E402


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
