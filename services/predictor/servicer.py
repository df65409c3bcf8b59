"""gRPC PredictorService: maps protos to LengthPredictor calls and errors to status codes."""
from __future__ import annotations

import logging

import grpc

from services.common.pb.inlaid.v1 import predictor_pb2, predictor_pb2_grpc
from services.predictor.predictor import InvalidInputError, LengthPredictor
from services.predictor.redis_stats import RedisStatsSync

log = logging.getLogger(__name__)


class PredictorServicer(predictor_pb2_grpc.PredictorServiceServicer):
    """Predict: one Prediction per item, in order. ReportLengths: feeds running statistics."""

    def __init__(self, predictor: LengthPredictor | None = None,
                 redis_sync: RedisStatsSync | None = None) -> None:
        self._predictor = predictor
        self._redis_sync = redis_sync

    def set_predictor(self, predictor: LengthPredictor) -> None:
        """Install the predictor once the model is loaded; until then calls get UNAVAILABLE."""
        self._predictor = predictor

    async def _ready(self, context: grpc.aio.ServicerContext) -> LengthPredictor:
        if self._predictor is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "predictor is loading its model")
        return self._predictor

    async def Predict(self, request: predictor_pb2.PredictRequest,
                      context: grpc.aio.ServicerContext) -> predictor_pb2.PredictResponse:
        items = [(item.task, item.prompt) for item in request.items]
        try:
            preds = await (await self._ready(context)).predict(items)
        except InvalidInputError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception:
            log.exception("Predict failed for %d items", len(items))
            await context.abort(grpc.StatusCode.INTERNAL, "prediction failed; see predictor logs")
        return predictor_pb2.PredictResponse(predictions=[
            predictor_pb2.Prediction(output_tokens=p.output_tokens, confidence=p.confidence,
                                     source=p.source)
            for p in preds
        ])

    async def ReportLengths(self, request: predictor_pb2.ReportLengthsRequest,
                            context: grpc.aio.ServicerContext) -> predictor_pb2.ReportLengthsResponse:
        reports = [(r.task, r.output_tokens) for r in request.reports]
        predictor = await self._ready(context)
        try:
            predictor.report(reports)
        except InvalidInputError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if self._redis_sync is not None and reports:
            try:
                await self._redis_sync.push(reports)
            except Exception as exc:  # noqa: BLE001 — local statistics already took the reports
                log.warning("writing %d length reports to Redis failed: %s", len(reports), exc)
        return predictor_pb2.ReportLengthsResponse()
