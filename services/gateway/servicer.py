"""GatewayServicer: validate → tokenize → predict → queue in Redis → stream the output back."""
from __future__ import annotations

import asyncio
import logging
import os
import statistics
import time
import uuid
from pathlib import Path

import grpc

from services.common.adapter_screening import ScreeningConfig, screen_adapter_dir
from services.common.adapters import BaseDims, load_adapter
from services.common.auth import LOCAL_PRINCIPAL, Principal, current_principal
from services.common.errors import AlreadyExistsError, FailedPreconditionError, InlaidError, \
    InvalidArgumentError, NotFoundError, PermissionDeniedError, ResourceExhaustedError
from services.common.metrics import Metrics
from services.common.pb.inlaid.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from services.common.request_queue import OutputChunk, QueuedRequest, RequestQueue
from services.common.task_registry import TaskRecord, TaskRegistry, check_task_name
from services.common.tokenizer import Tokenizer
from services.gateway.config import GatewayConfig
from services.gateway.peers import PredictorClient, QuantizerClient
from services.gateway.validation import check_input, check_length, check_params, \
    check_quant_settings, check_request_id

log = logging.getLogger(__name__)


class DeadlineExceededError(InlaidError):
    """The client's deadline passed while its request was still running."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


def base_dims(config: dict) -> BaseDims:
    """The base model's shapes from its HF config.json, to check adapters against."""
    heads = int(config["num_attention_heads"])
    return BaseDims(hidden_size=int(config["hidden_size"]),
                    intermediate_size=int(config["intermediate_size"]),
                    num_layers=int(config["num_hidden_layers"]), num_heads=heads,
                    num_kv_heads=int(config.get("num_key_value_heads") or heads),
                    head_dim=int(config.get("head_dim") or int(config["hidden_size"]) // heads))


def task_info(record: TaskRecord, lengths: list[int] | None = None) -> common_pb2.TaskInfo:
    lengths = lengths or []
    return common_pb2.TaskInfo(
        name=record.name, adapter_path=record.adapter_path, rank=record.rank,
        target_modules=record.targets, state=common_pb2.TaskState.Value("TASK_STATE_" + record.state),
        message=record.message, tenant=record.tenant, weight=record.weight,
        num_finished=len(lengths),
        median_output_tokens=float(statistics.median(lengths)) if lengths else 0.0)


def _caller() -> Principal:
    """The authenticated caller (services.common.auth); the local user when auth is off."""
    return current_principal() or LOCAL_PRINCIPAL


def _is_visible(record: TaskRecord, caller: Principal) -> bool:
    """Tasks of tenant "" are shared; others are seen by their tenant and by admins."""
    return caller.is_admin or record.tenant in ("", caller.tenant)


def _owner_tenant(caller: Principal) -> str:
    """Tasks an admin registers are shared by every tenant; a tenant's own are private."""
    return "" if caller.is_admin else caller.tenant


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    """The public API. Errors are raised as services.common.errors types; the interceptor
    turns them into status codes. A Generate whose client goes away cancels its request.
    Another tenant's task answers NOT_FOUND, exactly like a missing one (no existence leak)."""

    def __init__(self, config: GatewayConfig, queue: RequestQueue, registry: TaskRegistry,
                 tokenizer: Tokenizer, predictor: PredictorClient | None = None,
                 quantizer: QuantizerClient | None = None, metrics: Metrics | None = None,
                 screening: ScreeningConfig | None = None) -> None:
        self._config = config
        self._screening = screening or ScreeningConfig()
        self._metrics = metrics
        self._queue = queue
        self._registry = registry
        self._tokenizer = tokenizer
        self._dims = base_dims(tokenizer.config)
        self._max_model_len = config.max_model_len or tokenizer.max_model_len
        self._predictor = predictor
        self._quantizer = quantizer
        self._background: set[asyncio.Task] = set()  # keeps fire-and-forget cancels alive
        self._is_shutting_down = False
        self._num_streams = 0

    # generation -----------------------------------------------------------------------
    def _refuse(self, context, reason: str) -> None:
        """RESOURCE_EXHAUSTED with a back-off hint in the trailing metadata: grpc-retry-pushback-ms
        is what gRPC's own retry policy obeys; retry-after-s is for clients that retry by hand."""
        retry_s = self._config.retry_after_s
        context.set_trailing_metadata((("grpc-retry-pushback-ms", str(int(retry_s * 1000))),
                                       ("retry-after-s", f"{retry_s:g}")))
        raise ResourceExhaustedError(f"{reason}; retry in {retry_s:g} s")

    def _check_stream_room(self, context) -> None:
        # Streams are what a gateway holds per client (a task, buffers, a Redis read): their
        # number is bounded, so neither Generate nor Resume can grow memory without bound.
        if self._num_streams >= self._config.max_streams:
            self._refuse(context, f"gateway is serving its maximum of {self._config.max_streams} "
                                  "streams")

    async def Generate(self, request, context):
        start_s, caller = time.perf_counter(), _caller()
        self._check_stream_room(context)
        if request.task:
            record = await self._require_visible(request.task, caller)
            if not record.is_servable:
                raise FailedPreconditionError(f"task {request.task!r} is {record.state}: "
                                              f"{record.message or 'not servable'}")
        check_input(request, self._config)
        params = check_params(request.params, self._config)
        request_id = request.request_id or uuid.uuid4().hex
        check_request_id(request_id)
        if request.request_id and await self._queue.exists(request_id):
            async for response in self._attach(request_id, caller):
                yield response
            return
        prompt_text, token_ids = await asyncio.to_thread(self._tokenize, request)
        check_length(len(token_ids), params["max_tokens"], self._max_model_len)
        if await self._queue.backlog() >= self._config.max_queue:
            self._refuse(context, f"request queue is full ({self._config.max_queue} queued or "
                                  "running)")
        predicted = None
        if self._predictor is not None:
            predicted = await self._predictor.predict(request.task, prompt_text)
        if predicted is None:
            # No predictor, or it is down: degrade to the task's running statistics.
            predicted = await self._queue.median_output_tokens(request.task)
        # The client's deadline, read once: on the wall clock for the engine (which holds back a request
        # that cannot finish by it), on this process's monotonic clock for the stream below.
        remaining_s = context.time_remaining()
        deadline_s = None if remaining_s is None else time.monotonic() + remaining_s
        entry_id = await self._queue.enqueue(QueuedRequest(
            request_id=request_id, task=request.task, prompt_token_ids=token_ids, params=params,
            predicted_output_tokens=predicted, tenant=caller.tenant,
            deadline_ts=None if remaining_s is None else time.time() + remaining_s))
        if entry_id is None:  # the same idempotency key arrived twice at once; one queued it
            async for response in self._attach(request_id, caller):
                yield response
            return
        async for response in self._stream(request_id, 0, cancel_on_exit=True,
                                           predicted_output_tokens=predicted or 0,
                                           task=request.task, start_s=start_s,
                                           deadline_s=deadline_s):
            yield response

    async def _attach(self, request_id: str, caller: Principal):
        """Idempotency key seen before: stream that request instead of running it twice."""
        owner = await self._queue.owner(request_id)
        if owner is not None and not self._may_see(owner, caller):
            raise AlreadyExistsError(f"request_id {request_id!r} is taken; use another")
        async for response in self._stream(request_id, 0, cancel_on_exit=False):
            yield response

    async def Resume(self, request, context):
        check_request_id(request.request_id)
        if request.offset < 0:
            raise InvalidArgumentError(f"offset must be >= 0, got {request.offset}")
        await self._require_request(request.request_id)
        self._check_stream_room(context)
        async for response in self._stream(request.request_id, request.offset,
                                           cancel_on_exit=False):
            yield response

    async def Cancel(self, request, context):
        check_request_id(request.request_id)
        await self._require_request(request.request_id)
        return gateway_pb2.CancelResponse(was_active=await self._queue.cancel(request.request_id))

    @staticmethod
    def _may_see(owner: str, caller: Principal) -> bool:
        return caller.is_admin or owner == caller.tenant

    async def _require_request(self, request_id: str) -> None:
        owner = await self._queue.owner(request_id)
        if owner is None or not self._may_see(owner, _caller()):
            raise NotFoundError(f"unknown request {request_id!r} (finished requests are kept "
                                "for an hour)")

    def _tokenize(self, request) -> tuple[str, list[int]]:
        if request.prompt:
            return request.prompt, self._tokenizer.encode_prompt(request.prompt)
        text = self._tokenizer.render_chat([(m.role, m.content) for m in request.messages])
        return text, self._tokenizer.encode_rendered(text)

    async def _stream(self, request_id: str, offset: int, cancel_on_exit: bool,
                      predicted_output_tokens: int = 0, task: str | None = None,
                      start_s: float = 0.0, deadline_s: float | None = None):
        """The first message (id, prediction) right away, then the output from `offset`.
        `task` set means a new request whose latency the metrics should record."""
        is_finished, ttft_s = False, None
        self._num_streams += 1
        try:
            yield gateway_pb2.GenerateResponse(request_id=request_id,
                                               predicted_output_tokens=predicted_output_tokens)
            async for chunk in self._queue.follow(request_id, self._config.read_block_ms,
                                                  deadline_s):
                response = self._response(request_id, chunk, offset)
                is_finished = chunk.is_final
                if ttft_s is None and chunk.token_ids:
                    ttft_s = time.perf_counter() - start_s
                if is_finished and task is not None and self._metrics is not None:
                    self._metrics.observe_finished(
                        task, common_pb2.FinishReason.Name(chunk.finish_reason)
                        .removeprefix("FINISH_REASON_").lower(), chunk.num_prompt_tokens,
                        chunk.num_output_tokens, ttft_s, time.perf_counter() - start_s)
                if response is not None:
                    yield response
            if not is_finished and deadline_s is not None and time.monotonic() >= deadline_s:
                # follow() stopped at the client's deadline: say so (the request is cancelled
                # below) instead of ending the stream as if it were complete.
                raise DeadlineExceededError(f"deadline passed before request {request_id} "
                                            "finished; it was cancelled")
        finally:
            self._num_streams -= 1
            # Client cancelled or its deadline passed: free the engine slot. A stopping gateway
            # leaves the request running, so the client can Resume it on another replica.
            if cancel_on_exit and not is_finished and not self._is_shutting_down:
                task = asyncio.get_running_loop().create_task(self._queue.cancel(request_id))
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    def _response(self, request_id: str, chunk: OutputChunk, offset: int):
        token_ids, text, start = chunk.token_ids, chunk.text, chunk.offset
        if chunk.end <= offset and not chunk.is_final:
            return None  # the client already has these tokens
        if start < offset:
            token_ids = token_ids[offset - start:]
            text, start = self._tokenizer.decode(token_ids), offset
        return gateway_pb2.GenerateResponse(
            request_id=request_id, text=text, token_ids=token_ids, offset=start,
            finish_reason=chunk.finish_reason, num_prompt_tokens=chunk.num_prompt_tokens,
            num_output_tokens=chunk.num_output_tokens, error=chunk.error)

    # tasks ------------------------------------------------------------------------------
    async def _require_visible(self, name: str, caller: Principal) -> TaskRecord:
        record = await self._registry.get(name)
        if record is None or not _is_visible(record, caller):
            raise NotFoundError(f"unknown task {name!r}: register it with AddTask "
                                "(`inlaid tasks add`) or list tasks with ListTasks")
        return record

    async def ListTasks(self, request, context):
        caller = _caller()
        tasks = [t for t in await self._registry.list() if _is_visible(t, caller)]
        client = self._queue.client
        pipe = client.pipeline(transaction=False)
        for record in tasks:
            pipe.lrange(self._queue.keys.stats(record.name), 0, -1)
        pipe.hget(self._queue.keys.weights, "version")
        *lengths, version = await pipe.execute()
        infos = [task_info(r, [int(x) for x in ls]) for r, ls in zip(tasks, lengths)]
        return gateway_pb2.ListTasksResponse(tasks=infos, weight_version=int(version or 0))

    async def AddTask(self, request, context):
        check_task_name(request.name)
        if not request.adapter_path:
            raise InvalidArgumentError("adapter_path is required")
        if not 0 <= request.weight < float("inf"):  # NaN and inf too (fuzzing: inf was stored)
            raise InvalidArgumentError(f"weight must be finite and >= 0 (0 = 1.0), got {request.weight}")
        check_quant_settings(request)
        if "\x00" in request.adapter_path or "\x00" in request.calibration_path:
            # Path.resolve() raises ValueError on NUL, which answered INTERNAL (found by fuzzing).
            raise InvalidArgumentError("adapter_path and calibration_path must not contain NUL bytes")
        if await self._registry.get(request.name) is not None:
            raise AlreadyExistsError(f"task {request.name!r} already exists; remove it first "
                                     "or pick another name")
        adapter_path = str(Path(request.adapter_path).expanduser().resolve())
        calibration_path = ""
        if request.calibration_path:
            calibration_path = str(Path(request.calibration_path).expanduser().resolve())
            if self._quantizer is None:
                raise FailedPreconditionError(
                    "calibration_path given but no quantizer configured (GATEWAY_QUANTIZER_ADDR); "
                    "register without calibration data to serve on the current base")
            if not os.path.isfile(calibration_path):
                raise InvalidArgumentError(f"calibration file {calibration_path} does not exist")
        adapter = await asyncio.to_thread(load_adapter, request.name, adapter_path, self._dims,
                                          self._config.max_lora_rank)
        # A poisoned adapter would hurt every task through the shared quantized base (the
        # paper's stated limitation): screen before it is served or joins quantization.
        report = await asyncio.to_thread(screen_adapter_dir, adapter_path, self._screening)
        is_quarantined = report.should_quarantine
        state = "QUARANTINED" if is_quarantined else (
            "QUANTIZING" if calibration_path else "READY")
        record = TaskRecord(name=request.name, adapter_path=adapter_path, rank=adapter.rank,
                            targets=list(adapter.targets), state=state,
                            message=report.summary() if report.reasons else "",
                            tenant=_owner_tenant(_caller()), weight=request.weight or 1.0)
        await self._registry.add(record)
        if is_quarantined:
            log.warning("quarantined task %s: %s", record.name, report.summary())
            return gateway_pb2.AddTaskResponse(task=task_info(record))
        job_id = ""
        if calibration_path:
            # Hook for incremental MLGPTQ: the task serves on the current base meanwhile and
            # the quantizer publishes a new weight version when the job is done.
            try:
                job_id = await self._quantizer.start_job(
                    request.name, adapter_path, calibration_path, bits=request.quant_bits,
                    group_size=request.quant_group_size)
            except Exception:
                await self._registry.remove(request.name)
                raise
            record = await self._registry.update(request.name, message=f"quantization job {job_id}")
        log.info("registered task %s (rank %d, %s)", record.name, record.rank, record.targets)
        return gateway_pb2.AddTaskResponse(task=task_info(record), job_id=job_id)

    async def RemoveTask(self, request, context):
        check_task_name(request.name)
        caller = _caller()
        record = await self._require_visible(request.name, caller)
        if record.tenant != caller.tenant and not caller.is_admin:
            raise PermissionDeniedError(f"task {request.name!r} is shared; only an admin key "
                                        "may remove it")
        await self._registry.remove(request.name)
        # Its finished-length statistics go too (a task re-added under the name starts afresh).
        await self._queue.client.delete(self._queue.keys.stats(request.name))
        if self._metrics is not None:
            self._metrics.forget_task(request.name)  # label sets stay bounded by live tasks
        log.info("removed task %s", request.name)
        return gateway_pb2.RemoveTaskResponse()

    def begin_shutdown(self) -> None:
        self._is_shutting_down = True

    async def close(self) -> None:
        for peer in (self._predictor, self._quantizer):
            if peer is not None:
                await peer.close()
