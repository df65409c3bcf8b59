"""`inlaid quantize`: full or incremental multi-task quantization of a base model from the shell."""
from __future__ import annotations

import argparse
import sys

from services.quantizer.config import AGGREGATIONS, METHODS, SUPPORTED_BITS


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "quantize", help="quantize the base model for a set of tasks (GPTQ v1 checkpoint)",
        description="Quantize a base model's decoder linears. With --add, add tasks to the "
                    "checkpoint at --out incrementally (only the new tasks' statistics are computed).")
    p.add_argument("--model", default="smollm2-135m", help="model name or HF directory")
    p.add_argument("--task", action="append", default=[], metavar="NAME=ADAPTER_DIR:CALIB.jsonl",
                   help="a task (repeat); ADAPTER_DIR may be empty for the bare base")
    p.add_argument("--bits", type=int, default=4, help=f"one of {SUPPORTED_BITS}")
    p.add_argument("--group-size", type=int, default=128, help="-1 for per-row groups")
    p.add_argument("--method", default="mlgptq", choices=METHODS)
    p.add_argument("--aggregation", default="mean", choices=AGGREGATIONS, help="mlgptq only")
    p.add_argument("--desc-act", action=argparse.BooleanOptionalAction, default=True,
                   help="act-order: columns by descending H diag (default on; --no-desc-act)")
    p.add_argument("--asym", action=argparse.BooleanOptionalAction, default=True,
                   help="asymmetric grid (default on; --no-asym for a symmetric grid)")
    p.add_argument("--mse", action=argparse.BooleanOptionalAction, default=False,
                   help="MSE clipping search for each group's range instead of min/max (default off)")
    p.add_argument("--num-seqs", type=int, default=32, help="calibration sequences per task")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per calibration sequence")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--out", required=True, help="checkpoint root (versions v1, v2, ... + CURRENT)")
    p.add_argument("--add", action="store_true", help="add --task tasks to the checkpoint at --out")
    p.set_defaults(func=run)


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def run(args: argparse.Namespace) -> int:
    from services.common.adapters import AdapterError
    from services.common.model_source import ModelNotFoundError
    from services.quantizer.calibration import CalibrationError, TaskSpec
    from services.quantizer.checkpoint import CheckpointError
    from services.quantizer.config import QuantConfig
    from services.quantizer.packing import PackingError

    try:
        tasks = [TaskSpec.parse(t) for t in args.task]
        if args.add:
            from services.quantizer.incremental import add_tasks
            version = add_tasks(args.out, tasks, device=_device(args.device))
        else:
            from services.quantizer.pipeline import quantize
            cfg = QuantConfig(bits=args.bits, group_size=args.group_size, sym=not args.asym,
                              desc_act=args.desc_act, mse=args.mse, method=args.method,
                              aggregation=args.aggregation, num_seqs=args.num_seqs,
                              seq_len=args.seq_len)
            version = quantize(args.model, tasks, cfg, args.out, device=_device(args.device))
    except (CalibrationError, AdapterError, CheckpointError, ModelNotFoundError, PackingError,
            ValueError) as e:
        print(f"inlaid quantize: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {version}")
    return 0
