"""`inlaid train-adapter | eval | trace | lengths`: the workload kit's subcommands.

Each `add_*` function registers one subcommand on an argparse subparsers object;
`add_parser(subparsers)` registers them all (the `inlaid` dispatcher calls it).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _friendly(run):
    """Bad input (TaskError and config errors are ValueErrors) ends with a message, not a traceback."""
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return wrapped


def _load_base(model_name: str, num_threads: int, device: str = "cpu"):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from services.common.model_source import resolve_model

    torch.set_num_threads(num_threads)
    src = resolve_model(model_name)
    if src.kind != "hf":
        raise SystemExit(f"model {model_name!r} has no weights (kind {src.kind}); use a real model")
    tokenizer = AutoTokenizer.from_pretrained(src.path)
    model = AutoModelForCausalLM.from_pretrained(src.path, dtype=torch.float32).to(device)
    return model, tokenizer


def _task_names(spec: str) -> list[str]:
    from services.common.workload.task import builtin_tasks

    return list(builtin_tasks()) if spec == "all" else spec.split(",")


def _run_train(args: argparse.Namespace) -> int:
    from services.common.workload.task import get_task
    from services.common.workload.training import TrainConfig, train_adapter

    config = TrainConfig(rank=args.rank, alpha=args.alpha, targets=tuple(args.targets.split(",")),
                         steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                         max_len=args.max_len, seed=args.seed, save_every=args.save_every,
                         base_model=args.base_name or args.model)
    task = get_task(args.task)
    model, tokenizer = _load_base(args.model, args.threads, args.device)
    summary = train_adapter(model, tokenizer, task, args.out, config, resume=args.resume)
    print(json.dumps(summary, indent=2))
    return 0


def add_train_parser(subparsers) -> None:
    p = subparsers.add_parser("train-adapter", help="LoRA fine-tune the base model on one task")
    p.add_argument("--task", required=True, help="built-in task name or a .jsonl file")
    p.add_argument("--out", required=True, type=Path, help="adapter output directory")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=int, default=16)
    p.add_argument("--targets", default="q_proj,v_proj", help="comma-separated module names")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-len", type=int, default=192, help="max prompt+completion tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=20, help="checkpoint period in steps")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    _common_args(p)
    p.add_argument("--base-name", default=None,
                   help="base model name written into adapter_config.json (default: --model)")
    p.set_defaults(func=_friendly(_run_train))


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")


def _run_eval(args: argparse.Namespace) -> int:
    from services.common.workload.evaluation import evaluate, load_base_weights
    from services.common.workload.report import comparison_table, provenance, write_results

    from services.common.workload.task import get_task

    for name in _task_names(args.task):
        get_task(name)  # fail on a bad name before the model loads
    model, tokenizer = _load_base(args.model, args.threads, args.device)
    if args.base_weights:
        print(f"replaced {load_base_weights(model, args.base_weights)} base tensors from {args.base_weights}")
    rows = []
    for name in _task_names(args.task):
        adapter = args.adapter or (args.adapters_root / name if args.adapters_root else None)
        kw = dict(num_examples=args.num, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
        tuned = evaluate(name, model, tokenizer, adapter, **kw)
        row = {"task": tuned["task"], "metric": tuned["metric"], "num_examples": tuned["num_examples"],
               "adapter": tuned["adapter"], "adapter_score": tuned["score"],
               "adapter_mean_output_tokens": tuned["mean_output_tokens"]}
        if args.compare_base and adapter is not None:
            base = evaluate(name, model, tokenizer, None, **kw)
            row.update(base_score=base["score"], base_mean_output_tokens=base["mean_output_tokens"])
        rows.append(row)
        print(json.dumps(row))
    if all("base_score" in r for r in rows):
        table = comparison_table(rows)
    else:
        table = "\n".join(["| task | metric | N | score |", "|---|---|---:|---:|"] +
                          [f"| {r['task']} | {r['metric']} | {r['num_examples']} | {r['adapter_score']:.3f} |"
                           for r in rows])
    print(table)
    if args.md_out or args.json_out:
        meta = provenance(args.device)
        payload = {"base_weights": args.base_weights, "model": args.model, "results": rows}
        write_results(args.md_out or Path(str(args.json_out)[:-5] + ".md"),
                      args.json_out or Path(str(args.md_out)[:-3] + ".json"),
                      "Demo adapters vs the bare base model (greedy, test split)", table, payload, meta)
    return 0


def add_eval_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="score tasks (greedy) with/without adapters")
    p.add_argument("--task", required=True, help="task name, comma list, 'all', or a .jsonl file")
    p.add_argument("--adapter", type=Path, default=None, help="PEFT adapter directory")
    p.add_argument("--adapters-root", type=Path, default=None, help="use ROOT/<task> as each adapter")
    p.add_argument("--compare-base", action="store_true", help="also score the bare base model")
    p.add_argument("--num", type=int, default=100, help="test examples per task")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's budget")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--base-weights", default=None, help="safetensors of (dequantized) base weights")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--md-out", type=Path, default=None)
    p.add_argument("--json-out", type=Path, default=None)
    _common_args(p)
    p.set_defaults(func=_friendly(_run_eval))


def _run_trace(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from services.common.model_source import resolve_model
    from services.common.workload.traces import TraceConfig, generate_trace, write_jsonl

    config = TraceConfig(rate=args.rate, duration_s=args.duration, num_tasks=args.num_tasks,
                         arrival=args.arrival, cv=args.cv, popularity=args.popularity,
                         zipf_a=args.zipf_a, seed=args.seed)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model).path)
    rows = generate_trace(config, tokenizer)
    write_jsonl(rows, args.out)
    print(f"wrote {len(rows)} requests over {len(set(r['task'] for r in rows))} tasks to {args.out}")
    return 0


def add_trace_parser(subparsers) -> None:
    p = subparsers.add_parser("trace", help="generate a request trace (JSONL) for benchmarks")
    p.add_argument("--rate", type=float, required=True, help="mean requests per second")
    p.add_argument("--duration", type=float, required=True, help="seconds")
    p.add_argument("--num-tasks", type=int, default=7, help="1..1000 (variants beyond the built-ins)")
    p.add_argument("--arrival", choices=("poisson", "gamma"), default="poisson")
    p.add_argument("--cv", type=float, default=1.0, help="inter-arrival coefficient of variation (gamma)")
    p.add_argument("--popularity", choices=("uniform", "zipf"), default="uniform")
    p.add_argument("--zipf-a", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="smollm2-135m", help="tokenizer used to count tokens")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=_friendly(_run_trace))


def _run_lengths(args: argparse.Namespace) -> int:
    from services.common.workload.lengths import measure_lengths, plot_lengths, summarize, write_rows
    from services.common.workload.report import provenance
    from services.common.workload.task import get_task

    tasks = [get_task(name) for name in _task_names(args.task)]
    model, tokenizer = _load_base(args.model, args.threads, args.device)
    rows: list[dict] = []
    for task in tasks:
        name = task.name
        adapter = args.adapters_root / name
        rows += measure_lengths(task, model, tokenizer,
                                adapter if (adapter / "adapter_config.json").exists() else None,
                                args.num, args.batch_size)
        write_rows(rows, args.out)  # after every task: a long run leaves usable partial data
        print(json.dumps({name: summarize(rows)[name]}))
    stats = summarize(rows)
    if args.plot:
        plot_lengths(rows, args.plot)
    if args.json_out:
        args.json_out.write_text(json.dumps({**provenance(args.device), "num_per_task": args.num,
                                             "data": str(args.out), "per_task": stats}, indent=2) + "\n")
    return 0


def add_lengths_parser(subparsers) -> None:
    p = subparsers.add_parser("lengths", help="measure output lengths per task (greedy, task adapter)")
    p.add_argument("--task", default="all", help="task names (comma list) or 'all'")
    p.add_argument("--adapters-root", type=Path, default=Path("adapters"))
    p.add_argument("--num", type=int, default=200, help="test prompts per task")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", type=Path, default=Path("data/lengths.jsonl"))
    p.add_argument("--plot", type=Path, default=Path("benchmarks/results/output_lengths.png"))
    p.add_argument("--json-out", type=Path, default=Path("benchmarks/results/output_lengths.json"))
    _common_args(p)
    p.set_defaults(func=_friendly(_run_lengths))


def add_parser(subparsers) -> None:
    """Register every workload subcommand."""
    add_train_parser(subparsers)
    add_eval_parser(subparsers)
    add_trace_parser(subparsers)
    add_lengths_parser(subparsers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.common.workload.cli")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
