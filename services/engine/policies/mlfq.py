"""FastServe's skip-join multi-level feedback queue (MLFQ) as a baseline policy."""
from __future__ import annotations

import heapq
import math
import time

from services.engine.block_manager import BlockManager
from services.engine.policies.batching import secure_decode_slots, start_running
from services.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from services.engine.sequence import Sequence, SequenceStatus


class MLFQScheduler(Scheduler):
    """Skip-join MLFQ (Wu et al., FastServe), preemptive at token granularity.

    Level i has quantum `mlfq_base_quantum · 2^i` generated tokens. A new job
    skips the levels whose quantum is shorter than its first iteration (its
    prefill, measured in quantum units of `mlfq_prefill_tokens_per_quantum`
    prompt tokens), so long prompts do not block short ones at level 0. A job
    that uses up its quantum is demoted one level; a job not served for
    `starvation_limit_s` is promoted to level 0. Each step serves the
    highest-priority jobs (level, then arrival) that fit, prefill and decode in
    one batch; a waiting job may take the running slot of a job of a strictly
    lower level (see `_make_room` for why not its KV blocks). Output-length
    predictions are not used.
    """

    name = "mlfq"

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager,
                 clock=time.monotonic) -> None:
        super().__init__(config, block_manager, clock)
        self._is_waiting_sorted = True
        self._last_promotion_scan_s = -math.inf

    # ---- levels --------------------------------------------------------------
    def quantum(self, level: int) -> int:
        return self.config.mlfq_base_quantum << level

    def initial_level(self, seq: Sequence) -> int:
        cost = seq.num_prompt_tokens / self.config.mlfq_prefill_tokens_per_quantum
        level = 0 if cost <= 1 else math.ceil(math.log2(cost))
        return min(level, self.config.mlfq_num_levels - 1)

    @staticmethod
    def priority(seq: Sequence) -> tuple[int, int]:
        return seq.sched_state["level"], seq.seq_no

    # ---- pool management -------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        super().add(seq)
        state = seq.sched_state
        if "level" not in state:
            state["level"] = self.initial_level(seq)
            state["level_tokens"] = 0
            state["last_service_s"] = seq.arrival_s
        self._is_waiting_sorted = False

    def preempt(self, seq: Sequence) -> None:
        super().preempt(seq)
        self._is_waiting_sorted = False

    def _promote_starved(self, now_s: float) -> None:
        # A full scan per step would dominate at thousands of waiting jobs; a
        # tenth of the limit keeps the starvation bound within 10 %.
        limit = self.config.starvation_limit_s
        if now_s - self._last_promotion_scan_s < limit / 10:
            return
        self._last_promotion_scan_s = now_s
        for seq in (*self.waiting, *self.running):
            state = seq.sched_state
            if state["level"] > 0 and now_s - state["last_service_s"] > limit:
                state["level"] = 0
                state["level_tokens"] = 0
                self._is_waiting_sorted = False

    # ---- the step ------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        now = self.clock()
        self._promote_starved(now)
        if not self._is_waiting_sorted:
            self.waiting.sort(key=self.priority)
            self._is_waiting_sorted = True
        cfg = self.config
        bm = self.block_manager
        beta = cfg.max_adapters_per_batch
        running = sorted(self.running, key=self.priority)
        tasks: set[str] = set()     # adapters in this batch (the base model "" takes none)
        decode: list[Sequence] = []
        prefill: list[Sequence] = []
        preempted: list[Sequence] = []
        num_prefill_tokens = 0
        is_admitting = True
        walked: set[int] = set()
        preempted_ids: set[int] = set()

        def can_take(seq: Sequence) -> bool:
            return (len(decode) + len(prefill) < cfg.max_num_seqs
                    and (not beta or not seq.task or seq.task in tasks or len(tasks) < beta))

        # Copy of waiting: _make_room's preemptions append to it while we walk.
        for seq in heapq.merge(running, self.waiting[:], key=self.priority):
            if len(decode) + len(prefill) >= cfg.max_num_seqs:
                break
            if id(seq) in preempted_ids:
                continue
            if seq.status is SequenceStatus.RUNNING:
                walked.add(id(seq))
                if can_take(seq):
                    decode.append(seq)
                    if seq.task:
                        tasks.add(seq.task)
                continue
            if not can_take(seq):
                continue
            # The step's rows are its prefill tokens plus one per decode (at most every running job).
            if prefill and num_prefill_tokens + seq.num_tokens + len(running) > cfg.max_num_batched_tokens:
                is_admitting = False
            elif not self._make_room(seq, running, decode, len(prefill), preempted):
                is_admitting = False
            if not is_admitting:
                break            # strict priority: no lower job jumps a blocked one
            preempted_ids.update(id(s) for s in preempted)
            bm.allocate(seq)
            prefill.append(seq)
            if seq.task:
                tasks.add(seq.task)
            num_prefill_tokens += seq.num_tokens
        if not is_admitting:     # the running jobs behind the blocked one still decode
            for seq in running:
                if (id(seq) not in walked and seq.status is SequenceStatus.RUNNING
                        and can_take(seq)):
                    decode.append(seq)
                    if seq.task:
                        tasks.add(seq.task)
        start_running(self, prefill, now)
        decode, more_preempted = secure_decode_slots(
            self, decode, victim_key=self.priority, protected=prefill)
        preempted.extend(more_preempted)
        return SchedulerOutput(prefill=prefill, decode=decode, preempted=preempted)

    def _make_room(self, seq: Sequence, running: list[Sequence], selected: list[Sequence],
                   num_prefilled: int, preempted: list[Sequence]) -> bool:
        """Whether seq can start now; frees a running slot by preempting a strictly lower-level job.

        FastServe swaps a preempted job's KV to host memory; this engine can
        only drop and recompute it, which under memory pressure thrashes (long
        jobs are recomputed again and again and never finish). So a job may
        take a lower job's *slot* but never its KV blocks: when blocks are
        short, admission waits for running jobs to finish.
        """
        bm = self.block_manager
        # len(selected): at most one new block per decoding job this step.
        if bm.blocks_needed(seq.num_tokens) + len(selected) > bm.num_free_blocks:
            return not self.running and num_prefilled == 0 and \
                bm.blocks_needed(seq.num_tokens) <= bm.num_free_blocks
        level = seq.sched_state["level"]
        while len(self.running) + num_prefilled >= self.config.max_num_seqs:
            victims = [s for s in running if s.status is SequenceStatus.RUNNING
                       and s not in selected and s.sched_state["level"] > level]
            if not victims:
                return False
            victim = max(victims, key=self.priority)
            self.preempt(victim)
            preempted.append(victim)
        return True

    def update(self, out: SchedulerOutput, token_ids: list[int]) -> None:
        super().update(out, token_ids)
        now = self.clock()
        last_level = self.config.mlfq_num_levels - 1
        for seq in out.seqs:
            state = seq.sched_state
            state["last_service_s"] = now
            state["level_tokens"] += 1
            if state["level_tokens"] >= self.quantum(state["level"]) and state["level"] < last_level:
                state["level"] += 1
                state["level_tokens"] = 0
