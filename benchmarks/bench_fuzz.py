"""Fuzz campaign: N hostile gRPC requests against a real gateway subprocess (no engine: a valid
Generate/Resume gets its first message and is cancelled by the client) plus M hostile adapter
directories through services.common.adapters.load_adapter. Counts answers per status code;
writes benchmarks/results/fuzz.{md,json}.

    .venv/bin/python benchmarks/bench_fuzz.py --cases 10000 --adapters 1000
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from tests.faults.cluster import FaultCluster  # noqa: E402
from tests.fuzz import hostile, hostile_adapters  # noqa: E402
from tests.fuzz.run import (  # noqa: E402
    base_model_dims,
    campaign,
    hostile_adapter_dirs,
    start_fuzz_gateway,
)


def adapter_campaign(num: int, seed: int, dims) -> dict:
    rng, root = random.Random(seed), Path(tempfile.mkdtemp(prefix="inlaid-fuzz-adapters-"))
    marker, outcomes = root / "MARKER", Counter()
    kinds = list(hostile_adapters.KINDS) + [None] * max(0, num - len(hostile_adapters.KINDS))
    for kind in kinds:
        kind, path = hostile_adapters.make(rng, root, dims, marker, kind)
        outcomes[f"{kind}: {hostile_adapters.check(kind, path, dims, marker)}"] += 1
    failures = {k: n for k, n in outcomes.items() if ": CRASH" in k or ": FAIL" in k}
    by_outcome = Counter()
    for key, n in outcomes.items():
        by_outcome[key.split(": ", 1)[1].split(":")[0]] += n
    return {"num_dirs": sum(outcomes.values()), "by_outcome": dict(by_outcome),
            "by_kind": dict(sorted(outcomes.items())), "failures": failures}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=10_000)
    p.add_argument("--adapters", type=int, default=1000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    command = "python benchmarks/bench_fuzz.py " + " ".join(sys.argv[1:])
    dims = base_model_dims()
    start = time.monotonic()
    cluster = FaultCluster()
    try:
        tasks = start_fuzz_gateway(cluster)
        dirs = hostile_adapter_dirs(random.Random(args.seed),
                                    Path(tempfile.mkdtemp(prefix="inlaid-fuzz-")), dims)
        grpc_result = campaign(cluster.gateway_addr, args.cases, args.seed, tasks, dirs)
        grpc_s = time.monotonic() - start
        alive = cluster.gateway.process.poll() is None
        log_text = cluster.gateway.log_path.read_text(errors="replace")
        grpc_result["gateway_alive_after"] = alive
        grpc_result["gateway_log_tracebacks"] = log_text.count("Traceback")
    finally:
        cluster.stop()
    adapter_result = adapter_campaign(args.adapters, args.seed, dims)
    wall_s = time.monotonic() - start
    ok = (grpc_result["num_bad"] == 0 and grpc_result["healthy_after"] and alive
          and not adapter_result["failures"])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    meta = {"device": f"cpu ({os.cpu_count()} cores, shared machine)", "git_commit": commit,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": command, "wall_s": round(wall_s, 1), "grpc_s": round(grpc_s, 1),
            "passed": ok}
    print(json.dumps({**meta, "grpc": {k: v for k, v in grpc_result.items() if k != "by_method"},
                      "adapters": {k: v for k, v in adapter_result.items() if k != "by_kind"}},
                     indent=1))
    if not args.no_write:
        results = ROOT / "benchmarks" / "results"
        (results / "fuzz.json").write_text(json.dumps(
            {**meta, "grpc": grpc_result, "adapters": adapter_result}, indent=1))
        lines = ["# Fuzz: hostile gRPC requests and adapter directories", "",
                 f"- command: `{command}`", f"- {meta['device']}; commit {commit}; {meta['date']}; "
                 f"{wall_s:.0f} s", "- gateway subprocess on its own redis-server, no engine: a "
                 "request that passes validation streams its first message (request id) and the "
                 "client cancels it; one real task (arith) registered; allowed answers: "
                 + ", ".join(sorted(hostile.ALLOWED)), "",
                 f"## gRPC: {grpc_result['num_cases']} cases, {grpc_result['num_bad']} bad answers, "
                 f"healthy after: {grpc_result['healthy_after']}, process alive: {alive}, "
                 f"tracebacks in the gateway log: {grpc_result['gateway_log_tracebacks']}", "",
                 "| status | count |", "|---|---|"]
        lines += [f"| {code} | {n} |" for code, n in grpc_result["by_code"].items()]
        lines += ["", "| method / payload / status | count |", "|---|---|"]
        lines += [f"| {k} | {n} |" for k, n in grpc_result["by_method"].items()]
        if grpc_result["bad_examples"]:
            lines += ["", "Bad answers (first 20):", "```",
                      *[json.dumps(b) for b in grpc_result["bad_examples"]], "```"]
        lines += ["", f"## Adapters: {adapter_result['num_dirs']} hostile directories through "
                  "load_adapter", "", "| outcome | count |", "|---|---|"]
        lines += [f"| {k} | {n} |" for k, n in adapter_result["by_outcome"].items()]
        lines += ["", "| kind: outcome | count |", "|---|---|"]
        lines += [f"| {k} | {n} |" for k, n in adapter_result["by_kind"].items()]
        (results / "fuzz.md").write_text("\n".join(lines) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
