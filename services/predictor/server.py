"""Predictor server: config → statistics + ONNX model → servicer → ServiceHost; `python -m services.predictor.server`."""
from __future__ import annotations

import asyncio
import logging

from services.common.grpc_server import ServiceHost, run_main, run_until_stopped
from services.common.metrics import (Metrics, MetricsConfig, RpcMetricsInterceptor,
                                     create_metrics, serve_metrics)
from services.common.pb.inlaid.v1 import predictor_pb2, predictor_pb2_grpc
from services.predictor.config import PredictorConfig
from services.predictor.onnx_predictor import METADATA_FILE, MicroBatcher, OnnxLengthModel
from services.predictor.predictor import LengthPredictor
from services.predictor.redis_stats import RedisStatsSync
from services.predictor.servicer import PredictorServicer
from services.predictor.stats import RunningStats

log = logging.getLogger("services.predictor")
SERVICE_NAME = predictor_pb2.DESCRIPTOR.services_by_name["PredictorService"].full_name


def load_model(config: PredictorConfig) -> OnnxLengthModel | None:
    """The warmed ONNX model, or None (statistics only) when no model directory is configured or present."""
    if config.model_dir is None:
        log.info("PREDICTOR_MODEL_DIR=none: serving from running statistics only")
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
    """The predictor's components on one ServiceHost; start() → port, stop() frees everything."""

    def __init__(self, config: PredictorConfig, metrics: Metrics | None = None,
                 metrics_config: MetricsConfig | None = None) -> None:
        """metrics_config with a port also serves /metrics over HTTP (main() does; tests don't)."""
        self.config = config
        self.metrics = metrics or create_metrics()
        self._metrics_config = metrics_config
        self._metrics_server = None
        self.host = ServiceHost([SERVICE_NAME], config.host, config.port, grace_s=config.grace_s,
                                interceptors=[RpcMetricsInterceptor(self.metrics)])
        self.port: int | None = None
        self._batcher: MicroBatcher | None = None
        self._redis_sync: RedisStatsSync | None = None

    @property
    def health(self):
        return self.host.health

    async def start(self) -> int:
        """Bind with health NOT_SERVING, load + warm the model, then SERVING. Returns the port."""
        cfg = self.config
        stats = RunningStats(window=cfg.stats_window)
        # grpc cannot add services to a started server: register now, answer UNAVAILABLE
        # until the predictor is installed, so probes see NOT_SERVING while the model loads.
        if self._metrics_config is not None:   # before the gRPC port (see serve_metrics)
            self._metrics_server = serve_metrics(self._metrics_config, self.metrics)
        servicer = PredictorServicer()
        predictor_pb2_grpc.add_PredictorServiceServicer_to_server(servicer, self.host.server)
        self.port = await self.host.start()
        self.host.on_stop(self._close)
        model = await asyncio.to_thread(load_model, cfg)
        if model is not None:
            self._batcher = MicroBatcher(model, cfg.max_batch, cfg.max_wait_ms)
            self._batcher.start()
        if cfg.redis_url:
            self._redis_sync = RedisStatsSync(cfg.redis_url, stats, cfg.stats_window,
                                              namespace=cfg.redis_namespace)
            self._redis_sync.start()
        servicer.set_predictor(LengthPredictor(cfg, stats, model, self._batcher, self.metrics))
        await self.host.set_serving(True)
        log.info("predictor listening on port %d (model %s, redis %s)", self.port,
                 "loaded" if model is not None else "none", "yes" if cfg.redis_url else "no")
        return self.port

    async def _close(self) -> None:
        if self._metrics_server is not None:
            self._metrics_server.close()
        if self._batcher is not None:
            await self._batcher.close()
        if self._redis_sync is not None:
            await self._redis_sync.close()

    async def stop(self) -> None:
        """Graceful: NOT_SERVING → in-flight RPCs finish within grace_s → free resources."""
        await self.host.stop()


async def serve(config: PredictorConfig) -> None:
    await run_until_stopped(PredictorServer(config, metrics_config=MetricsConfig.from_env("predictor")))


def main() -> None:
    run_main(serve, PredictorConfig.from_env)


if __name__ == "__main__":
    main()
