"""RunningStats: medians, windows, spread-based confidence, model-bias estimate."""
import math

import pytest

from services.predictor.stats import RunningStats


@pytest.mark.parametrize("lengths, median", [
    ([5], 5),
    ([1, 2, 3], 2),
    ([1, 2, 3, 10], 2.5),
    ([100, 1, 50], 50),
])
def test_median(lengths, median):
    stats = RunningStats(window=16)
    for n in lengths:
        stats.observe("t", n)
    summary = stats.summary("t")
    assert summary.count == len(lengths)
    assert summary.median == median
    assert summary.mean == pytest.approx(sum(lengths) / len(lengths))


def test_window_keeps_most_recent():
    stats = RunningStats(window=3)
    for n in [1000, 1000, 1000, 1, 2, 3]:
        stats.observe("t", n)
    assert stats.summary("t").median == 2
    assert stats.summary("t").count == 3


def test_unknown_task_has_no_summary_and_tasks_are_separate():
    stats = RunningStats()
    stats.observe("a", 10)
    assert stats.summary("b") is None
    assert stats.tasks() == ["a"]
    stats.observe("b", 30)
    assert stats.global_median() == 20


def test_negative_length_rejected():
    with pytest.raises(ValueError, match="output_tokens"):
        RunningStats().observe("t", -1)


def test_confidence_grows_with_count_and_falls_with_spread():
    tight, wide = RunningStats(), RunningStats()
    for i in range(40):
        tight.observe("t", 50)
        wide.observe("t", 5 if i % 2 else 500)
    few = RunningStats()
    few.observe("t", 50)
    assert 0.0 <= wide.summary("t").confidence < tight.summary("t").confidence < 1.0
    assert few.summary("t").confidence < tight.summary("t").confidence


def test_replace_and_log_bias():
    stats = RunningStats(window=4)
    stats.replace("t", [9, 9, 99, 99, 99, 99])  # only the last 4 survive
    assert stats.summary("t").median == 99
    assert stats.log_bias("t") is None  # no model predictions yet
    stats.observe_prediction("t", math.log1p(9))
    assert stats.log_bias("t") == pytest.approx(math.log1p(99) - math.log1p(9))


def test_number_of_tracked_tasks_is_bounded():
    stats = RunningStats(max_tasks=2)
    for task in ("a", "b", "c"):
        stats.observe(task, 1)
    assert sorted(stats.tasks()) == ["b", "c"]
