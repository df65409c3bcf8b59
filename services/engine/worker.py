"""EngineWorker: moves requests from the Redis stream into an LLMEngine and its outputs back."""
from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import redis.exceptions

from services.common.env_config import env_values
from services.common.adapters import AdapterError
from services.common.memory import MallocTrimmer
from services.common.metrics import Metrics
from services.common.pb.inlaid.v1 import predictor_pb2, predictor_pb2_grpc
from services.common.request_queue import Delivery, OutputChunk, RequestQueue
from services.common.task_registry import TaskRegistry
from services.engine.errors import (AdapterInUseError, DuplicateRequestError, EngineError,
                                    InvalidRequestError, UnknownTaskError)
from services.engine.llm_engine import LLMEngine, RequestOutput
from services.engine.sequence import FinishReason, SamplingParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerConfig:
    """How an engine replica talks to Redis and its peers (ENGINE_* variables; REDIS_URL)."""

    host: str = "0.0.0.0"
    port: int = 50053                  # EngineService (status, drain) + health
    engine_id: str = ""                # Redis consumer name; "" → host-pid-random
    redis_url: str = ""
    redis_namespace: str = "inlaid"
    pool: str = "default"
    max_pool: int = 0                  # requests held at once; 0 → 2 × ENGINE_MAX_NUM_SEQS
    read_block_ms: int = 200           # XREADGROUP wait when the engine is idle
    claim_idle_s: float = 30.0         # a pending entry idle this long belongs to a dead engine
    claim_every_s: float = 2.0
    tasks_poll_s: float = 0.5          # how often the tasks version is checked
    predictor_addr: str = ""           # ReportLengths target; "" → none
    stats_window: int = 1000           # length of inlaid:stats:{task}
    grace_s: float = 10.0
    trim_every_s: float = 60.0         # malloc_trim when idle, at most this often; 0 → never
    output_ttl_s: int = 3600           # a finished request's output stays resumable this long

    def __post_init__(self) -> None:
        if self.output_ttl_s <= 0:
            raise ValueError(f"ENGINE_OUTPUT_TTL_S must be > 0, got {self.output_ttl_s}")
        if self.trim_every_s < 0:
            raise ValueError(f"ENGINE_TRIM_EVERY_S must be >= 0, got {self.trim_every_s}")
        for name in ("read_block_ms", "claim_idle_s", "claim_every_s", "tasks_poll_s",
                     "stats_window"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ENGINE_{name.upper()} must be > 0, got {getattr(self, name)}")
        if self.max_pool < 0:
            raise ValueError(f"ENGINE_MAX_POOL must be >= 0, got {self.max_pool}")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides) -> WorkerConfig:
        """Build from ENGINE_<FIELD> variables (REDIS_URL for redis_url); overrides win."""
        return cls(**{**env_values(cls, "ENGINE", env), **overrides})

    def resolved_engine_id(self) -> str:
        return self.engine_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass
class _InFlight:
    entry_id: str
    task: str
    num_prompt_tokens: int
    next_offset: int                   # output tokens written so far (earlier engines' included)
    base_offset: int                   # tokens written before this engine took the request


class EngineWorker:
    """One loop owns the engine: admit → step (in a thread) → publish. Nothing else touches the
    engine while a step runs, because every engine call is made from this loop in sequence."""

    def __init__(self, engine: LLMEngine, queue: RequestQueue, registry: TaskRegistry,
                 config: WorkerConfig, metrics: Metrics | None = None) -> None:
        self.engine = engine
        self.metrics = metrics
        self.queue = queue
        self.registry = registry
        self.config = config
        self.engine_id = config.resolved_engine_id()
        self.capacity = config.max_pool or 2 * engine.config.max_num_seqs
        self.num_steps = 0
        self.num_generated_tokens = 0
        self.is_draining = False
        self._inflight: dict[str, _InFlight] = {}
        self._loaded: dict[str, str] = {}               # adapter name → path
        self._failed: set[tuple[str, str]] = set()      # (name, path) that did not load
        self._tasks_version = -1
        self.weight_version = 0                         # base weights being served (0 = original)
        self._failed_weights: set[int] = set()
        self._stopping = False
        self._channel = None
        self._predictor = None
        if config.predictor_addr:
            self._channel = grpc.aio.insecure_channel(config.predictor_addr)
            self._predictor = predictor_pb2_grpc.PredictorServiceStub(self._channel)
        self._background: set[asyncio.Task] = set()
        self.ready = asyncio.Event()                    # set once the group exists and adapters loaded
        # Every engine call runs on this one thread: torch's CPU buffers then come from one
        # malloc arena instead of one per pool thread, each kept at its own high-water mark.
        self._engine_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._trimmer = MallocTrimmer()
        self._last_trim_s = time.monotonic()

    @property
    def num_inflight(self) -> int:
        return len(self._inflight)

    @property
    def loaded_adapters(self) -> list[str]:
        return sorted(self._loaded)

    def drain(self) -> None:
        """Stop taking requests; the ones held run to completion."""
        self.is_draining = True

    def stop(self) -> None:
        """Leave the loop after the current step; held requests stay pending for others."""
        self._stopping = True

    async def run(self) -> None:
        await self.queue.ensure_group()
        await self.sync_adapters(force=True)
        self.ready.set()
        last_claim = last_beat = last_tasks = 0.0
        while not self._stopping:
            try:
                now = time.monotonic()
                if now - last_tasks >= self.config.tasks_poll_s:
                    await self.sync_adapters()
                    await self.sync_weights()
                    last_tasks = now
                if self._inflight:
                    await self._check_cancels()
                if now - last_beat >= self.config.claim_idle_s / 3:
                    await self.queue.touch(self.engine_id,
                                           [f.entry_id for f in self._inflight.values()])
                    last_beat = now
                room = self.capacity - len(self._inflight)
                if room > 0 and not self.is_draining:
                    deliveries: list[Delivery] = []
                    if now - last_claim >= self.config.claim_every_s:
                        deliveries += await self.queue.autoclaim(
                            self.engine_id, int(self.config.claim_idle_s * 1000), room)
                        last_claim = now
                    is_idle = not (self.engine.has_unfinished or deliveries)
                    if room > len(deliveries):
                        deliveries += await self.queue.read_new(
                            self.engine_id, room - len(deliveries),
                            self.config.read_block_ms if is_idle else 0)
                    for delivery in deliveries:
                        await self._admit(delivery)
                elif not self.engine.has_unfinished:
                    await asyncio.sleep(0.05)  # draining and idle: nothing to read or step
                if self.engine.has_unfinished:
                    error, step_start_s = "", time.perf_counter()
                    try:
                        outputs = await self._in_engine_thread(self.engine.step)
                    except Exception as exc:  # noqa: BLE001 - a failed step must not hang clients
                        outputs = self._fail_all(exc)
                        error = f"engine step failed: {type(exc).__name__}: {exc}"
                    self.num_steps += 1
                    self._observe_step(outputs, time.perf_counter() - step_start_s)
                    await self._publish(outputs, error)
                    if not outputs:
                        await asyncio.sleep(0.01)  # nothing schedulable: do not spin
                else:
                    await self._maybe_trim(now)
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                log.error("redis unavailable (%s); retrying in 1 s", exc)
                await asyncio.sleep(1.0)

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        if self._channel is not None:
            await self._channel.close()
        self._engine_thread.shutdown(wait=False, cancel_futures=True)

    async def _in_engine_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(
            self._engine_thread, functools.partial(fn, *args))

    async def _maybe_trim(self, now: float) -> None:
        """Idle engine: hand the allocator's free pages back (RSS then shows real use)."""
        every_s = self.config.trim_every_s
        if every_s and self._trimmer.is_available and now - self._last_trim_s >= every_s:
            self._last_trim_s = now
            await self._in_engine_thread(self._trimmer.trim)

    # adapters --------------------------------------------------------------------------
    async def sync_adapters(self, force: bool = False) -> None:
        """Load/unload adapters to match the registry when its version changed."""
        if not force and await self.registry.version() == self._tasks_version:
            return
        version, tasks = await self.registry.snapshot()
        wanted = {t.name: t.adapter_path for t in tasks if t.is_servable}
        is_complete = True
        for name, path in list(self._loaded.items()):
            if wanted.get(name) == path:
                continue
            try:
                self.engine.remove_adapter(name)
                del self._loaded[name]
                if self.metrics is not None and name not in wanted:
                    self.metrics.forget_task(name)
                log.info("unloaded adapter %s", name)
            except AdapterInUseError:
                is_complete = False  # retried on the next poll, when its requests are done
        self._failed = {(n, p) for n, p in self._failed if wanted.get(n) == p}  # bounded by tasks
        for name, path in wanted.items():
            if name in self._loaded or (name, path) in self._failed:
                continue
            try:
                await self._in_engine_thread(self.engine.add_adapter, name, path)
                self._loaded[name] = path
                log.info("loaded adapter %s from %s", name, path)
            except (AdapterError, EngineError, OSError) as exc:
                self._failed.add((name, path))
                log.error("cannot load adapter %s from %s: %s", name, path, exc)
        self._tasks_version = version if is_complete else -1

    async def sync_weights(self) -> None:
        """Swap in a newer quantized base (`inlaid:weights` version/path, published by the
        quantizer). The loop awaits the swap, so it lands between two steps."""
        info = await self.queue.client.hgetall(self.queue.keys.weights)
        version = int(info.get("version") or 0)
        if version <= self.weight_version or version in self._failed_weights:
            return
        from services.quantizer.qlinear import apply_checkpoint  # torch-heavy; only when used

        try:
            num_swapped = await self._in_engine_thread(apply_checkpoint, self.engine.runner,
                                                       info.get("path", ""))
        except (OSError, ValueError, KeyError) as exc:
            self._failed_weights.add(version)
            log.error("cannot swap in base weights version %d from %s: %s", version,
                      info.get("path"), exc)
            return
        self.weight_version = version
        log.info("serving base weights version %d (%d linears swapped)", version, num_swapped)

    # requests --------------------------------------------------------------------------
    async def _admit(self, delivery: Delivery) -> None:
        request, rid = delivery.request, delivery.request.request_id
        if rid in self._inflight:
            return
        written, is_done = await self.queue.written(rid)
        if is_done:  # a dead engine finished it but died before the ack
            await self.queue.ack(delivery.entry_id)
            return
        num_prompt, base = len(request.prompt_token_ids), len(written)

        def final(reason: FinishReason, error: str = "") -> OutputChunk:
            return OutputChunk(offset=base, token_ids=[], finish_reason=int(reason), error=error,
                               num_prompt_tokens=num_prompt, num_output_tokens=base)

        if await self.queue.cancelled([rid]):
            await self.queue.publish([(delivery.entry_id, rid, final(FinishReason.CANCELLED))])
            return
        try:
            params = dict(request.params)
            params["stop"] = tuple(params.get("stop") or ())
            remaining = int(params.get("max_tokens", 0)) - base
            if remaining <= 0 and base > 0:
                await self.queue.publish([(delivery.entry_id, rid, final(FinishReason.LENGTH))])
                return
            params["max_tokens"] = remaining
            sampling = SamplingParams(**params)
            if request.task and request.task not in self._loaded:
                await self.sync_adapters(force=True)  # registered after our last poll
            predicted = request.predicted_output_tokens
            # A reclaimed request continues after the tokens already streamed (prompt + them),
            # so the client's stream stays consistent even when sampling is not seeded.
            self.engine.add_request(rid, request.prompt_token_ids + written, sampling,
                                    task=request.task,
                                    predicted_output_tokens=None if predicted is None
                                    else max(1, predicted - base),
                                    deadline_s=request.deadline_monotonic())
        except DuplicateRequestError:
            return
        except (InvalidRequestError, UnknownTaskError, ValueError, TypeError) as exc:
            await self.queue.publish([(delivery.entry_id, rid, final(FinishReason.ERROR, str(exc)))])
            return
        self._inflight[rid] = _InFlight(delivery.entry_id, request.task, num_prompt, base, base)
        await self.queue.mark_running(rid, self.engine_id)

    def _observe_step(self, outputs: list[RequestOutput], step_s: float) -> None:
        if self.metrics is None or not outputs:
            return
        tasks: dict[str, int] = {}
        for out in outputs:
            state = self._inflight.get(out.request_id)
            if state is not None:
                tasks[state.task] = tasks.get(state.task, 0) + len(out.new_token_ids)
        self.metrics.observe_step(step_s, len(outputs), len(tasks))
        for task, num_tokens in tasks.items():
            self.metrics.add_generated_tokens(task, num_tokens)
        scheduler, blocks = self.engine.scheduler, self.engine.block_manager
        self.metrics.set_kv_blocks(blocks.num_blocks - blocks.num_free_blocks, blocks.num_blocks)
        self.metrics.running_requests.set(len(scheduler.running))
        depths: dict[str, int] = {}
        for seq in scheduler.waiting:
            depths[seq.task] = depths.get(seq.task, 0) + 1
        self.metrics.set_queue_depths(depths)
        self.metrics.adapters_loaded.set(len(self._loaded))

    def _fail_all(self, exc: Exception) -> list[RequestOutput]:
        """A step raised: finish every held request with ERROR (their entries get acked, so a
        request that crashes the engine is not retried forever) and keep serving."""
        log.exception("engine step failed; failing %d request(s)", len(self._inflight),
                      exc_info=exc)
        outputs = []
        for request_id, state in self._inflight.items():
            try:
                self.engine.abort(request_id)
            except Exception:  # noqa: BLE001 - best effort on an engine in a bad state
                log.exception("abort of %s failed", request_id)
            outputs.append(RequestOutput(request_id, [], "", FinishReason.ERROR,
                                         state.num_prompt_tokens, state.next_offset - state.base_offset,
                                         True))
        return outputs

    async def _check_cancels(self) -> None:
        cancelled = await self.queue.cancelled(list(self._inflight))
        outputs = [out for rid in cancelled if (out := self.engine.abort(rid)) is not None]
        await self._publish(outputs)

    async def _publish(self, outputs: list[RequestOutput], error: str = "") -> None:
        items, finished = [], []
        for out in outputs:
            state = self._inflight.get(out.request_id)
            if state is None:
                continue
            self.num_generated_tokens += len(out.new_token_ids)
            chunk = OutputChunk(offset=state.next_offset, token_ids=list(out.new_token_ids),
                                text=out.new_text)
            state.next_offset += len(out.new_token_ids)
            if out.is_finished:
                del self._inflight[out.request_id]
                num_output = state.base_offset + out.num_output_tokens
                chunk = OutputChunk(offset=chunk.offset, token_ids=chunk.token_ids,
                                    text=chunk.text,
                                    finish_reason=int(out.finish_reason) or int(FinishReason.ERROR),
                                    error=error if out.finish_reason is FinishReason.ERROR else "",
                                    num_prompt_tokens=state.num_prompt_tokens,
                                    num_output_tokens=num_output)
                if out.finish_reason in (FinishReason.EOS, FinishReason.LENGTH, FinishReason.STOP):
                    finished.append((state.task, num_output))
            elif not chunk.token_ids and not chunk.text:
                continue
            items.append((state.entry_id, out.request_id, chunk))
        accepted = await self.queue.publish(items)
        for (_entry_id, request_id, _chunk), is_written in zip(items, accepted):
            if not is_written and request_id in self._inflight:
                # Another engine took the request over (we looked dead) or it already finished:
                # its stream is theirs now, so stop spending steps on it here.
                log.warning("request %s was taken over by another engine; dropping it", request_id)
                del self._inflight[request_id]
                self.engine.abort(request_id)
        if finished:
            await self._record_lengths(finished)

    async def _record_lengths(self, finished: list[tuple[str, int]]) -> None:
        """Finished lengths feed the predictor's statistics: `inlaid:stats:{task}` is the shared
        record (predictor replicas reload it; the predictor never writes it, so nothing is
        counted twice), ReportLengths updates the predictor at once."""
        pipe = self.queue.client.pipeline(transaction=False)
        for task, num_output in finished:
            pipe.lpush(self.queue.keys.stats(task), num_output)
            pipe.ltrim(self.queue.keys.stats(task), 0, self.config.stats_window - 1)
        await pipe.execute()
        if self._predictor is not None:
            reports = [predictor_pb2.LengthReport(task=t, output_tokens=n) for t, n in finished]
            task = asyncio.get_running_loop().create_task(self._report(reports))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _report(self, reports: list) -> None:
        try:
            await self._predictor.ReportLengths(
                predictor_pb2.ReportLengthsRequest(reports=reports), timeout=2.0)
        except grpc.aio.AioRpcError as exc:
            log.debug("predictor ReportLengths failed: %s", exc.code())
