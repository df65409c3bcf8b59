"""Scheduler interface: each step picks which sequences the runner computes (no torch).

A policy decides *order* and *admission*; the engine loop is always
`out = scheduler.schedule(); tokens = runner.run(out.seqs); scheduler.update(out, tokens)`.
"""
from __future__ import annotations

import abc
import time
from dataclasses import dataclass, field

from services.engine.block_manager import BlockManager
from services.engine.sequence import Sequence, SequenceStatus

# inlaid: how tasks are ranked for the β decode slots (see InlaidScheduler._decode).
INLAID_DECODE_TASK_RANKS = ("srtf", "srtf_per_seq")


@dataclass(frozen=True)
class SchedulerConfig:
    """Knobs shared by every policy."""

    max_num_seqs: int = 64                 # running sequences at once
    max_num_batched_tokens: int = 4096     # tokens computed in one step (prefill budget)
    max_adapters_per_batch: int = 10       # β: distinct tasks in one step; 0 = unlimited
    max_decode_streak: int = 8             # decode steps before new prefills are considered
    starvation_limit_s: float = 30.0       # a request waiting longer than this jumps the queue
    # Policy-specific knobs (each policy reads only its own).
    mlfq_num_levels: int = 6               # FastServe MLFQ: number of priority levels
    mlfq_base_quantum: int = 8             # tokens a job may generate at level 0; doubles per level
    mlfq_prefill_tokens_per_quantum: int = 256  # prompt tokens costing one quantum unit (skip-join)
    wfq_prefill_token_weight: float = 0.5  # WFQ service charged per prompt token (decode token = 1)
    inlaid_task_switch_tokens: int = 32    # inlaid: a task new to the batch must be this much shorter
    # inlaid: while the running pool holds >= β tasks, prefill waits this many times
    # max_decode_streak decode steps (1 = the plain streak rule)
    inlaid_full_batch_streak_factor: int = 2
    # inlaid: decode slot rank of a task: "srtf" = its shortest remaining (+ switch penalty);
    # "srtf_per_seq" = that divided by its running sequences (tokens per sequence a slot advances)
    inlaid_decode_task_rank: str = "srtf"
    # inlaid: work-conserving β. 0 = strict cap. f > 0: while the sequences of the β chosen tasks
    # would fill fewer than f × max_num_seqs batch slots, the next tasks in rank order join too
    # (the cap then only binds when the batch is full enough to be worth protecting). 1.0 (the
    # default): the cap never leaves a batch slot empty. An H100 run (e403c5f, serve_gpu.md) had
    # β = ∞ ahead of fill 0.75 on every metric at 1.6 C; simulated on its cost model
    # (sim_beta_fill.md, 3 seeds) fill 1.0 matches or beats 0.75 at every rate and at 2 to 1000 tasks.
    inlaid_beta_fill: float = 1.0
    # inlaid, under overload (at least as many waiting requests as free batch slots): prefill waits
    # until this fraction of max_num_seqs slots is free, for at most inlaid_overload_streak_factor x
    # max_decode_streak decode steps. A prefill step costs a fixed overhead (on a GPU it runs
    # eagerly, not as a CUDA graph), so under overload fewer and larger ones leave more time for
    # decoding; below saturation the rule never triggers. 0 = off.
    inlaid_overload_min_free: float = 0.25
    inlaid_overload_streak_factor: int = 4
    # inlaid and wfq: admission reserves KV blocks for the prompt plus this fraction of the predicted
    # output, after the running requests' own reserved shares (1.0: the whole prediction; 0: the prompt
    # and one token, as fifo). A running request that outgrows its share takes free blocks as it
    # goes, and on a shortage the one with the most predicted work left is preempted.
    admission_reserve_fraction: float = 1.0
    # inlaid: shortest-remaining-first across the running pool too. When the KV reserve leaves no
    # room for the next waiting request, the running request with the most predicted tokens left is
    # preempted (recomputed later) if it has more than this many times the waiting one's predicted
    # output left; a request is displaced this way at most once, a hungry one never. 0 = off.
    inlaid_preempt_ratio: float = 0.0
    # inlaid: a latency target for the running pool. r > 0: the number of running requests is capped
    # so a decode-only step takes at most r times the fastest decode-only step seen (the per-token
    # time of a request served nearly alone). The cap adapts by measured step times: a slower step
    # scales it down in proportion (to no fewer than 8 requests), a step within the target raises it
    # by one, up to max_num_seqs. Trades throughput for latency under overload; 0 = off.
    inlaid_step_time_ratio: float = 0.0
    # inlaid: deadline-aware admission. k > 0: a waiting request that can no longer finish within k times
    # its latency served alone (predicted output x the fastest decode-only step seen) ranks after every
    # waiting request that still can, so under overload the slots go to requests that can still meet
    # that SLO; the late ones keep SRTF order among themselves and the starvation guard still bounds
    # their wait. 0 = off (a client's own deadline, Sequence.deadline_s, counts either way: a request
    # that would miss it is held back while other work can run, InlaidScheduler.misses_deadline).
    inlaid_slo_scale: float = 0.0
    # inlaid and wfq: a prefill step also decodes the running pool (see StreakScheduler). False:
    # prefill-only steps that stall the running requests.
    piggyback_decode: bool = True
    # Adapters the device holds at once (EngineConfig.max_adapters); bounds what the fill rule may
    # add beyond β. 0 = no bound (simulations without a slot pool).
    max_adapter_slots: int = 0

    def __post_init__(self) -> None:
        if self.max_num_seqs <= 0 or self.max_num_batched_tokens <= 0:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be > 0")
        if self.max_adapters_per_batch < 0:
            raise ValueError("max_adapters_per_batch must be >= 0 (0 = unlimited)")
        if self.mlfq_num_levels <= 0 or self.mlfq_base_quantum <= 0 or self.mlfq_prefill_tokens_per_quantum <= 0:
            raise ValueError("mlfq_num_levels, mlfq_base_quantum, mlfq_prefill_tokens_per_quantum must be > 0")
        if self.inlaid_task_switch_tokens < 0:
            raise ValueError("inlaid_task_switch_tokens must be >= 0")
        if self.inlaid_full_batch_streak_factor < 1:
            raise ValueError("inlaid_full_batch_streak_factor must be >= 1 (1 = the plain streak rule)")
        if self.inlaid_decode_task_rank not in INLAID_DECODE_TASK_RANKS:
            raise ValueError(f"inlaid_decode_task_rank must be one of {INLAID_DECODE_TASK_RANKS}, "
                             f"got {self.inlaid_decode_task_rank!r}")
        if not 0.0 <= self.inlaid_beta_fill <= 1.0:
            raise ValueError(f"inlaid_beta_fill must be in [0, 1], got {self.inlaid_beta_fill}")
        if not 0.0 <= self.admission_reserve_fraction <= 1.0:
            raise ValueError(f"admission_reserve_fraction must be in [0, 1], got {self.admission_reserve_fraction}")
        if not 0.0 <= self.inlaid_overload_min_free <= 1.0:
            raise ValueError(f"inlaid_overload_min_free must be in [0, 1], got {self.inlaid_overload_min_free}")
        for name in ("inlaid_preempt_ratio", "inlaid_step_time_ratio", "inlaid_slo_scale"):   # ratios: off or >= 1
            value = getattr(self, name)
            if value < 0 or 0 < value < 1:
                raise ValueError(f"{name} must be 0 (off) or >= 1, got {value}")
        if self.inlaid_overload_streak_factor < 1:
            raise ValueError("inlaid_overload_streak_factor must be >= 1")
        if self.wfq_prefill_token_weight < 0:
            raise ValueError("wfq_prefill_token_weight must be >= 0")


@dataclass
class SchedulerOutput:
    """What to compute this step: prefill sequences first, then decode sequences."""

    prefill: list[Sequence] = field(default_factory=list)
    decode: list[Sequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def seqs(self) -> list[Sequence]:
        return self.prefill + self.decode

    @property
    def is_empty(self) -> bool:
        return not self.prefill and not self.decode

    @property
    def num_adapters(self) -> int:
        return len({s.task for s in self.seqs})


class Scheduler(abc.ABC):
    """Base of all policies: owns waiting/running pools and the block manager.

    Subclasses implement `schedule()`. `update()` applies the runner's sampled
    tokens; stop conditions (EOS, stop strings, max_tokens) are decided by the
    engine, which calls `finish()`.
    """

    name = "base"

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager,
                 clock=time.monotonic) -> None:
        self.config = config
        self.block_manager = block_manager
        self.clock = clock
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.last_step_tasks: set[str] = set()

    # ---- pool management -------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def abort(self, request_id: str) -> Sequence | None:
        for pool in (self.waiting, self.running):
            for seq in pool:
                if seq.request_id == request_id:
                    pool.remove(seq)
                    self.block_manager.free(seq)
                    seq.status = SequenceStatus.FINISHED
                    return seq
        return None

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finished_s = self.clock()

    def preempt(self, seq: Sequence) -> None:
        """Drop seq's KV (recompute later): it returns to waiting with its output so far."""
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def running_limit(self) -> int:
        """Requests that may run at once now (max_num_seqs; a policy may hold it lower)."""
        return self.config.max_num_seqs

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def upcoming_tasks(self, limit: int) -> list[str]:
        """Up to `limit` distinct tasks of waiting requests, in the order they are likely admitted
        (here: queue order; policies with another order override). The engine prefetches their
        adapters' host packs."""
        return distinct_tasks(self.waiting, limit)

    # ---- the step --------------------------------------------------------
    @abc.abstractmethod
    def schedule(self) -> SchedulerOutput:
        """Pick this step's prefill and decode sequences, allocating their KV blocks."""

    def update(self, out: SchedulerOutput, token_ids: list[int]) -> None:
        """Record one sampled token per scheduled sequence (order of out.seqs)."""
        now = self.clock()
        for seq, tok in zip(out.seqs, token_ids, strict=True):
            seq.num_cached_tokens = seq.num_tokens
            seq.output_token_ids.append(tok)
            if seq.first_token_s is None:
                seq.first_token_s = now
        self.last_step_tasks = {s.task for s in out.seqs}


def distinct_tasks(seqs, limit: int) -> list[str]:
    tasks: list[str] = []
    for seq in seqs:
        if len(tasks) >= limit:
            break
        if seq.task and seq.task not in tasks:
            tasks.append(seq.task)
    return tasks
