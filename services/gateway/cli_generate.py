"""`inlaid generate`: send one request to the gateway and stream the text to stdout."""
from __future__ import annotations

import argparse
import sys

import grpc

from services.common.pb.inlaid.v1 import common_pb2, gateway_pb2
from services.gateway.client import add_gateway_option, connect, gateway_addr, report_rpc_error


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("generate", help="generate text for a prompt (streams to stdout)")
    p.add_argument("--task", default="", help="task (adapter) name; empty = the base model")
    p.add_argument("--prompt", required=True, help="prompt text ('-' reads stdin)")
    p.add_argument("--raw", action="store_true",
                   help="send the prompt as raw text instead of one user chat turn")
    p.add_argument("--system", default=None, help="system message (chat mode)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0, help="0 = unseeded")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--request-id", default="", help="idempotency key (re-attaches if known)")
    p.add_argument("--timeout", type=positive_seconds, default=None,
                   help="deadline in seconds: the request is cancelled if it has not finished by then, and the "
                        "engine will not start it while it predicts the request cannot finish in time")
    p.add_argument("--verbose", "-v", action="store_true", help="print ids and counts to stderr")
    add_gateway_option(p)
    p.set_defaults(func=run)
    return p


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {text}")
    return value


def build_request(args: argparse.Namespace) -> gateway_pb2.GenerateRequest:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    params = common_pb2.SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos)
    request = gateway_pb2.GenerateRequest(task=args.task, params=params,
                                          request_id=args.request_id)
    if args.raw:
        request.prompt = prompt
    else:
        if args.system:
            request.messages.add(role="system", content=args.system)
        request.messages.add(role="user", content=prompt)
    return request


def run(args: argparse.Namespace) -> int:
    channel, stub = connect(args)
    call = stub.Generate(build_request(args), timeout=args.timeout)
    last = None
    try:
        for response in call:
            if response.text:
                sys.stdout.write(response.text)
                sys.stdout.flush()
            if args.verbose and response.predicted_output_tokens:
                print(f"[{response.request_id}] predicted {response.predicted_output_tokens} "
                      "tokens", file=sys.stderr)
            last = response
    except KeyboardInterrupt:
        call.cancel()  # the gateway sees the cancellation and frees the engine slot
        print("\n[cancelled]", file=sys.stderr)
        return 130
    except grpc.RpcError as exc:
        if exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED and args.timeout is not None:
            print(f"\nerror: DEADLINE_EXCEEDED: not finished within --timeout {args.timeout:g} s; the request "
                  "was cancelled", file=sys.stderr)
            return 1
        return report_rpc_error(exc, gateway_addr(args))
    finally:
        channel.close()
    sys.stdout.write("\n")
    if last is None:
        return 1
    reason = common_pb2.FinishReason.Name(last.finish_reason)
    if last.finish_reason == common_pb2.FINISH_REASON_ERROR:
        print(f"error: {last.error}", file=sys.stderr)
        return 1
    if args.verbose:
        print(f"[{last.request_id}] {reason}: {last.num_prompt_tokens} prompt + "
              f"{last.num_output_tokens} output tokens", file=sys.stderr)
    return 0
