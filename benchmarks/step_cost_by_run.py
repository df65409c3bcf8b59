"""Per-replay step-cost fit of a bench_serve_gpu steps file: what each policy's steps cost on its base.

The cost model (services/engine/simulator/cost_model.py) is fitted once, to the calibration steps;
this fits the same linear form to each replay's own measured steps, so two bases (4-bit, fp16) or
two policies can be compared per prompt token and per decode row on the steps they really ran:

    .venv/bin/python benchmarks/step_cost_by_run.py benchmarks/results/serve_gpu_24gib.steps.csv

Writes <steps stem>.step_fit.md next to the input (or --out). Ordinary least squares on
t = a + b·prefill_tokens + c·decode_rows + d·adapters + g·[step has a prefill]; the fit's median
relative error is shown per replay (replays with few prefill steps pin b and g loosely).

When the run's results JSON lies beside the steps file (or --results names it), a second table shows
how the cost model the simulator used (fitted to the calibration steps only) prices each replay's
steps: predicted over measured time, summed over its prefill steps, its decode-only steps and all.
A policy whose steps the model overprices looks slower in simulation than on the engine, so this
bounds how far simulated policy ratios can be trusted.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from serve_gpu_fit import fit_error  # noqa: E402
from services.engine.simulator.cost_model import CostModel  # noqa: E402

TERMS = ("a ms", "b µs / prompt token", "c µs / decode row", "d µs / adapter", "g ms / prefill step")
SCALE = (1e3, 1e6, 1e6, 1e6, 1e3)


def fit_rows(rows: list[dict]) -> tuple[np.ndarray, float]:
    """(coefficients in TERMS order, seconds; median relative error) of one replay's steps."""
    x = np.array([[1.0, float(r["num_prefill_tokens"]), float(r["num_decode_seqs"]), float(r["num_adapters"]),
                   float(float(r["num_prefill_tokens"]) > 0)] for r in rows])
    y = np.array([float(r["step_s"]) for r in rows])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    return coef, float(np.median(np.abs(x @ coef - y) / y))


def bias_rows(cost: CostModel, rows: list[dict]) -> tuple[float, float, float, float]:
    """(predicted / measured summed over prefill steps, over decode-only steps, over all; median |rel err|),
    from serve_gpu_fit.fit_error (nan where a replay has no such steps)."""
    def ratio(rs: list[dict]) -> float:
        return 1.0 + fit_error(cost, rs)["total_time_rel_err"] if rs else float("nan")
    prefill = [r for r in rows if float(r["num_prefill_tokens"]) > 0]
    decode = [r for r in rows if float(r["num_prefill_tokens"]) == 0]
    whole = fit_error(cost, rows)
    return ratio(prefill), ratio(decode), 1.0 + whole["total_time_rel_err"], whole["median_abs_rel_err"]


def bias_table(results: Path, runs: dict[str, list[dict]]) -> list[str]:
    """The results file's cost model on each 4-bit replay's steps (the model is fitted to the 4-bit base),
    beside a pooled refit that leaves the replay out (calibration steps + every other 4-bit replay)."""
    cost = CostModel.from_dict(json.loads(results.read_text())["calibration"]["cost_model"])
    replays = {run: rs for run, rs in runs.items() if "fp16" not in run}
    lines = ["", f"## The simulator's cost model on each replay (`{results.name}`)", "",
             f"Cost model of that run: {cost.source}. Ratios are predicted / measured step time, summed; "
             "above 1 the simulator charges the replay's steps more than the engine took, so the policy looks "
             "slower in simulation than it ran. Last column: the same form refitted (CostModel.fit) to the "
             "calibration steps and every other 4-bit replay, then evaluated on the one left out. Replays on "
             "the fp16 base are left out (the model prices the 4-bit base).", "",
             "| replay | steps | prefill steps | pred/meas, prefill steps | pred/meas, decode-only steps | "
             "pred/meas, all | median abs rel err | pred/meas, all, pooled refit without it |",
             "|---|---|---|---|---|---|---|---|"]
    for run, rs in replays.items():
        pre, dec, tot, med = bias_rows(cost, rs)
        pooled = "–"
        if not run.startswith("calib"):
            others = [r for other, o in replays.items() if other != run for r in o]
            pooled = f"{bias_rows(CostModel.fit(others, source='pooled'), rs)[2]:.3f}"
        n_pre = sum(float(r["num_prefill_tokens"]) > 0 for r in rs)
        lines.append(f"| {run} | {len(rs)} | {n_pre} | {pre:.3f} | {dec:.3f} | {tot:.3f} | {med:.1%} | {pooled} |")
    return lines


def report(path: Path, results: Path | None = None) -> str:
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
    if results is not None:
        lines += bias_table(results, runs)
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("steps_csv")
    ap.add_argument("--out", default=None, help="output .md (default: <steps stem>.step_fit.md)")
    ap.add_argument("--results", default=None,
                    help="the run's results JSON, for its cost model (default: <steps stem>.json when it exists)")
    args = ap.parse_args()
    path = Path(args.steps_csv)
    if not path.is_file():
        ap.error(f"no such steps file: {path}")
    stem = path.name.replace(".steps.csv", "")
    results = Path(args.results) if args.results else path.with_name(stem + ".json")
    if args.results and not results.is_file():
        ap.error(f"no such results file: {results}")
    out = Path(args.out) if args.out else path.with_name(stem + ".step_fit.md")
    out.write_text(report(path, results if results.is_file() else None))
    print(out.read_text())


if __name__ == "__main__":
    main()
