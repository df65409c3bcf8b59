"""`inlaid tasks add|list|remove`: manage the registered tasks through the gateway."""
from __future__ import annotations

import argparse

import grpc

from services.common.pb.inlaid.v1 import common_pb2, gateway_pb2
from services.gateway.client import add_gateway_option, connect, gateway_addr, report_rpc_error


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("tasks", help="add, list or remove tasks (LoRA adapters)")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = actions.add_parser("add", help="register a PEFT adapter directory as a task")
    add.add_argument("--name", required=True)
    add.add_argument("--adapter", required=True, help="PEFT adapter directory")
    add.add_argument("--calibration", default="",
                     help="JSONL calibration data: re-quantize the base with this task")
    add.add_argument("--weight", type=float, default=0.0, help="fair-queueing weight (1.0)")
    add.add_argument("--bits", type=int, default=0,
                     help="with --calibration: bits of the quantized base (2, 3, 4, 8; 0 = current)")
    add.add_argument("--group-size", type=int, default=0,
                     help="with --calibration: quantization group size (-1 = per row; 0 = current)")
    add.set_defaults(func=run_add)
    ls = actions.add_parser("list", help="list registered tasks")
    ls.set_defaults(func=run_list)
    rm = actions.add_parser("remove", help="unregister a task")
    rm.add_argument("--name", required=True)
    rm.set_defaults(func=run_remove)
    for sub in (add, ls, rm):
        add_gateway_option(sub)
    return p


def _call(args: argparse.Namespace, method: str, request):
    channel, stub = connect(args)
    try:
        return getattr(stub, method)(request, timeout=60)
    finally:
        channel.close()


def _describe(task: common_pb2.TaskInfo) -> str:
    state = common_pb2.TaskState.Name(task.state).removeprefix("TASK_STATE_")
    line = (f"{task.name:<24} {state:<11} rank {task.rank:<3} {','.join(task.target_modules):<30} "
            f"finished {task.num_finished:<6} median {task.median_output_tokens:.0f}")
    return line + (f"  ({task.message})" if task.message else "")


def run_add(args: argparse.Namespace) -> int:
    request = gateway_pb2.AddTaskRequest(name=args.name, adapter_path=args.adapter,
                                         calibration_path=args.calibration, weight=args.weight,
                                         quant_bits=args.bits, quant_group_size=args.group_size)
    try:
        response = _call(args, "AddTask", request)
    except grpc.RpcError as exc:
        return report_rpc_error(exc, gateway_addr(args))
    print("added " + _describe(response.task))
    if response.job_id:
        print(f"quantization job {response.job_id} started")
    return 0


def run_list(args: argparse.Namespace) -> int:
    try:
        response = _call(args, "ListTasks", gateway_pb2.ListTasksRequest())
    except grpc.RpcError as exc:
        return report_rpc_error(exc, gateway_addr(args))
    print(f"base weights version {response.weight_version}; {len(response.tasks)} task(s)")
    for task in response.tasks:
        print(_describe(task))
    return 0


def run_remove(args: argparse.Namespace) -> int:
    try:
        _call(args, "RemoveTask", gateway_pb2.RemoveTaskRequest(name=args.name))
    except grpc.RpcError as exc:
        return report_rpc_error(exc, gateway_addr(args))
    print(f"removed {args.name}")
    return 0
