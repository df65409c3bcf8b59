"""Skip-join MLFQ on hand-made scenarios: initial level, demotion, priority preemption, starvation promotion."""
from __future__ import annotations

import pytest

from services.engine.block_manager import BlockManager
from services.engine.policies.mlfq import MLFQScheduler
from services.engine.scheduler import SchedulerConfig
from services.engine.sequence import SamplingParams, Sequence, SequenceStatus


class Clock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


def make_seq(rid: str, prompt: int = 8, task: str = "a", arrival_s: float = 0.0) -> Sequence:
    return Sequence(request_id=rid, prompt_token_ids=[1] * prompt, params=SamplingParams(max_tokens=1000),
                    task=task, arrival_s=arrival_s)


def make_sched(num_blocks: int = 1000, **cfg) -> tuple[MLFQScheduler, Clock]:
    clock = Clock()
    cfg.setdefault("mlfq_base_quantum", 2)
    cfg.setdefault("mlfq_prefill_tokens_per_quantum", 100)
    return MLFQScheduler(SchedulerConfig(**cfg), BlockManager(num_blocks, 4), clock=clock), clock


def step(sched, clock, dt_s: float = 0.01):
    out = sched.schedule()
    clock.now_s += dt_s
    sched.update(out, [7] * len(out.seqs))
    return out


@pytest.mark.parametrize("prompt, level", [(1, 0), (100, 0), (101, 1), (200, 1), (201, 2), (400, 2),
                                           (100_000, 5)])
def test_skip_join_initial_level_from_prompt_length(prompt, level):
    sched, _ = make_sched(mlfq_num_levels=6)
    seq = make_seq("r", prompt=prompt)
    sched.add(seq)
    assert seq.sched_state["level"] == level


def test_demotion_after_quantum_doubles_per_level():
    sched, clock = make_sched()
    seq = make_seq("r")
    sched.add(seq)
    levels = []
    for _ in range(8):
        step(sched, clock)
        levels.append(seq.sched_state["level"])
    # quantum 2 tokens at level 0, 4 at level 1, 8 at level 2
    assert levels == [0, 1, 1, 1, 1, 2, 2, 2]


def test_higher_level_job_takes_the_row_of_a_demoted_one_which_pauses_with_its_kv():
    sched, clock = make_sched(max_num_seqs=1)
    old = make_seq("old")
    sched.add(old)
    for _ in range(3):
        step(sched, clock)
    assert old.sched_state["level"] == 1
    blocks = list(old.block_table)
    new = make_seq("new", arrival_s=clock.now_s)
    sched.add(new)
    out = step(sched, clock)
    assert [s.request_id for s in out.prefill] == ["new"] and not out.decode
    assert not out.preempted                      # paused, not dropped: no recompute later
    assert old.status is SequenceStatus.RUNNING and old.block_table == blocks
    # new uses up its level-0 quantum (2 tokens) and drops to level 1, behind old (earlier arrival)
    out = step(sched, clock)
    assert [s.request_id for s in out.decode] == ["new"]
    out = step(sched, clock)
    assert [s.request_id for s in out.decode] == ["old"] and old.num_cached_tokens > 0


def test_paused_jobs_resume_when_blocks_are_short_and_the_lowest_is_dropped_first():
    """Admission waits while paused jobs hold the blocks; every step still serves a job; a decode
    that finds no free block drops the lowest-priority job, not the one being served."""
    sched, clock = make_sched(num_blocks=6, max_num_seqs=1)   # 4-token blocks
    low = make_seq("low", prompt=7)                # 2 blocks
    sched.add(low)
    for _ in range(3):
        step(sched, clock)                         # level 1 after its 2-token quantum
    sched.add(make_seq("high", prompt=11, arrival_s=clock.now_s))   # level 0, 3 blocks: fills the cache
    outs = [step(sched, clock)]
    assert [s.request_id for s in outs[0].prefill] == ["high"] and low.status is SequenceStatus.RUNNING
    sched.add(make_seq("third", prompt=15, arrival_s=clock.now_s))  # level 0, 4 blocks: must wait
    outs += [step(sched, clock) for _ in range(20)]
    # no step idles while admission waits (until "high" alone outgrows the 6-block cache, step 17)
    assert all(len(o.seqs) == 1 for o in outs[:16])
    drops = [([s.request_id for s in o.decode], [s.request_id for s in o.preempted]) for o in outs if o.preempted]
    assert drops[0] == (["high"], ["low"])
    assert any([s.request_id for s in o.prefill] == ["third"] for o in outs)


def test_same_level_does_not_preempt():
    sched, clock = make_sched(max_num_seqs=1)
    sched.add(make_seq("first"))
    step(sched, clock)
    sched.add(make_seq("second"))
    out = step(sched, clock)
    assert [s.request_id for s in out.decode] == ["first"] and not out.preempted


def test_starved_job_is_promoted_to_level_zero():
    sched, clock = make_sched(max_num_seqs=1, starvation_limit_s=1.0)
    long_prompt = make_seq("long", prompt=400)        # joins at level 2
    sched.add(long_prompt)
    sched.add(make_seq("short"))
    assert [s.request_id for s in step(sched, clock).prefill] == ["short"]
    clock.now_s = 2.0
    sched.schedule()
    assert long_prompt.sched_state["level"] == 0


def test_beta_caps_adapters_and_base_model_is_free():
    sched, clock = make_sched(max_adapters_per_batch=2)
    for i in range(6):
        sched.add(make_seq(f"r{i}", task=f"t{i}"))
    sched.add(make_seq("base", task=""))
    out = step(sched, clock)
    assert len({s.task for s in out.seqs if s.task}) == 2
    assert "base" in [s.request_id for s in out.seqs]


def test_mixed_prefill_and_decode_in_one_step_with_token_budget():
    sched, clock = make_sched(max_num_batched_tokens=20)
    sched.add(make_seq("a", prompt=8))
    step(sched, clock)
    for rid in ("b", "c", "d"):
        sched.add(make_seq(rid, prompt=8))
    out = step(sched, clock)
    assert [s.request_id for s in out.decode] == ["a"]
    assert [s.request_id for s in out.prefill] == ["b", "c"]   # 16 of 20 tokens; d would exceed
