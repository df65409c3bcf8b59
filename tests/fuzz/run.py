"""One fuzz campaign against a running gateway: N hostile cases, counts per method and status."""
from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.model_source import resolve_model
from services.common.pb.inlaid.v1 import gateway_pb2, gateway_pb2_grpc
from services.gateway.servicer import base_dims
from tests.faults.cluster import ROOT
from tests.fuzz import hostile, hostile_adapters


def base_model_dims():
    """The served base's dimensions, which hostile adapters are shaped against."""
    return base_dims(json.loads((Path(resolve_model().path) / "config.json").read_text()))


def start_fuzz_gateway(cluster) -> list[str]:
    """Redis + a gateway (no engine) with the demo task `arith` registered; returns the tasks."""
    cluster.start_redis()
    cluster.start_gateway()
    with grpc.insecure_channel(cluster.gateway_addr) as channel:
        gateway_pb2_grpc.GatewayServiceStub(channel).AddTask(gateway_pb2.AddTaskRequest(
            name="arith", adapter_path=str(ROOT / "adapters" / "arith")), timeout=60)
    return ["arith"]


def hostile_adapter_dirs(rng: random.Random, root: Path, dims) -> list[Path]:
    """One hostile adapter directory of every kind, under root."""
    return [hostile_adapters.make(rng, root, dims, root / "MARKER", kind)[1]
            for kind in hostile_adapters.KINDS]


def campaign(addr: str, num_cases: int, seed: int, tasks: list[str],
             adapter_dirs: list[Path]) -> dict:
    """Send num_cases hostile requests; returns counts and up to 20 examples of bad answers."""
    rng = random.Random(seed)
    by_code: Counter = Counter()
    by_method: Counter = Counter()
    bad: list[dict] = []
    options = [("grpc.max_send_message_length", 64 << 20)]  # let huge requests reach the server
    with grpc.insecure_channel(addr, options=options) as channel:
        for i in range(num_cases):
            method, payload = hostile.random_case(rng, tasks, adapter_dirs)
            code, details = hostile.send(channel, method, payload)
            kind = "raw" if isinstance(payload, bytes) else "message"
            by_code[code] += 1
            by_method[f"{method}/{kind}/{code}"] += 1
            if code not in hostile.ALLOWED or "Traceback" in details:
                if len(bad) < 20:
                    bad.append({"case": i, "method": method, "kind": kind, "code": code,
                                "details": details, "payload": repr(payload)[:300]})
                elif code == "UNAVAILABLE":  # the server died: stop instead of counting corpses
                    break
        healthy = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    num_bad = sum(n for code, n in by_code.items() if code not in hostile.ALLOWED)
    return {"num_cases": sum(by_code.values()), "by_code": dict(by_code.most_common()),
            "by_method": dict(sorted(by_method.items())), "num_bad": num_bad, "bad_examples": bad,
            "healthy_after": healthy}
