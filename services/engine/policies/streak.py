"""StreakScheduler: the step rule shared by the inlaid and wfq policies (no torch)."""
from __future__ import annotations

import abc
import time

from services.engine.block_manager import BlockManager
from services.engine.policies.batching import reserved_blocks
from services.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from services.engine.sequence import Sequence


class StreakScheduler(Scheduler):
    """Each step is a prefill batch or a decode batch, chosen by the standard rule.

    Prefill is tried when nothing runs, or after `max_decode_streak` decode steps
    while slots and KV blocks are left; otherwise the running pool decodes.
    Subclasses decide the order inside `_prefill` and `_decode`. Every scheduled
    sequence's `last_service_s` is stamped, which the starvation guards read.
    """

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager,
                 clock=time.monotonic) -> None:
        super().__init__(config, block_manager, clock)
        self.num_decode_streak = 0

    @abc.abstractmethod
    def _prefill(self, now_s: float) -> list[Sequence]:
        """Admit waiting sequences (allocating their blocks); [] when none fits."""

    @abc.abstractmethod
    def _decode(self, now_s: float) -> tuple[list[Sequence], list[Sequence]]:
        """(sequences to decode this step, sequences preempted to make room)."""

    def schedule(self) -> SchedulerOutput:
        now = self.clock()
        if self.waiting and self._should_prefill():
            admitted = self._prefill(now)
            # Reset even when nothing fitted: the next attempt (a full sort of the
            # waiting pool) comes after another streak, not on every step.
            self.num_decode_streak = 0
            if admitted:
                return SchedulerOutput(prefill=admitted)
        if not self.running:
            return SchedulerOutput()
        decode, preempted = self._decode(now)
        self.num_decode_streak += 1
        return SchedulerOutput(decode=decode, preempted=preempted)

    def update(self, out: SchedulerOutput, token_ids: list[int]) -> None:
        super().update(out, token_ids)
        now = self.clock()
        for seq in out.seqs:
            seq.sched_state["last_service_s"] = now

    def _should_prefill(self) -> bool:
        if not self.running:
            return True
        if len(self.running) >= self.config.max_num_seqs:
            return False
        if self.num_decode_streak < self.config.max_decode_streak:
            return False
        # Nothing can be admitted while the running requests' predicted needs take
        # every free block; skipping the attempt saves sorting the waiting pool.
        return self.block_manager.num_free_blocks > reserved_blocks(self.block_manager, self.running)
