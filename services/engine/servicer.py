"""EngineServicer: the operator surface of one engine replica (status, drain)."""
from __future__ import annotations

from services.common.errors import UnavailableError
from services.common.pb.inlaid.v1 import engine_pb2, engine_pb2_grpc
from services.engine.worker import EngineWorker


class EngineServicer(engine_pb2_grpc.EngineServiceServicer):
    """Reads the worker's engine between steps; requests themselves arrive through Redis.

    Registered before the model loads (grpc cannot add services to a running server);
    `attach()` hands it the worker once there is one."""

    def __init__(self, worker: EngineWorker | None = None) -> None:
        self._worker = worker

    def attach(self, worker: EngineWorker) -> None:
        self._worker = worker

    def _require(self) -> EngineWorker:
        if self._worker is None:
            raise UnavailableError("engine is still loading its model")
        return self._worker

    async def GetStatus(self, request, context):
        worker = self._require()
        engine = worker.engine
        scheduler, blocks = engine.scheduler, engine.block_manager
        return engine_pb2.GetStatusResponse(
            engine_id=worker.engine_id, model=engine.config.model,
            device=str(engine.runner.device), num_waiting=len(scheduler.waiting),
            num_running=len(scheduler.running), num_free_blocks=blocks.num_free_blocks,
            num_total_blocks=blocks.num_blocks, loaded_adapters=worker.loaded_adapters,
            weight_version=worker.weight_version, policy=engine.config.policy,
            num_steps=worker.num_steps, num_generated_tokens=worker.num_generated_tokens,
            is_draining=worker.is_draining)

    async def Drain(self, request, context):
        worker = self._require()
        worker.drain()
        return engine_pb2.DrainResponse(num_running=worker.num_inflight)
