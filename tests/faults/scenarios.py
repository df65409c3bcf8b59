"""Fault scenarios over a FaultCluster: N streaming requests in flight, a fault mid-stream, and
what the clients saw compared token-for-token with a no-fault reference run.

A client is the one a real application would write: it streams Generate with its own request
id; when the stream breaks (UNAVAILABLE: gateway or Redis gone) it calls Resume(request_id,
offset=tokens it has) until it gets the rest. Every response's offset is checked against the
tokens already held, so a duplicated or skipped token is counted, never silently merged."""
from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

import grpc

from services.common.pb.inlaid.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from services.common.redis_keys import RedisKeys
from tests.faults.cluster import FaultCluster

PROMPTS = ["Write a short story about a lighthouse keeper.",
           "Explain how a refrigerator works.", "List some uses of copper.",
           "Describe the water cycle in simple words.", "What makes a good breakfast?",
           "Tell me about the history of the bicycle.", "Why is the sky blue?",
           "Give advice to a new gardener."]
OK_REASONS = {common_pb2.FINISH_REASON_EOS, common_pb2.FINISH_REASON_LENGTH,
              common_pb2.FINISH_REASON_STOP}


@dataclass
class ClientResult:
    request_id: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: int = 0
    error: str = ""
    num_duplicated: int = 0     # tokens received again at an offset already held
    num_gap: int = 0            # tokens skipped (offset beyond what is held)
    num_resumes: int = 0
    first_token: asyncio.Event = field(default_factory=asyncio.Event)


def _request(prompt: str, max_tokens: int, request_id: str) -> gateway_pb2.GenerateRequest:
    # ignore_eos: every request streams exactly max_tokens, so "complete" is unambiguous.
    return gateway_pb2.GenerateRequest(
        prompt=prompt, request_id=request_id,
        params=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))


def _take(result: ClientResult, response: gateway_pb2.GenerateResponse) -> None:
    if response.token_ids:
        held = len(result.token_ids)
        if response.offset < held:
            overlap = min(held - response.offset, len(response.token_ids))
            result.num_duplicated += overlap
            result.token_ids += list(response.token_ids)[overlap:]
        else:
            result.num_gap += response.offset - held
            result.token_ids += list(response.token_ids)
        result.first_token.set()
    if response.finish_reason:
        result.finish_reason = response.finish_reason
        result.error = response.error


async def run_client(cluster: FaultCluster, prompt: str, max_tokens: int,
                     request_id: str) -> ClientResult:
    return await _run_into(cluster, prompt, max_tokens, ClientResult(request_id))


async def reference(cluster: FaultCluster, n: int, max_tokens: int) -> list[list[int]]:
    """The no-fault outputs of the N prompts (greedy)."""
    results = await asyncio.gather(*(run_client(cluster, PROMPTS[i % len(PROMPTS)],
                                                max_tokens, f"ref-{uuid.uuid4().hex[:8]}-{i}")
                                     for i in range(n)))
    for r in results:
        if r.finish_reason not in OK_REASONS or r.num_resumes or r.num_duplicated or r.num_gap:
            raise RuntimeError(f"reference run failed: {r}")
    return [r.token_ids for r in results]


def score(name: str, n: int, results: list[ClientResult], ref: list[list[int]],
          extra: dict | None = None) -> dict:
    completed = [r for r in results if r.finish_reason in OK_REASONS]
    correct = [r for r, want in zip(results, ref) if r.finish_reason in OK_REASONS
               and r.token_ids == want]
    row = {"scenario": name, "n_in_flight": n, "completed": len(completed),
           "correct": len(correct), "lost": n - len(completed),
           "duplicated_tokens": sum(r.num_duplicated for r in results),
           "gap_tokens": sum(r.num_gap for r in results),
           "resumes": sum(r.num_resumes for r in results),
           "errors": sorted({r.error for r in results if r.error})}
    mismatched = [(r.request_id, len(r.token_ids), len(w)) for r, w in zip(results, ref)
                  if r.finish_reason in OK_REASONS and r.token_ids != w]
    if mismatched:
        row["mismatched"] = mismatched
    row.update(extra or {})
    return row


async def _wait_streaming(tasks, results_of, timeout_s: float = 120.0) -> None:
    """Until every client holds at least one token (all N are admitted and mid-stream)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end and not all(t.done() for t in tasks):
        if all(r.first_token.is_set() for r in results_of()):
            return
        await asyncio.sleep(0.05)


class _Tracker:
    """Gives access to the ClientResults of running client tasks (they are created inside)."""

    def __init__(self) -> None:
        self.results: list[ClientResult] = []


async def _clients_with_results(cluster: FaultCluster, n: int, max_tokens: int, tag: str):
    tracker = _Tracker()
    ids = [f"{tag}-{uuid.uuid4().hex[:8]}-{i}" for i in range(n)]

    async def client(i: int) -> ClientResult:
        result = ClientResult(ids[i])
        tracker.results.append(result)
        return await _run_into(cluster, PROMPTS[i % len(PROMPTS)], max_tokens, result)

    tasks = [asyncio.create_task(client(i)) for i in range(n)]
    await asyncio.sleep(0)
    return tracker, tasks


async def _run_into(cluster: FaultCluster, prompt: str, max_tokens: int,
                    result: ClientResult, deadline_s: float = 180.0) -> ClientResult:
    """run_client, filling a given ClientResult (so the scenario can watch progress)."""
    end = time.monotonic() + deadline_s
    started = False
    while not result.finish_reason and time.monotonic() < end:
        try:
            async with grpc.aio.insecure_channel(cluster.gateway_addr) as channel:
                stub = gateway_pb2_grpc.GatewayServiceStub(channel)
                if not started:
                    call = stub.Generate(_request(prompt, max_tokens, result.request_id))
                else:
                    result.num_resumes += 1
                    call = stub.Resume(gateway_pb2.ResumeRequest(
                        request_id=result.request_id, offset=len(result.token_ids)))
                async for response in call:
                    started = True
                    _take(result, response)
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL,
                                  grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED):
                result.error = f"{exc.code().name}: {exc.details()}"
                return result
            if exc.code() is not grpc.StatusCode.UNAVAILABLE:
                result.error = f"(retried) {exc.code().name}: {exc.details()[:200]}"
            await asyncio.sleep(0.3)
    if not result.finish_reason and not result.error:
        result.error = "client deadline"
    return result


# scenarios ---------------------------------------------------------------------------------
async def engine_kill(cluster: FaultCluster, ref: list[list[int]], max_tokens: int) -> dict:
    """kill -9 the engine holding the requests mid-stream; the other engine reclaims them."""
    n = len(ref)
    tracker, tasks = await _clients_with_results(cluster, n, max_tokens, "ekill")
    await _wait_streaming(tasks, lambda: tracker.results)
    held = {name: cluster.engine_status(name).num_running for name in cluster.live_engines()}
    victim = max(held, key=held.get)
    tokens_at_kill = sum(len(r.token_ids) for r in tracker.results)
    cluster.kill(cluster.engines[victim])
    kill_s = time.monotonic()
    results = await asyncio.gather(*tasks)
    recovery_s = time.monotonic() - kill_s
    cluster.start_engine(victim)  # back to two engines for the next scenario
    return score("a. engine kill -9 mid-stream, other engine reclaims (XAUTOCLAIM)", n, results,
                 ref, {"victim_held": held[victim], "tokens_seen_at_kill": tokens_at_kill,
                       "recovery_s": round(recovery_s, 1)})


async def gateway_restart(cluster: FaultCluster, ref: list[list[int]], max_tokens: int) -> dict:
    """kill -9 the gateway mid-stream, start a new one on the same port; clients Resume."""
    n = len(ref)
    tracker, tasks = await _clients_with_results(cluster, n, max_tokens, "gw")
    await _wait_streaming(tasks, lambda: tracker.results)
    tokens_at_kill = sum(len(r.token_ids) for r in tracker.results)
    cluster.kill(cluster.gateway)
    cluster.start_gateway()
    results = await asyncio.gather(*tasks)
    return score("b. gateway kill -9 + restart mid-stream, clients Resume(id, offset)", n,
                 results, ref, {"tokens_seen_at_kill": tokens_at_kill})


async def gateway_sigterm(cluster: FaultCluster, ref: list[list[int]], max_tokens: int) -> dict:
    """SIGTERM the gateway mid-stream (a rolling update): it stops taking calls, gives streams
    its grace period, leaves the requests running (no cancel), exits; a new gateway starts on
    the same port and the clients Resume."""
    n = len(ref)
    tracker, tasks = await _clients_with_results(cluster, n, max_tokens, "gwterm")
    await _wait_streaming(tasks, lambda: tracker.results)
    tokens_at_stop = sum(len(r.token_ids) for r in tracker.results)
    code, exit_s = await asyncio.to_thread(cluster.terminate, cluster.gateway)
    cluster.start_gateway()
    results = await asyncio.gather(*tasks)
    return score("f. gateway SIGTERM (graceful) + restart mid-stream, clients Resume(id, offset)",
                 n, results, ref, {"tokens_seen_at_stop": tokens_at_stop, "exit_code": code,
                                   "shutdown_s": round(exit_s, 1)})


async def redis_restart(cluster: FaultCluster, ref: list[list[int]], max_tokens: int) -> dict:
    """kill -9 Redis (AOF, fsync always) mid-stream and restart it on the same port."""
    n = len(ref)
    tracker, tasks = await _clients_with_results(cluster, n, max_tokens, "redis")
    await _wait_streaming(tasks, lambda: tracker.results)
    tokens_at_kill = sum(len(r.token_ids) for r in tracker.results)
    cluster.kill_redis()
    await asyncio.sleep(1.0)  # a real outage, not just a blip
    cluster.start_redis()
    results = await asyncio.gather(*tasks)
    return score("c. Redis kill -9 + restart (appendonly, fsync always) mid-stream", n, results,
                 ref, {"tokens_seen_at_kill": tokens_at_kill})


async def cancel_and_deadline(cluster: FaultCluster, ref: list[list[int]],
                              long_max_tokens: int = 300) -> dict:
    """Half the clients cancel their call after the first tokens, half have a short deadline;
    the engines must end with nothing running and every KV block free."""
    n = len(ref)
    ids = [f"cancel-{uuid.uuid4().hex[:8]}-{i}" for i in range(n)]
    seen: list[list[int]] = [[] for _ in range(n)]
    codes: list[str] = [""] * n

    async def client(i: int) -> None:
        async with grpc.aio.insecure_channel(cluster.gateway_addr) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            use_deadline = i % 2 == 1
            call = stub.Generate(_request(PROMPTS[i % len(PROMPTS)], long_max_tokens, ids[i]),
                                 timeout=6.0 if use_deadline else None)
            try:
                async for response in call:
                    seen[i] += list(response.token_ids)
                    if not use_deadline and len(seen[i]) >= 3:
                        call.cancel()
                        break
                codes[i] = "CANCELLED (client)" if not use_deadline else "finished?!"
            except grpc.aio.AioRpcError as exc:
                codes[i] = exc.code().name

    peak = {"num_running": 0}

    async def watch() -> None:  # proof the engines were busy before the cancels landed
        while True:
            for name in cluster.live_engines():
                status = await asyncio.to_thread(cluster.engine_status, name)
                peak["num_running"] = max(peak["num_running"], status.num_running)
            await asyncio.sleep(0.2)

    watcher = asyncio.create_task(watch())
    await asyncio.gather(*(client(i) for i in range(n)))
    watcher.cancel()
    # Resources are freed asynchronously (the gateway sets the cancel key, the worker polls it).
    end, statuses = time.monotonic() + 30, {}
    while time.monotonic() < end:
        statuses = {name: cluster.engine_status(name) for name in cluster.live_engines()}
        if all(s.num_running == 0 and s.num_waiting == 0 and s.num_free_blocks == s.num_total_blocks
               for s in statuses.values()):
            break
        await asyncio.sleep(0.2)
    freed_s = 30 - (end - time.monotonic())
    import redis.asyncio as aioredis  # noqa: PLC0415 - only this scenario reads Redis directly
    client = aioredis.from_url(cluster.redis_url, decode_responses=True)
    keys = RedisKeys("inlaid", "default")
    states = [await client.hget(keys.request(rid), "state") for rid in ids]
    await client.aclose()
    prefix_ok = sum(1 for i in range(n) if seen[i] == ref[i][:len(seen[i])]
                    or ref[i] == seen[i][:len(ref[i])])
    all_free = all(s.num_running == 0 and s.num_waiting == 0
                   and s.num_free_blocks == s.num_total_blocks for s in statuses.values())
    finished = sum(1 for s in states if s == "finished")
    return {"scenario": "d. client cancel (n/2) + deadline 6 s (n/2), max_tokens "
                        f"{long_max_tokens}: engine resources freed",
            "n_in_flight": n, "completed": finished, "correct": prefix_ok,
            "lost": n - finished, "duplicated_tokens": 0, "gap_tokens": 0, "resumes": 0,
            "errors": sorted(set(codes)), "resources_freed": all_free, "peak_num_running": peak["num_running"],
            "freed_after_s": round(freed_s, 1),
            "engine_status": {name: {"num_running": s.num_running, "num_waiting": s.num_waiting,
                                     "free_blocks": f"{s.num_free_blocks}/{s.num_total_blocks}"}
                              for name, s in statuses.items()},
            "note": "completed = request state 'finished' (CANCELLED) in Redis; correct = tokens "
                    "seen before the cancel are a prefix of the reference"}


async def engine_pause(cluster: FaultCluster, ref: list[list[int]], max_tokens: int) -> dict:
    """SIGSTOP the engine holding the requests (a hung, not dead, engine) until the other one
    has reclaimed and finished them, then SIGCONT it: the stale engine's late writes must be
    refused (offset check in the append script), so no output stream grows past max_tokens."""
    import signal  # noqa: PLC0415

    import redis.asyncio as aioredis  # noqa: PLC0415

    from services.common.request_queue import OutputChunk  # noqa: PLC0415

    n = len(ref)
    tracker, tasks = await _clients_with_results(cluster, n, max_tokens, "epause")
    await _wait_streaming(tasks, lambda: tracker.results)
    held = {name: cluster.engine_status(name).num_running for name in cluster.live_engines()}
    victim = max(held, key=held.get)
    process = cluster.engines[victim].process
    process.send_signal(signal.SIGSTOP)
    try:
        results = await asyncio.gather(*tasks)
    finally:
        process.send_signal(signal.SIGCONT)
    await asyncio.sleep(3.0)  # let the woken engine try to publish its stale tokens
    keys = RedisKeys("inlaid", "default")
    client = aioredis.from_url(cluster.redis_url, decode_responses=True)
    stream_tokens = []
    for r in results:
        entries = await client.xrange(keys.output(r.request_id))
        stream_tokens.append(sum(len(OutputChunk.from_fields(f).token_ids) for _, f in entries))
    await client.aclose()
    over = sum(max(0, t - max_tokens) for t in stream_tokens)
    row = score("e. engine SIGSTOP (hung) mid-stream, reclaimed, then SIGCONT (stale writer)",
                n, results, ref, {"victim_held": held[victim],
                                  "stream_tokens_beyond_max_after_wakeup": over,
                                  "victim_alive_after": process.poll() is None})
    row["duplicated_tokens"] += over
    return row
