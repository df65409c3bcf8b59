"""onnxruntime inference of the exported length model, with async micro-batching of concurrent calls."""
from __future__ import annotations

import asyncio
import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from services.predictor.features import Featurizer

METADATA_FILE = "metadata.json"
FORMAT = "inlaid-predictor-v1"


class ModelLoadError(RuntimeError):
    """The model directory is missing files or holds an incompatible model."""


@dataclass(frozen=True)
class ModelOutput:
    """One model prediction: log1p(tokens) and a confidence in [0, 1]."""

    log_tokens: float
    confidence: float


class OnnxLengthModel:
    """Loads model.onnx + metadata.json from a directory; runs batches on a fixed thread count."""

    def __init__(self, model_dir: Path, num_threads: int = 1) -> None:
        model_dir = Path(model_dir)
        meta_path = model_dir / METADATA_FILE
        if not meta_path.exists():
            raise ModelLoadError(f"{meta_path} not found")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise ModelLoadError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
        onnx_path = model_dir / meta["onnx_file"]
        if not onnx_path.exists():
            raise ModelLoadError(f"{onnx_path} not found")
        self.metadata = meta
        self.featurizer = Featurizer.from_dict(meta["featurizer"])
        # Index 0 of the task embedding is "unknown"; known tasks start at 1.
        self.task_index = {t: i + 1 for i, t in enumerate(meta["tasks"])}
        self._task_sigma = {t: float(s) for t, s in meta.get("task_log_sigma", {}).items()}
        opts = ort.SessionOptions()
        # One request at a time per session: extra intra-op threads only add
        # wake-up latency for a model this small and steal cores from the engine.
        opts.intra_op_num_threads = num_threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])

    def knows(self, task: str) -> bool:
        return task in self.task_index

    @property
    def tasks(self) -> list[str]:
        return list(self.task_index)

    def run_raw(self, ngram_ids: np.ndarray, task_ids: np.ndarray, dense: np.ndarray) -> np.ndarray:
        """Session call on prepared arrays: [B, L] int64, [B] int64, [B, F] float32 → [B]."""
        return self._session.run(None, {"ngram_ids": ngram_ids, "task_ids": task_ids,
                                        "dense": dense})[0]

    def predict(self, items: list[tuple[str, str]]) -> list[ModelOutput]:
        """(task, prompt) pairs of known tasks → predictions, in order."""
        if not items:
            return []
        ids, dense = self.featurizer.batch([prompt for _, prompt in items])
        task_ids = np.asarray([self.task_index[task] for task, _ in items], dtype=np.int64)
        logs = self.run_raw(ids, task_ids, dense)
        return [ModelOutput(float(v), math.exp(-self._task_sigma.get(task, 1.0)))
                for v, (task, _) in zip(logs, items)]

    def warmup(self, num_runs: int = 3) -> None:
        """Run a few batches so the first real request pays no lazy-initialisation cost."""
        task = next(iter(self.task_index), None)
        if task is None:
            return
        for batch in (1, 8):
            for _ in range(num_runs):
                self.predict([(task, "warm up the predictor with a short prompt")] * batch)


class MicroBatcher:
    """Merges concurrent predict() calls into batches of at most max_batch items.

    Calls that arrive while a batch runs wait at most max_wait_ms more before the
    next batch starts; the session runs on one worker thread so the event loop
    stays free for gRPC traffic.
    """

    def __init__(self, model: OnnxLengthModel, max_batch: int, max_wait_ms: float) -> None:
        self._model = model
        self._max_batch = max_batch
        self._max_wait_s = max_wait_ms / 1000.0
        self._queue: asyncio.Queue[tuple[tuple[str, str], asyncio.Future]] | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="predictor-onnx")

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self._executor.shutdown(wait=True)

    async def predict(self, items: list[tuple[str, str]]) -> list[ModelOutput]:
        if self._queue is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        loop = asyncio.get_running_loop()
        futures = []
        for item in items:
            fut = loop.create_future()
            self._queue.put_nowait((item, fut))
            futures.append(fut)
        return list(await asyncio.gather(*futures))

    async def _loop(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self._max_wait_s
            while len(batch) < self._max_batch:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            live = [(item, fut) for item, fut in batch if not fut.done()]
            if not live:
                continue
            try:
                outs = await loop.run_in_executor(
                    self._executor, self._model.predict, [item for item, _ in live])
            except Exception as exc:  # noqa: BLE001 — delivered to every waiting caller
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), out in zip(live, outs):
                if not fut.done():
                    fut.set_result(out)
