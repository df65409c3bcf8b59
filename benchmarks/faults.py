"""Fault-injection run: N streaming requests per scenario, a fault mid-stream, counts of
completed / correct (token-for-token equal to a no-fault greedy reference) / lost / duplicated.

Real processes: redis-server (appendonly, fsync always), two CPU engines (SmolLM2,
ENGINE_NUM_THREADS=1, ENGINE_CLAIM_IDLE_S=3), one gateway; scenarios in tests/faults/scenarios.py.
Writes benchmarks/results/faults.{md,json}.

    .venv/bin/python benchmarks/faults.py --n 8 --max-tokens 40
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.faults import scenarios  # noqa: E402
from tests.faults.cluster import ClusterConfig, FaultCluster  # noqa: E402

COLUMNS = ("scenario", "n_in_flight", "completed", "correct", "lost", "duplicated_tokens",
           "gap_tokens", "resumes")


async def run_all(cluster: FaultCluster, n: int, max_tokens: int, only: set[str]) -> list[dict]:
    ref = await scenarios.reference(cluster, n, max_tokens)
    rows = []
    steps = [("engine", scenarios.engine_kill), ("gateway", scenarios.gateway_restart),
             ("gateway-term", scenarios.gateway_sigterm),
             ("redis", scenarios.redis_restart), ("pause", scenarios.engine_pause)]
    for key, scenario in steps:
        if not only or key in only:
            start = time.monotonic()
            rows.append(await scenario(cluster, ref, max_tokens))
            rows[-1]["wall_s"] = round(time.monotonic() - start, 1)
            print(json.dumps(rows[-1]), flush=True)
    if not only or "cancel" in only:
        start = time.monotonic()
        rows.append(await scenarios.cancel_and_deadline(cluster, ref))
        rows[-1]["wall_s"] = round(time.monotonic() - start, 1)
        print(json.dumps(rows[-1]), flush=True)
    return rows


def write(rows: list[dict], args, command: str, wall_s: float) -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    meta = {"device": f"cpu ({os.cpu_count()} cores, shared machine; load avg "
                      f"{os.getloadavg()[0]:.1f} at the end)", "git_commit": commit,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": command,
            "wall_s": round(wall_s, 1)}
    results = ROOT / "benchmarks" / "results"
    (results / "faults.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    lines = ["# Fault injection", "", f"- command: `{command}`",
             f"- {meta['device']}; commit {commit}; {meta['date']}; total {wall_s:.0f} s",
             f"- each scenario: {args.n} greedy requests (ignore_eos, max_tokens "
             f"{args.max_tokens}) streaming when the fault hits; correct = the client's tokens "
             "equal the no-fault reference run token-for-token; duplicated/gap = tokens the "
             "client received twice / never (checked by offset); resumes = Resume calls the clients made, "
             "counting those refused while the gateway or Redis was still down (clients retry "
             "every 0.3 s)", "",
             "| " + " | ".join(COLUMNS) + " | notes |", "|" + "---|" * (len(COLUMNS) + 1)]
    for row in rows:
        notes = {k: v for k, v in row.items() if k not in COLUMNS}
        lines.append("| " + " | ".join(str(row[c]) for c in COLUMNS) + " | "
                     + json.dumps(notes).replace("|", "/") + " |")
    (results / "faults.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=40)
    p.add_argument("--only", default="", help="comma list of engine,gateway,gateway-term,redis,pause,cancel")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    command = "python benchmarks/faults.py " + " ".join(sys.argv[1:])
    start = time.monotonic()
    cluster = FaultCluster(ClusterConfig())
    try:
        cluster.start()
        rows = asyncio.run(run_all(cluster, args.n, args.max_tokens,
                                   {x for x in args.only.split(",") if x}))
    except Exception:
        for proc in [cluster.gateway, *cluster.engines.values()]:
            if proc is not None:
                print(f"--- {proc.role} log tail ---\n{cluster.log_tail(proc)}", file=sys.stderr)
        raise
    finally:
        cluster.stop()
    if not args.no_write:
        write(rows, args, command, time.monotonic() - start)
    ok = all(r["lost"] == 0 and r["correct"] == r["n_in_flight"] and r["duplicated_tokens"] == 0
             and r["gap_tokens"] == 0 for r in rows)
    print("workdir", cluster.workdir)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
