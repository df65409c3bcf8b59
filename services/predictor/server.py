"""Predictor server: config → statistics + ONNX model → servicer → grpc.aio server (health, reflection, SIGTERM)."""
from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.pb.inlaid.v1 import predictor_pb2, predictor_pb2_grpc
from services.predictor.config import PredictorConfig
from services.predictor.onnx_predictor import (
    METADATA_FILE, MicroBatcher, ModelLoadError, OnnxLengthModel)
from services.predictor.predictor import LengthPredictor
from services.predictor.redis_stats import RedisStatsSync
from services.predictor.servicer import PredictorServicer
from services.predictor.stats import RunningStats

log = logging.getLogger(__name__)
SERVICE_NAME = predictor_pb2.DESCRIPTOR.services_by_name["PredictorService"].full_name


def load_model(config: PredictorConfig) -> OnnxLengthModel | None:
    """The ONNX model, or None (statistics only) when no model directory is configured or present."""
    if config.model_dir is None:
        log.info("no PREDICTOR_MODEL_DIR: serving from running statistics only")
        return None
    if not (config.model_dir / METADATA_FILE).exists():
        log.warning("no model in %s: serving from running statistics only", config.model_dir)
        return None
    # A directory that has a model but cannot load it is a deployment error: fail loudly.
    model = OnnxLengthModel(config.model_dir, num_threads=config.num_threads)
    model.warmup()
    log.info("loaded length model from %s (%d tasks)", config.model_dir, len(model.tasks))
    return model


class PredictorServer:
    """Owns the grpc.aio server and the predictor's resources; start() then wait()/stop()."""

    def __init__(self, config: PredictorConfig) -> None:
        self.config = config
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port: int | None = None
        self._batcher: MicroBatcher | None = None
        self._redis_sync: RedisStatsSync | None = None

    async def start(self) -> int:
        """Bind, report NOT_SERVING, load + warm the model, then SERVING. Returns the bound port."""
        cfg = self.config
        stats = RunningStats(window=cfg.stats_window)
        if cfg.redis_url:
            self._redis_sync = RedisStatsSync(cfg.redis_url, stats, cfg.stats_window)
        self.server = grpc.aio.server()
        # Bind first with health NOT_SERVING, so probes see the service while it loads.
        servicer = PredictorServicer(None, self._redis_sync)
        predictor_pb2_grpc.add_PredictorServiceServicer_to_server(servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, reflection.SERVICE_NAME, "grpc.health.v1.Health"), self.server)
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = self.server.add_insecure_port(f"{cfg.host}:{cfg.port}")
        await self.server.start()
        model = await asyncio.to_thread(load_model, cfg)
        if model is not None:
            self._batcher = MicroBatcher(model, cfg.max_batch, cfg.max_wait_ms)
            self._batcher.start()
        servicer.set_predictor(LengthPredictor(cfg, stats, model, self._batcher))
        if self._redis_sync is not None:
            self._redis_sync.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("predictor serving on %s:%d (model=%s)", cfg.host, self.port, model is not None)
        return self.port

    async def stop(self) -> None:
        """Graceful: health NOT_SERVING → finish in-flight RPCs (grace_s) → free resources."""
        await self.health.enter_graceful_shutdown()
        if self.server is not None:
            await self.server.stop(self.config.grace_s)
        if self._batcher is not None:
            await self._batcher.close()
        if self._redis_sync is not None:
            await self._redis_sync.close()


async def serve(config: PredictorConfig) -> None:
    server = PredictorServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    await stop.wait()
    log.info("shutting down predictor")
    await server.stop()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(PredictorConfig.from_env()))


if __name__ == "__main__":
    main()
