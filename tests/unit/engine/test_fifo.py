"""FIFO policy with the S-LoRA adapter cap, tested without torch (fake runner: token 7)."""
from __future__ import annotations

import itertools

from services.engine.block_manager import BlockManager
from services.engine.policies import POLICIES, make_scheduler
from services.engine.policies.fifo import FifoScheduler
from services.engine.scheduler import SchedulerConfig
from services.engine.sequence import SamplingParams, Sequence, SequenceStatus

_clock = itertools.count()


def seq(rid: str, prompt_len: int, task: str = "", max_tokens: int = 64) -> Sequence:
    return Sequence(rid, [1] * prompt_len, SamplingParams(max_tokens=max_tokens), task=task,
                    arrival_s=float(next(_clock)))


def sched(num_blocks=64, block_size=4, **kw) -> FifoScheduler:
    return make_scheduler("fifo", SchedulerConfig(**kw), BlockManager(num_blocks, block_size))


def step(s: FifoScheduler):
    out = s.schedule()
    s.update(out, [7] * len(out.seqs))
    return out


def ids(seqs) -> list[str]:
    return [x.request_id for x in seqs]


def test_registered_by_name():
    assert POLICIES["fifo"] is FifoScheduler


def test_arrival_order_and_mixed_prefill_decode():
    s = sched()
    a, b = seq("a", 5), seq("b", 3)
    s.add(b)
    s.add(a)
    a.arrival_s, b.arrival_s = 0.0, 1.0          # a arrived first even though added second
    out = step(s)
    assert ids(out.prefill) == ["a", "b"] and out.decode == []
    c = seq("c", 2)
    s.add(c)
    out = step(s)
    assert ids(out.decode) == ["a", "b"] and ids(out.prefill) == ["c"]
    assert all(x.status is SequenceStatus.RUNNING for x in (a, b, c))


def test_adapter_cap_skips_to_other_tasks():
    s = sched(max_adapters_per_batch=2)
    reqs = [seq("1", 2, "t1"), seq("2", 2, "t2"), seq("3", 2, "t3"), seq("4", 2, "t1"),
            seq("5", 2, "")]
    for r in reqs:
        s.add(r)
    out = step(s)
    # t3 would be a third adapter: skipped; t1 again and the base model still join.
    assert ids(out.prefill) == ["1", "2", "4", "5"]
    assert ids(s.waiting) == ["3"]
    for r in (reqs[0], reqs[3]):       # t1 finishes: only t2 remains, t3 may join
        s.finish(r)
    out = step(s)
    assert ids(out.prefill) == ["3"] and ids(out.decode) == ["2", "5"]


def test_token_budget_and_max_num_seqs():
    s = sched(max_num_batched_tokens=10, max_num_seqs=3)
    for r in (seq("a", 6), seq("b", 6), seq("c", 1), seq("d", 1)):
        s.add(r)
    assert ids(step(s).prefill) == ["a"]             # b does not fit the budget: FIFO stops
    assert ids(step(s).prefill) == ["b", "c"]        # 1 decode + 6 + 1 ≤ 10
    out = step(s)
    assert ids(out.prefill) == [] and len(out.decode) == 3   # max_num_seqs reached


def test_oversized_prompt_runs_alone():
    s = sched(max_num_batched_tokens=8)
    s.add(seq("big", 20))
    assert ids(step(s).prefill) == ["big"]


def test_kv_limit_blocks_admission_strict_fifo():
    s = sched(num_blocks=4, block_size=4)
    s.add(seq("a", 12))       # 3 blocks
    s.add(seq("b", 8))        # 2 blocks: does not fit
    s.add(seq("c", 2))        # would fit, but FIFO does not let it pass b
    assert ids(step(s).prefill) == ["a"]
    assert ids(s.waiting) == ["b", "c"]


def test_preempts_newest_when_decode_needs_a_block():
    s = sched(num_blocks=3, block_size=4)
    a, b = seq("a", 4), seq("b", 4)
    s.add(a)
    s.add(b)
    step(s)                                # each holds one full block, 1 block free
    out = step(s)                          # a takes the free block; b cannot: b preempted
    assert ids(out.decode) == ["a"] and ids(out.preempted) == ["b"]
    assert b.status is SequenceStatus.WAITING and b.block_table == [] and b.num_preemptions == 1
    assert b.num_cached_tokens == 0 and b.num_output_tokens == 1   # output kept, KV recomputed
    free_before = s.block_manager.num_free_blocks
    s.finish(a)
    assert s.block_manager.num_free_blocks == free_before + 2
    out = s.schedule()
    assert ids(out.prefill) == ["b"] and b.num_new_tokens == 5   # prompt + its 1 output token


def test_lone_sequence_preempts_itself_without_crashing():
    s = sched(num_blocks=1, block_size=4)
    a = seq("a", 4)
    s.add(a)
    step(s)
    out = step(s)
    assert ids(out.preempted) == ["a"] and out.is_empty
