"""Inlaid policy on hand-made scenarios: SRTF order, β cap, task stickiness, starvation, preemption, admission."""
from __future__ import annotations

import random

import pytest

from services.engine.block_manager import BlockManager
from services.engine.config import EngineConfig
from services.engine.policies.inlaid import InlaidScheduler
from services.engine.scheduler import SchedulerConfig
from services.engine.sequence import SamplingParams, Sequence, SequenceStatus


class Clock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


def make_seq(rid: str, prompt: int = 8, predicted: int | None = 10, task: str = "a",
             arrival_s: float = 0.0, max_tokens: int = 1000) -> Sequence:
    return Sequence(request_id=rid, prompt_token_ids=[1] * prompt, params=SamplingParams(max_tokens=max_tokens),
                    task=task, predicted_output_tokens=predicted, arrival_s=arrival_s)


def make_sched(num_blocks: int = 1000, block_size: int = 4, **cfg) -> tuple[InlaidScheduler, Clock]:
    clock = Clock()
    cfg.setdefault("max_decode_streak", 0)   # prefill whenever something waits
    cfg.setdefault("inlaid_beta_fill", 0.0)   # the strict β cap; the work-conserving fill has its own tests
    sched = InlaidScheduler(SchedulerConfig(**cfg), BlockManager(num_blocks, block_size), clock=clock)
    return sched, clock


def step(sched: InlaidScheduler, clock: Clock, dt_s: float = 0.01):
    out = sched.schedule()
    clock.now_s += dt_s
    sched.update(out, [7] * len(out.seqs))
    return out


def ids(seqs) -> list[str]:
    return [s.request_id for s in seqs]


def test_prefill_admits_shortest_predicted_first():
    sched, _ = make_sched(max_num_seqs=2)
    for rid, pred in (("long", 100), ("short", 5), ("mid", 50)):
        sched.add(make_seq(rid, predicted=pred))
    out = sched.schedule()
    assert ids(out.prefill) == ["short", "mid"]
    assert {s.status for s in out.prefill} == {SequenceStatus.RUNNING}
    assert ids(sched.waiting) == ["long"]


def test_unknown_prediction_sorts_as_max_tokens():
    sched, _ = make_sched(max_num_seqs=1)
    sched.add(make_seq("unknown", predicted=None, max_tokens=500))
    sched.add(make_seq("known", predicted=400))
    assert ids(sched.schedule().prefill) == ["known"]


def test_decode_streak_bounds_time_between_prefills():
    sched, clock = make_sched(max_num_seqs=8, max_decode_streak=3)
    sched.add(make_seq("first", predicted=100))
    assert step(sched, clock).prefill                      # nothing running: prefill at once
    sched.add(make_seq("second", predicted=100))
    kinds = ["P" if step(sched, clock).prefill else "D" for _ in range(4)]
    assert kinds == ["D", "D", "D", "P"]


@pytest.mark.parametrize("beta, expected_adapters", [(2, 2), (3, 3), (0, 5)])
def test_prefill_batch_respects_beta(beta, expected_adapters):
    sched, _ = make_sched(max_adapters_per_batch=beta)
    for i in range(10):
        sched.add(make_seq(f"r{i}", task=f"t{i % 5}", predicted=10 + i))
    sched.add(make_seq("base", task="", predicted=1000))   # base model: no adapter slot
    out = sched.schedule()
    adapters = {s.task for s in out.prefill if s.task}
    assert len(adapters) == expected_adapters
    assert "base" in ids(out.prefill)


def make_running(sched: InlaidScheduler, seq: Sequence, num_outputs: int = 0) -> Sequence:
    """Put seq in the running pool as if prefilled and decoded: KV for all but its newest token."""
    seq.output_token_ids = [7] * max(0, num_outputs - 1)
    sched.add(seq)
    sched.waiting.remove(seq)
    sched.block_manager.allocate(seq)
    seq.num_cached_tokens = seq.num_tokens
    if num_outputs:
        seq.output_token_ids.append(7)
    seq.status = SequenceStatus.RUNNING
    sched.running.append(seq)
    return seq


@pytest.mark.parametrize("b_predicted, expected", [(80, {"ta", "tc"}), (50, {"tb", "ta"})])
def test_decode_prefers_previous_step_tasks_unless_much_shorter(b_predicted, expected):
    sched, _ = make_sched(max_adapters_per_batch=2, inlaid_task_switch_tokens=32, max_decode_streak=100)
    make_running(sched, make_seq("a", task="ta", predicted=100), num_outputs=1)
    make_running(sched, make_seq("c", task="tc", predicted=101), num_outputs=1)
    make_running(sched, make_seq("b", task="tb", predicted=b_predicted), num_outputs=1)
    sched.last_step_tasks = {"ta", "tc"}
    out = sched.schedule()
    assert not out.prefill
    # tb pays 32 tokens for joining: 80+32 > 100 keeps {ta, tc}; 50+32 < 101 displaces tc.
    assert {s.task for s in out.decode} == expected


def test_new_task_much_shorter_displaces_previous_task():
    sched, clock = make_sched(max_adapters_per_batch=1, inlaid_task_switch_tokens=32)
    sched.add(make_seq("long", task="ta", predicted=500))
    step(sched, clock)
    sched.add(make_seq("short", task="tb", predicted=5))
    out = step(sched, clock)
    assert ids(out.prefill) == ["short"]                    # SRTF across tasks, not stuck on ta
    out = step(sched, clock)
    assert {s.task for s in out.decode} == {"tb"}          # ta waits with its KV kept
    assert sched.running[0].block_table


def test_starved_request_goes_ahead_of_shorter_ones():
    sched, clock = make_sched(max_num_seqs=1, starvation_limit_s=10.0)
    sched.add(make_seq("long", predicted=1000, arrival_s=0.0))
    sched.add(make_seq("s0", predicted=5, arrival_s=0.0))
    assert ids(sched.schedule().prefill) == ["s0"]
    sched.finish(sched.running[0])
    clock.now_s = 5.0
    sched.add(make_seq("s1", predicted=5, arrival_s=5.0))
    assert ids(sched.schedule().prefill) == ["s1"]
    sched.finish(sched.running[0])
    clock.now_s = 10.5                                       # long has now waited past the limit
    sched.add(make_seq("s2", predicted=5, arrival_s=10.5))
    assert ids(sched.schedule().prefill) == ["long"]


def test_request_past_its_prediction_goes_ahead():
    sched, _ = make_sched(max_num_seqs=1)
    over = make_seq("over", predicted=4)
    over.output_token_ids = [7] * 6                          # preempted after outrunning its prediction
    sched.add(make_seq("short", predicted=2))
    sched.add(over)
    assert ids(sched.schedule().prefill) == ["over"]


def test_kv_exhaustion_preempts_most_remaining_work():
    # 4 blocks of 4 tokens, all held: each sequence has 8 cached tokens and a 9th to place.
    sched, _ = make_sched(num_blocks=4, block_size=4, max_num_seqs=2, max_decode_streak=100)
    # a predicted the longer output (12) but has generated 8 of it: 4 left, refreshed per token.
    a = make_running(sched, make_seq("a", prompt=1, predicted=12), num_outputs=8)
    b = make_running(sched, make_seq("b", prompt=7, predicted=10), num_outputs=2)
    assert sched.block_manager.num_free_blocks == 0
    assert (a.predicted_remaining_tokens, b.predicted_remaining_tokens) == (4, 8)
    out = sched.schedule()
    assert ids(out.preempted) == ["b"]
    assert ids(out.decode) == ["a"]
    assert b.status is SequenceStatus.WAITING and b.num_preemptions == 1 and not b.block_table
    assert b in sched.waiting and len(a.block_table) == 3


@pytest.mark.parametrize("predicted, admitted", [(100, False), (17, False), (16, True)])
def test_memory_admission_reserves_predicted_output(predicted, admitted):
    # 10 blocks x 4 tokens. The runner holds 2 blocks and reserves 3 more (4+16 tokens),
    # leaving 5 blocks = 20 tokens for the newcomer's prompt (4) + predicted output.
    sched, clock = make_sched(num_blocks=10, block_size=4)
    sched.add(make_seq("runner", prompt=4, predicted=16))
    step(sched, clock)
    sched.add(make_seq("new", prompt=4, predicted=predicted))
    out = sched.schedule()
    assert (ids(out.prefill) == ["new"]) is admitted


def test_random_workload_runs_to_completion_within_beta():
    rng = random.Random(1)
    sched, clock = make_sched(num_blocks=200, block_size=4, max_num_seqs=16, max_adapters_per_batch=3,
                              starvation_limit_s=1e9, max_decode_streak=2)
    targets = {}
    for i in range(120):
        seq = make_seq(f"r{i}", prompt=rng.randint(1, 30), task=f"t{rng.randint(0, 7)}",
                       predicted=rng.randint(1, 40), arrival_s=0.0)
        targets[seq.request_id] = rng.randint(1, 40)
        sched.add(seq)
    finished = 0
    for _ in range(20000):
        if not sched.has_unfinished:
            break
        out = step(sched, clock)
        assert out.seqs, "scheduled nothing while requests remain"
        assert len({s.task for s in out.seqs}) <= 3
        for seq in out.seqs:
            if seq.num_output_tokens >= targets[seq.request_id]:
                sched.finish(seq)
                finished += 1
    assert finished == 120
    assert sched.block_manager.num_free_blocks == 200


def prefill_after_full_pool(pool_tasks: list[str], **cfg) -> list[str]:
    """Step kinds (P/D) after the pool's tasks started and one request of a new task arrived."""
    sched, clock = make_sched(max_decode_streak=2, **cfg)
    for i, task in enumerate(pool_tasks):
        sched.add(make_seq(f"pool{i}", task=task, predicted=100))
    assert step(sched, clock).prefill                       # nothing running: prefill at once
    sched.add(make_seq("new", task="tnew", predicted=5, arrival_s=clock.now_s))
    kinds = []
    while not kinds or kinds[-1] != "P":
        out = step(sched, clock)
        assert len(kinds) < 20 and out.seqs
        kinds.append("P" if out.prefill else "D")
    assert ids(out.prefill) == ["new"]
    return kinds


@pytest.mark.parametrize("factor, num_decode_steps", [(1, 2), (2, 4), (3, 6)])
def test_pool_holding_beta_tasks_waits_factor_times_the_streak(factor, num_decode_steps):
    # β = 2 tasks already run: the decode batch has no free task slot, so a prefill only
    # buys a request that would wait in the pool; it comes after factor × streak decode steps.
    kinds = prefill_after_full_pool(["ta", "tb"], max_adapters_per_batch=2,
                                    inlaid_full_batch_streak_factor=factor)
    assert kinds == ["D"] * num_decode_steps + ["P"]


@pytest.mark.parametrize("pool_tasks, beta", [(["ta", "tb"], 3), (["ta", ""], 2), (["ta", "tb", "tc"], 0)])
def test_pool_with_a_free_task_slot_keeps_the_plain_streak(pool_tasks, beta):
    # A free slot (β > tasks running; the base model "" takes none; β = 0 is unlimited): the
    # new request can join the next decode batch, so prefill comes after the plain streak.
    kinds = prefill_after_full_pool(pool_tasks, max_adapters_per_batch=beta,
                                    inlaid_full_batch_streak_factor=3)
    assert kinds == ["D", "D", "P"]


def test_full_batch_streak_factor_must_be_positive():
    with pytest.raises(ValueError, match="inlaid_full_batch_streak_factor"):
        SchedulerConfig(inlaid_full_batch_streak_factor=0)


def decode_tasks_with_rank(rank: str, hungry_task: str | None = None) -> set[str]:
    """Tasks decoded when β = 1 slot is contested by ta (3 running, shortest 30 tokens left)
    and tb (1 running, 20 left); both ran last step, so neither pays the switch penalty."""
    sched, clock = make_sched(max_adapters_per_batch=1, max_decode_streak=100, starvation_limit_s=5.0,
                              inlaid_decode_task_rank=rank)
    for i, predicted in enumerate((31, 40, 50)):
        make_running(sched, make_seq(f"a{i}", task="ta", predicted=predicted), num_outputs=1)
    make_running(sched, make_seq("b", task="tb", predicted=21), num_outputs=1)
    sched.last_step_tasks = {"ta", "tb"}
    for seq in sched.running:
        seq.sched_state["last_service_s"] = 0.0
    clock.now_s = 1.0
    if hungry_task:
        for seq in sched.running:
            if seq.task == hungry_task:
                seq.sched_state["last_service_s"] = -10.0   # unserved past the starvation limit
    out = sched.schedule()
    assert not out.prefill
    return {s.task for s in out.decode}


@pytest.mark.parametrize("rank, expected", [("srtf", {"tb"}), ("srtf_per_seq", {"ta"})])
def test_decode_rank_per_seq_prefers_the_slot_advancing_more_sequences(rank, expected):
    # srtf: 20 < 30 tokens, tb's single request wins the slot. srtf_per_seq: 30 / 3 = 10 < 20 / 1.
    assert decode_tasks_with_rank(rank) == expected


def test_decode_rank_per_seq_keeps_the_starvation_guard():
    assert decode_tasks_with_rank("srtf_per_seq", hungry_task="tb") == {"tb"}


def test_decode_rank_per_seq_keeps_the_previous_step_preference():
    # tc (new to the batch, 3 running, 30 left) pays 32 tokens: (30 + 32) / 3 > 20 / 1 of tb.
    sched, _ = make_sched(max_adapters_per_batch=1, max_decode_streak=100,
                          inlaid_decode_task_rank="srtf_per_seq")
    for i in range(3):
        make_running(sched, make_seq(f"c{i}", task="tc", predicted=31 + i), num_outputs=1)
    make_running(sched, make_seq("b", task="tb", predicted=21), num_outputs=1)
    sched.last_step_tasks = {"tb"}
    assert {s.task for s in sched.schedule().decode} == {"tb"}


def test_decode_task_rank_is_validated():
    with pytest.raises(ValueError, match="inlaid_decode_task_rank"):
        SchedulerConfig(inlaid_decode_task_rank="biggest")
    with pytest.raises(ValueError, match="ENGINE_INLAID_DECODE_TASK_RANK"):
        EngineConfig(inlaid_decode_task_rank="biggest")


@pytest.mark.parametrize("env, expected", [({}, "srtf"),
                                           ({"ENGINE_INLAID_DECODE_TASK_RANK": "srtf_per_seq"}, "srtf_per_seq")])
def test_decode_task_rank_from_env(env, expected):
    assert EngineConfig.from_env(env).scheduler_config().inlaid_decode_task_rank == expected


# ---- work-conserving β (inlaid_beta_fill) -------------------------------------------------
def test_fill_lets_more_tasks_into_an_underfilled_batch():
    # 6 single-request tasks, β = 2, 8 batch slots: the strict cap runs 2 requests; fill 0.75
    # (6 slots) lets tasks join in SRTF order until 6 requests are held.
    for fill, expected in ((0.0, 2), (0.75, 6)):
        sched, _ = make_sched(max_adapters_per_batch=2, max_num_seqs=8, inlaid_beta_fill=fill)
        for i in range(6):
            sched.add(make_seq(f"r{i}", task=f"t{i}", predicted=10 + i))
        out = sched.schedule()
        assert len({s.task for s in out.prefill}) == expected
        assert ids(out.prefill) == [f"r{i}" for i in range(expected)]   # the shortest ones


def test_fill_keeps_the_cap_when_the_beta_tasks_fill_the_batch():
    sched, _ = make_sched(max_adapters_per_batch=2, max_num_seqs=8, inlaid_beta_fill=0.75)
    for t in range(4):
        for i in range(4):
            sched.add(make_seq(f"t{t}-{i}", task=f"t{t}", predicted=10 + t))
    out = sched.schedule()
    assert {s.task for s in out.prefill} == {"t0", "t1"}    # 8 requests of the 2 best tasks: full


def test_fill_never_exceeds_the_adapter_slots():
    sched, _ = make_sched(max_adapters_per_batch=2, max_num_seqs=16, inlaid_beta_fill=1.0, max_adapter_slots=3)
    for i in range(10):
        sched.add(make_seq(f"r{i}", task=f"t{i}", predicted=10 + i))
    sched.add(make_seq("base", task="", predicted=50))      # the base model needs no slot
    out = sched.schedule()
    assert {s.task for s in out.prefill} == {"t0", "t1", "t2", ""}


def test_fill_in_decode_adds_tasks_of_waiting_running_requests():
    sched, _ = make_sched(max_adapters_per_batch=1, max_num_seqs=4, max_decode_streak=100, inlaid_beta_fill=0.75)
    for i in range(4):
        make_running(sched, make_seq(f"r{i}", task=f"t{i}", predicted=20 + i), num_outputs=1)
    out = sched.schedule()
    assert not out.prefill
    assert ids(out.decode) == ["r0", "r1", "r2"]            # 0.75 × 4 = 3 slots to fill, β = 1


def test_fill_must_be_a_fraction():
    with pytest.raises(ValueError, match="inlaid_beta_fill"):
        SchedulerConfig(inlaid_beta_fill=1.5)
    assert EngineConfig.from_env({"ENGINE_INLAID_BETA_FILL": "0"}).scheduler_config().inlaid_beta_fill == 0.0


# ---- overload prefill rule (inlaid_overload_min_free) --------------------------------------
def overloaded(num_running: int, num_waiting: int, **cfg) -> InlaidScheduler:
    """8 batch slots, num_running of them busy (one task, so β never binds), num_waiting queued."""
    cfg.setdefault("max_decode_streak", 1)
    sched, _ = make_sched(max_num_seqs=8, max_adapters_per_batch=0, **cfg)
    for i in range(num_running):
        make_running(sched, make_seq(f"run{i}", predicted=50), num_outputs=1)
    for i in range(num_waiting):
        sched.add(make_seq(f"wait{i}", predicted=5))
    return sched


def test_overload_waits_for_enough_free_slots():
    # 1 free slot of 8 and 5 waiting: min_free 0.25 wants 2 free slots, so the streak rule's
    # prefill is held back; with the rule off it happens after one decode step.
    for min_free, prefills in ((0.0, True), (0.25, False)):
        sched = overloaded(7, 5, inlaid_overload_min_free=min_free)
        sched.num_decode_streak = 1
        assert bool(sched.schedule().prefill) is prefills


def test_overload_prefill_once_enough_slots_are_free():
    sched = overloaded(6, 5, inlaid_overload_min_free=0.25)   # 2 of 8 free = 0.25
    sched.num_decode_streak = 1
    assert ids(sched.schedule().prefill) == ["wait0", "wait1"]


def test_overload_wait_is_bounded_by_its_streak_factor():
    sched = overloaded(7, 5, inlaid_overload_min_free=0.25, inlaid_overload_streak_factor=3)
    kinds = []
    for _ in range(5):
        out = sched.schedule()
        kinds.append("prefill" if out.prefill else "decode")
        sched.update(out, [7] * len(out.seqs))
    assert kinds == ["decode", "decode", "decode", "prefill", "decode"]   # 3 x max_decode_streak 1


def test_no_overload_no_wait():
    # fewer waiting requests (1) than free slots (2): not overloaded, though 2 of 8 free is below
    # min_free 0.5; the plain streak rule admits the request
    sched = overloaded(6, 1, inlaid_overload_min_free=0.5)
    sched.num_decode_streak = 1
    assert ids(sched.schedule().prefill) == ["wait0"]


def test_overload_knobs_are_checked():
    with pytest.raises(ValueError, match="inlaid_overload_min_free"):
        SchedulerConfig(inlaid_overload_min_free=2.0)
    with pytest.raises(ValueError, match="inlaid_overload_streak_factor"):
        SchedulerConfig(inlaid_overload_streak_factor=0)
    cfg = EngineConfig.from_env({"ENGINE_INLAID_OVERLOAD_MIN_FREE": "0"}).scheduler_config()
    assert cfg.inlaid_overload_min_free == 0.0 and cfg.inlaid_overload_streak_factor == 4


def displacement_scene(ratio: float, long_predicted: int = 200, short_predicted: int = 4) -> InlaidScheduler:
    """Blocks of 4 tokens, two fewer than the short request needs beside the long one's reserve: a
    long request runs (8 prompt tokens + its predicted output reserved); a short one waits (8
    prompt tokens + its output: 3 blocks)."""
    blocks = min(20, -(-(8 + long_predicted) // 4) + 1)
    sched, _ = make_sched(num_blocks=blocks, block_size=4, max_num_seqs=4, inlaid_preempt_ratio=ratio)
    make_running(sched, make_seq("long", prompt=8, predicted=long_predicted), num_outputs=1)
    sched.add(make_seq("short", prompt=8, predicted=short_predicted))
    return sched


def test_displacement_preempts_a_long_runner_for_a_much_shorter_waiting_request():
    sched = displacement_scene(ratio=4.0)
    out = sched.schedule()
    assert ids(out.prefill) == ["short"] and ids(out.preempted) == ["long"]
    long = out.preempted[0]
    assert long.status is SequenceStatus.WAITING and long.num_preemptions == 1 and not long.block_table
    assert long not in out.decode and long in sched.waiting


@pytest.mark.parametrize("ratio, long_predicted", [(0.0, 200), (4.0, 16), (50.0, 200)])
def test_no_displacement_when_off_or_not_much_longer(ratio, long_predicted):
    # off; 15 tokens left is not above 4 x 4; 199 is not above 50 x 4
    sched = displacement_scene(ratio, long_predicted)
    out = sched.schedule()
    assert not out.prefill and not out.preempted and ids(out.decode) == ["long"]


def test_a_request_is_displaced_at_most_once_and_never_when_hungry():
    sched = displacement_scene(ratio=4.0)
    long = sched.running[0]
    long.sched_state["displaced"] = True
    assert not sched.schedule().preempted
    sched = displacement_scene(ratio=4.0)
    sched.running[0].sched_state["last_service_s"] = -sched.config.starvation_limit_s - 1
    assert not sched.schedule().preempted


def test_displacement_runs_a_random_workload_to_completion():
    """Long and short requests arriving over time on a tight cache: every one finishes, KV is all
    returned, and each request is displaced at most once."""
    rng = random.Random(3)
    sched, clock = make_sched(num_blocks=40, block_size=4, max_num_seqs=6, inlaid_preempt_ratio=2.0,
                              max_decode_streak=2, starvation_limit_s=1e9)
    pending, targets = [], {}
    for i in range(40):
        length = rng.choice([2, 5, 40])
        pending.append(make_seq(f"r{i}", prompt=rng.randint(2, 10), predicted=length, task=f"t{i % 3}",
                                arrival_s=i * 0.02))
        targets[f"r{i}"] = length
    seqs, finished = list(pending), 0
    for _ in range(5000):
        while pending and pending[0].arrival_s <= clock.now_s:
            sched.add(pending.pop(0))
        if not (pending or sched.has_unfinished):
            break
        for seq in step(sched, clock).seqs:
            if seq.num_output_tokens >= targets[seq.request_id]:
                sched.finish(seq)
                finished += 1
    assert finished == 40 and sched.block_manager.num_free_blocks == 40
    assert sum(s.sched_state.get("displaced", False) for s in seqs) >= 1    # displacement happened
    assert all(s.num_preemptions <= 1 for s in seqs if s.sched_state.get("displaced"))


def test_preempt_ratio_is_checked():
    for bad in (-1.0, 0.5):
        with pytest.raises(ValueError, match="inlaid_preempt_ratio"):
            SchedulerConfig(inlaid_preempt_ratio=bad)
    cfg = EngineConfig.from_env({"ENGINE_INLAID_PREEMPT_RATIO": "4"}).scheduler_config()
    assert cfg.inlaid_preempt_ratio == 4.0


def run_timed(sched: InlaidScheduler, clock: Clock, seqs: list[Sequence], step_s, lengths: dict,
              max_steps: int = 20000) -> list[int]:
    """Drive sched over seqs (added at their arrival) with each step taking step_s(rows) seconds, finishing
    a request at its lengths[rid] tokens; the running pool's size at every decode-only step."""
    pending, sizes = sorted(seqs, key=lambda s: s.arrival_s), []
    for _ in range(max_steps):
        while pending and pending[0].arrival_s <= clock.now_s:
            sched.add(pending.pop(0))
        if not (pending or sched.has_unfinished):
            return sizes
        if not sched.has_unfinished:
            clock.now_s = pending[0].arrival_s
            continue
        out = sched.schedule()
        if out.decode and not out.prefill:
            sizes.append(len(sched.running))
        clock.now_s += step_s(len(out.seqs))
        sched.update(out, [7] * len(out.seqs))
        for seq in out.seqs:
            if seq.num_output_tokens >= lengths[seq.request_id]:
                sched.finish(seq)
    raise AssertionError("the workload did not finish")


def test_step_time_ratio_caps_the_running_pool_to_the_latency_target():
    """inlaid_step_time_ratio = 3 with steps of 1 ms + 0.25 ms per row: the first, lone request's decode
    steps (1.25 ms) set the reference, so a decode step should stay within 3.75 ms, 11 rows; under
    overload (200 requests arriving every 0.2 ms) the pool settles there (off: it fills max_num_seqs),
    and every request finishes. The cap bounds admission: requests already running are not preempted."""
    def workload() -> tuple[list[Sequence], dict]:
        seqs = [make_seq("first", predicted=20, arrival_s=0.0)]
        seqs += [make_seq(f"r{i}", predicted=30, task=f"t{i % 4}", arrival_s=0.05 + 2e-4 * i) for i in range(200)]
        return seqs, {s.request_id: s.predicted_output_tokens for s in seqs}

    sizes = {}
    for ratio in (0.0, 3.0):
        sched, clock = make_sched(max_num_seqs=64, inlaid_step_time_ratio=ratio, max_decode_streak=2,
                                  starvation_limit_s=1e9)
        seqs, lengths = workload()
        sizes[ratio] = run_timed(sched, clock, seqs, lambda rows: 1e-3 + 0.25e-3 * rows, lengths)
        assert all(s.status is SequenceStatus.FINISHED for s in seqs)
        assert sched.block_manager.num_free_blocks == 1000
    assert max(sizes[0.0]) == 64
    capped = sizes[3.0][len(sizes[3.0]) // 4:]      # past the first decrease
    assert 8 <= max(capped) <= 12, max(capped)
    assert sched.running_limit() <= 12


def test_step_time_ratio_never_caps_below_eight_and_is_checked():
    """A target no step can meet (every decode step far slower than the first) holds the cap at 8, not
    lower; a ratio in (0, 1) or below 0 is a config error; the engine reads ENGINE_INLAID_STEP_TIME_RATIO."""
    sched, clock = make_sched(max_num_seqs=64, inlaid_step_time_ratio=1.0, max_decode_streak=2,
                              starvation_limit_s=1e9)
    seqs = [make_seq("first", predicted=5)] + [make_seq(f"r{i}", predicted=20, arrival_s=0.01 + 1e-3 * i)
                                               for i in range(60)]
    lengths = {s.request_id: s.predicted_output_tokens for s in seqs}
    sizes = run_timed(sched, clock, seqs, lambda rows: 1e-3 * rows, lengths)
    assert min(sizes[len(sizes) // 2:]) >= 1 and max(sizes[len(sizes) // 4:]) <= 8
    assert sched.running_limit() == 8
    small, small_clock = make_sched(max_num_seqs=4, inlaid_step_time_ratio=1.0, max_decode_streak=2)
    seqs = [make_seq("first", predicted=5)] + [make_seq(f"s{i}", predicted=20, arrival_s=0.01) for i in range(10)]
    sizes = run_timed(small, small_clock, seqs, lambda rows: 1e-3 * rows, {s.request_id: 20 for s in seqs})
    assert max(sizes) <= 4 and small.running_limit() == 4      # the floor never lifts max_num_seqs
    for bad in (-1.0, 0.5):
        with pytest.raises(ValueError, match="inlaid_step_time_ratio"):
            SchedulerConfig(inlaid_step_time_ratio=bad)
    cfg = EngineConfig.from_env({"ENGINE_INLAID_STEP_TIME_RATIO": "2.5"}).scheduler_config()
    assert cfg.inlaid_step_time_ratio == 2.5


def test_slo_scale_ranks_late_requests_after_those_that_can_still_meet_their_deadline():
    """inlaid_slo_scale = 5 with 1 ms decode steps (the pace): at t = 1 s "late" (arrived at 0, 10 tokens
    predicted: deadline 50 ms) ranks after "fresh" (arrived at 0.99 s, 40 tokens: deadline 1.19 s, finishing
    at 1.04 s) although SRTF alone puts it first; a hungry late request still goes first; off, or before
    any decode-only step was timed, SRTF order holds."""
    def scenario(**cfg) -> tuple[InlaidScheduler, Clock]:
        sched, clock = make_sched(max_num_seqs=2, max_decode_streak=1, **cfg)
        sched.add(make_seq("warm", predicted=1))
        step(sched, clock, 1e-3)          # prefill
        step(sched, clock, 1e-3)          # a 1 ms decode-only step: the pace
        clock.now_s = 1.0
        sched.add(make_seq("late", predicted=10, arrival_s=0.0))
        sched.add(make_seq("fresh", predicted=40, arrival_s=0.99))
        return sched, clock

    sched, _ = scenario(inlaid_slo_scale=5.0, starvation_limit_s=1e9)
    assert sched.is_late(sched.waiting[0], 10, 1.0) and not sched.is_late(sched.waiting[1], 40, 1.0)
    assert ids(sched.schedule().prefill)[0] == "fresh"
    sched, _ = scenario(inlaid_slo_scale=0.0, starvation_limit_s=1e9)
    assert ids(sched.schedule().prefill)[0] == "late"
    sched, _ = scenario(inlaid_slo_scale=5.0, starvation_limit_s=0.5)   # "late" waited 1 s: hungry
    assert ids(sched.schedule().prefill)[0] == "late"
    cold, clock = make_sched(max_num_seqs=1, inlaid_slo_scale=5.0, starvation_limit_s=1e9)
    clock.now_s = 1.0
    cold.add(make_seq("late", predicted=10, arrival_s=0.0))
    cold.add(make_seq("fresh", predicted=40, arrival_s=0.99))
    assert ids(cold.schedule().prefill) == ["late"]                     # no pace measured yet
    for bad in (-1.0, 0.5):
        with pytest.raises(ValueError, match="inlaid_slo_scale"):
            SchedulerConfig(inlaid_slo_scale=bad)
    assert EngineConfig.from_env({"ENGINE_INLAID_SLO_SCALE": "5"}).scheduler_config().inlaid_slo_scale == 5.0


def test_a_request_that_would_miss_its_clients_deadline_waits_while_other_work_runs():
    """seq.deadline_s (the client's gRPC deadline, where the gateway cancels): after a 2 ms decode-only
    step (the current pace), "doomed" (10 tokens, deadline 15 ms away) is not admitted even with free
    slots while "ok" or "warm" runs; with a reachable deadline it is; with nothing else to run it runs (its
    prediction may be long); a hungry one goes first whatever its deadline."""
    def scenario(deadline_s: float, warm_runs: bool = True, ok: bool = True, **cfg) -> InlaidScheduler:
        sched, clock = make_sched(max_num_seqs=8, max_decode_streak=1, **cfg)
        sched.add(make_seq("warm", predicted=1))
        step(sched, clock, 1e-3)          # prefill
        step(sched, clock, 2e-3)          # a 2 ms decode-only step: the pace
        if not warm_runs:
            sched.finish(sched.running[0])
        clock.now_s = 1.0
        sched.add(make_seq("doomed", predicted=10, arrival_s=0.9))
        if ok:
            sched.add(make_seq("ok", predicted=40, arrival_s=0.99))
        sched.waiting[0].deadline_s = deadline_s
        return sched

    sched = scenario(1.015, starvation_limit_s=1e9)
    assert sched.misses_deadline(sched.waiting[0], 10, 1.0)
    assert ids(sched.schedule().prefill) == ["ok"] and ids(sched.waiting) == ["doomed"]
    sched = scenario(1.5, starvation_limit_s=1e9)                    # 10 tokens at 2 ms: in time
    assert ids(sched.schedule().prefill) == ["doomed", "ok"]
    sched = scenario(1.015, ok=False, starvation_limit_s=1e9)        # "warm" still runs: held
    assert ids(sched.schedule().prefill) == [] and ids(sched.waiting) == ["doomed"]
    sched = scenario(1.015, warm_runs=False, ok=False, starvation_limit_s=1e9)   # else idle: it runs
    assert ids(sched.schedule().prefill) == ["doomed"]
    sched = scenario(1.015, starvation_limit_s=0.05)                 # waited 0.1 s: hungry
    assert ids(sched.schedule().prefill)[0] == "doomed"
