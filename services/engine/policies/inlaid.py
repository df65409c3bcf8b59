"""Inlaid policy: SRTF on predicted remaining tokens, at most β tasks per batch, starvation guard."""
from __future__ import annotations

import time

from services.engine.block_manager import BlockManager
from services.engine.policies.batching import (
    admit_prefills,
    choose_tasks,
    group_by_task,
    secure_decode_slots,
    start_running,
)
from services.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from services.engine.sequence import Sequence


class InlaidScheduler(Scheduler):
    """LoRA-Inlaid's multi-task scheduler.

    Each step is one of the paper's three choices: a prefill batch from the
    waiting pool, or a decode batch from the running pool (continuing the
    previous decode batch when its tasks are still there). Prefill is
    considered when nothing runs or after `max_decode_streak` decode steps
    (bounding how long a new request waits for its first chance). Within a batch:

    * order is shortest predicted remaining output first (SRTF); the key is
      refreshed every step as tokens are generated;
    * at most β = `max_adapters_per_batch` distinct tasks, tasks of the
      previous step first (their adapters are already in the batch);
    * a request is hungry — it goes ahead of SRTF and of the task preference —
      when it has not been served for `starvation_limit_s` or has outrun its
      predicted length;
    * admission reserves KV blocks for prompt + predicted output, and on KV
      exhaustion the running request with the most predicted remaining work is
      preempted (recomputed later).
    """

    name = "inlaid"

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager,
                 clock=time.monotonic) -> None:
        super().__init__(config, block_manager, clock)
        self.num_decode_streak = 0

    def add(self, seq: Sequence) -> None:
        super().add(seq)
        seq.sched_state.setdefault("last_service_s", seq.arrival_s)

    def is_hungry(self, seq: Sequence, now_s: float) -> bool:
        predicted = seq.predicted_output_tokens
        if predicted is not None and seq.num_output_tokens > predicted:
            return True
        last = seq.sched_state.get("last_service_s", seq.arrival_s)
        return now_s - last > self.config.starvation_limit_s

    # ---- the step ----------------------------------------------------------
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

    # ---- choices -----------------------------------------------------------
    def _should_prefill(self) -> bool:
        if not self.running:
            return True
        if len(self.running) >= self.config.max_num_seqs:
            return False
        return self.num_decode_streak >= self.config.max_decode_streak

    def _prefill(self, now_s: float) -> list[Sequence]:
        hungry = {id(s) for s in self.waiting if self.is_hungry(s, now_s)}
        ordered = sorted(self.waiting, key=lambda s: (id(s) not in hungry,
                                                       s.predicted_remaining_tokens, s.seq_no))
        allowed = None
        if self.config.max_adapters_per_batch:
            groups = group_by_task(self.running)
            for seq in ordered:
                groups.setdefault(seq.task, []).append(seq)
            allowed = choose_tasks(groups, self.config.max_adapters_per_batch,
                                   lambda t: self.task_key(t, groups[t], now_s))
        admitted = admit_prefills(self, ordered, allowed, reserve_predicted=True,
                                  is_urgent=lambda s: id(s) in hungry)
        start_running(self, admitted, now_s)
        return admitted

    def task_key(self, task: str, seqs: list[Sequence], now_s: float) -> tuple:
        """Rank of a task for one of the β slots: hungry first, then shortest remaining.

        A task outside the previous step pays `inlaid_task_switch_tokens` extra
        (a new adapter in the batch), so it displaces a task of the previous
        step only when its shortest request is that much shorter. Tasks of
        running requests that lose their slot keep their KV and wait; prefill
        and decode use the same ranking, so a short request of a new task can
        overtake long running ones (SRTF) without thrashing between tasks.
        """
        switch = 0 if task in self.last_step_tasks else self.config.inlaid_task_switch_tokens
        return (not any(self.is_hungry(s, now_s) for s in seqs),
                min(s.predicted_remaining_tokens for s in seqs) + switch)

    def _decode(self, now_s: float) -> tuple[list[Sequence], list[Sequence]]:
        candidates = self.running
        groups = group_by_task(self.running)

        def task_key(task: str) -> tuple:
            return self.task_key(task, groups[task], now_s)

        chosen = choose_tasks(groups, self.config.max_adapters_per_batch, task_key)
        if len(chosen) < len(groups):
            candidates = [s for s in self.running if s.task in chosen]
        if self.block_manager.num_free_blocks < len(candidates):
            # Memory is tight: shortest remaining get slots first; the longest are victims.
            candidates = sorted(candidates, key=lambda s: s.predicted_remaining_tokens)
        return secure_decode_slots(self, list(candidates),
                                   victim_key=lambda s: (s.predicted_remaining_tokens, s.seq_no))
