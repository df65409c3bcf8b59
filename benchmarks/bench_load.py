"""Sustained-load soak test of the real stack on this machine (loopback only).

Starts a private redis-server, the predictor, a CPU engine (SmolLM2) and the gateway as child
processes (services.stack.Stack on free ports), registers the demo adapters in ./adapters, then
sends an open-loop Poisson stream of Generate requests (random demo task or the bare base, a
prompt from the workload kit) at `--rate` req/s for `--duration-s`. Every `--sample-s` seconds
it samples the RSS of every service process (and Redis' own used_memory). Reports errors,
latency / TTFT percentiles, tokens/s and, per process, RSS at the start, at the end of warm-up
(the first third) and at the end, plus the least-squares RSS slope over the warm phase (the last
two thirds). Memory passes as flat when no slope exceeds --flat-mb-per-min; the exit code
is non-zero on any error or a process that is not flat. Writes benchmarks/results/load.{md,json}.

Redis keeps finished outputs for ENGINE_OUTPUT_TTL_S (resumable); the run sets it to
--output-ttl-s (default 120 s) so Redis, too, reaches its steady state inside the run.

    .venv/bin/python benchmarks/bench_load.py --duration-s 1800 --rate 0.4 --max-tokens 24
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from benchmarks.results_io import git_commit  # noqa: E402
from services.common.pb.inlaid.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc  # noqa: E402
from services.common.redis_server import redis_binary  # noqa: E402
from services.common.workload import gen_code, gen_lists, gen_numbers, gen_records  # noqa: E402
from services.stack import Stack, StackConfig, wait_serving  # noqa: E402

GENERATORS = {"arith": gen_numbers.arith, "num2words_en": gen_numbers.num2words_en,
              "num2words_fr": gen_numbers.num2words_fr, "sort_list": gen_lists.sort_list,
              "json_extract": gen_records.json_extract, "table_summary": gen_records.table_summary,
              "code_gen": gen_code.code_gen}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def slope_mb_per_min(samples: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (t_s, rss_mb) in MB/min."""
    if len(samples) < 3:
        return None
    n = len(samples)
    mt = sum(t for t, _ in samples) / n
    mr = sum(r for _, r in samples) / n
    var = sum((t - mt) ** 2 for t, _ in samples)
    if var == 0:
        return None
    return 60 * sum((t - mt) * (r - mr) for t, r in samples) / var


class Result:
    def __init__(self) -> None:
        self.records: list[dict] = []


async def one_request(stub, task: str, prompt: str, max_tokens: int, out: Result,
                      timeout_s: float) -> None:
    start = time.perf_counter()
    record = {"task": task, "ok": False, "ttft_s": None, "latency_s": None, "tokens": 0,
              "error": ""}
    request = gateway_pb2.GenerateRequest(
        task=task, messages=[common_pb2.ChatMessage(role="user", content=prompt)],
        params=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0))
    try:
        finish = 0
        async for response in stub.Generate(request, timeout=timeout_s):
            if response.token_ids and record["ttft_s"] is None:
                record["ttft_s"] = time.perf_counter() - start
            record["tokens"] += len(response.token_ids)
            if response.finish_reason:
                finish = response.finish_reason
                if response.error:
                    record["error"] = response.error[:200]
        record["latency_s"] = time.perf_counter() - start
        name = common_pb2.FinishReason.Name(finish)
        record["finish"] = name
        record["ok"] = name in ("FINISH_REASON_EOS", "FINISH_REASON_LENGTH", "FINISH_REASON_STOP")
        if not record["ok"] and not record["error"]:
            record["error"] = name
    except grpc.aio.AioRpcError as exc:
        record["error"] = f"{exc.code().name}: {exc.details()[:160]}"
    out.records.append(record)


def redis_used_mb(client) -> float | None:
    try:
        return client.info("memory")["used_memory"] / (1 << 20)
    except Exception:  # noqa: BLE001 - a missed sample, not a failed run
        return None


async def drive(gateway: str, tasks: list[str], args, pids: dict[str, int],
                redis_client=None) -> tuple[Result, dict]:
    rng = random.Random(args.seed)
    out = Result()
    rss: dict[str, list[tuple[float, float]]] = {role: [] for role in pids}
    if redis_client is not None:
        rss["redis used_memory"] = []
    loadavg: list[tuple[float, float]] = []
    pending: set[asyncio.Task] = set()
    async with grpc.aio.insecure_channel(gateway) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        t0 = time.monotonic()
        next_arrival, next_sample, sent = t0, t0, 0
        while True:
            now = time.monotonic()
            if now - t0 >= args.duration_s or sent >= args.max_requests:
                break
            if now >= next_sample:
                for role, pid in pids.items():
                    value = rss_mb(pid)
                    if value is not None:
                        rss[role].append((now - t0, value))
                if redis_client is not None:
                    value = redis_used_mb(redis_client)
                    if value is not None:
                        rss["redis used_memory"].append((now - t0, value))
                loadavg.append((now - t0, os.getloadavg()[0]))
                next_sample += args.sample_s
            if now >= next_arrival:
                # Open loop: arrivals do not wait for completions (bounded by max_in_flight so a
                # stalled stack cannot pile up unbounded client tasks).
                if len(pending) < args.max_in_flight:
                    task = rng.choice(tasks)
                    prompt = GENERATORS[task](rng)[0] if task else GENERATORS[rng.choice(
                        list(GENERATORS))](rng)[0]
                    job = asyncio.create_task(one_request(stub, task, prompt, args.max_tokens,
                                                          out, args.request_timeout_s))
                    pending.add(job)
                    job.add_done_callback(pending.discard)
                else:
                    out.records.append({"task": "", "ok": False, "error": "client: dropped "
                                        "(max in flight)", "ttft_s": None, "latency_s": None,
                                        "tokens": 0})
                sent += 1
                next_arrival += rng.expovariate(args.rate)
            await asyncio.sleep(min(0.05, max(0.0, min(next_arrival, next_sample) - now)))
        send_end = time.monotonic() - t0
        if pending:
            await asyncio.wait(pending, timeout=args.request_timeout_s)
        end = time.monotonic() - t0
    return out, {"rss": rss, "loadavg": loadavg, "send_s": send_end, "wall_s": end}


def summarize(out: Result, extra: dict, args) -> dict:
    recs = out.records
    ok = [r for r in recs if r["ok"]]
    errors: dict[str, int] = {}
    for r in recs:
        if not r["ok"]:
            errors[r["error"] or "unknown"] = errors.get(r["error"] or "unknown", 0) + 1
    lat = [r["latency_s"] for r in ok]
    ttft = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    tokens = sum(r["tokens"] for r in ok)
    memory = {role: memory_verdict(samples, extra["send_s"], args.flat_mb_per_min)
              for role, samples in extra["rss"].items()}
    loads = [v for _, v in extra["loadavg"]]
    return {"num_requests": len(recs), "num_ok": len(ok), "num_errors": len(recs) - len(ok),
            "errors": errors,
            "latency_s": {q: percentile(lat, p) for q, p in (("p50", .5), ("p90", .9), ("p99", .99))},
            "ttft_s": {q: percentile(ttft, p) for q, p in (("p50", .5), ("p90", .9), ("p99", .99))},
            "output_tokens": tokens, "tokens_per_s": tokens / extra["wall_s"] if extra["wall_s"] else 0,
            "achieved_rate_req_s": len(recs) / extra["send_s"] if extra["send_s"] else 0,
            "send_s": extra["send_s"], "wall_s": extra["wall_s"], "memory": memory,
            "loadavg_1m": {"min": min(loads, default=None), "mean": sum(loads) / len(loads)
                           if loads else None, "max": max(loads, default=None)},
            "memory_flat": all(m["flat"] for m in memory.values()),
            "flat_mb_per_min": args.flat_mb_per_min, "rss_samples": extra["rss"]}


def memory_verdict(samples: list[tuple[float, float]], send_s: float,
                   limit_mb_per_min: float) -> dict:
    """RSS at start / end of warm-up (first third) / end, and the slope over the warm phase
    (last two thirds): allocator high-water marks settle during warm-up, a leak keeps going."""
    warm_s = send_s / 3
    warm = [s for s in samples if s[0] >= warm_s]
    slope = slope_mb_per_min(warm)
    at = lambda seq: seq[0][1] if seq else None  # noqa: E731
    return {"start_mb": at(samples), "warm_mb": at(warm),
            "end_mb": samples[-1][1] if samples else None,
            "max_mb": max((r for _, r in samples), default=None),
            "warm_growth_mb": warm[-1][1] - warm[0][1] if len(warm) > 1 else None,
            "slope_mb_per_min_warm": slope, "num_samples": len(samples),
            # A leak only grows: a falling RSS (freed memory handed back) passes.
            "flat": slope is not None and slope <= limit_mb_per_min}


def write_results(summary: dict, args, command: str, commit: str, date: str | None = None,
                  rendered_by: str = "") -> None:
    results = ROOT / "benchmarks" / "results"
    meta = {"device": f"cpu ({os.cpu_count()} cores, shared machine), engine ENGINE_NUM_THREADS="
                      f"{args.engine_threads}", "git_commit": commit,
            "date": date or datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": command, "args": vars(args)}
    if rendered_by:
        meta["rendered_by"] = rendered_by
    (results / "load.json").write_text(json.dumps({**meta, **summary}, indent=1))
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [f"# Load test (soak): {args.rate} req/s open loop for {args.duration_s:.0f} s",
             "", f"- command: `{command}`", f"- device: {meta['device']}; commit {commit}; "
             f"{meta['date']}",
             *([f"- report re-rendered from the run's samples by `{rendered_by}`"]
               if rendered_by else []),
             f"- model SmolLM2-135M on CPU, demo adapters + base, chat prompts from the workload "
             f"kit, greedy, max_tokens={args.max_tokens}",
             f"- 1-min load average during the run: min {fmt(summary['loadavg_1m']['min'])}, "
             f"mean {fmt(summary['loadavg_1m']['mean'])}, max {fmt(summary['loadavg_1m']['max'])} "
             "(2 cores shared with other engineers' jobs)", "",
             "| requests | ok | errors | achieved req/s | tokens/s | latency p50/p90/p99 s | "
             "TTFT p50/p90/p99 s |", "|---|---|---|---|---|---|---|",
             f"| {summary['num_requests']} | {summary['num_ok']} | {summary['num_errors']} | "
             f"{summary['achieved_rate_req_s']:.3f} | {summary['tokens_per_s']:.2f} | "
             + "/".join(fmt(summary["latency_s"][q]) for q in ("p50", "p90", "p99")) + " | "
             + "/".join(fmt(summary["ttft_s"][q]) for q in ("p50", "p90", "p99")) + " |", "",
             "Errors: " + (", ".join(f"{k}: {v}" for k, v in summary["errors"].items()) or "none"),
             "", "## Memory per process",
             "", f"RSS sampled every {args.sample_s:.0f} s (Redis also by its own used_memory). "
             f"Warm-up = the first third of the run ({summary['send_s'] / 3:.0f} s); the warm phase "
             "= the last two thirds. **Flat** = least-squares slope over the warm phase at most "
             f"+{args.flat_mb_per_min} MB/min (+{60 * args.flat_mb_per_min:.0f} MB/hour; a "
             "falling RSS passes). "
             f"Verdict: **{'PASS' if summary['memory_flat'] else 'FAIL'}**.", "",
             "| process | start MB | warm MB | end MB | max MB | warm-phase growth MB | "
             "slope MB/min (warm) | flat |", "|---|---|---|---|---|---|---|---|"]
    for role, m in summary["memory"].items():
        lines.append(f"| {role} | {fmt(m['start_mb'])} | {fmt(m['warm_mb'])} | {fmt(m['end_mb'])} "
                     f"| {fmt(m['max_mb'])} | {fmt(m['warm_growth_mb'])} "
                     f"| {fmt(m['slope_mb_per_min_warm'])} | {'PASS' if m['flat'] else 'FAIL'} |")
    if summary.get("memwatch"):
        lines += memwatch_lines(summary["memwatch"])
    lines += ["", "Latency numbers are noisy: the 2 CPU cores are shared with other engineers' "
              "jobs (see the load average above); the memory verdict does not depend on them."]
    (results / "load.md").write_text("\n".join(lines) + "\n")


def collect_memwatch(directory: Path) -> dict[str, list[dict]]:
    """The memwatch samples of each service (benchmarks/memwatch), keyed by role."""
    samples = {}
    for path in sorted(directory.glob("*.jsonl")):
        role = path.stem.split("-")[0]
        keep = ("t_s", "VmRSS", "rss_anon_mb", "rss_heap_mb", "malloc_in_use_mb",
                "malloc_free_mb", "malloc_mmapped_mb", "num_arenas", "Threads")
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        samples[role] = [{k: r[k] for k in keep if k in r} for r in rows]
    return samples


def memwatch_lines(memwatch: dict[str, list[dict]]) -> list[str]:
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    lines = ["", "## Allocator view (memwatch)", "",
             "glibc malloc statistics sampled inside each service (benchmarks/memwatch): bytes "
             "in use vs free-but-kept by the allocator, first → last sample.", "",
             "| process | samples | malloc in use MB | malloc free MB | mmapped MB | arenas | "
             "threads |", "|---|---|---|---|---|---|---|"]
    for role, rows in memwatch.items():
        if not rows:
            continue
        a, b = rows[0], rows[-1]
        pair = lambda k: f"{fmt(a.get(k))} → {fmt(b.get(k))}"  # noqa: E731
        lines.append(f"| {role} | {len(rows)} | {pair('malloc_in_use_mb')} | "
                     f"{pair('malloc_free_mb')} | {pair('malloc_mmapped_mb')} | "
                     f"{a.get('num_arenas')} → {b.get('num_arenas')} | "
                     f"{a.get('Threads', 0):.0f} → {b.get('Threads', 0):.0f} |")
    return lines


def rerender(path: Path, limit_mb_per_min: float, commit: str, command: str,
             memwatch_dir: str = "", is_written: bool = True) -> int:
    data = json.loads(path.read_text())
    meta_keys = ("device", "git_commit", "date", "command", "args", "rendered_by")
    summary = {k: v for k, v in data.items() if k not in meta_keys}
    run_args = argparse.Namespace(**{**data["args"], "flat_mb_per_min": limit_mb_per_min})
    summary["memory"] = {role: memory_verdict(samples, data["send_s"], limit_mb_per_min)
                         for role, samples in data["rss_samples"].items()}
    summary["memory_flat"] = all(m["flat"] for m in summary["memory"].values())
    summary["flat_mb_per_min"] = limit_mb_per_min
    if memwatch_dir:
        summary["memwatch"] = collect_memwatch(Path(memwatch_dir))
    if is_written:
        write_results(summary, run_args, data["command"], commit or data["git_commit"],
                      data["date"], rendered_by=command)
    for role, m in summary["memory"].items():
        print(f"memory {role}: warm slope {m['slope_mb_per_min_warm']:.3f} MB/min, warm-phase "
              f"growth {m['warm_growth_mb']:.1f} MB -> {'PASS' if m['flat'] else 'FAIL'}")
    print(f"memory flat: {'PASS' if summary['memory_flat'] else 'FAIL'}")
    return 0 if summary["memory_flat"] and summary["num_errors"] == 0 else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration-s", type=float, default=600.0)
    p.add_argument("--rate", type=float, default=0.4, help="mean arrivals per second (Poisson)")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--max-requests", type=int, default=100_000)
    p.add_argument("--max-in-flight", type=int, default=64)
    p.add_argument("--request-timeout-s", type=float, default=300.0)
    p.add_argument("--sample-s", type=float, default=5.0)
    p.add_argument("--engine-threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-predictor", action="store_true")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--flat-mb-per-min", type=float, default=0.5,
                   help="a process is flat when its warm-phase RSS slope is within this")
    p.add_argument("--output-ttl-s", type=int, default=120,
                   help="ENGINE_OUTPUT_TTL_S: how long Redis keeps finished outputs")
    p.add_argument("--rerender", default="",
                   help="no run: recompute the memory verdicts of a load.json (its RSS samples) "
                        "with the current criteria and rewrite load.{md,json}")
    p.add_argument("--commit", default="", help="with --rerender: the commit the run started from")
    p.add_argument("--memwatch-dir", default="",
                   help="diagnostics: every service appends memory samples (smaps, malloc "
                        "statistics) to DIR/<role>-<pid>.jsonl (benchmarks/memwatch)")
    p.add_argument("--memwatch-trace", action="store_true",
                   help="with --memwatch-dir: also tracemalloc + gc type growth (slows services)")
    p.add_argument("--memwatch-s", type=float, default=30.0)
    args = p.parse_args()
    if args.rerender:
        return rerender(Path(args.rerender), args.flat_mb_per_min, args.commit,
                        "python benchmarks/bench_load.py " + " ".join(sys.argv[1:]),
                        args.memwatch_dir, is_written=not args.no_write)
    if args.rate <= 0 or args.duration_s <= 0:
        p.error("--rate and --duration-s must be > 0")
    command = "python benchmarks/bench_load.py " + " ".join(sys.argv[1:])
    commit = git_commit()  # the code that runs (the tree may move on during a long run)
    # SIGTERM ends the run through `finally`, so the stack's processes are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    tmp = Path(tempfile.mkdtemp(prefix="inlaid-load-"))
    redis_port = free_port()
    redis = subprocess.Popen([redis_binary(), "--port", str(redis_port), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no", "--dir", str(tmp)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # The children inherit os.environ (Stack passes it on): pin threads, no fixed metrics ports.
    os.environ.update(ENGINE_NUM_THREADS=str(args.engine_threads), PREDICTOR_NUM_THREADS="1",
                      METRICS_PORT="off", LOG_LEVEL="WARNING", ENGINE_DEVICE="cpu",
                      ENGINE_MAX_MODEL_LEN="1024", GATEWAY_MAX_MODEL_LEN="1024",
                      ENGINE_KV_CACHE_BYTES=str(64 << 20),
                      ENGINE_OUTPUT_TTL_S=str(args.output_ttl_s))
    if args.memwatch_dir:
        Path(args.memwatch_dir).mkdir(parents=True, exist_ok=True)
        os.environ.update(INLAID_MEMWATCH_DIR=str(Path(args.memwatch_dir).resolve()),
                          INLAID_MEMWATCH_S=str(args.memwatch_s),
                          INLAID_MEMWATCH_TRACE="1" if args.memwatch_trace else "0",
                          PYTHONPATH=os.pathsep.join(filter(None, [
                              str(ROOT / "benchmarks" / "memwatch"),
                              os.environ.get("PYTHONPATH", "")])))
    ports = [free_port() for _ in range(4)]
    config = StackConfig(gateway_port=ports[0], predictor_port=ports[1], engine_port=ports[2],
                         quantizer_port=ports[3], redis_url=f"redis://127.0.0.1:{redis_port}",
                         adapters_dir=str(ROOT / "adapters"), with_predictor=not args.no_predictor,
                         with_quantizer=False, startup_timeout_s=300)
    stack = Stack(config)
    try:
        stack.start()
        registered = stack.register_adapters()
        wait_serving(f"127.0.0.1:{ports[0]}", time.monotonic() + 30)
        tasks = registered + [""]
        pids = {c.role: c.process.pid for c in stack.children}
        pids["redis"] = redis.pid
        print(f"stack up: {pids}; tasks {tasks}; load {os.getloadavg()}", flush=True)
        import redis as redis_sync
        redis_client = redis_sync.Redis(host="127.0.0.1", port=redis_port, socket_timeout=2)
        out, extra = asyncio.run(drive(f"127.0.0.1:{ports[0]}", tasks, args, pids, redis_client))
        redis_client.close()
    finally:
        stack.stop()
        redis.terminate()
        redis.wait(10)
    summary = summarize(out, extra, args)
    if args.memwatch_dir:
        summary["memwatch"] = collect_memwatch(Path(args.memwatch_dir))
    printable = {k: v for k, v in summary.items() if k not in ("rss_samples", "memwatch")}
    print(json.dumps(printable, indent=1))
    for role, m in summary["memory"].items():
        print(f"memory {role}: start {m['start_mb']} MB, warm {m['warm_mb']} MB, end {m['end_mb']} "
              f"MB, warm slope {m['slope_mb_per_min_warm']} MB/min -> "
              f"{'PASS' if m['flat'] else 'FAIL'} (limit {args.flat_mb_per_min} MB/min)")
    print(f"memory flat: {'PASS' if summary['memory_flat'] else 'FAIL'}; errors: "
          f"{summary['num_errors']}")
    if not args.no_write:
        write_results(summary, args, command, commit)
    return 0 if summary["num_errors"] == 0 and summary["memory_flat"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
