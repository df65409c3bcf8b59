"""Per-example scores in [0, 1]: each metric compares a model output with an Example."""
from __future__ import annotations

import json
import re
from typing import Callable

from services.common.workload.sandbox import run_tests
from services.common.workload.task import Example, TaskError

Metric = Callable[[str, Example], float]


def normalize(text: str) -> str:
    """Case, surrounding whitespace/quotes, inner runs of spaces and a final period do not count."""
    text = " ".join(text.strip().strip("`\"'").split()).lower()
    return text[:-1] if text.endswith(".") else text


def exact(output: str, example: Example) -> float:
    return float(normalize(output) == normalize(example.completion))


def _first_json_object(text: str) -> dict | None:
    start = text.find("{")
    while start != -1:
        try:
            obj, _ = json.JSONDecoder().raw_decode(text[start:])
            if isinstance(obj, dict):
                return obj
        except json.JSONDecodeError:
            pass
        start = text.find("{", start + 1)
    return None


def _same_value(got: object, want: object) -> bool:
    if isinstance(want, str):
        return isinstance(got, str) and normalize(got) == normalize(want)
    if isinstance(want, (int, float)) and not isinstance(want, bool):
        try:
            return float(got) == float(want)  # "34" and 34 both carry the fact
        except (TypeError, ValueError):
            return False
    return got == want


def json_fields(output: str, example: Example) -> float:
    """Fraction of the reference object's fields present with the right value in the output's JSON."""
    want = json.loads(example.completion)
    if not isinstance(want, dict) or not want:
        raise TaskError("metric json_fields needs completions that are non-empty JSON objects")
    got = _first_json_object(output)
    if got is None:
        return 0.0
    return sum(_same_value(got.get(k), v) for k, v in want.items()) / len(want)


def _mentions(text: str, phrase: str) -> bool:
    return bool(re.search(rf"(?<!\w){re.escape(phrase.lower())}(?!\w)", text))


def facts(output: str, example: Example) -> float:
    """F1 of the table entities mentioned: meta["facts"] are wanted, meta["distractors"] are not.

    Recall alone would reward copying the whole table; mentioning other rows costs precision.
    """
    wanted, unwanted = example.meta.get("facts"), example.meta.get("distractors", [])
    if not wanted:
        raise TaskError("metric facts needs examples with meta['facts'] (built-in tasks only)")
    text = output.lower()
    hits = sum(_mentions(text, f) for f in wanted)
    noise = sum(_mentions(text, d) for d in unwanted)
    if hits == 0:
        return 0.0
    precision, recall = hits / (hits + noise), hits / len(wanted)
    return 2 * precision * recall / (precision + recall)


def _items(text: str) -> list[str]:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    if len(lines) == 1:
        lines = lines[0].split(",")
    # "3. apple", "- apple", "* apple" → "apple"
    return [normalize(re.sub(r"^\s*(?:\d+[.)]|[-*•])\s*", "", ln)) for ln in lines]


def ordered_list(output: str, example: Example) -> float:
    """Positions holding the right item, over the longer list's length (1.0 only for an exact list)."""
    got, want = _items(output), _items(example.completion)
    if not want:
        raise TaskError("metric ordered_list needs non-empty reference lists")
    return sum(g == w for g, w in zip(got, want)) / max(len(got), len(want))


def token_f1(output: str, example: Example) -> float:
    """Bag-of-words F1 between output and reference (a generic metric for free-form text)."""
    got, want = normalize(output).split(), normalize(example.completion).split()
    if not got or not want:
        return float(got == want)
    common = sum(min(got.count(w), want.count(w)) for w in set(want))
    if common == 0:
        return 0.0
    precision, recall = common / len(got), common / len(want)
    return 2 * precision * recall / (precision + recall)


def code_tests(output: str, example: Example) -> float:
    """Fraction of meta["tests"] the output's function passes in a sandboxed subprocess."""
    tests, function = example.meta.get("tests"), example.meta.get("function")
    if not tests or not function:
        raise TaskError("metric code_tests needs meta['tests'] and meta['function'] (built-in tasks only)")
    return run_tests(extract_code(output), function, tests)


def extract_code(output: str) -> str:
    """The first fenced code block if there is one, else the whole output."""
    m = re.search(r"```(?:python|py)?\s*\n(.*?)(?:```|$)", output, re.DOTALL)
    return m.group(1) if m else output


METRICS: dict[str, Metric] = {
    "exact": exact, "json_fields": json_fields, "facts": facts, "ordered_list": ordered_list,
    "token_f1": token_f1, "code_tests": code_tests,
}
# Metrics that need nothing beyond the reference completion: usable by user JSONL tasks.
REFERENCE_ONLY = ("exact", "json_fields", "ordered_list", "token_f1")


def get_metric(name: str) -> Metric:
    if name not in METRICS:
        raise TaskError(f"unknown metric {name!r}; choose one of {', '.join(METRICS)}")
    return METRICS[name]
