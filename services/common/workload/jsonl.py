"""User tasks from JSONL files of {"prompt", "completion"} lines (+ optional "metric", "split")."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from services.common.workload.task import SPLITS, Example, TaskError, check_split, split_of

DEFAULT_METRIC = "token_f1"  # free-form user text rarely matches exactly


@dataclass(frozen=True)
class JsonlTask:
    """A task whose examples are given, not generated; splits come from a prompt hash unless a
    line names its "split" explicitly. examples() returns at most what the file holds."""

    name: str
    metric: str
    max_new_tokens: int
    by_split: dict[str, tuple[Example, ...]] = field(repr=False)

    def examples(self, split: str, num: int, seed: int = 0) -> list[Example]:
        check_split(split)
        pool = self.by_split[split]
        if not pool:
            sizes = ", ".join(f"{s}={len(self.by_split[s])}" for s in SPLITS)
            raise TaskError(f"task {self.name!r} has no {split} examples ({sizes}); give lines a "
                            f"\"split\": \"{split}\" field or add more lines (splits are 80/10/10 by prompt hash)")
        return list(pool[:num])


def load_jsonl_task(path: str | Path, name: str | None = None) -> JsonlTask:
    """Parse and validate a user task file; errors name the file and line."""
    from services.common.workload.metrics import METRICS, REFERENCE_ONLY

    path = Path(path)
    if not path.is_file():
        raise TaskError(f"task file {path} does not exist")
    by_split: dict[str, list[Example]] = {s: [] for s in SPLITS}
    metrics: set[str] = set()
    task_name = name or path.stem
    longest = 0
    seen: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise TaskError(f"{where}: expected a JSON object, got {type(row).__name__}")
            for key in ("prompt", "completion"):
                if not isinstance(row.get(key), str) or not row[key].strip():
                    raise TaskError(f"{where}: missing or empty string field {key!r}")
            metric = row.get("metric", DEFAULT_METRIC)
            if metric not in REFERENCE_ONLY:
                known = "" if metric in METRICS else "unknown "
                raise TaskError(f"{where}: {known}metric {metric!r} is not usable for user tasks; "
                                f"choose one of {', '.join(REFERENCE_ONLY)}")
            metrics.add(metric)
            split = row.get("split") or split_of(row["prompt"])
            if split not in SPLITS:
                raise TaskError(f"{where}: unknown split {split!r}; choose one of {SPLITS}")
            if row["prompt"] in seen:
                continue  # a repeated prompt would straddle splits or weigh twice
            seen.add(row["prompt"])
            by_split[split].append(Example(task_name, row["prompt"], row["completion"]))
            longest = max(longest, len(row["completion"]))
    if not seen:
        raise TaskError(f"task file {path} holds no examples")
    if len(metrics) > 1:
        raise TaskError(f"{path}: lines name different metrics {sorted(metrics)}; use one per file")
    # ~2 characters per token is a pessimistic bound for the tokenizers here; +16 for slack.
    return JsonlTask(task_name, metrics.pop(), longest // 2 + 16,
                     {s: tuple(v) for s, v in by_split.items()})
