"""Weighted fair queueing across tasks: service in prompt + output tokens, scaled by task weight."""
from __future__ import annotations

import heapq
import time

from services.engine.block_manager import BlockManager
from services.engine.policies.batching import (
    admit_prefills,
    choose_tasks,
    group_by_task,
    secure_decode_slots,
    start_running,
)
from services.engine.policies.streak import StreakScheduler
from services.engine.scheduler import SchedulerConfig, SchedulerOutput
from services.engine.sequence import Sequence


class WFQScheduler(StreakScheduler):
    """Per-task weighted fair queueing (beyond the paper, which left fairness open).

    Every task carries a virtual finish tag: the service it has received,
    `wfq_prefill_token_weight · prompt tokens + output tokens`, divided by its
    weight (`Sequence.priority_weight`, the newest request's value). A task
    that becomes backlogged starts at the smallest tag among backlogged tasks,
    so idle time earns no credit. Prefill admits the waiting request of the
    task with the smallest tag (tags advance as requests are admitted, so one
    batch interleaves tasks); when more than β tasks run, decode serves the β
    tasks with the smallest tags. Within a task, shortest predicted remaining
    first. A heavy task thus only spends its own share and cannot starve the
    others; `starvation_limit_s` only reorders requests within a task.
    """

    name = "wfq"

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager,
                 clock=time.monotonic) -> None:
        super().__init__(config, block_manager, clock)
        self.task_tags: dict[str, float] = {}
        self.task_weights: dict[str, float] = {}
        self._num_active: dict[str, int] = {}   # waiting + running requests per task
        self._virtual_now = 0.0

    # ---- service accounting ---------------------------------------------------
    def _charge(self, task: str, service: float) -> None:
        self.task_tags[task] += service / self.task_weights[task]

    def _activate(self, seq: Sequence) -> None:
        task = seq.task
        if seq.priority_weight <= 0:
            raise ValueError(f"priority_weight must be > 0, got {seq.priority_weight} for {seq.request_id}")
        self.task_weights[task] = seq.priority_weight
        if self._num_active.get(task, 0) == 0:
            active = [self.task_tags[t] for t, n in self._num_active.items() if n > 0]
            if active:
                self._virtual_now = max(self._virtual_now, min(active))
            self.task_tags[task] = max(self.task_tags.get(task, 0.0), self._virtual_now)
        self._num_active[task] = self._num_active.get(task, 0) + 1

    def _deactivate(self, seq: Sequence) -> None:
        self._num_active[seq.task] -= 1

    def add(self, seq: Sequence) -> None:
        super().add(seq)
        self._activate(seq)
        seq.sched_state.setdefault("last_service_s", seq.arrival_s)

    def finish(self, seq: Sequence) -> None:
        if not seq.is_finished:
            self._deactivate(seq)
        super().finish(seq)

    def abort(self, request_id: str) -> Sequence | None:
        seq = super().abort(request_id)
        if seq is not None:
            self._deactivate(seq)
        return seq

    def _is_hungry(self, seq: Sequence, now_s: float) -> bool:
        return now_s - seq.sched_state["last_service_s"] > self.config.starvation_limit_s

    def update(self, out: SchedulerOutput, token_ids: list[int]) -> None:
        super().update(out, token_ids)
        for seq in out.seqs:     # every scheduled sequence produced one output token
            self._charge(seq.task, 1.0)

    def fair_order(self, now_s: float) -> list[Sequence]:
        """Waiting requests in the order WFQ would serve them, tags advancing per admission.

        Across tasks only tags count: a backlogged heavy task's old requests
        are all "hungry", and letting them jump ahead would undo the fairness
        (tags already bound every task's wait). Within a task, hungry first,
        then shortest predicted remaining.
        """
        groups = group_by_task(self.waiting)
        for seqs in groups.values():
            seqs.sort(key=lambda s: (not self._is_hungry(s, now_s), s.predicted_remaining_tokens, s.seq_no))
        heap = [(self.task_tags[t], t) for t in groups]
        heapq.heapify(heap)
        cursor = dict.fromkeys(groups, 0)
        ordered: list[Sequence] = []
        weight = self.config.wfq_prefill_token_weight
        while heap:
            tag, task = heapq.heappop(heap)
            seq = groups[task][cursor[task]]
            ordered.append(seq)
            cursor[task] += 1
            if cursor[task] < len(groups[task]):
                # Charge the prompt plus the predicted output: a task's next request
                # waits behind the service its previous one will take.
                service = weight * seq.num_tokens + seq.predicted_remaining_tokens
                heapq.heappush(heap, (tag + service / self.task_weights[task], task))
        return ordered

    def _prefill(self, now_s: float, decode_rows: int) -> tuple[list[Sequence], set[str] | None]:
        ordered = self.fair_order(now_s)
        allowed = None
        beta = self.config.max_adapters_per_batch
        if beta:
            allowed = {""}          # the base model takes no adapter slot
            for seq in ordered:     # the β tasks that come first in fair order
                if len(allowed) > beta:
                    break
                allowed.add(seq.task)
        admitted = admit_prefills(self, ordered, allowed, reserve_predicted=True,
                                  is_urgent=lambda s: True, decode_rows=decode_rows)
        weight = self.config.wfq_prefill_token_weight
        for seq in admitted:
            self._charge(seq.task, weight * seq.num_tokens)
        start_running(self, admitted, now_s)
        return admitted, allowed

    def _decode(self, now_s: float, among: list[Sequence] | None = None, allowed: set[str] | None = None,
                protected: list[Sequence] = ()) -> tuple[list[Sequence], list[Sequence]]:
        candidates = self.decode_candidates(among, allowed)
        groups = group_by_task(candidates)

        def task_key(task: str) -> tuple:
            return (self.task_tags[task],)

        chosen = choose_tasks(groups, self.config.max_adapters_per_batch, task_key)
        if len(chosen) < len(groups):
            candidates = [s for s in candidates if s.task in chosen]
        if self.block_manager.num_free_blocks < len(candidates):
            candidates = sorted(candidates, key=lambda s: (self.task_tags[s.task],
                                                          s.predicted_remaining_tokens))
        return secure_decode_slots(
            self, list(candidates),
            victim_key=lambda s: (self.task_tags[s.task], s.predicted_remaining_tokens, s.seq_no),
            protected=protected)
