"""Per-replay step-cost fit of a bench_serve_gpu steps file: what each policy's steps cost on its base.

The cost model (services/engine/simulator/cost_model.py) is fitted once, to the calibration steps;
this fits the same linear form to each replay's own measured steps, so two bases (4-bit, fp16) or
two policies can be compared per prompt token and per decode row on the steps they really ran:

    .venv/bin/python benchmarks/step_cost_by_run.py benchmarks/results/serve_gpu_24gib.steps.csv

Writes <steps stem>.step_fit.md next to the input (or --out). Ordinary least squares on
t = a + b·prefill_tokens + c·decode_rows + d·adapters + g·[step has a prefill]; the fit's median
relative error is shown per replay (replays with few prefill steps pin b and g loosely).
"""
from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path

import numpy as np

TERMS = ("a ms", "b µs / prompt token", "c µs / decode row", "d µs / adapter", "g ms / prefill step")
SCALE = (1e3, 1e6, 1e6, 1e6, 1e3)


def fit_rows(rows: list[dict]) -> tuple[np.ndarray, float]:
    """(coefficients in TERMS order, seconds; median relative error) of one replay's steps."""
    x = np.array([[1.0, float(r["num_prefill_tokens"]), float(r["num_decode_seqs"]), float(r["num_adapters"]),
                   float(float(r["num_prefill_tokens"]) > 0)] for r in rows])
    y = np.array([float(r["step_s"]) for r in rows])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    return coef, float(np.median(np.abs(x @ coef - y) / y))


def report(path: Path) -> str:
    with path.open() as f:
        rows = list(csv.DictReader(f))
    runs: dict[str, list[dict]] = {}
    for r in rows:
        runs.setdefault(r["run"], []).append(r)
    lines = [f"# Step-cost fit per replay of `{path.name}`\n",
             f"Command: `python benchmarks/step_cost_by_run.py {path}`. Ordinary least squares per replay on its "
             "measured engine steps (the device and commit are those of the run that wrote the file).\n",
             "| replay | steps | prefill steps | busy s | decode rows / step | " + " | ".join(TERMS)
             + " | median abs rel err |", "|" + "---|" * (6 + len(TERMS))]
    for run, rs in runs.items():
        if len(rs) < 2 * len(TERMS):
            continue
        coef, err = fit_rows(rs)
        n_pre = sum(float(r["num_prefill_tokens"]) > 0 for r in rs)
        lines.append(f"| {run} | {len(rs)} | {n_pre} | {sum(float(r['step_s']) for r in rs):.2f} | "
                     f"{statistics.fmean(float(r['num_decode_seqs']) for r in rs):.1f} | "
                     + " | ".join(f"{c * s:.1f}" for c, s in zip(coef, SCALE)) + f" | {err:.1%} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("steps_csv")
    ap.add_argument("--out", default=None, help="output .md (default: <steps stem>.step_fit.md)")
    args = ap.parse_args()
    path = Path(args.steps_csv)
    out = Path(args.out) if args.out else path.with_name(path.name.replace(".steps.csv", "") + ".step_fit.md")
    out.write_text(report(path))
    print(out.read_text())


if __name__ == "__main__":
    main()
