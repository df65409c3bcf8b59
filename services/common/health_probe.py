"""`python -m services.common.health_probe ADDR`: gRPC health check for container health checks.

Exit codes follow grpc_health_probe: 0 SERVING, 1 bad arguments, 2 connection failure,
3 RPC failure, 4 not SERVING.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

EXIT_SERVING = 0
EXIT_BAD_ARGS = 1
EXIT_CONNECTION_FAILURE = 2
EXIT_RPC_FAILURE = 3
EXIT_UNHEALTHY = 4
# Below the 5 s timeout compose gives its health checks.
DEFAULT_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class ProbeResult:
    """Outcome of one probe: exit code and a one-line human-readable message."""

    exit_code: int
    message: str


def probe(addr: str, service: str = "", timeout_s: float = DEFAULT_TIMEOUT_S) -> ProbeResult:
    """Ask `addr`'s standard health service about `service` ("" = the whole server).

    `timeout_s` bounds connect and RPC together, so it fits inside a container health
    check's own timeout.
    """
    if timeout_s <= 0:
        return ProbeResult(EXIT_BAD_ARGS, f"timeout must be > 0, got {timeout_s}")
    if not addr or ":" not in addr:
        return ProbeResult(EXIT_BAD_ARGS, f"address must be HOST:PORT, got {addr!r}")
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(addr) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            return ProbeResult(EXIT_CONNECTION_FAILURE, f"{addr}: no connection within {timeout_s}s")
        stub = health_pb2_grpc.HealthStub(channel)
        remaining_s = max(deadline - time.monotonic(), 0.05)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=remaining_s)
        except grpc.RpcError as exc:
            return ProbeResult(EXIT_RPC_FAILURE, f"{addr}: health check failed: {exc.code().name} "
                                                 f"{exc.details()}")
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    code = EXIT_SERVING if response.status == health_pb2.HealthCheckResponse.SERVING else EXIT_UNHEALTHY
    return ProbeResult(code, f"{addr} service={service!r}: {status}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.common.health_probe",
                                     description="Check a gRPC server's standard health service.")
    parser.add_argument("addr", help="HOST:PORT, e.g. localhost:50051")
    parser.add_argument("--service", default="", help="service name to check (default: the server)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help="seconds for connect and RPC together (keep below the health check's)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2, which would read as "connection failure"
        return EXIT_SERVING if exc.code == 0 else EXIT_BAD_ARGS
    result = probe(args.addr, args.service, args.timeout)
    print(result.message, file=sys.stdout if result.exit_code == EXIT_SERVING else sys.stderr)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
