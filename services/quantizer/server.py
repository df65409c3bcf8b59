"""Quantizer server: config → base model → job runner → servicer; `python -m services.quantizer.server`."""
from __future__ import annotations

import asyncio
import logging

from services.common.grpc_server import ServiceHost, run_main, run_until_stopped
from services.common.metrics import (Metrics, MetricsConfig, RpcMetricsInterceptor,
                                     create_metrics, serve_metrics)
from services.common.pb.inlaid.v1 import quantizer_pb2, quantizer_pb2_grpc
from services.common.redis_keys import RedisKeys
from services.common.redis_server import connect, resolve_url
from services.common.task_registry import TaskRegistry
from services.quantizer.backend import QuantizerBackend
from services.quantizer.config import QuantizerServiceConfig
from services.quantizer.influence import InfluenceConfig
from services.quantizer.job_store import JobStore
from services.quantizer.jobs import MAX_KEPT_JOBS, JobRunner
from services.quantizer.publisher import WeightPublisher
from services.quantizer.servicer import QuantizerServicer

log = logging.getLogger("services.quantizer")
SERVICE_NAME = quantizer_pb2.DESCRIPTOR.services_by_name["QuantizerService"].full_name


class QuantizerServer:
    """The quantizer's components on one ServiceHost; start() → port, stop() frees everything."""

    def __init__(self, config: QuantizerServiceConfig, metrics: Metrics | None = None,
                 metrics_config: MetricsConfig | None = None,
                 influence: InfluenceConfig = InfluenceConfig()) -> None:
        self.config = config
        self.influence = influence
        self.metrics = metrics or create_metrics()
        self._metrics_config = metrics_config
        self._metrics_server = None
        self.host = ServiceHost([SERVICE_NAME], config.host, config.port, grace_s=config.grace_s,
                                interceptors=[RpcMetricsInterceptor(self.metrics)])
        self.servicer = QuantizerServicer()
        quantizer_pb2_grpc.add_QuantizerServiceServicer_to_server(self.servicer, self.host.server)
        self.runner: JobRunner | None = None
        self.backend: QuantizerBackend | None = None
        self._embedded = None
        self._client = None
        self.port: int | None = None

    async def start(self) -> int:
        """Bind (NOT_SERVING), load the base, publish a not-yet-published current version,
        then SERVING. Returns the port."""
        if self._metrics_config is not None:   # before the gRPC port (see serve_metrics)
            self._metrics_server = serve_metrics(self._metrics_config, self.metrics)
        self.port = await self.host.start()
        self.host.on_stop(self._close)
        url, self._embedded = resolve_url(self.config.redis_url)
        self._client = connect(url)
        keys = RedisKeys(self.config.redis_namespace)
        publisher = WeightPublisher(self._client, keys)
        self.backend = await asyncio.to_thread(QuantizerBackend, self.config, self.influence)
        await self._publish_current(publisher)
        self.runner = JobRunner(self.backend.run, publisher, TaskRegistry(self._client, keys),
                                self.backend.num_layers, self.metrics,
                                store=JobStore(self._client, keys, MAX_KEPT_JOBS),
                                max_attempts=self.config.max_job_attempts,
                                screen=self.backend.screen if self.influence.is_enabled else None)
        # No job runs yet: whatever a killed job half-wrote can go, then its record decides.
        await asyncio.to_thread(self.backend.remove_stale_temp_dirs)
        served_version, _ = await publisher.current()
        await self.runner.recover(self.backend.quantized_task_names(), served_version)
        self.runner.start()
        self.servicer.attach(self.backend, self.runner)
        await self.host.set_serving(True)
        log.info("quantizer listening on port %d (model %s, versions in %s, device %s, redis %s)",
                 self.port, self.config.model, self.backend.root, self.backend.device, url)
        return self.port

    async def _publish_current(self, publisher: WeightPublisher) -> None:
        # A version written just before a crash (or a fresh Redis) must still reach the engines.
        current = self.backend.current_version()
        if current is None:
            return
        _, served_path = await publisher.current()
        if served_path != str(current.resolve()):
            version = await publisher.publish(current)
            log.info("published existing %s as weight version %d", current, version)

    async def _close(self) -> None:
        if self.runner is not None:
            await self.runner.close()
        if self._metrics_server is not None:
            self._metrics_server.close()
        if self._client is not None:
            await self._client.aclose()
        if self._embedded is not None:
            self._embedded.stop()

    async def stop(self) -> None:
        await self.host.stop()


async def serve(config: QuantizerServiceConfig) -> None:
    await run_until_stopped(QuantizerServer(config, metrics_config=MetricsConfig.from_env("quantizer"),
                                            influence=InfluenceConfig.from_env()))


def main() -> None:
    run_main(serve, QuantizerServiceConfig.from_env)


if __name__ == "__main__":
    main()
