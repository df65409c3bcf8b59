"""QuantizerServicer: StartJob (validate up front, then queue) and GetJob (progress)."""
from __future__ import annotations

import asyncio

from services.common.errors import UnavailableError
from services.common.pb.inlaid.v1 import quantizer_pb2, quantizer_pb2_grpc
from services.quantizer.backend import QuantizerBackend
from services.quantizer.calibration import TaskSpec
from services.quantizer.jobs import Job, JobRunner

_STATES = {"QUEUED": quantizer_pb2.JOB_STATE_QUEUED, "RUNNING": quantizer_pb2.JOB_STATE_RUNNING,
           "DONE": quantizer_pb2.JOB_STATE_DONE, "FAILED": quantizer_pb2.JOB_STATE_FAILED}


def job_response(job: Job) -> quantizer_pb2.GetJobResponse:
    return quantizer_pb2.GetJobResponse(
        job_id=job.job_id, state=_STATES[job.state], num_layers_done=job.num_layers_done,
        num_layers_total=job.num_layers_total, message=job.message,
        weight_version=job.weight_version, bits=job.bits, group_size=job.group_size,
        num_attempts=job.num_attempts)


class QuantizerServicer(quantizer_pb2_grpc.QuantizerServiceServicer):
    """Registered before the base loads (grpc cannot add services later); `attach()` makes it
    answer, until then every call is UNAVAILABLE and health says NOT_SERVING."""

    def __init__(self) -> None:
        self._backend: QuantizerBackend | None = None
        self._runner: JobRunner | None = None
        self._submit_lock = asyncio.Lock()

    def attach(self, backend: QuantizerBackend, runner: JobRunner) -> None:
        self._backend, self._runner = backend, runner

    def _require(self) -> tuple[QuantizerBackend, JobRunner]:
        if self._backend is None or self._runner is None:
            raise UnavailableError("quantizer is still loading its base model")
        return self._backend, self._runner

    async def StartJob(self, request, context):
        backend, runner = self._require()
        tasks = [TaskSpec(name=t.name, adapter_path=t.adapter_path or None,
                          calibration_path=t.calibration_path) for t in request.tasks]
        # One submission at a time: two jobs naming one task must not both pass validation.
        async with self._submit_lock:
            settings = await asyncio.to_thread(backend.validate, tasks,
                                               runner.pending_task_names(), request.bits,
                                               request.group_size)
            job = await runner.submit(tasks, bits=settings.bits, group_size=settings.group_size)
        return quantizer_pb2.StartJobResponse(job_id=job.job_id)

    async def GetJob(self, request, context):
        _, runner = self._require()
        return job_response(runner.get(request.job_id))
