"""Helpers shared by the gateway's client subcommands (`inlaid generate`, `inlaid tasks`)."""
from __future__ import annotations

import argparse
import os
import sys

import grpc

from services.common.pb.inlaid.v1 import gateway_pb2_grpc

DEFAULT_GATEWAY_ADDR = "localhost:50051"


def add_gateway_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gateway", metavar="ADDR", default=None,
                        help="gateway address (default: $INLAID_GATEWAY_ADDR or "
                             f"{DEFAULT_GATEWAY_ADDR})")


def gateway_addr(args: argparse.Namespace) -> str:
    return args.gateway or os.environ.get("INLAID_GATEWAY_ADDR") or DEFAULT_GATEWAY_ADDR


def connect(args: argparse.Namespace) -> tuple[grpc.Channel, gateway_pb2_grpc.GatewayServiceStub]:
    channel = grpc.insecure_channel(gateway_addr(args))
    return channel, gateway_pb2_grpc.GatewayServiceStub(channel)


def report_rpc_error(exc: grpc.RpcError, addr: str) -> int:
    """Print a failed call the way a user can act on it; returns the exit status."""
    code = exc.code()
    if code is grpc.StatusCode.UNAVAILABLE:
        print(f"error: gateway {addr} is unavailable ({exc.details()}); is `inlaid serve` "
              "running?", file=sys.stderr)
    else:
        print(f"error: {code.name}: {exc.details()}", file=sys.stderr)
    return 1
