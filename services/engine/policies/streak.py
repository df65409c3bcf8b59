"""StreakScheduler: the step rule shared by the inlaid and wfq policies (no torch)."""
from __future__ import annotations

import abc
import time

from services.engine.block_manager import BlockManager
from services.engine.policies.batching import reserved_blocks
from services.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from services.engine.sequence import Sequence, SequenceStatus


class StreakScheduler(Scheduler):
    """Each step is a decode batch, or a prefill batch joined by a decode batch.

    Prefill is tried when nothing runs, or after `max_decode_streak` decode steps
    while slots and KV blocks are left; otherwise the running pool decodes. With
    `piggyback_decode` (the default) a prefill step also decodes the running
    pool, as a decode step would: a prefill step runs eagerly (no CUDA graph)
    and is compute-bound, so its decode rows cost little, and the running
    requests no longer stall for it. Without it the prefill step holds only
    prefills (the paper's separate prefill and decode choices).
    Subclasses decide the order inside `_prefill` and `_decode`. Every scheduled
    sequence's `last_service_s` is stamped, which the starvation guards read.
    """

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager,
                 clock=time.monotonic) -> None:
        super().__init__(config, block_manager, clock)
        self.num_decode_streak = 0

    @abc.abstractmethod
    def _prefill(self, now_s: float, decode_rows: int) -> tuple[list[Sequence], set[str] | None]:
        """Admit waiting sequences (allocating their blocks): (admitted, the step's tasks).

        The tasks are those the step may hold (None: any); a decode batch that
        joins the prefills keeps to them. `decode_rows` tokens of the step budget
        are kept for that decode batch (0: a prefill-only step)."""

    @abc.abstractmethod
    def _decode(self, now_s: float, among: list[Sequence] | None = None,
                allowed: set[str] | None = None,
                protected: list[Sequence] = ()) -> tuple[list[Sequence], list[Sequence]]:
        """(sequences to decode this step, sequences preempted to make room).

        Chosen from `among` (default: the running pool) whose task is in
        `allowed` (None: any); `protected` (this step's prefills) are never
        preempted."""

    def schedule(self) -> SchedulerOutput:
        now = self.clock()
        displaced: list[Sequence] = []
        if self.waiting and self._should_prefill():
            running = list(self.running)
            joining = running if self._can_piggyback() else []
            admitted, allowed = self._prefill(now, len(joining))
            # running requests _prefill preempted to make room (policies that do) leave the decode
            displaced = [s for s in running if s.status is SequenceStatus.WAITING]
            if displaced:
                joining = [s for s in joining if s.status is SequenceStatus.RUNNING]
            # Reset even when nothing fitted: the next attempt (a full sort of the
            # waiting pool) comes after another streak, not on every step.
            self.num_decode_streak = 0
            if admitted:
                decode, preempted = (self._decode(now, joining, allowed, admitted) if joining else ([], []))
                return SchedulerOutput(prefill=admitted, decode=decode, preempted=displaced + preempted)
        if not self.running:
            return SchedulerOutput(preempted=displaced)
        decode, preempted = self._decode(now)
        self.num_decode_streak += 1
        return SchedulerOutput(decode=decode, preempted=displaced + preempted)

    def decode_candidates(self, among: list[Sequence] | None, allowed: set[str] | None) -> list[Sequence]:
        """The sequences a decode chooses from: `among` (default: the running pool) whose task is
        in `allowed` (None: any)."""
        seqs = self.running if among is None else among
        return seqs if allowed is None else [s for s in seqs if s.task in allowed]

    def _can_piggyback(self) -> bool:
        """Whether this step's prefills join a decode of the running pool (`piggyback_decode`).

        Only when every waiting prompt fits beside a full decode batch in the
        token budget, so an over-long prompt still gets a prefill-only step and
        cannot be left out forever."""
        cfg = self.config
        if not (cfg.piggyback_decode and self.running):
            return False
        longest = max(s.num_tokens for s in self.waiting)
        return longest + len(self.running) <= cfg.max_num_batched_tokens

    def update(self, out: SchedulerOutput, token_ids: list[int]) -> None:
        super().update(out, token_ids)
        now = self.clock()
        for seq in out.seqs:
            seq.sched_state["last_service_s"] = now

    def _should_prefill(self) -> bool:
        if not self.running:
            return True
        if len(self.running) >= self.running_limit():
            return False
        if self.num_decode_streak < self.config.max_decode_streak:
            return False
        # Nothing can be admitted while the running requests' predicted needs take
        # every free block; skipping the attempt saves sorting the waiting pool.
        return self.block_manager.num_free_blocks > reserved_blocks(
            self.block_manager, self.running, self.config.admission_reserve_fraction)
