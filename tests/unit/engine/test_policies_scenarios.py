"""Every policy on the same hand-made scenarios: β cap, starvation bound, preemption on KV exhaustion."""
from __future__ import annotations

import pytest

from services.engine.block_manager import BlockManager
from services.engine.policies import POLICIES
from services.engine.scheduler import SchedulerConfig
from services.engine.sequence import SamplingParams, Sequence, SequenceStatus

STEP_S = 0.01


class Clock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


def make_sched(policy: str, num_blocks: int = 10_000, block_size: int = 4, **cfg):
    clock = Clock()
    cfg.setdefault("max_decode_streak", 2)
    sched = POLICIES[policy](SchedulerConfig(**cfg), BlockManager(num_blocks, block_size), clock=clock)
    return sched, clock


def make_seq(rid: str, task: str = "a", prompt: int = 4, predicted: int | None = 8,
             arrival_s: float = 0.0) -> Sequence:
    return Sequence(request_id=rid, prompt_token_ids=[1] * prompt, params=SamplingParams(max_tokens=1000),
                    task=task, predicted_output_tokens=predicted, arrival_s=arrival_s)


def step(sched, clock, lengths: dict[str, int]):
    """One step of a fake runner: every scheduled sequence gets a token; those at their length finish."""
    out = sched.schedule()
    bm = sched.block_manager
    for seq in out.seqs:   # the runner would write KV for every token: the blocks must hold them
        assert len(seq.block_table) * bm.block_size >= seq.num_tokens
    clock.now_s += STEP_S
    sched.update(out, [7] * len(out.seqs))
    for seq in out.seqs:
        if seq.num_output_tokens >= lengths[seq.request_id]:
            sched.finish(seq)
    return out


def drain(sched, clock, lengths: dict[str, int], max_steps: int = 5000) -> list:
    outs = []
    while sched.has_unfinished:
        assert len(outs) < max_steps, f"{sched.name}: not done after {max_steps} steps"
        outs.append(step(sched, clock, lengths))
    return outs


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_beta_caps_distinct_adapters_in_every_step(policy):
    # inlaid_beta_fill 0: the strict cap (the work-conserving default lets more tasks into an
    # underfilled batch; see test_policy_inlaid.py)
    sched, clock = make_sched(policy, max_adapters_per_batch=3, max_num_seqs=16, inlaid_beta_fill=0.0)
    seqs = [make_seq(f"t{t}-{i}", task=f"t{t}", predicted=4 + i) for t in range(8) for i in range(4)]
    seqs += [make_seq(f"base-{i}", task="", predicted=5) for i in range(3)]
    lengths = {s.request_id: 4 + (hash(s.request_id) % 3) for s in seqs}
    for seq in seqs:
        sched.add(seq)
    outs = drain(sched, clock, lengths)
    assert all(len({s.task for s in out.seqs if s.task}) <= 3 for out in outs)
    assert all(s.is_finished for s in seqs)
    # β leaves room for the base model: it is served alongside three adapters at some step.
    assert any("" in {s.task for s in out.seqs} and len({s.task for s in out.seqs}) == 4 for out in outs)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_long_request_is_not_starved_by_a_stream_of_short_ones(policy):
    limit_s = 0.2
    sched, clock = make_sched(policy, max_num_seqs=1, starvation_limit_s=limit_s)
    long = make_seq("long", predicted=500, prompt=4)
    sched.add(long)
    lengths = {"long": 5}
    # Short requests keep arriving, one per step: SRTF alone would never pick the long one.
    for i in range(200):
        short = make_seq(f"s{i}", predicted=1, arrival_s=clock.now_s)
        lengths[short.request_id] = 1
        sched.add(short)
        step(sched, clock, lengths)
        if long.first_scheduled_s is not None:
            break
    assert long.first_scheduled_s is not None, f"{policy}: long request never scheduled"
    assert long.first_scheduled_s <= limit_s + 0.1


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_kv_exhaustion_preempts_then_every_request_finishes(policy):
    # 6 blocks of 4 tokens; four requests of 4 prompt + 8 output tokens need 12 blocks at the end.
    # Predictions are short (1 token), so predicted-length admission lets them in and they outgrow it.
    sched, clock = make_sched(policy, num_blocks=6, block_size=4, max_num_seqs=4)
    seqs = [make_seq(f"r{i}", task=f"t{i % 2}", predicted=1) for i in range(4)]
    lengths = {s.request_id: 8 for s in seqs}
    for seq in seqs:
        sched.add(seq)
    outs = drain(sched, clock, lengths)
    assert sum(len(out.preempted) for out in outs) > 0
    assert all(s.is_finished and s.num_output_tokens == 8 for s in seqs)
    assert sched.block_manager.num_free_blocks == 6           # nothing leaked
    for out in outs:
        for victim in out.preempted:
            assert victim not in out.seqs                      # a victim is not also computed


def test_wfq_preempts_from_the_most_served_task():
    sched, clock = make_sched("wfq", num_blocks=3, block_size=4, max_num_seqs=4, wfq_prefill_token_weight=0.0)
    heavy = make_seq("heavy", task="h", predicted=1)
    sched.add(heavy)
    lengths = {"heavy": 50, "light": 50}
    for _ in range(3):                     # heavy alone: its task's tag grows
        step(sched, clock, lengths)
    light = make_seq("light", task="l", predicted=1, arrival_s=clock.now_s)
    sched.add(light)
    preempted = []
    for _ in range(12):
        preempted += [s.request_id for s in step(sched, clock, lengths).preempted]
    assert preempted and preempted[0] == "heavy"
    assert light.status is SequenceStatus.RUNNING


def test_mlfq_preempts_the_lowest_priority_job_when_blocks_run_out():
    sched, clock = make_sched("mlfq", num_blocks=4, block_size=4, max_num_seqs=4, mlfq_base_quantum=2,
                              mlfq_prefill_tokens_per_quantum=100)
    old = make_seq("old")
    sched.add(old)
    lengths = {"old": 50, "new": 50}
    for _ in range(4):                     # old uses up level 0's quantum: demoted
        step(sched, clock, lengths)
    assert old.sched_state["level"] >= 1
    new = make_seq("new", arrival_s=clock.now_s)
    sched.add(new)
    preempted = []
    for _ in range(12):
        preempted += [s.request_id for s in step(sched, clock, lengths).preempted]
    assert preempted and preempted[0] == "old"


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_step_tokens_stay_within_the_batched_token_budget(policy):
    # A step's rows are its prefill tokens plus one per decode; the GPU GEMMs are tuned per
    # power-of-two row bucket up to the budget, so a step over it (4076 prefill + 21 decodes
    # against 4096 in an H100 run) hits an untuned bucket and stalls the engine while it tunes.
    sched, clock = make_sched(policy, max_num_seqs=32, max_num_batched_tokens=100,
                              max_adapters_per_batch=0)
    seqs = [make_seq(f"r{i}", task=f"t{i % 4}", prompt=9, predicted=30, arrival_s=0.001 * i)
            for i in range(80)]
    lengths = {s.request_id: 30 for s in seqs}
    sizes = []
    schedule = sched.schedule

    def recorded():   # the rows of each step, counted before the step advances its sequences
        out = schedule()
        sizes.append(sum(s.num_new_tokens for s in out.seqs))
        return out

    sched.schedule = recorded
    for i, seq in enumerate(seqs):
        sched.add(seq)
        if i >= 20 and i % 4 == 0:     # prompts keep arriving while earlier requests decode
            step(sched, clock, lengths)
    drain(sched, clock, lengths)
    assert max(sizes) <= 100, f"{policy}: step of {max(sizes)} tokens"
    assert all(s.is_finished for s in seqs)


@pytest.mark.parametrize("policy", ["inlaid", "wfq"])
@pytest.mark.parametrize("piggyback", [True, False])
def test_prefill_step_decodes_the_running_pool_only_with_piggyback(policy, piggyback):
    sched, clock = make_sched(policy, max_adapters_per_batch=0, max_num_seqs=8, piggyback_decode=piggyback)
    first = [make_seq(f"r{i}", task="a", predicted=50) for i in range(2)]
    lengths = {s.request_id: 50 for s in first}
    for seq in first:
        sched.add(seq)
    assert step(sched, clock, lengths).prefill == first
    late = make_seq("late", task="b", predicted=50)
    lengths["late"] = 50
    sched.add(late)
    outs = [step(sched, clock, lengths) for _ in range(sched.config.max_decode_streak + 1)]
    mixed = [o for o in outs if o.prefill]
    assert len(mixed) == 1 and mixed[0].prefill == [late]
    # with piggybacking the running requests decode in the prefill step too, so none of them waits
    assert sorted(s.request_id for s in mixed[0].decode) == (["r0", "r1"] if piggyback else [])
    assert all(len(o.decode) == 2 for o in outs if not o.prefill)


def test_piggybacked_step_keeps_the_token_budget_and_lets_an_over_long_prompt_run_alone():
    sched, clock = make_sched("inlaid", max_adapters_per_batch=0, max_num_seqs=8, max_num_batched_tokens=64)
    running = [make_seq(f"r{i}", prompt=4, predicted=50) for i in range(3)]
    lengths = {s.request_id: 50 for s in running}
    for seq in running:
        sched.add(seq)
    step(sched, clock, lengths)
    # 62 prompt tokens + 3 decode rows exceed the 64-token budget: a prefill-only step takes it
    big = make_seq("big", prompt=62, predicted=50)
    lengths["big"] = 50
    sched.add(big)
    outs = [step(sched, clock, lengths) for _ in range(sched.config.max_decode_streak + 1)]
    mixed = [o for o in outs if o.prefill]
    assert len(mixed) == 1 and mixed[0].prefill == [big] and mixed[0].decode == []
    # a prompt that fits beside the decode rows joins them, and the step stays within the budget
    small = make_seq("small", prompt=20, predicted=50)
    lengths["small"] = 50
    sched.add(small)
    outs = [step(sched, clock, lengths) for _ in range(sched.config.max_decode_streak + 1)]
    mixed = [o for o in outs if o.prefill]
    assert len(mixed) == 1 and mixed[0].prefill == [small] and len(mixed[0].decode) == 4


@pytest.mark.parametrize("fraction,admitted", [(1.0, 2), (0.5, 4), (0.0, 8)])
def test_admission_reserves_the_configured_share_of_the_predicted_output(fraction, admitted):
    # 40 blocks of 4 tokens; 4-token prompts predicted to emit 60 more: 16, 9 or 2 blocks reserved each
    sched, clock = make_sched("inlaid", num_blocks=40, max_adapters_per_batch=0, max_num_seqs=8,
                              admission_reserve_fraction=fraction)
    seqs = [make_seq(f"r{i}", prompt=4, predicted=60) for i in range(8)]
    for seq in seqs:
        sched.add(seq)
    out = sched.schedule()
    assert len(out.prefill) == admitted


def test_admission_reserve_fraction_is_validated():
    with pytest.raises(ValueError, match="admission_reserve_fraction"):
        SchedulerConfig(admission_reserve_fraction=1.5)
