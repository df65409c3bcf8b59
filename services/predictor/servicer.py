"""gRPC PredictorService: maps protos to LengthPredictor calls (errors → status codes in the shared interceptor)."""
from __future__ import annotations

import grpc

from services.common.errors import UnavailableError
from services.common.pb.inlaid.v1 import predictor_pb2, predictor_pb2_grpc
from services.predictor.predictor import LengthPredictor


class PredictorServicer(predictor_pb2_grpc.PredictorServiceServicer):
    """Predict: one Prediction per item, in order. ReportLengths: feeds running statistics.

    Bad input raises InvalidInputError (INVALID_ARGUMENT); calls before the model
    is loaded get UNAVAILABLE.
    """

    def __init__(self, predictor: LengthPredictor | None = None) -> None:
        self._predictor = predictor

    def set_predictor(self, predictor: LengthPredictor) -> None:
        """Install the predictor once the model is loaded and warm."""
        self._predictor = predictor

    def _ready(self) -> LengthPredictor:
        if self._predictor is None:
            raise UnavailableError("predictor is loading its model; retry shortly")
        return self._predictor

    async def Predict(self, request: predictor_pb2.PredictRequest,
                      context: grpc.aio.ServicerContext) -> predictor_pb2.PredictResponse:
        preds = await self._ready().predict([(item.task, item.prompt) for item in request.items])
        return predictor_pb2.PredictResponse(predictions=[
            predictor_pb2.Prediction(output_tokens=p.output_tokens, confidence=p.confidence,
                                     source=p.source)
            for p in preds
        ])

    async def ReportLengths(self, request: predictor_pb2.ReportLengthsRequest,
                            context: grpc.aio.ServicerContext) -> predictor_pb2.ReportLengthsResponse:
        # Local only: engines also LPUSH the same lengths to Redis (inlaid:stats:{task}),
        # which RedisStatsSync reads back, so writing them here would count them twice.
        self._ready().report([(r.task, r.output_tokens) for r in request.reports])
        return predictor_pb2.ReportLengthsResponse()
