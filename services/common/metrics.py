"""Prometheus metrics shared by every Inlaid role: one Metrics object per process, passed through constructors."""
from __future__ import annotations

import asyncio
import inspect
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, \
    generate_latest
from prometheus_client.exposition import start_http_server

from services.common.grpc_server import wrap_unary_request_handler

# Metrics ports by role (compose and Kubernetes use the same numbers).
DEFAULT_METRICS_PORTS = {"gateway": 9091, "predictor": 9092, "engine": 9093, "quantizer": 9094}
# TTFT and end-to-end latency include queueing, so the buckets reach minutes.
LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# Time per output token: ~1 ms (big GPU, small batch) to ~1 s (CPU engine, large batch).
TPOT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
STEP_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
PREDICT_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
# The paper's adapter cap β defaults to 10; buckets resolve every value up to it.
TASKS_PER_BATCH_BUCKETS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 16, 24, 32, 64)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


@dataclass(frozen=True)
class MetricsConfig:
    """Where a role serves /metrics; port None disables the endpoint."""

    port: int | None
    addr: str = "0.0.0.0"

    def __post_init__(self) -> None:
        if self.port is not None and not 0 <= self.port < 65536:
            raise ValueError(f"metrics port must be in [0, 65535] or disabled, got {self.port}")

    @classmethod
    def from_env(cls, role: str, env: Mapping[str, str] | None = None) -> "MetricsConfig":
        """METRICS_PORT (a number, or "off" to disable; default by role), METRICS_ADDR."""
        if role not in DEFAULT_METRICS_PORTS:
            raise ValueError(f"unknown role {role!r}; expected one of {sorted(DEFAULT_METRICS_PORTS)}")
        env = os.environ if env is None else env
        raw = env.get("METRICS_PORT", "").strip()
        if raw.lower() in ("off", "none", "disabled", "-1"):
            port = None
        elif raw == "":
            port = DEFAULT_METRICS_PORTS[role]
        else:
            try:
                port = int(raw)
            except ValueError:
                raise ValueError(f"METRICS_PORT must be an integer or 'off', got {raw!r}") from None
        return cls(port=port, addr=env.get("METRICS_ADDR", cls.addr) or cls.addr)


class Metrics:
    """Every Inlaid metric, registered on one CollectorRegistry owned by this object.

    Build one per process with `create_metrics()` and hand it to the components that
    record (servicer, engine worker, quantizer job). Label `task` is the task name
    ("" for the bare base model). Token *rates* come from the counters in PromQL:
    `rate(inlaid_generated_tokens_total[1m])`.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        r = registry
        # Requests and latency (the gateway observes what the client sees).
        self.requests = Counter("inlaid_requests", "Finished requests by task and finish reason",
                                ["task", "finish_reason"], registry=r)
        self.queue_depth = Gauge("inlaid_queue_depth", "Requests waiting (not yet running) per task",
                                 ["task"], registry=r)
        self.running_requests = Gauge("inlaid_running_requests", "Requests currently running",
                                      registry=r)
        self.ttft_s = Histogram("inlaid_ttft_seconds", "Time to first token", ["task"],
                                buckets=LATENCY_BUCKETS_S, registry=r)
        self.tpot_s = Histogram("inlaid_tpot_seconds", "Time per output token after the first",
                                ["task"], buckets=TPOT_BUCKETS_S, registry=r)
        self.latency_s = Histogram("inlaid_request_latency_seconds", "End-to-end request latency",
                                   ["task"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.prompt_tokens = Counter("inlaid_prompt_tokens", "Prompt tokens processed", ["task"],
                                     registry=r)
        self.generated_tokens = Counter("inlaid_generated_tokens", "Output tokens generated",
                                        ["task"], registry=r)
        # Engine internals.
        self.kv_blocks_used = Gauge("inlaid_kv_blocks_used", "KV-cache blocks in use", registry=r)
        self.kv_blocks_total = Gauge("inlaid_kv_blocks_total", "KV-cache blocks in total", registry=r)
        self.step_s = Histogram("inlaid_engine_step_seconds", "Duration of one engine step",
                                buckets=STEP_BUCKETS_S, registry=r)
        self.batch_size = Histogram("inlaid_batch_size", "Sequences per engine step",
                                    buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.tasks_per_batch = Histogram("inlaid_tasks_per_batch", "Distinct tasks per engine step",
                                         buckets=TASKS_PER_BATCH_BUCKETS, registry=r)
        self.preemptions = Counter("inlaid_preemptions", "Sequences preempted for KV memory",
                                   registry=r)
        self.adapter_cache_hits = Counter("inlaid_adapter_cache_hits", "Adapter lookups already loaded",
                                          registry=r)
        self.adapter_cache_misses = Counter("inlaid_adapter_cache_misses",
                                            "Adapter lookups that had to load weights", registry=r)
        self.adapters_loaded = Gauge("inlaid_adapters_loaded", "Adapters resident in the engine",
                                     registry=r)
        # Predictor.
        self.predict_s = Histogram("inlaid_predict_seconds", "Predictor latency per batch",
                                   buckets=PREDICT_BUCKETS_S, registry=r)
        self.predictions = Counter("inlaid_predictions", "Predictions by source", ["source"],
                                   registry=r)
        # Quantizer.
        self.quantization_progress = Gauge("inlaid_quantization_progress",
                                           "Fraction of layers done per running job (0..1)",
                                           ["job_id"], registry=r)
        self.quantization_jobs = Counter("inlaid_quantization_jobs", "Finished quantization jobs",
                                         ["state"], registry=r)
        self.adapter_screenings = Counter("inlaid_adapter_screenings", "Adapter screening verdicts",
                                          ["verdict"], registry=r)
        # Every service: gRPC calls (RpcMetricsInterceptor).
        self.rpcs = Counter("inlaid_rpcs", "Finished gRPC calls by method and status code",
                            ["method", "code"], registry=r)
        self.rpc_s = Histogram("inlaid_rpc_seconds", "gRPC call duration (whole stream for streams)",
                               ["method"], buckets=LATENCY_BUCKETS_S, registry=r)
        # process_resident_memory_bytes & co.: what an operator watches for leaks.
        ProcessCollector(registry=r)
        self._lock = threading.Lock()
        self._queued_tasks: set[str] = set()
        self._finish_reasons: dict[str, set[str]] = {}   # label pairs of `requests`, by task

    def forget_task(self, task: str) -> None:
        """Drop every series labelled with a removed task, so label sets do not grow without
        bound as tasks come and go (a re-added task starts from zero)."""
        for metric in (self.ttft_s, self.tpot_s, self.latency_s, self.prompt_tokens,
                       self.generated_tokens):
            try:
                metric.remove(task)
            except KeyError:
                pass
        with self._lock:
            for reason in self._finish_reasons.pop(task, ()):
                self.requests.remove(task, reason)
            if task in self._queued_tasks:
                self.queue_depth.remove(task)
                self._queued_tasks.discard(task)

    def observe_finished(self, task: str, finish_reason: str, num_prompt_tokens: int,
                         num_output_tokens: int, ttft_s: float | None, latency_s: float) -> None:
        """Record one finished request; TPOT is derived as (latency - ttft) / (n - 1)."""
        self.requests.labels(task, finish_reason).inc()
        with self._lock:
            self._finish_reasons.setdefault(task, set()).add(finish_reason)
        self.prompt_tokens.labels(task).inc(max(num_prompt_tokens, 0))
        self.latency_s.labels(task).observe(latency_s)
        if ttft_s is not None:
            self.ttft_s.labels(task).observe(ttft_s)
            if num_output_tokens > 1:
                self.tpot_s.labels(task).observe(max(latency_s - ttft_s, 0.0) / (num_output_tokens - 1))

    def add_generated_tokens(self, task: str, num_tokens: int) -> None:
        """Count tokens as they are produced, so rate() tracks live throughput."""
        if num_tokens > 0:
            self.generated_tokens.labels(task).inc(num_tokens)

    def set_queue_depths(self, depths: Mapping[str, int]) -> None:
        """Replace all per-task queue depths; tasks absent from `depths` are dropped (no stale series)."""
        with self._lock:
            for task in self._queued_tasks - set(depths):
                self.queue_depth.remove(task)
            for task, depth in depths.items():
                self.queue_depth.labels(task).set(depth)
            self._queued_tasks = set(depths)

    def observe_step(self, step_s: float, num_seqs: int, num_tasks: int) -> None:
        """Record one engine step: its duration, batch size and distinct tasks in the batch."""
        self.step_s.observe(step_s)
        self.batch_size.observe(num_seqs)
        self.tasks_per_batch.observe(num_tasks)

    def set_kv_blocks(self, num_used: int, num_total: int) -> None:
        if not 0 <= num_used <= num_total:
            raise ValueError(f"kv blocks used {num_used} must be in [0, total={num_total}]")
        self.kv_blocks_used.set(num_used)
        self.kv_blocks_total.set(num_total)

    def record_adapter_lookup(self, is_hit: bool) -> None:
        (self.adapter_cache_hits if is_hit else self.adapter_cache_misses).inc()

    def set_quantization_progress(self, job_id: str, fraction: float) -> None:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"quantization progress must be in [0, 1], got {fraction}")
        self.quantization_progress.labels(job_id).set(fraction)

    def finish_quantization(self, job_id: str, state: str) -> None:
        """Count a finished job (state e.g. "done"/"failed") and drop its progress series."""
        self.quantization_jobs.labels(state).inc()
        try:
            self.quantization_progress.remove(job_id)
        except KeyError:  # a job that failed before reporting any progress
            pass

    def render(self) -> bytes:
        """The text exposition format, as /metrics serves it."""
        return generate_latest(self.registry)


class RpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts and times every unary-request gRPC call: inlaid_rpcs_total{method, code}, inlaid_rpc_seconds.

    Put it before the error-mapping interceptor, so it sees the final status codes.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    async def intercept_service(self, continuation: Callable, handler_call_details: Any) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        return wrap_unary_request_handler(handler, lambda behavior: self._wrap_unary(behavior, method),
                                          lambda behavior: self._wrap_stream(behavior, method))

    def _record(self, method: str, code: grpc.StatusCode, context: Any, start: float) -> None:
        if code is grpc.StatusCode.OK and context.code() is not None:  # set_code() without abort
            code = context.code()
        self._metrics.rpcs.labels(method, code.name).inc()
        self._metrics.rpc_s.labels(method).observe(time.perf_counter() - start)

    def _wrap_unary(self, behavior: Callable, method: str) -> Callable:
        async def wrapped(request: Any, context: Any) -> Any:
            start, code = time.perf_counter(), grpc.StatusCode.OK
            try:
                result = behavior(request, context)
                return await result if inspect.isawaitable(result) else result
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception:
                code = grpc.StatusCode.UNKNOWN  # what grpc reports for an unmapped exception
                raise
            finally:
                self._record(method, code, context, start)
        return wrapped

    def _wrap_stream(self, behavior: Callable, method: str) -> Callable:
        async def wrapped(request: Any, context: Any) -> Any:
            start, code = time.perf_counter(), grpc.StatusCode.OK
            try:
                result = behavior(request, context)
                if inspect.isawaitable(result):  # a coroutine writing with context.write()
                    await result
                elif hasattr(result, "__aiter__"):
                    async for response in result:
                        yield response
                else:
                    for response in result:
                        yield response
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except (asyncio.CancelledError, GeneratorExit):  # the client went away mid-stream
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception:
                code = grpc.StatusCode.UNKNOWN
                raise
            finally:
                self._record(method, code, context, start)
        return wrapped


def create_metrics(registry: CollectorRegistry | None = None) -> Metrics:
    """A fresh Metrics on its own registry (never the prometheus_client global one)."""
    return Metrics(registry if registry is not None else CollectorRegistry(auto_describe=True))


@dataclass
class MetricsServer:
    """A running /metrics HTTP endpoint (daemon thread); close() stops it."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return self.server.server_port

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def start_metrics_server(port: int, metrics: Metrics, addr: str = "0.0.0.0") -> MetricsServer:
    """Serve `metrics` on http://addr:port/metrics (port 0 picks a free port)."""
    server, thread = start_http_server(port, addr=addr, registry=metrics.registry)
    return MetricsServer(server=server, thread=thread)


def serve_metrics(config: MetricsConfig, metrics: Metrics) -> MetricsServer | None:
    """A role's /metrics endpoint as `config` says (None when disabled); call it before binding
    the gRPC port, so a taken metrics port fails start-up with a message naming the fix."""
    if config.port is None:
        return None
    try:
        return start_metrics_server(config.port, metrics, config.addr)
    except OSError as exc:
        raise RuntimeError(f"cannot serve metrics on port {config.port} ({exc}); "
                           f"set METRICS_PORT to a free port or 'off'") from exc
