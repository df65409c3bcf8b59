"""Serving-spine overhead: the same requests through gateway → Redis → worker vs LLMEngine directly.

Both paths use one LLMEngine (SmolLM2-135M on CPU) in this process and alternate A/B per
repeat; the spine path runs a real gRPC gateway on an ephemeral port, an embedded
redis-server and the EngineWorker, with gRPC clients streaming every token. EOS is ignored
so both paths generate exactly the same number of tokens. Writes
benchmarks/results/spine.{md,json}.
Usage: .venv/bin/python benchmarks/bench_spine.py [--requests 8] [--max-tokens 16] [--repeats 3]
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.common.grpc_server import ServiceHost  # noqa: E402
from services.common.model_source import resolve_model  # noqa: E402
from services.common.pb.inlaid.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc  # noqa: E402
from services.common.redis_keys import RedisKeys  # noqa: E402
from services.common.redis_server import EmbeddedRedis, connect  # noqa: E402
from services.common.request_queue import RequestQueue  # noqa: E402
from services.common.task_registry import TaskRegistry  # noqa: E402
from services.common.tokenizer import Tokenizer  # noqa: E402
from services.engine.config import EngineConfig  # noqa: E402
from services.engine.llm_engine import LLMEngine  # noqa: E402
from services.engine.sequence import SamplingParams  # noqa: E402
from services.engine.worker import EngineWorker, WorkerConfig  # noqa: E402
from services.gateway.config import GatewayConfig  # noqa: E402
from services.gateway.servicer import GatewayServicer  # noqa: E402

PROMPTS = ["Write the number 4213 in English words.", "List three colors.",
           "What is the capital of France?", "Sort these numbers: 9, 2, 7, 4."]


def run_direct(engine: LLMEngine, tokenizer: Tokenizer, n: int, max_tokens: int) -> dict:
    prompts = [tokenizer.encode_prompt(PROMPTS[i % len(PROMPTS)]) for i in range(n)]
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    results = engine.generate(prompts, params)
    wall_s = time.perf_counter() - start
    return {"wall_s": wall_s, "num_tokens": sum(len(r.token_ids) for r in results)}


async def run_spine(stub, n: int, max_tokens: int) -> dict:
    async def one(i: int) -> tuple[int, float]:
        request = gateway_pb2.GenerateRequest(prompt=PROMPTS[i % len(PROMPTS)], params=
                                              common_pb2.SamplingParams(max_tokens=max_tokens,
                                                                        ignore_eos=True))
        start, ttft_s, num_tokens = time.perf_counter(), None, 0
        async for response in stub.Generate(request, timeout=600):
            if response.token_ids and ttft_s is None:
                ttft_s = time.perf_counter() - start
            num_tokens += len(response.token_ids)
        return num_tokens, ttft_s

    start = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(n)))
    wall_s = time.perf_counter() - start
    return {"wall_s": wall_s, "num_tokens": sum(r[0] for r in results),
            "ttft_median_s": statistics.median(r[1] for r in results)}


async def main_async(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    source = resolve_model()
    tokenizer = Tokenizer(source.path)
    engine = LLMEngine(EngineConfig(device="cpu", kv_cache_bytes=64 << 20,
                                    max_num_seqs=max(8, args.requests), max_model_len=1024))
    engine.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=2))  # warm-up
    redis = EmbeddedRedis(Path(tempfile.mkdtemp(prefix="spine")))
    url = redis.start()
    keys = RedisKeys(namespace="bench")
    client = connect(url)
    queue, registry = RequestQueue(client, keys), TaskRegistry(client, keys)
    await queue.ensure_group()
    servicer = GatewayServicer(GatewayConfig(port=0, redis_namespace="bench",
                                             max_model_len=1024), queue, registry, tokenizer)
    host = ServiceHost(["inlaid.v1.GatewayService"], "127.0.0.1", 0, grace_s=0.5)
    gateway_pb2_grpc.add_GatewayServiceServicer_to_server(servicer, host.server)
    port = await host.start()
    await host.set_serving(True)
    rows = []

    async def spine_phase(stub, n: int, max_tokens: int) -> dict:
        # The worker owns the engine while it runs, so it only runs in the spine phase.
        worker = EngineWorker(engine, queue, registry, WorkerConfig(redis_namespace="bench"))
        task = asyncio.create_task(worker.run())
        try:
            return await run_spine(stub, n, max_tokens)
        finally:
            worker.stop()
            await task

    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            await spine_phase(stub, 1, 2)  # warm the path
            for repeat in range(args.repeats):
                direct = await asyncio.to_thread(run_direct, engine, tokenizer, args.requests,
                                                 args.max_tokens)
                spine = await spine_phase(stub, args.requests, args.max_tokens)
                rows.append({"repeat": repeat, "direct": direct, "spine": spine})
                print(f"repeat {repeat}: direct {direct['wall_s']:.2f} s, spine "
                      f"{spine['wall_s']:.2f} s ({spine['wall_s'] / direct['wall_s']:.3f}x), "
                      f"spine TTFT median {spine['ttft_median_s']:.3f} s", flush=True)
    finally:
        await host.stop()
        await client.aclose()
        redis.stop()
    return {"rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    rows = result["rows"]
    ratios = [r["spine"]["wall_s"] / r["direct"]["wall_s"] for r in rows]
    direct_tps = [r["direct"]["num_tokens"] / r["direct"]["wall_s"] for r in rows]
    spine_tps = [r["spine"]["num_tokens"] / r["spine"]["wall_s"] for r in rows]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    command = "benchmarks/bench_spine.py " + shlex.join(sys.argv[1:])
    summary = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit, "command": command,
        "device": f"{platform.machine()} CPU, {args.threads} torch threads (shared machine)",
        "requests": args.requests, "max_tokens": args.max_tokens, "repeats": args.repeats,
        "median_wall_ratio_spine_over_direct": statistics.median(ratios),
        "median_direct_tok_s": statistics.median(direct_tps),
        "median_spine_tok_s": statistics.median(spine_tps),
        "median_spine_ttft_s": statistics.median(r["spine"]["ttft_median_s"] for r in rows),
        "rows": rows,
    }
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "spine.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [f"# Serving-spine overhead ({summary['date']}, commit {commit})", "",
             f"Command: `{command}`; model smollm2-135m; device: {summary['device']}.", "",
             f"{args.requests} concurrent requests x {args.max_tokens} tokens (EOS ignored), "
             "the same LLMEngine driven directly (`generate`) and through gRPC gateway -> "
             "embedded Redis -> EngineWorker -> streamed back, alternating per repeat in one "
             "process. The machine was shared with other work: expect noise.", "",
             "| repeat | direct s | spine s | spine/direct | direct tok/s | spine tok/s | "
             "spine TTFT median s |", "|---|---|---|---|---|---|---|"]
    for r, ratio, dt, st in zip(rows, ratios, direct_tps, spine_tps):
        lines.append(f"| {r['repeat']} | {r['direct']['wall_s']:.2f} | {r['spine']['wall_s']:.2f} "
                     f"| {ratio:.3f} | {dt:.1f} | {st:.1f} | {r['spine']['ttft_median_s']:.3f} |")
    lines += ["", f"Median spine/direct wall-time ratio: "
                  f"**{summary['median_wall_ratio_spine_over_direct']:.3f}**."]
    (out / "spine.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
