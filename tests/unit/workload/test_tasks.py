"""Generators: determinism, split disjointness, variants, and distinct length profiles."""
from __future__ import annotations

import pytest

from services.common.workload.task import TaskError, builtin_tasks, get_task, split_of

TASKS = list(builtin_tasks())


def test_at_least_six_tasks():
    assert len(TASKS) >= 6


@pytest.mark.parametrize("name", TASKS)
def test_generation_is_deterministic(name):
    a = get_task(name).examples("test", 15, seed=3)
    b = get_task(name).examples("test", 15, seed=3)
    assert [(e.prompt, e.completion, e.meta) for e in a] == [(e.prompt, e.completion, e.meta) for e in b]
    assert a != get_task(name).examples("test", 15, seed=4)


@pytest.mark.parametrize("name", TASKS)
def test_splits_are_disjoint_and_labelled(name):
    task = get_task(name)
    prompts = {s: {e.prompt for e in task.examples(s, n)} for s, n in
               (("train", 300), ("calib", 40), ("test", 40))}
    assert not prompts["train"] & prompts["test"]
    assert not prompts["train"] & prompts["calib"]
    assert not prompts["calib"] & prompts["test"]
    for split, ps in prompts.items():
        assert all(split_of(p) == split for p in ps)
        # seeds change the draw, never the split a prompt belongs to
    other_seed = {e.prompt for e in task.examples("train", 300, seed=9)}
    assert not other_seed & prompts["test"]


@pytest.mark.parametrize("name", TASKS)
def test_examples_are_distinct_and_self_consistent(name):
    from services.common.workload.metrics import get_metric

    task = get_task(name)
    examples = task.examples("test", 30)
    assert len({e.prompt for e in examples}) == 30
    metric = get_metric(task.metric)
    assert all(metric(e.completion, e) == 1.0 for e in examples)


def test_variants_share_family_but_not_prompts():
    base, v17 = get_task("sort_list"), get_task("sort_list#17")
    assert v17.name == "sort_list#17" and v17.metric == base.metric
    assert not {e.prompt for e in base.examples("test", 20)} & {e.prompt for e in v17.examples("test", 20)}
    assert get_task("sort_list#0") is base or get_task("sort_list#0").name == "sort_list"


@pytest.mark.parametrize("bad", ["nope", "sort_list#x", "sort_list#"])
def test_unknown_task_names_are_rejected(bad):
    if bad == "sort_list#":
        assert get_task(bad).name == "sort_list"
        return
    with pytest.raises(TaskError):
        get_task(bad)


def test_unknown_split_is_rejected():
    with pytest.raises(TaskError, match="split"):
        get_task("arith").examples("dev", 3)


def test_output_length_profiles_differ(tokenizer):
    import statistics

    medians = {}
    for name in TASKS:
        examples = get_task(name).examples("test", 40)
        medians[name] = statistics.median(len(tokenizer(e.completion).input_ids) for e in examples)
    assert medians["arith"] < medians["num2words_en"] < medians["json_extract"] < medians["code_gen"]
    assert max(medians.values()) > 10 * min(medians.values())


def test_code_gen_reference_passes_and_wrong_code_fails():
    from services.common.workload.metrics import code_tests

    example = get_task("code_gen").examples("test", 1)[0]
    assert code_tests(example.completion, example) == 1.0
    broken = example.completion.replace("return", "return None and", 1)
    assert code_tests(broken, example) < 1.0
