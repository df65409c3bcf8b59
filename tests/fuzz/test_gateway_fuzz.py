"""Hostile gRPC requests against a real gateway: every answer is a client-error status (or a
normal stream), never UNKNOWN / INTERNAL / a hang, and the gateway is healthy afterwards."""
from __future__ import annotations

import random

import grpc
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from services.common.pb.inlaid.v1 import common_pb2, gateway_pb2
from tests.fuzz import hostile
from tests.fuzz.run import campaign

pytestmark = pytest.mark.timeout(600)


def test_random_campaign_ci(fuzz_gateway):
    cluster, tasks, dirs = fuzz_gateway
    result = campaign(cluster.gateway_addr, 300, seed=0, tasks=tasks, adapter_dirs=dirs)
    assert result["num_bad"] == 0, result["bad_examples"]
    assert result["healthy_after"]
    assert result["by_code"].get("OK", 0) > 0  # some cases were valid and got through


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(prompt=st.text(max_size=200), role=st.text(max_size=20), task=st.text(max_size=20),
       max_tokens=st.integers(-2**31, 2**31 - 1),
       temperature=st.floats(width=32, allow_nan=True, allow_infinity=True),
       top_p=st.floats(width=32), top_k=st.integers(-2**31, 2**31 - 1),
       stop=st.lists(st.text(max_size=300), max_size=20), request_id=st.text(max_size=140),
       use_messages=st.booleans())
def test_hypothesis_generate(fuzz_gateway, prompt, role, task, max_tokens, temperature, top_p,
                             top_k, stop, request_id, use_messages):
    cluster, _tasks, _dirs = fuzz_gateway
    request = gateway_pb2.GenerateRequest(
        task=task, request_id=request_id,
        params=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=temperature,
                                         top_p=top_p, top_k=top_k, stop=stop))
    if use_messages:
        request.messages.add(role=role, content=prompt)
    else:
        request.prompt = prompt
    with grpc.insecure_channel(cluster.gateway_addr) as channel:
        code, details = hostile.send(channel, "Generate", request)
    assert code in hostile.ALLOWED, (code, details)


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.binary(max_size=300), method=st.sampled_from(hostile.METHODS))
def test_hypothesis_raw_bytes(fuzz_gateway, data, method):
    cluster, _tasks, _dirs = fuzz_gateway
    with grpc.insecure_channel(cluster.gateway_addr) as channel:
        code, details = hostile.send(channel, method, data)
    assert code in hostile.ALLOWED, (code, details)


@pytest.mark.slow
def test_random_campaign_10k(fuzz_gateway):
    cluster, tasks, dirs = fuzz_gateway
    result = campaign(cluster.gateway_addr, 10_000, seed=1, tasks=tasks, adapter_dirs=dirs)
    assert result["num_bad"] == 0, result["bad_examples"]
    assert result["healthy_after"]


def test_seeded_cases_are_reproducible():
    a = [repr(hostile.random_case(random.Random(5), ["arith"], [])) for _ in range(3)]
    b = [repr(hostile.random_case(random.Random(5), ["arith"], [])) for _ in range(3)]
    assert a == b


@pytest.mark.parametrize("method, payload", [
    # Regressions the 10k campaign found (each once answered INTERNAL or UNKNOWN).
    ("AddTask", gateway_pb2.AddTaskRequest(name="fz_nul", adapter_path="/tmp/\x00x")),
    ("AddTask", gateway_pb2.AddTaskRequest(name="fz_nul2", adapter_path="adapters/arith",
                                           calibration_path="a\x00b")),
    ("AddTask", gateway_pb2.AddTaskRequest(name="fz_inf", adapter_path="adapters/arith",
                                           weight=float("inf"))),
    ("Generate", b"\x12\x02\xff\xfe"),          # prompt that is not UTF-8
    ("ListTasks", b"\x12\xc0\x84=abc"),         # length prefix past the end
])
def test_found_cases_are_client_errors(fuzz_gateway, method, payload):
    cluster, _tasks, _dirs = fuzz_gateway
    with grpc.insecure_channel(cluster.gateway_addr) as channel:
        code, details = hostile.send(channel, method, payload)
    assert code == "INVALID_ARGUMENT", (code, details)
