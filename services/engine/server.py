"""Engine server: config → LLMEngine → EngineWorker → EngineService + health; `python -m services.engine.server`."""
from __future__ import annotations

import asyncio
import logging

from services.common.grpc_server import ServiceHost
from services.common.logging import LoggingConfig, setup_logging
from services.common.metrics import (MetricsConfig, RpcMetricsInterceptor, create_metrics,
                                     serve_metrics)
from services.common.pb.inlaid.v1 import engine_pb2, engine_pb2_grpc
from services.common.redis_keys import RedisKeys
from services.common.redis_server import connect, resolve_url
from services.common.request_queue import RequestQueue
from services.common.task_registry import TaskRegistry
from services.engine.config import EngineConfig
from services.engine.sequence import SamplingParams
from services.engine.servicer import EngineServicer
from services.engine.worker import EngineWorker, WorkerConfig

log = logging.getLogger("services.engine")
SERVICE_NAME = engine_pb2.DESCRIPTOR.services_by_name["EngineService"].full_name


async def serve(engine_config: EngineConfig, worker_config: WorkerConfig) -> None:
    metrics, metrics_config = create_metrics(), MetricsConfig.from_env("engine")
    host = ServiceHost([SERVICE_NAME], worker_config.host, worker_config.port,
                       grace_s=worker_config.grace_s, interceptors=[RpcMetricsInterceptor(metrics)])
    servicer = EngineServicer()
    engine_pb2_grpc.add_EngineServiceServicer_to_server(servicer, host.server)
    await host.start()  # health answers NOT_SERVING while the model loads
    host.install_signal_handlers()
    log.info("engine control on port %d; loading %s", host.port, engine_config.model)
    url, embedded = resolve_url(worker_config.redis_url)
    client = connect(url)
    keys = RedisKeys(worker_config.redis_namespace, worker_config.pool)

    from services.engine.llm_engine import LLMEngine  # torch import happens here, not at import
    engine = await asyncio.to_thread(LLMEngine, engine_config)
    # Warm up before SERVING: the first forward pays for lazy init (allocator, kernels), and
    # that must not land on the first user's request.
    await asyncio.to_thread(engine.generate, [[0, 1, 2, 3]], SamplingParams(max_tokens=2))
    worker = EngineWorker(engine, RequestQueue(client, keys, worker_config.output_ttl_s),
                          TaskRegistry(client, keys),
                          worker_config, metrics)
    servicer.attach(worker)
    metrics_server = serve_metrics(metrics_config, metrics)
    run = asyncio.get_running_loop().create_task(worker.run())

    async def shutdown() -> None:
        # Finish what we hold within the grace period; the rest stays pending for other engines.
        worker.drain()
        deadline = asyncio.get_running_loop().time() + worker_config.grace_s
        while worker.num_inflight and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)
        worker.stop()
        try:
            await asyncio.wait_for(run, timeout=30)
        except asyncio.TimeoutError:
            run.cancel()
        await worker.close()
        await client.aclose()
        if metrics_server is not None:
            metrics_server.close()
        if embedded is not None:
            embedded.stop()

    host.on_stop(shutdown)
    ready = asyncio.ensure_future(worker.ready.wait())
    await asyncio.wait([run, ready], return_when=asyncio.FIRST_COMPLETED)
    if run.done():
        ready.cancel()
        await host.stop("worker failed to start")
        run.result()  # raises the worker's error
    await host.set_serving(True)
    runner = engine.runner
    layout = ""
    if runner.w4_frag:
        storage = " block-major" if runner.w4_block_major else ""
        layout = f", 4-bit codes in fragment order k_width {runner.w4_frag}{storage}"
    kv_dtype = str(runner.kv_dtype).removeprefix("torch.")
    log.info("engine %s serving pool %r (device %s%s; %d KV blocks of %d tokens, %s)", worker.engine_id, keys.pool,
             runner.device, layout, runner.num_kv_blocks, runner.block_size, kv_dtype)
    done, _ = await asyncio.wait([run, asyncio.ensure_future(host.wait())],
                                 return_when=asyncio.FIRST_COMPLETED)
    if run in done and run.exception() is not None:
        log.error("worker loop failed: %r", run.exception())
        await host.stop("worker failed")
        raise run.exception()


def main() -> None:
    logging_config = LoggingConfig.from_env()
    setup_logging(logging_config.level, logging_config.is_json)
    try:    # a bad ENGINE_* / worker setting ends with its message and exit status 2, not a traceback
        engine_config, worker_config = EngineConfig.from_env(), WorkerConfig.from_env()
        engine_config.check_device()
        engine_config.scheduler_config()    # the policy knobs (SchedulerConfig checks them)
    except ValueError as exc:
        log.error("engine configuration error: %s", exc)
        raise SystemExit(2) from None
    asyncio.run(serve(engine_config, worker_config))


if __name__ == "__main__":
    main()
