"""Tests for services/common/auth.py against a real grpc.aio server on an ephemeral port."""
from __future__ import annotations

import hashlib
import json

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common.auth import (LOCAL_PRINCIPAL, ApiKeyStore, AuthConfig, AuthConfigError,
                                  AuthInterceptor, Principal, current_principal, current_tenant,
                                  extract_api_key, require_admin)
from services.common.logging import log_context

KEYS = {"k-acme": {"tenant": "acme"}, "k-ops": {"tenant": "ops", "is_admin": True},
        "sha256:" + hashlib.sha256(b"k-hashed").hexdigest(): "beta"}


def _principal_bytes() -> bytes:
    p = current_principal()
    # The tenant also reaches the log context, so log lines of the call carry it.
    return f"{p.tenant}|{p.is_admin}|{log_context().get('tenant', '')}".encode()


async def _unary(request, context):
    return _principal_bytes()


async def _server_stream(request, context):
    for _ in range(2):
        yield _principal_bytes()


async def _server_stream_write(request, context):
    await context.write(_principal_bytes())


async def _client_stream(request_iterator, context):
    count = 0
    async for _ in request_iterator:
        count += 1
    return _principal_bytes() + f"|{count}".encode()


async def _admin(request, context):
    principal = await require_admin(context)
    return principal.tenant.encode()


def _handlers():
    return grpc.method_handlers_generic_handler("test.Echo", {
        "Unary": grpc.unary_unary_rpc_method_handler(_unary),
        "ServerStream": grpc.unary_stream_rpc_method_handler(_server_stream),
        "ServerStreamWrite": grpc.unary_stream_rpc_method_handler(_server_stream_write),
        "ClientStream": grpc.stream_unary_rpc_method_handler(_client_stream),
        "Admin": grpc.unary_unary_rpc_method_handler(_admin),
    })


async def _start(interceptor):
    server = grpc.aio.server(interceptors=[interceptor])
    server.add_generic_rpc_handlers((_handlers(),))
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, grpc.aio.insecure_channel(f"127.0.0.1:{port}")


@pytest.fixture
async def channel():
    server, chan = await _start(AuthInterceptor(ApiKeyStore.from_mapping(KEYS)))
    yield chan
    await chan.close()
    await server.stop(None)


@pytest.mark.parametrize("metadata, expected", [
    ((("authorization", "Bearer k-acme"),), b"acme|False|acme"),
    ((("authorization", "bearer   k-ops "),), b"ops|True|ops"),
    ((("x-api-key", "k-hashed"),), b"beta|False|beta"),
])
async def test_known_keys_reach_the_handler_as_their_tenant(channel, metadata, expected):
    assert await channel.unary_unary("/test.Echo/Unary")(b"", metadata=metadata) == expected


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer nope"),),
                                      (("authorization", "Basic k-acme"),),
                                      (("x-api-key", ""),)])
async def test_missing_or_unknown_keys_are_unauthenticated(channel, metadata):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await channel.unary_unary("/test.Echo/Unary")(b"", metadata=metadata)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "nope" not in err.value.details() and "k-acme" not in err.value.details()


async def test_streaming_shapes_keep_the_principal(channel):
    md = (("x-api-key", "k-acme"),)
    got = [r async for r in channel.unary_stream("/test.Echo/ServerStream")(b"", metadata=md)]
    assert got == [b"acme|False|acme"] * 2
    got = [r async for r in channel.unary_stream("/test.Echo/ServerStreamWrite")(b"", metadata=md)]
    assert got == [b"acme|False|acme"]

    async def requests():
        for _ in range(3):
            yield b"x"
    got = await channel.stream_unary("/test.Echo/ClientStream")(requests(), metadata=md)
    assert got == b"acme|False|acme|3"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in channel.unary_stream("/test.Echo/ServerStream")(b""):
            pass
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_admin_only_calls(channel):
    call = channel.unary_unary("/test.Echo/Admin")
    assert await call(b"", metadata=(("x-api-key", "k-ops"),)) == b"ops"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(b"", metadata=(("x-api-key", "k-acme"),))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_health_needs_no_key(channel):
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=""))
    assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_disabled_auth_runs_everything_as_local_admin():
    server, chan = await _start(AuthInterceptor(ApiKeyStore({}), is_enabled=False))
    try:
        assert await chan.unary_unary("/test.Echo/Unary")(b"") == b"|True|"
        assert await chan.unary_unary("/test.Echo/Admin")(b"") == b""
    finally:
        await chan.close()
        await server.stop(None)
    assert current_principal() is None and current_tenant() == ""
    assert LOCAL_PRINCIPAL == Principal("", True)


def test_extract_api_key_prefers_well_formed_headers():
    assert extract_api_key([("Authorization", b"Bearer abc")]) == "abc"
    assert extract_api_key([("authorization", "Token abc"), ("x-api-key", "def")]) == "def"
    assert extract_api_key(None) is None


def test_store_parses_json_and_yaml_and_keeps_only_digests(tmp_path):
    yaml_text = "k1: {tenant: a}\nk2:\n  tenant: b\n  is_admin: true\n"
    store = ApiKeyStore.parse(yaml_text)
    assert store.lookup("k2") == Principal("b", True)
    assert store.lookup("k3") is None
    assert "k1" not in repr(vars(store))
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"k3": "c"}))
    config = AuthConfig.from_env({"INLAID_AUTH_ENABLED": "true", "INLAID_API_KEYS": yaml_text,
                                  "INLAID_API_KEYS_FILE": str(path)})
    merged = config.load_store()
    assert len(merged) == 3 and merged.lookup("k3") == Principal("c", False)


@pytest.mark.parametrize("data", [
    [], {"k": {"tenant": ""}}, {"k": {"tenant": "a", "is_admin": "yes"}},
    {"k": {"tenant": "a", "role": "x"}}, {"k": 3}, {"": "a"},
])
def test_store_rejects_malformed_entries(data):
    with pytest.raises(AuthConfigError):
        ApiKeyStore.from_mapping(data)


def test_config_errors(tmp_path):
    assert AuthConfig.from_env({}) == AuthConfig(is_enabled=False)
    with pytest.raises(AuthConfigError, match="no keys"):
        AuthConfig.from_env({"INLAID_AUTH_ENABLED": "1"})
    with pytest.raises(AuthConfigError):
        AuthConfig.from_env({"INLAID_AUTH_ENABLED": "maybe"})
    with pytest.raises(AuthConfigError, match="cannot read"):
        AuthConfig(True, api_keys_file=tmp_path / "absent.yaml").load_store()
    with pytest.raises(AuthConfigError, match="twice"):
        AuthConfig(True, api_keys="k: a", api_keys_file=_write(tmp_path, "k: b")).load_store()
    with pytest.raises(AuthConfigError, match="hold no keys"):
        AuthConfig(True, api_keys_file=_write(tmp_path, "")).load_store()
    with pytest.raises(AuthConfigError):
        AuthInterceptor(ApiKeyStore({}), is_enabled=True)


def _write(tmp_path, text):
    path = tmp_path / "keys.yaml"
    path.write_text(text)
    return path


async def test_composes_with_service_host():
    """The interceptor as the services wire it: inside ServiceHost, before its error interceptor."""
    from services.common.grpc_server import ServiceHost

    host = ServiceHost(["test.Echo"], host="127.0.0.1", port=0, grace_s=0.1,
                       interceptors=[AuthInterceptor(ApiKeyStore.from_mapping(KEYS))])
    host.server.add_generic_rpc_handlers((_handlers(),))
    port = await host.start()
    await host.set_serving(True)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        status = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="test.Echo"))
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        unary = channel.unary_unary("/test.Echo/Unary")
        assert await unary(b"", metadata=(("x-api-key", "k-acme"),)) == b"acme|False|acme"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await unary(b"")
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await channel.close()
        await host.stop("test")
