"""WFQ on hand-made scenarios: weighted shares, a heavy task cannot starve others, no credit for idling."""
from __future__ import annotations

import pytest

from services.engine.block_manager import BlockManager
from services.engine.policies.wfq import WFQScheduler
from services.engine.scheduler import SchedulerConfig
from services.engine.sequence import SamplingParams, Sequence


class Clock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


def make_seq(rid: str, task: str, weight: float = 1.0, prompt: int = 4, predicted: int = 8) -> Sequence:
    return Sequence(request_id=rid, prompt_token_ids=[1] * prompt, params=SamplingParams(max_tokens=1000),
                    task=task, predicted_output_tokens=predicted, arrival_s=0.0, priority_weight=weight)


def make_sched(**cfg) -> tuple[WFQScheduler, Clock]:
    clock = Clock()
    cfg.setdefault("max_decode_streak", 0)
    cfg.setdefault("wfq_prefill_token_weight", 0.0)
    return WFQScheduler(SchedulerConfig(**cfg), BlockManager(10_000, 4), clock=clock), clock


def run(sched, clock, num_steps: int, output_len: int) -> dict[str, int]:
    """Fake runner: every request produces output_len tokens; returns tokens served per task."""
    served: dict[str, int] = {}
    for _ in range(num_steps):
        out = sched.schedule()
        clock.now_s += 0.01
        sched.update(out, [7] * len(out.seqs))
        for seq in out.seqs:
            served[seq.task] = served.get(seq.task, 0) + 1
            if seq.num_output_tokens >= output_len:
                sched.finish(seq)
    return served


@pytest.mark.parametrize("weight_b", [1.0, 3.0])
def test_backlogged_tasks_share_tokens_by_weight(weight_b):
    sched, clock = make_sched(max_num_seqs=4)
    for i in range(200):
        sched.add(make_seq(f"a{i}", "a", weight=1.0))
        sched.add(make_seq(f"b{i}", "b", weight=weight_b))
    served = run(sched, clock, 400, output_len=8)
    assert served["b"] / served["a"] == pytest.approx(weight_b, rel=0.15)


def test_heavy_task_cannot_starve_a_light_one():
    sched, clock = make_sched(max_num_seqs=2)
    for i in range(100):
        sched.add(make_seq(f"hog{i}", "hog"))
    run(sched, clock, 50, output_len=8)
    light = make_seq("light", "light")
    sched.add(light)
    run(sched, clock, 10, output_len=8)
    # Admitted at the first free slot, ahead of the 90-odd queued hog requests.
    assert light.first_token_s is not None and light.first_token_s - 0.5 <= 0.1


def test_returning_task_gets_no_credit_for_idle_time():
    sched, clock = make_sched(max_num_seqs=2)
    for i in range(60):
        sched.add(make_seq(f"a{i}", "a"))
    run(sched, clock, 100, output_len=8)
    sched.add(make_seq("b0", "b"))
    assert sched.task_tags["b"] >= min(sched.task_tags["a"], sched.task_tags["b"])
    assert sched.task_tags["b"] == pytest.approx(sched.task_tags["a"])
    for i in range(1, 60):
        sched.add(make_seq(f"b{i}", "b"))
    served = run(sched, clock, 100, output_len=8)
    assert served["b"] / served["a"] == pytest.approx(1.0, rel=0.25)   # shares, not a catch-up burst


def test_invalid_weight_rejected():
    sched, _ = make_sched()
    with pytest.raises(ValueError, match="priority_weight"):
        sched.add(make_seq("r", "a", weight=0.0))


def test_finish_and_abort_release_backlog_count():
    sched, clock = make_sched()
    sched.add(make_seq("r0", "a"))
    sched.add(make_seq("r1", "a"))
    run(sched, clock, 1, output_len=100)
    sched.abort("r1")
    sched.finish(sched.running[0])
    assert sched._num_active["a"] == 0
