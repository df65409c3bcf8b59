"""Metrics: right answers score 1, wrong ones less; the sandbox contains hostile code."""
from __future__ import annotations

import json

import pytest

from services.common.workload.metrics import (code_tests, exact, facts, get_metric, json_fields,
                                              ordered_list, token_f1)
from services.common.workload.sandbox import run_tests
from services.common.workload.task import Example, TaskError


def ex(completion: str, **meta) -> Example:
    return Example("t", "p", completion, meta)


@pytest.mark.parametrize("output,score", [
    ("forty-two", 1.0), (" Forty-two. ", 1.0), ("forty two", 0.0), ("The answer is forty-two", 0.0),
])
def test_exact(output, score):
    assert exact(output, ex("forty-two")) == score


def test_json_fields_partial_credit_and_garbage():
    ref = ex(json.dumps({"name": "Ann Lee", "age": 34, "city": "Oslo", "job": "chef"}))
    assert json_fields('{"name": "Ann Lee", "age": 34, "city": "Oslo", "job": "chef"}', ref) == 1.0
    assert json_fields('Sure! {"name": "ann lee", "age": "34", "city": "Lima", "job": "chef"}', ref) == 0.75
    assert json_fields("no json here", ref) == 0.0
    assert json_fields('{"name": ', ref) == 0.0


def test_facts_counts_whole_words_and_penalizes_copied_rows():
    ref = ex("x", facts=["lamps", "120", "mugs", "12"], distractors=["tents", "50"])
    assert facts("lamps sold best with 120 units and mugs worst with 12.", ref) == 1.0
    # "120" inside "1200" does not count: recall 1/4, precision 1 -> F1 0.4
    assert facts("lamps sold 1200 units", ref) == pytest.approx(0.4)
    # copying the whole table: recall 1, precision 4/6
    assert facts("lamps 120, tents 50, mugs 12", ref) == pytest.approx(0.8)
    assert facts("nothing relevant", ref) == 0.0
    with pytest.raises(TaskError):
        facts("x", ex("y"))


def test_ordered_list():
    ref = ex("1. apple\n2. banana\n3. cherry")
    assert ordered_list("1. apple\n2. banana\n3. cherry", ref) == 1.0
    assert ordered_list("apple, banana, cherry", ref) == 1.0
    assert ordered_list("1. banana\n2. apple\n3. cherry", ref) == pytest.approx(1 / 3)
    assert ordered_list("1. apple\n2. banana\n3. cherry\n4. date", ref) == 0.75
    assert ordered_list("", ref) == 0.0


def test_token_f1():
    assert token_f1("the cat sat", ex("the cat sat")) == 1.0
    assert 0 < token_f1("the cat", ex("the cat sat")) < 1
    assert token_f1("dog", ex("the cat sat")) == 0.0


CODE_EX = ex("", function="f", tests=[[[2], 5], [[0], 1], [[-1], -1]])


def test_code_tests_right_wrong_and_fenced():
    assert code_tests("def f(x):\n    return 2 * x + 1", CODE_EX) == 1.0
    assert code_tests("Here:\n```python\ndef f(x):\n    return 2*x+1\n```\nDone.", CODE_EX) == 1.0
    assert code_tests("def f(x):\n    return x + 1", CODE_EX) == pytest.approx(1 / 3)
    assert code_tests("def f(x) return", CODE_EX) == 0.0
    assert code_tests("def g(x):\n    return 1", CODE_EX) == 0.0


@pytest.mark.parametrize("code", [
    "def f(x):\n    while True: pass",                      # CPU-time limit / timeout
    "def f(x):\n    return len(bytearray(2 << 30))",         # memory limit
    "import os\nos._exit(0)\ndef f(x): return 2*x+1",         # exits before reporting
    "def f(x):\n    open('{tmp}/pwn', 'w').write('x'); return 2*x+1",  # no file writes
    "import subprocess\ndef f(x):\n    subprocess.run(['touch', '{tmp}/pwn']); return 2*x+1",
])
def test_sandbox_contains_hostile_code(code, tmp_path):
    assert run_tests(code.format(tmp=tmp_path), "f", CODE_EX.meta["tests"], timeout_s=5) < 1.0
    assert not (tmp_path / "pwn").exists()


def test_sandbox_output_cannot_forge_the_result():
    code = "print('\\n0000 3')\ndef f(x): return 0"
    assert run_tests(code, "f", CODE_EX.meta["tests"]) == 0.0


def test_unknown_metric():
    with pytest.raises(TaskError, match="unknown metric"):
        get_metric("bleu")
