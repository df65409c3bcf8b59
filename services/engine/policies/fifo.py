"""FIFO policy with S-LoRA's cap on distinct adapters per batch (the baseline scheduler)."""
from __future__ import annotations

from collections import deque

from services.engine.scheduler import Scheduler, SchedulerOutput
from services.engine.sequence import Sequence, SequenceStatus


def arrival_key(seq: Sequence) -> tuple[float, int]:
    return (seq.arrival_s, seq.seq_no)


class FifoScheduler(Scheduler):
    """Every running sequence decodes each step; waiting ones are admitted in arrival order.

    Admission stops at the first request whose KV blocks do not fit (strict FIFO
    for memory), but a request whose task would push the batch past
    `max_adapters_per_batch` distinct adapters is skipped, as S-LoRA/vLLM do, so
    one busy task cannot block the others. The base model ("") needs no adapter
    slot and is not counted. When decode needs a block and none is free, the
    newest running sequence is preempted (its KV dropped, recomputed later).
    """

    name = "fifo"

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self._schedule_decode(out)
        if not out.preempted:   # memory is short this step: admitting more would thrash
            self._schedule_prefill(out)
        return out

    def _schedule_decode(self, out: SchedulerOutput) -> None:
        queue = deque(sorted(self.running, key=arrival_key))
        while queue:
            seq = queue.popleft()
            while not self.block_manager.can_append(seq):
                victim = queue.pop() if queue else seq   # newest first
                self.preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                self.block_manager.append_slot(seq)
                out.decode.append(seq)

    def _schedule_prefill(self, out: SchedulerOutput) -> None:
        cap = self.config.max_adapters_per_batch
        tasks = {s.task for s in self.running if s.task}
        budget = self.config.max_num_batched_tokens - len(out.decode)
        now = self.clock()
        for seq in sorted(self.waiting, key=arrival_key):
            if len(self.running) >= self.config.max_num_seqs:
                break
            num_new = seq.num_new_tokens
            # An oversized prompt alone in a step still runs; otherwise respect the budget.
            if num_new > budget and out.seqs:
                break
            if seq.task and seq.task not in tasks and cap and len(tasks) >= cap:
                continue
            if not self.block_manager.can_allocate(seq):
                break
            self.block_manager.allocate(seq)
            self.waiting.remove(seq)
            self.running.append(seq)
            seq.status = SequenceStatus.RUNNING
            if seq.first_scheduled_s is None:
                seq.first_scheduled_s = now
            if seq.task:
                tasks.add(seq.task)
            budget -= num_new
            out.prefill.append(seq)
