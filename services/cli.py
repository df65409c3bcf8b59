"""`inlaid` console script: a thin dispatcher over subcommand modules.

Each module in SUBCOMMANDS defines `add_parser(subparsers)`, which adds its subcommand
(argparse) and sets `func=<callable(args) -> int>` as the parser default. To add a
subcommand (quantize, eval, train-adapter, trace, ...), write such a module and append
its dotted name to SUBCOMMANDS; nothing else here changes.
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS: tuple[str, ...] = (
    "services.stack",                 # serve
    "services.gateway.cli_generate",  # generate
    "services.gateway.cli_tasks",     # tasks add|list|remove
    "services.predictor.cli",         # train-predictor
    "services.quantizer.cli",         # quantize
    "services.common.workload.cli",   # train-adapter, eval, trace, lengths
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="inlaid", description="Serve many LoRA tasks on one shared, quantized base LLM.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
