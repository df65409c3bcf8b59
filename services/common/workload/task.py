"""Task and Example nouns, deterministic split assignment, and the built-in task list."""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Callable, Protocol

SPLITS = ("train", "calib", "test")
# Percent of the prompt-hash space owned by each split: train [0, 80), calib [80, 90), test [90, 100).
_SPLIT_BOUNDS = {"train": (0, 80), "calib": (80, 90), "test": (90, 100)}
# Generating a split draws candidates until enough land in it; past this many draws per wanted
# example the generator's prompt space is too small for the request.
_MAX_DRAWS_PER_EXAMPLE = 200


class TaskError(ValueError):
    """Bad task name, bad task file or impossible request."""


@dataclass(frozen=True)
class Example:
    """One prompt with its reference completion; `meta` carries what a metric needs (facts, tests)."""

    task: str
    prompt: str
    completion: str
    meta: dict = field(default_factory=dict, compare=False, hash=False)


def split_of(prompt: str) -> str:
    """The split a prompt belongs to: a pure function of its text, so splits never overlap."""
    bucket = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big") % 100
    for split, (lo, hi) in _SPLIT_BOUNDS.items():
        if lo <= bucket < hi:
            return split
    raise AssertionError(bucket)


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise TaskError(f"unknown split {split!r}; choose one of {SPLITS}")


class TaskSource(Protocol):
    """What training, evaluation and traces need from a task (built-in or user JSONL)."""

    name: str
    metric: str
    max_new_tokens: int

    def examples(self, split: str, num: int, seed: int = 0) -> list[Example]: ...


# A generator draws (prompt, completion, meta) from a seeded Random.
Generator = Callable[[random.Random], tuple[str, str, dict]]


@dataclass(frozen=True)
class Task:
    """A built-in task: a seeded generator, its metric name and a generation budget.

    `family` is the generator's name; variants such as `sort_list#17` share the family's
    generator and metric but draw from their own seed stream, so their prompts differ.
    """

    name: str
    family: str
    metric: str
    max_new_tokens: int
    generate: Generator = field(compare=False, repr=False)

    def examples(self, split: str, num: int, seed: int = 0) -> list[Example]:
        """`num` distinct examples of `split`, identical for identical (name, split, num, seed)."""
        check_split(split)
        out: list[Example] = []
        seen: set[str] = set()
        for i in range(max(num, 1) * _MAX_DRAWS_PER_EXAMPLE):
            if len(out) >= num:
                return out
            # String seeds hash deterministically in random.Random (not via hash()).
            prompt, completion, meta = self.generate(random.Random(f"{self.name}:{seed}:{i}"))
            if prompt in seen or split_of(prompt) != split:
                continue
            seen.add(prompt)
            out.append(Example(self.name, prompt, completion, meta))
        if len(out) < num:
            raise TaskError(f"task {self.name!r} yields only {len(out)} distinct {split} examples, "
                            f"{num} asked")
        return out

    def variant(self, index: int) -> Task:
        """The index-th copy of this task under the name `family#index` (index 0 is the task itself)."""
        if index == 0:
            return self
        return Task(f"{self.family}#{index}", self.family, self.metric, self.max_new_tokens,
                    self.generate)


def builtin_tasks() -> dict[str, Task]:
    """The demo tasks, from short to long outputs."""
    from services.common.workload import gen_code, gen_lists, gen_numbers, gen_records

    specs = [
        ("arith", "exact", 12, gen_numbers.arith),
        ("num2words_en", "exact", 48, gen_numbers.num2words_en),
        ("num2words_fr", "exact", 48, gen_numbers.num2words_fr),
        ("json_extract", "json_fields", 64, gen_records.json_extract),
        ("table_summary", "facts", 64, gen_records.table_summary),
        ("sort_list", "ordered_list", 160, gen_lists.sort_list),
        ("code_gen", "code_tests", 160, gen_code.code_gen),
    ]
    return {name: Task(name, name, metric, budget, gen) for name, metric, budget, gen in specs}


def get_task(name: str) -> TaskSource:
    """A built-in task (`sort_list`), a variant (`sort_list#17`) or a user JSONL file path."""
    if name.endswith(".jsonl"):
        from services.common.workload.jsonl import load_jsonl_task

        return load_jsonl_task(name)
    tasks = builtin_tasks()
    family, _, index = name.partition("#")
    if family not in tasks:
        raise TaskError(f"unknown task {name!r}; built-in tasks: {', '.join(tasks)} "
                        "(or a path to a .jsonl file of {\"prompt\", \"completion\"} lines)")
    if not index:
        return tasks[family]
    if not index.isdigit():
        raise TaskError(f"bad task variant {name!r}: expected {family}#<number>")
    return tasks[family].variant(int(index))
