"""Measured output-length distributions per task (greedy, each task with its own adapter)."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from services.common.workload.evaluation import generate
from services.common.workload.task import TaskSource


def measure_lengths(task: TaskSource, model, tokenizer, adapter_dir: str | Path | None,
                    num_examples: int, batch_size: int = 32, split: str = "test") -> list[dict]:
    """Rows {task, prompt, output_tokens, split}: tokens generated before EOS (capped at the task budget)."""
    examples = task.examples(split, num_examples)
    runner = model
    if adapter_dir is not None:
        from peft import PeftModel

        runner = PeftModel.from_pretrained(model, str(adapter_dir))
    try:
        outputs = generate(runner, tokenizer, [e.prompt for e in examples], task.max_new_tokens,
                           batch_size)
    finally:
        if adapter_dir is not None:
            runner.unload()
    return [{"task": task.name, "prompt": e.prompt, "output_tokens": n, "split": split}
            for e, (_, n) in zip(examples, outputs)]


def summarize(rows: list[dict]) -> dict[str, dict]:
    """Per-task count, mean, quartiles, min and max of output_tokens."""
    by_task: dict[str, list[int]] = {}
    for row in rows:
        by_task.setdefault(row["task"], []).append(row["output_tokens"])
    out = {}
    for task, values in by_task.items():
        q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
        out[task] = {"num": len(values), "mean": round(statistics.fmean(values), 2),
                     "p25": q[0], "median": q[1], "p75": q[2], "min": min(values), "max": max(values)}
    return out


def plot_lengths(rows: list[dict], path: str | Path) -> None:
    """Box plot of output tokens per task, tasks ordered by median."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers
    import matplotlib.pyplot as plt

    by_task: dict[str, list[int]] = {}
    for row in rows:
        by_task.setdefault(row["task"], []).append(row["output_tokens"])
    names = sorted(by_task, key=lambda t: statistics.median(by_task[t]))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.boxplot([by_task[t] for t in names], showfliers=True)
    ax.set_xticks(range(1, len(names) + 1), names, rotation=20)
    ax.set_ylabel("output tokens (greedy, task adapter)")
    ax.set_title("Output length per task")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_rows(rows: list[dict], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
