"""Request traces: arrival times, task popularity and reference output lengths for benchmarks."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from services.common.workload.chat import prompt_token_ids
from services.common.workload.task import Task, TaskError, builtin_tasks

_MAX_TASKS = 1000


@dataclass(frozen=True)
class TraceConfig:
    """What `inlaid trace` draws: a stationary arrival process over a popularity-weighted task set."""

    rate: float  # mean requests per second
    duration_s: float
    num_tasks: int = 7
    arrival: str = "poisson"  # poisson | gamma
    cv: float = 1.0  # coefficient of variation of inter-arrival times (gamma only)
    popularity: str = "uniform"  # uniform | zipf
    zipf_a: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.rate > 0 or not self.duration_s > 0:
            raise TaskError(f"rate and duration must be positive, got {self.rate}, {self.duration_s}")
        if not 1 <= self.num_tasks <= _MAX_TASKS:
            raise TaskError(f"num_tasks must be in 1..{_MAX_TASKS}, got {self.num_tasks}")
        if self.arrival not in ("poisson", "gamma"):
            raise TaskError(f"arrival must be poisson or gamma, got {self.arrival!r}")
        if not self.cv > 0:
            raise TaskError(f"cv must be positive, got {self.cv}")
        if self.popularity not in ("uniform", "zipf"):
            raise TaskError(f"popularity must be uniform or zipf, got {self.popularity!r}")
        if not self.zipf_a >= 0:
            raise TaskError(f"zipf_a must be >= 0, got {self.zipf_a}")


def trace_tasks(num_tasks: int) -> list[Task]:
    """The built-in tasks, then variants `family#k` cycling through the families."""
    base = list(builtin_tasks().values())
    return [base[i % len(base)].variant(i // len(base)) for i in range(num_tasks)]


def arrival_times(config: TraceConfig, rng: random.Random) -> list[float]:
    """Arrival instants in [0, duration): Poisson, or gamma renewal with the given cv (burstier if cv > 1)."""
    times, t = [], 0.0
    shape = 1.0 / config.cv ** 2
    while True:
        if config.arrival == "poisson":
            t += rng.expovariate(config.rate)
        else:
            t += rng.gammavariate(shape, 1.0 / (config.rate * shape))  # mean 1/rate
        if t >= config.duration_s:
            return times
        times.append(t)


def generate_trace(config: TraceConfig, tokenizer) -> list[dict]:
    """Trace rows {arrival_s, task, prompt, output_tokens, prompt_tokens}, sorted by arrival.

    output_tokens is the reference completion's length in tokens (no EOS); prompt_tokens
    counts the chat-rendered prompt, as the engine receives it. Prompts come from test splits.
    """
    rng = random.Random(f"trace:{config.seed}")
    tasks = trace_tasks(config.num_tasks)
    if config.popularity == "uniform":
        weights = [1.0] * len(tasks)
    else:
        weights = [1.0 / (rank + 1) ** config.zipf_a for rank in range(len(tasks))]
    times = arrival_times(config, rng)
    chosen = rng.choices(range(len(tasks)), weights=weights, k=len(times))
    counts: dict[int, int] = {}
    for i in chosen:
        counts[i] = counts.get(i, 0) + 1
    pools = {i: tasks[i].examples("test", n, seed=config.seed) for i, n in counts.items()}
    cursor = {i: 0 for i in counts}
    rows = []
    for t, i in zip(times, chosen):
        example = pools[i][cursor[i]]
        cursor[i] += 1
        rows.append({"arrival_s": round(t, 6), "task": tasks[i].name, "prompt": example.prompt,
                     "output_tokens": len(tokenizer(example.completion, add_special_tokens=False).input_ids),
                     "prompt_tokens": len(prompt_token_ids(tokenizer, example.prompt))})
    return rows


def write_jsonl(rows: list[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
