"""Reading and writing benchmark result files (benchmarks/results/)."""
from __future__ import annotations

import csv
import json
import sys
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


def gpu_run_header(script: str, commit: str, **extra) -> dict:
    """The opening fields of a GPU probe's result: device, torch and triton versions, commit, the
    given extras and the command line (python benchmarks/<script> ...)."""
    import torch
    import triton
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "commit": commit, **extra, "command": f"python benchmarks/{script} " + " ".join(sys.argv[1:])}


def write_probe(out: str | Path, stem: str, res: dict, write_markdown) -> None:
    """<out>/<stem>.json and <out>/<stem>.md (write_markdown(res, path)), the report echoed to stdout
    with the run's wall time (res["wall_s"])."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1))
    write_markdown(res, out / f"{stem}.md")
    print((out / f"{stem}.md").read_text())
    print(f"done in {res['wall_s']:.0f} s")
