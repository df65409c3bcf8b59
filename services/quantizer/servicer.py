"""QuantizerService (grpc.aio): StartJob queues an incremental MLGPTQ job, GetJob reports it."""
from __future__ import annotations

from services.common.errors import InvalidArgumentError, NotFoundError
from services.common.pb.inlaid.v1 import quantizer_pb2, quantizer_pb2_grpc
from services.quantizer.calibration import TaskSpec
from services.quantizer.jobs import DONE, FAILED, QUEUED, RUNNING, JobManager

_STATES = {QUEUED: quantizer_pb2.JOB_STATE_QUEUED, RUNNING: quantizer_pb2.JOB_STATE_RUNNING,
           DONE: quantizer_pb2.JOB_STATE_DONE, FAILED: quantizer_pb2.JOB_STATE_FAILED}


class QuantizerServicer(quantizer_pb2_grpc.QuantizerServiceServicer):
    """Thin RPC layer over a JobManager; errors map to status codes via the shared interceptor."""

    def __init__(self, jobs: JobManager):
        self.jobs = jobs

    async def StartJob(self, request, context):
        tasks = []
        for t in request.tasks:
            if not t.name or not t.calibration_path:
                raise InvalidArgumentError("every task needs a name and a calibration_path")
            tasks.append(TaskSpec(t.name, t.adapter_path or None, t.calibration_path))
        if not tasks:
            raise InvalidArgumentError("StartJob needs at least one task")
        job = self.jobs.start(tasks)
        return quantizer_pb2.StartJobResponse(job_id=job.job_id)

    async def GetJob(self, request, context):
        try:
            job = self.jobs.get(request.job_id)
        except KeyError as exc:
            raise NotFoundError(str(exc)) from None
        return quantizer_pb2.GetJobResponse(
            job_id=job.job_id, state=_STATES[job.state], num_layers_done=job.num_layers_done,
            num_layers_total=job.num_layers_total, message=job.message, weight_version=job.version)
