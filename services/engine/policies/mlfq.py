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
    one batch. A waiting job of a higher level takes the batch row of a running
    one, which pauses: it keeps its KV blocks and resumes when it is again among
    the best `max_num_seqs` (FastServe keeps preempted jobs' KV too, swapping it
    to host memory only under pressure). So more jobs may hold KV than run in a
    step; KV memory bounds them (see `_has_blocks_for`). Output-length predictions
    are not used.
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
        num_prefill_tokens = 0
        is_admitting = True
        walked: set[int] = set()
        # The step's rows are its prefill tokens plus one per decode (at most every running job,
        # at most a full batch: paused jobs take no row).
        decode_rows = min(len(running), cfg.max_num_seqs)

        def can_take(seq: Sequence) -> bool:
            return (len(decode) + len(prefill) < cfg.max_num_seqs
                    and (not beta or not seq.task or seq.task in tasks or len(tasks) < beta))

        # Running jobs past the first max_num_seqs rows pause (no row this step, KV kept).
        for seq in heapq.merge(running, self.waiting[:], key=self.priority):
            if len(decode) + len(prefill) >= cfg.max_num_seqs:
                break
            if seq.status is SequenceStatus.RUNNING:
                walked.add(id(seq))
                if can_take(seq):
                    decode.append(seq)
                    if seq.task:
                        tasks.add(seq.task)
                continue
            if not can_take(seq):
                continue
            if prefill and num_prefill_tokens + seq.num_tokens + decode_rows > cfg.max_num_batched_tokens:
                is_admitting = False
            elif not self._has_blocks_for(seq, decode, len(prefill)):
                is_admitting = False
            if not is_admitting:
                break            # strict priority: no lower job jumps a blocked one
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
        decode, preempted = secure_decode_slots(self, decode, victim_key=self.priority, protected=prefill)
        return SchedulerOutput(prefill=prefill, decode=decode, preempted=preempted)

    def _has_blocks_for(self, seq: Sequence, selected: list[Sequence], num_prefilled: int) -> bool:
        """Whether seq's prompt fits in the free KV blocks, keeping one new block per decoding job
        of this step (a lone job on an idle engine may take the whole cache).

        Paused jobs keep their blocks: FastServe would swap them to host memory, but this
        engine can only drop and recompute, which thrashes (long jobs recomputed again and
        again, never finishing: when a new job preempted the job whose row it took, mlfq
        computed 2.3× the prefill tokens of the other policies on the same traces, H100 run
        e403c5f, benchmarks/results/serve_gpu.md). So when blocks are short, admission waits;
        the running and paused jobs then finish and free them (a decode that finds no block
        preempts the lowest-priority job, secure_decode_slots).
        """
        bm = self.block_manager
        need = bm.blocks_needed(seq.num_tokens)
        if need + len(selected) <= bm.num_free_blocks:
            return True
        return not self.running and num_prefilled == 0 and need <= bm.num_free_blocks

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
