"""Gateway server: config → Redis, tokenizer, peers → GatewayServicer; `python -m services.gateway.server`."""
from __future__ import annotations

import asyncio
import logging

from services.common.adapter_screening import ScreeningConfig
from services.common.auth import AuthConfig, AuthInterceptor
from services.common.grpc_server import ServiceHost, run_main
from services.common.metrics import (Metrics, MetricsConfig, RpcMetricsInterceptor,
                                     create_metrics, serve_metrics)
from services.common.model_source import resolve_model
from services.common.pb.inlaid.v1 import gateway_pb2, gateway_pb2_grpc
from services.common.redis_keys import RedisKeys
from services.common.redis_server import connect, resolve_url
from services.common.request_queue import RequestQueue
from services.common.task_registry import TaskRegistry
from services.common.tokenizer import Tokenizer
from services.gateway.config import GatewayConfig
from services.gateway.peers import PredictorClient, QuantizerClient
from services.gateway.servicer import GatewayServicer

log = logging.getLogger("services.gateway")
SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name


async def build(config: GatewayConfig, redis_url: str,
                metrics: Metrics | None = None) -> tuple[GatewayServicer, RequestQueue]:
    """The servicer and its queue, ready to serve (also used by tests and the stack)."""
    source = resolve_model(config.model)
    if source.path is None:
        raise ValueError(f"GATEWAY_MODEL {config.model!r} has no tokenizer (random weights); "
                         "point it at a Hugging Face directory or a named model")
    tokenizer = await asyncio.to_thread(Tokenizer, source.path)
    client = connect(redis_url)
    keys = RedisKeys(config.redis_namespace, config.pool)
    queue = RequestQueue(client, keys)
    await queue.ensure_group()
    predictor = (PredictorClient(config.predictor_addr, config.predictor_timeout_s)
                 if config.predictor_addr else None)
    quantizer = (QuantizerClient(config.quantizer_addr, config.quantizer_timeout_s)
                 if config.quantizer_addr else None)
    servicer = GatewayServicer(config, queue, TaskRegistry(client, keys), tokenizer,
                               predictor, quantizer, metrics, ScreeningConfig.from_env())
    return servicer, queue


async def serve(config: GatewayConfig) -> None:
    # Auth off (the default for local runs) still installs the interceptor: every call then
    # runs as the local admin principal, so the servicer has one code path.
    auth = AuthInterceptor.from_config(AuthConfig.from_env())
    metrics, metrics_config = create_metrics(), MetricsConfig.from_env("gateway")
    host = ServiceHost([SERVICE_NAME], config.host, config.port, grace_s=config.grace_s,
                       interceptors=[auth, RpcMetricsInterceptor(metrics)])
    url, embedded = resolve_url(config.redis_url)
    servicer, queue = await build(config, url, metrics)
    # grpc cannot add services to a started server, so the servicer is built first.
    gateway_pb2_grpc.add_GatewayServiceServicer_to_server(servicer, host.server)
    await host.start()
    host.install_signal_handlers()

    metrics_server = serve_metrics(metrics_config, metrics)

    async def shutdown() -> None:
        if metrics_server is not None:
            metrics_server.close()
        await servicer.close()
        await queue.client.aclose()
        if embedded is not None:
            embedded.stop()

    host.on_stopping(servicer.begin_shutdown)
    host.on_stop(shutdown)
    await host.set_serving(True)
    log.info("gateway listening on port %d (redis %s, pool %r, predictor %s)", host.port, url,
             config.pool, config.predictor_addr or "none")
    await host.wait()


def main() -> None:
    run_main(serve, GatewayConfig.from_env)


if __name__ == "__main__":
    main()
