"""The scheduling targets of issue 7, the ratio of two replays, and the per-trace ratios of a run
with repeated traces at its highest rate (bench_serve_gpu --trace-repeats); bench_serve_gpu_report
builds its report from these."""
from __future__ import annotations

import math

# The paper's maxima vs S-LoRA (DESIGN.md): the targets of issue 7.
TARGETS = {"throughput": 1.5, "avg_latency": 1.7, "jct": 2.0, "slo": 5.0, "scale_loss": 0.10, "hog_p99": 2.0}
# the four ratios the targets name, in table order
HEADLINE = (("throughput", "throughput"), ("avg_latency", "avg latency"), ("jct", "JCT"), ("slo", "SLO"))


def ratios(ours: dict, base: dict) -> dict:
    """ours vs base, each oriented so that > 1 means ours is better."""
    def div(a, b):
        if a is None or b is None or math.isnan(a) or math.isnan(b):
            return float("nan")
        if b == 0:
            return float("inf") if a > 0 else float("nan")
        return a / b
    return {"throughput": div(ours.get("throughput_req_s"), base.get("throughput_req_s")),
            "avg_latency": div(base.get("latency_avg_s_per_token"), ours.get("latency_avg_s_per_token")),
            "jct": div(base.get("jct_avg_s"), ours.get("jct_avg_s")),
            "jct_all": div(base.get("jct_avg_all_s"), ours.get("jct_avg_all_s")),
            "ttft": div(base.get("ttft_avg_s"), ours.get("ttft_avg_s")),
            "slo": div(ours.get("slo_attainment_all"), base.get("slo_attainment_all"))}


def by(rows: list[dict], **match) -> dict | None:
    """The first row whose fields equal every keyword given."""
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def trace_ratios(data: dict) -> list[dict]:
    """One entry per trace at the run's highest rate (0: the main section's, then the repeat
    section's): its request count, inlaid vs fifo on the same 4-bit base ("same") and inlaid on
    4-bit vs fifo on fp16, S-LoRA's configuration ("fp16"); None where a replay is missing."""
    main = data.get("main") or []
    if not main:
        return []
    top = max(r["load_frac"] for r in main)
    four = [dict(r, trace_no=0) for r in main if r["load_frac"] == top] + (data.get("repeats") or [])
    fp16 = [dict(r, trace_no=0) for r in data.get("fp16") or []] + (data.get("fp16_repeats") or [])
    out = []
    for k in sorted({r["trace_no"] for r in four}):
        ours = by(four, trace_no=k, variant="inlaid")
        if ours is None:
            continue
        fifo, fifo16 = by(four, trace_no=k, variant="fifo"), by(fp16, trace_no=k, variant="fifo, fp16 base")
        out.append({"trace_no": k, "requests": ours.get("num_trace_requests"),
                    "same": ratios(ours, fifo) if fifo else None,
                    "fp16": ratios(ours, fifo16) if fifo16 else None})
    return out


def geomean(values: list[float]) -> float:
    """Geometric mean of the finite positive values, NaN if there are none: an infinite ratio (a
    baseline at zero) is left out rather than making the mean infinite."""
    ok = [v for v in values if 0 < v < math.inf]
    return math.exp(sum(math.log(v) for v in ok) / len(ok)) if ok else float("nan")


def repeats_md(data: dict) -> list[str]:
    """The report's section on repeated traces: every trace's eight headline ratios, their
    geometric mean and on how many traces each target is met (empty with a single trace)."""
    rows = trace_ratios(data)
    if len(rows) < 2:
        return []
    cols = [(base, key) for base in ("same", "fp16") for key, _ in HEADLINE]
    names = [f"{name} × {'same base' if base == 'same' else 'vs fifo fp16'}"
             for base in ("same", "fp16") for _, name in HEADLINE]
    out = [f"## The highest rate on {len(rows)} traces", "",
           "Trace 0 is the main section's; each further trace draws arrivals, tasks and lengths anew at the "
           "top rate (seed + 1000 k; with the load in tokens, each at its own req/s). Ratios > 1 mean inlaid "
           "is better: inlaid vs fifo on the same 4-bit base, "
           "and inlaid on 4-bit vs fifo on fp16 (S-LoRA's configuration). Targets: "
           + ", ".join(f"{name} ≥ {TARGETS[key]}×" for key, name in HEADLINE) + ".", "",
           "| trace | requests | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(cols)]

    def cell(row: dict, base: str, key: str) -> str:
        q = row[base]
        return "–" if q is None or math.isnan(q[key]) else f"{q[key]:.2f}"

    for r in rows:
        out.append(f"| {r['trace_no']} | {r['requests']} | " + " | ".join(cell(r, b, k) for b, k in cols) + " |")
    means, met = [], []
    for base, key in cols:
        vals = [r[base][key] if r[base] else None for r in rows]
        g = float("nan") if None in vals else geomean(vals)
        means.append("–" if math.isnan(g) else f"{g:.2f}")
        met.append(f"{sum(v is not None and v >= TARGETS[key] for v in vals)} of {len(rows)}")
    out += ["| geometric mean | | " + " | ".join(means) + " |",
            "| target met on | | " + " | ".join(met) + " |", ""]
    return out
