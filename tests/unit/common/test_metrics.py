"""Tests for services/common/metrics.py: registry isolation, derived values, the HTTP endpoint."""
from __future__ import annotations

import urllib.request

import pytest
from prometheus_client import REGISTRY

from services.common.metrics import MetricsConfig, create_metrics, serve_metrics, start_metrics_server


def _value(metrics, name, labels=None):
    return metrics.registry.get_sample_value(name, labels or {})


def test_each_factory_call_gets_its_own_registry():
    a, b = create_metrics(), create_metrics()
    a.add_generated_tokens("sql", 5)
    assert _value(a, "inlaid_generated_tokens_total", {"task": "sql"}) == 5
    assert _value(b, "inlaid_generated_tokens_total", {"task": "sql"}) is None
    # Nothing leaks into prometheus_client's process-global registry.
    assert REGISTRY.get_sample_value("inlaid_generated_tokens_total", {"task": "sql"}) is None


def test_observe_finished_derives_tpot_from_latency_and_ttft():
    m = create_metrics()
    m.observe_finished("sum", "eos", num_prompt_tokens=12, num_output_tokens=11, ttft_s=0.5,
                       latency_s=1.5)
    assert _value(m, "inlaid_requests_total", {"task": "sum", "finish_reason": "eos"}) == 1
    assert _value(m, "inlaid_prompt_tokens_total", {"task": "sum"}) == 12
    assert _value(m, "inlaid_tpot_seconds_sum", {"task": "sum"}) == pytest.approx(0.1)
    assert _value(m, "inlaid_ttft_seconds_sum", {"task": "sum"}) == pytest.approx(0.5)
    assert _value(m, "inlaid_request_latency_seconds_count", {"task": "sum"}) == 1


def test_single_token_request_has_no_tpot_sample():
    m = create_metrics()
    m.observe_finished("a", "length", 3, 1, ttft_s=0.2, latency_s=0.2)
    assert _value(m, "inlaid_tpot_seconds_count", {"task": "a"}) is None
    assert _value(m, "inlaid_ttft_seconds_count", {"task": "a"}) == 1


def test_queue_depths_drop_tasks_that_left_the_queue():
    m = create_metrics()
    m.set_queue_depths({"a": 3, "b": 1})
    m.set_queue_depths({"b": 4})
    assert _value(m, "inlaid_queue_depth", {"task": "a"}) is None
    assert _value(m, "inlaid_queue_depth", {"task": "b"}) == 4


def test_step_kv_adapter_and_quantization_metrics():
    m = create_metrics()
    m.observe_step(0.02, num_seqs=8, num_tasks=3)
    assert _value(m, "inlaid_tasks_per_batch_bucket", {"le": "3.0"}) == 1
    assert _value(m, "inlaid_tasks_per_batch_bucket", {"le": "2.0"}) == 0
    m.set_kv_blocks(10, 64)
    assert _value(m, "inlaid_kv_blocks_used") == 10
    with pytest.raises(ValueError):
        m.set_kv_blocks(65, 64)
    m.record_adapter_lookup(is_hit=True)
    m.record_adapter_lookup(is_hit=False)
    m.record_adapter_lookup(is_hit=False)
    assert _value(m, "inlaid_adapter_cache_hits_total") == 1
    assert _value(m, "inlaid_adapter_cache_misses_total") == 2
    m.set_quantization_progress("job-1", 0.25)
    assert _value(m, "inlaid_quantization_progress", {"job_id": "job-1"}) == 0.25
    with pytest.raises(ValueError):
        m.set_quantization_progress("job-1", 1.5)
    m.finish_quantization("job-1", "done")
    m.finish_quantization("job-2", "failed")  # never reported progress: still counted
    assert _value(m, "inlaid_quantization_progress", {"job_id": "job-1"}) is None
    assert _value(m, "inlaid_quantization_jobs_total", {"state": "failed"}) == 1


@pytest.mark.parametrize("env, port", [
    ({}, 9093),
    ({"METRICS_PORT": "9100"}, 9100),
    ({"METRICS_PORT": "off"}, None),
    ({"METRICS_PORT": "0"}, 0),
])
def test_config_from_env(env, port):
    assert MetricsConfig.from_env("engine", env).port == port


@pytest.mark.parametrize("role, env", [("engine", {"METRICS_PORT": "abc"}),
                                       ("engine", {"METRICS_PORT": "70000"}),
                                       ("router", {})])
def test_config_rejects_bad_input(role, env):
    with pytest.raises(ValueError):
        MetricsConfig.from_env(role, env)


def test_http_endpoint_serves_the_registry():
    m = create_metrics()
    m.add_generated_tokens("t", 7)
    server = start_metrics_server(0, m, addr="127.0.0.1")
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5).read()
    finally:
        server.close()
    assert b'inlaid_generated_tokens_total{task="t"} 7.0' in body
    assert b"inlaid_kv_blocks_used 0.0" in body


def test_serve_metrics_off_and_taken_port():
    m = create_metrics()
    assert serve_metrics(MetricsConfig(port=None), m) is None
    first = serve_metrics(MetricsConfig(port=0, addr="127.0.0.1"), m)
    try:
        with pytest.raises(RuntimeError, match="METRICS_PORT to a free port or 'off'"):
            serve_metrics(MetricsConfig(port=first.port, addr="127.0.0.1"), m)
    finally:
        first.close()


def test_observability_doc_example_runs(monkeypatch):
    """docs/observability.md's wiring example must keep working as the APIs evolve."""
    import logging
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[3] / "docs" / "observability.md").read_text()
    block = re.search(r"<!-- example: wiring.*?-->\n```python\n(.*?)```", doc, re.S).group(1)
    for var in ("INLAID_AUTH_ENABLED", "INLAID_API_KEYS", "INLAID_API_KEYS_FILE", "LOG_FORMAT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("METRICS_PORT", "0")
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        exec(compile(block, "docs/observability.md", "exec"), {"__name__": "doc_example"})
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


async def test_rpc_interceptor_counts_codes_and_times_calls():
    import asyncio

    import grpc

    from services.common.grpc_server import ErrorInterceptor
    from services.common.metrics import RpcMetricsInterceptor

    async def ok(request, context):
        return b"ok"

    async def not_found(request, context):
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such task")

    async def boom(request, context):
        raise RuntimeError("bug")

    async def stream(request, context):
        for _ in range(50):
            yield b"t"
            await asyncio.sleep(0.01)

    m = create_metrics()
    # Metrics first: it then sees the codes the error interceptor maps exceptions to.
    server = grpc.aio.server(interceptors=[RpcMetricsInterceptor(m), ErrorInterceptor()])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.T", {
        "Ok": grpc.unary_unary_rpc_method_handler(ok),
        "NotFound": grpc.unary_unary_rpc_method_handler(not_found),
        "Boom": grpc.unary_unary_rpc_method_handler(boom),
        "Stream": grpc.unary_stream_rpc_method_handler(stream)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        assert await channel.unary_unary("/t.T/Ok")(b"") == b"ok"
        for name, code in (("NotFound", grpc.StatusCode.NOT_FOUND), ("Boom", grpc.StatusCode.INTERNAL)):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await channel.unary_unary(f"/t.T/{name}")(b"")
            assert err.value.code() == code
        assert len([r async for r in channel.unary_stream("/t.T/Stream")(b"")]) == 50
        call = channel.unary_stream("/t.T/Stream")(b"")
        async for _ in call:
            call.cancel()
            break
        for _ in range(100):  # the server notices the cancellation asynchronously
            if _value(m, "inlaid_rpcs_total", {"method": "/t.T/Stream", "code": "CANCELLED"}):
                break
            await asyncio.sleep(0.02)
    finally:
        await channel.close()
        await server.stop(None)
    expected = {("/t.T/Ok", "OK"): 1, ("/t.T/NotFound", "NOT_FOUND"): 1, ("/t.T/Boom", "INTERNAL"): 1,
                ("/t.T/Stream", "OK"): 1, ("/t.T/Stream", "CANCELLED"): 1}
    for (method, code), count in expected.items():
        assert _value(m, "inlaid_rpcs_total", {"method": method, "code": code}) == count, (method, code)
    assert _value(m, "inlaid_rpc_seconds_sum", {"method": "/t.T/Stream"}) > 0.4  # the full stream
