"""`inlaid train-predictor`: train the output-length model and export it to ONNX."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from services.predictor.config import DEFAULT_MODEL_DIR


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the train-predictor subcommand on an argparse subparsers object."""
    p = subparsers.add_parser(
        "train-predictor", help="train the output-length predictor and export ONNX",
        description="Train the length model on JSONL rows {task, prompt, output_tokens}, "
                    "report held-out quality, and write model.onnx + metadata.json.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="JSONL of {task, prompt, output_tokens}")
    src.add_argument("--reference-examples", type=int, metavar="N",
                     help="instead of --data: N examples per built-in task, lengths of their "
                          "reference completions (a stand-in before real generations exist)")
    p.add_argument("--pretrain-reference", type=int, metavar="N", default=0,
                   help="with --data: first fit N reference-completion examples per task, then "
                        "fine-tune on the data (helps when the data is small)")
    p.add_argument("--out", type=Path, default=DEFAULT_MODEL_DIR, help="output model directory")
    p.add_argument("--holdout-task", default=None,
                   help="leave this task out of training (it is then served from statistics)")
    p.add_argument("--test-frac", type=float, default=0.2, help="held-out fraction of prompts")
    p.add_argument("--epochs", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--int8", action="store_true", help="int8 dynamic quantization of the MLP")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from services.predictor.train import TrainConfig, load_rows, train_predictor

    if not 0.0 <= args.test_frac < 1.0:
        raise SystemExit("--test-frac must be in [0, 1)")
    # This is a small model; one thread is fastest on a shared CPU.
    torch.set_num_threads(1)
    from services.predictor.reference_data import reference_rows

    pretrain = None
    if args.data is not None:
        if not args.data.exists():
            raise SystemExit(f"{args.data} not found")
        rows = load_rows(args.data)
        source = str(args.data)
        if args.pretrain_reference > 0:
            # Generators' train split: disjoint from prompts measured on other splits.
            pretrain = reference_rows(args.pretrain_reference, seed=args.seed)
            source += f", pretrained on reference completions ({args.pretrain_reference}/task)"
    else:
        rows = reference_rows(args.reference_examples, seed=args.seed)
        source = f"reference completions, {args.reference_examples} per task"
    report = train_predictor(rows, args.out, holdout_task=args.holdout_task,
                             test_frac=args.test_frac, quantize=args.int8,
                             train_cfg=TrainConfig(epochs=args.epochs, seed=args.seed),
                             data_source=source, pretrain_rows=pretrain)
    print(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0
