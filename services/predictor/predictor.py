"""Combines the ONNX model and running statistics into one prediction per (task, prompt)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

from services.common.errors import InvalidArgumentError
from services.common.metrics import Metrics
from services.common.pb.inlaid.v1 import predictor_pb2
from services.predictor.config import PredictorConfig
from services.predictor.onnx_predictor import MicroBatcher, OnnxLengthModel
from services.predictor.stats import RunningStats

MAX_TASK_NAME_CHARS = 256
# Predictions are clamped to this range of tokens (an engine's context bounds real outputs).
MAX_PREDICTED_TOKENS = 1 << 16

SOURCE_MODEL = predictor_pb2.PREDICTION_SOURCE_MODEL
SOURCE_STATISTICS = predictor_pb2.PREDICTION_SOURCE_STATISTICS
SOURCE_BLEND = predictor_pb2.PREDICTION_SOURCE_BLEND
SOURCE_DEFAULT = predictor_pb2.PREDICTION_SOURCE_DEFAULT
_SOURCE_LABELS = {SOURCE_MODEL: "model", SOURCE_STATISTICS: "statistics", SOURCE_BLEND: "blend",
                  SOURCE_DEFAULT: "default"}


class InvalidInputError(InvalidArgumentError):
    """A request the predictor refuses (the error interceptor maps it to INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class LengthPrediction:
    """Predicted output tokens, confidence in [0, 1], and a PredictionSource value."""

    output_tokens: int
    confidence: float
    source: int


def _tokens(log_tokens: float) -> int:
    return int(min(MAX_PREDICTED_TOKENS, max(1, round(math.expm1(log_tokens)))))


class LengthPredictor:
    """Model where it knows the task, statistics where it does not, a default otherwise.

    Blend: the model ranks prompts within a task; the statistics know the task's
    current level (adapters change, sampling settings differ from training). With
    n reports the model's log-prediction is shifted by w·(log median true −
    median log model prediction), w = n / (n + blend_prior_count). A shift keeps
    the model's order inside a task, which a weighted average with a constant
    median would flatten.
    """

    def __init__(self, config: PredictorConfig, stats: RunningStats,
                 model: OnnxLengthModel | None = None, batcher: MicroBatcher | None = None,
                 metrics: Metrics | None = None) -> None:
        self._config = config
        self._stats = stats
        self._model = model
        self._batcher = batcher
        self._metrics = metrics

    @property
    def has_model(self) -> bool:
        return self._model is not None

    def validate(self, items: list[tuple[str, str]]) -> None:
        if len(items) > self._config.max_items:
            raise InvalidInputError(
                f"{len(items)} items in one request; at most {self._config.max_items} allowed")
        for i, (task, prompt) in enumerate(items):
            if len(task) > MAX_TASK_NAME_CHARS:
                raise InvalidInputError(
                    f"item {i}: task name has {len(task)} characters; at most {MAX_TASK_NAME_CHARS}")
            if len(prompt) > self._config.max_prompt_chars:
                raise InvalidInputError(
                    f"item {i}: prompt has {len(prompt)} characters; at most "
                    f"{self._config.max_prompt_chars} (PREDICTOR_MAX_PROMPT_CHARS)")

    async def predict(self, items: list[tuple[str, str]]) -> list[LengthPrediction]:
        """Validate, run the model on the items it can judge, and fill in the rest from statistics."""
        start = time.perf_counter()
        preds = await self._predict(items)
        if self._metrics is not None:
            self._metrics.predict_s.observe(time.perf_counter() - start)
            for p in preds:
                self._metrics.predictions.labels(source=_SOURCE_LABELS[p.source]).inc()
        return preds

    async def _predict(self, items: list[tuple[str, str]]) -> list[LengthPrediction]:
        self.validate(items)
        # An empty prompt carries nothing for the model to read: statistics decide.
        model_rows = [i for i, (task, prompt) in enumerate(items)
                      if self._model is not None and prompt and self._model.knows(task)]
        outputs = {}
        if model_rows:
            batch = [items[i] for i in model_rows]
            if self._batcher is not None:
                results = await self._batcher.predict(batch)
            else:
                results = self._model.predict(batch)  # type: ignore[union-attr]
            outputs = dict(zip(model_rows, results))
        # One shift per task per call, taken before this call's predictions are recorded,
        # so every item of a task in a batch moves by the same amount (order preserved).
        shifts = {task: self._shift(task) for task in {items[i][0] for i in model_rows}}
        preds = []
        for i, (task, _) in enumerate(items):
            out = outputs.get(i)
            if out is None:
                preds.append(self._from_statistics(task))
                continue
            w, bias, stats_conf = shifts[task]
            if w == 0.0:
                preds.append(LengthPrediction(_tokens(out.log_tokens), out.confidence, SOURCE_MODEL))
            else:
                preds.append(LengthPrediction(_tokens(out.log_tokens + w * bias),
                                              (1.0 - w) * out.confidence + w * stats_conf,
                                              SOURCE_BLEND))
        for i in model_rows:
            self._stats.observe_prediction(items[i][0], outputs[i].log_tokens)
        return preds

    def _shift(self, task: str) -> tuple[float, float, float]:
        """(weight, log bias, statistics confidence) of the task; weight 0 without evidence."""
        bias = self._stats.log_bias(task)
        summary = self._stats.summary(task)
        if bias is None or summary is None:
            return 0.0, 0.0, 0.0
        w = summary.count / (summary.count + self._config.blend_prior_count)
        return w, bias, summary.confidence

    def _from_statistics(self, task: str) -> LengthPrediction:
        summary = self._stats.summary(task)
        if summary is not None:
            return LengthPrediction(max(1, round(summary.median)), summary.confidence,
                                    SOURCE_STATISTICS)
        fallback = self._stats.global_median()
        tokens = self._config.default_output_tokens if fallback is None else max(1, round(fallback))
        return LengthPrediction(tokens, 0.0, SOURCE_DEFAULT)

    def report(self, reports: list[tuple[str, int]]) -> None:
        """Record finished requests' true lengths (all validated before any is recorded)."""
        for i, (task, output_tokens) in enumerate(reports):
            if output_tokens < 0:
                raise InvalidInputError(f"report {i}: output_tokens must be >= 0, got {output_tokens}")
            if len(task) > MAX_TASK_NAME_CHARS:
                raise InvalidInputError(
                    f"report {i}: task name has {len(task)} characters; at most {MAX_TASK_NAME_CHARS}")
        for task, output_tokens in reports:
            self._stats.observe(task, output_tokens)
