"""Reading and writing benchmark result files (benchmarks/results/)."""
from __future__ import annotations

import csv
import json
from pathlib import Path


def read_steps(path: str | Path) -> list[dict]:
    """A bench_serve_gpu steps CSV: every column a float but `run` (the replay's name)."""
    with open(path) as f:
        return [{**{k: float(v) for k, v in r.items() if k != "run"}, "run": r["run"]} for r in csv.DictReader(f)]


def write_result(out: str | Path, res: dict, markdown: str) -> None:
    """<out>.json (the data) and <out>.md (its report), announced on stdout."""
    out = Path(out)
    if out.suffix in (".json", ".md"):   # a name with a dot elsewhere keeps it (with_suffix would cut it)
        out = out.with_suffix("")
    out.with_name(out.name + ".json").write_text(json.dumps(res, indent=1))
    md = out.with_name(out.name + ".md")
    md.write_text(markdown)
    print(f"wrote {md}")
