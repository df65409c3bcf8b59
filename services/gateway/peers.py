"""Clients of the gateway's optional peers: the length predictor and the quantizer."""
from __future__ import annotations

import logging
import time

import grpc

from services.common.errors import UnavailableError
from services.common.pb.inlaid.v1 import predictor_pb2, predictor_pb2_grpc, quantizer_pb2, \
    quantizer_pb2_grpc

log = logging.getLogger(__name__)


class PredictorClient:
    """Asks the predictor for an output length; any failure or timeout means "no prediction",
    because scheduling without a prediction is worse but a blocked request is worse still."""

    def __init__(self, addr: str, timeout_s: float) -> None:
        self._channel = grpc.aio.insecure_channel(addr)
        self._stub = predictor_pb2_grpc.PredictorServiceStub(self._channel)
        self._timeout_s = timeout_s
        self._last_warning_s = 0.0

    async def predict(self, task: str, prompt: str) -> int | None:
        request = predictor_pb2.PredictRequest(items=[predictor_pb2.PredictItem(task=task,
                                                                                prompt=prompt)])
        try:
            response = await self._stub.Predict(request, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            now = time.monotonic()
            if now - self._last_warning_s > 30:  # one line per 30 s, not one per request
                log.warning("predictor unavailable (%s); serving without predictions", exc.code())
                self._last_warning_s = now
            return None
        if not response.predictions or response.predictions[0].output_tokens <= 0:
            return None
        return int(response.predictions[0].output_tokens)

    async def close(self) -> None:
        await self._channel.close()


class QuantizerClient:
    """Starts incremental quantization jobs for tasks registered with calibration data."""

    def __init__(self, addr: str, timeout_s: float) -> None:
        self._channel = grpc.aio.insecure_channel(addr)
        self._stub = quantizer_pb2_grpc.QuantizerServiceStub(self._channel)
        self._timeout_s = timeout_s

    async def start_job(self, name: str, adapter_path: str, calibration_path: str,
                        bits: int = 0, group_size: int = 0) -> str:
        task = quantizer_pb2.QuantTask(name=name, adapter_path=adapter_path,
                                       calibration_path=calibration_path)
        request = quantizer_pb2.StartJobRequest(tasks=[task], bits=bits, group_size=group_size)
        try:
            response = await self._stub.StartJob(request, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            # Keep the quantizer's verdict (bad calibration file → INVALID_ARGUMENT).
            error = UnavailableError(f"quantizer: {exc.details()}")
            if exc.code() is not grpc.StatusCode.UNKNOWN:
                error.code = exc.code()
            raise error from exc
        return response.job_id

    async def close(self) -> None:
        await self._channel.close()
