"""Inlaid policy: SRTF on predicted remaining tokens, β tasks per batch (more only while the batch is underfilled), starvation guard."""
from __future__ import annotations

import collections

from services.engine.policies.batching import (
    admit_prefills,
    blocks_to_finish,
    choose_tasks,
    group_by_task,
    reserved_blocks,
    secure_decode_slots,
    start_running,
)
from services.engine.policies.streak import StreakScheduler
from services.engine.scheduler import SchedulerOutput, distinct_tasks
from services.engine.sequence import Sequence, SequenceStatus


# inlaid_step_time_ratio never caps the running pool below this many requests
MIN_RUNNING_CAP = 8
# added to the SRTF key (predicted tokens) of a waiting request past its deadline (is_late), so every request
# that can still meet its deadline ranks ahead of every late one, and late ones keep SRTF order among themselves
LATE_RANK_TOKENS = 1 << 30


class InlaidScheduler(StreakScheduler):
    """LoRA-Inlaid's multi-task scheduler.

    Each step is one of the paper's three choices: a prefill batch from the
    waiting pool, or a decode batch from the running pool (continuing the
    previous decode batch when its tasks are still there). Prefill is
    considered when nothing runs or after `max_decode_streak` decode steps
    (bounding how long a new request waits for its first chance), or after
    `inlaid_full_batch_streak_factor` times as many while the running pool
    already holds β tasks (see `_should_prefill`). Within a batch:

    * order is shortest predicted remaining output first (SRTF); the key is
      refreshed every step as tokens are generated;
    * at most β = `max_adapters_per_batch` distinct tasks (the base model ""
      is free), ranked by their shortest request; a task absent from the
      previous step pays `inlaid_task_switch_tokens`, so the batch keeps its
      tasks unless a much shorter request arrives. Running requests of a task
      that loses its slot keep their KV and wait (see `task_key`). With
      `inlaid_decode_task_rank` = "srtf_per_seq", decode divides that key by
      the task's running sequences, so a slot that advances many sequences
      beats one holding a single request (off by default: neutral in the
      simulator, benchmarks/results/sim_scale.md). `inlaid_beta_fill` = f > 0
      makes the cap work-conserving: while the chosen tasks' sequences fill
      fewer than f × max_num_seqs slots, the next tasks in rank order join
      (never more than the device's adapter slots, `max_adapter_slots`);
    * under overload (at least as many waiting requests as free slots) a prefill
      waits until `inlaid_overload_min_free` of the slots are free, for at most
      `inlaid_overload_streak_factor` × `max_decode_streak` decode steps;
    * a request is hungry — it goes ahead of SRTF and of the task preference —
      when it has not been served for `starvation_limit_s` or has outrun its
      predicted length;
    * admission reserves KV blocks for prompt + predicted output, and on KV
      exhaustion the running request with the most predicted remaining work is
      preempted (recomputed later);
    * with `inlaid_preempt_ratio` = r > 0, SRTF reaches into the running pool:
      when the reserve leaves no room for a waiting request, the running one
      with the most predicted tokens left is preempted for it if that is more
      than r times the waiting one's predicted output (each request at most
      once, a hungry one never; see `_displace_for`);
    * with `inlaid_step_time_ratio` = r > 0, the running pool is capped so a
      decode-only step stays within r times the fastest one seen (the cap
      adapts to measured step times: `running_limit`, `update`);
    * deadlines (hunger still goes first): a waiting request that at the
      current decode pace could no longer finish by its client's deadline
      (gRPC, passed on by the gateway, which cancels it there) is not
      admitted while other work can run (`misses_deadline`: its tokens would
      be thrown away); with `inlaid_slo_scale` = k > 0, one that could no
      longer finish within k times its latency served alone (its predicted
      output times the fastest decode-only step seen) ranks after every
      request that still can (`is_late`).
    """

    name = "inlaid"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._last_ranking: list[Sequence] = []        # the last prefill step's order of the pool
        self._new_since_ranking: list[Sequence] = []   # requests added since (upcoming_tasks)
        # inlaid_step_time_ratio's state: the running cap, the fastest decode-only step seen, and the
        # step in flight while it is decode-only (its start, its decode rows, whether the cap bound it)
        self._running_cap = float(self.config.max_num_seqs)
        self._fastest_decode_s: float | None = None
        self._decode_step: tuple[float, int, bool] | None = None
        self._last_decode_s: float | None = None        # the last decode-only step's time: the current pace

    def running_limit(self) -> int:
        limit = super().running_limit()
        if not self.config.inlaid_step_time_ratio:
            return limit
        return min(limit, max(MIN_RUNNING_CAP, int(self._running_cap)))

    def schedule(self) -> SchedulerOutput:
        start = self.clock()
        out = super().schedule()
        self._decode_step = ((start, len(out.decode), len(self.running) >= self.running_limit())
                             if out.decode and not out.prefill else None)
        return out

    def update(self, out: SchedulerOutput, token_ids: list[int]) -> None:
        super().update(out, token_ids)
        if self._decode_step is None:
            return
        start, rows, at_cap = self._decode_step
        self._decode_step = None
        step_s = self.clock() - start
        if self._fastest_decode_s is None or step_s < self._fastest_decode_s:
            self._fastest_decode_s = step_s
        self._last_decode_s = step_s
        if not self.config.inlaid_step_time_ratio:
            return
        target = self.config.inlaid_step_time_ratio * self._fastest_decode_s
        if step_s > target:    # multiplicative decrease toward the rows that fit the target
            self._running_cap = max(float(MIN_RUNNING_CAP), min(self._running_cap, rows * target / step_s))
        elif at_cap:           # additive increase, only while the cap binds (else it would drift up untested)
            self._running_cap = min(float(self.config.max_num_seqs), self._running_cap + 1.0)

    def add(self, seq: Sequence) -> None:
        super().add(seq)
        self._new_since_ranking.append(seq)
        seq.sched_state.setdefault("last_service_s", seq.arrival_s)
        # A waiting request generates nothing, so its SRTF key is fixed until it runs.
        seq.sched_state["waiting_remaining"] = seq.predicted_remaining_tokens

    def preempt(self, seq: Sequence) -> None:
        super().preempt(seq)
        seq.sched_state["waiting_remaining"] = seq.predicted_remaining_tokens

    def is_hungry(self, seq: Sequence, now_s: float) -> bool:
        predicted = seq.predicted_output_tokens
        if predicted is not None and seq.num_output_tokens > predicted:
            return True
        last = seq.sched_state.get("last_service_s", seq.arrival_s)
        return now_s - last > self.config.starvation_limit_s

    def is_late(self, seq: Sequence, remaining: int, now_s: float) -> bool:
        """inlaid_slo_scale = k: whether a waiting request with `remaining` predicted tokens, were it to run
        from now at the fastest decode-only step seen, would finish after arrival + k × its predicted output
        at that pace (its latency served alone, prompt time left out). False while no such step was timed."""
        k, pace, predicted = self.config.inlaid_slo_scale, self._fastest_decode_s, seq.predicted_output_tokens
        if not k or pace is None or predicted is None:
            return False
        return now_s + remaining * pace > seq.arrival_s + k * max(predicted, 1) * pace

    def misses_deadline(self, seq: Sequence, remaining: int, now_s: float) -> bool:
        """Whether a waiting request with `remaining` predicted tokens, decoding from now at the last
        decode-only step's pace, would finish after its client's deadline (seq.deadline_s), where the
        gateway cancels it. False without a deadline or before a decode-only step was timed."""
        pace = self._last_decode_s
        return seq.deadline_s is not None and pace is not None and now_s + remaining * pace > seq.deadline_s

    def _should_prefill(self) -> bool:
        # With β tasks already running, every decode batch has its task slots taken:
        # a prefill step (which stalls the whole pool, and on a GPU cannot replay a
        # CUDA graph) mostly admits requests that wait in the pool for a slot. Under
        # overload with many tasks, fewer and larger prefills then leave more steps
        # for decoding (benchmarks/results/sim_scale.md).
        cfg = self.config
        beta = cfg.max_adapters_per_batch
        if beta and self.running and self.num_decode_streak < (
                cfg.inlaid_full_batch_streak_factor * cfg.max_decode_streak):
            if len({s.task for s in self.running if s.task}) >= beta:
                return False
        # Overload (more waiting requests than free slots): a prefill that fills only a few freed
        # slots pays a whole prefill step's fixed cost for them; wait until enough are free, for a
        # bounded number of decode steps. Simulated with three H100 runs' cost models (60 s traces,
        # 3 seeds; benchmarks/results/sim_overload.md): at 1.5x capacity up to +1.2 % throughput and
        # 30 % lower JCT, never worse; no change at or below 1.1x.
        limit = self.running_limit()
        free = limit - len(self.running)
        if (cfg.inlaid_overload_min_free and self.running and len(self.waiting) >= free
                and free < cfg.inlaid_overload_min_free * limit
                and self.num_decode_streak < cfg.inlaid_overload_streak_factor * cfg.max_decode_streak):
            return False
        if super()._should_prefill():
            return True
        # Memory is reserved to the last block: a prefill step can still pay off by displacing
        # a long running request for a much shorter waiting one (streak and slot rules as above).
        return (cfg.inlaid_preempt_ratio > 0 and 0 < len(self.running) < limit
                and self.num_decode_streak >= cfg.max_decode_streak and self._displaceable_for(
                    min(s.sched_state.get("waiting_remaining", s.predicted_remaining_tokens) for s in self.waiting))
                is not None)

    def _displaceable_for(self, remaining: int) -> Sequence | None:
        """The running request to preempt for a waiting one with `remaining` predicted tokens:
        the one with the most predicted tokens left, if above inlaid_preempt_ratio times as many,
        never displaced before, and not hungry; else None."""
        now = self.clock()
        victim = max((s for s in self.running if not s.sched_state.get("displaced")),
                     key=lambda s: (s.predicted_remaining_tokens, s.seq_no), default=None)
        if (victim is None or victim.predicted_remaining_tokens <= self.config.inlaid_preempt_ratio * remaining
                or self.is_hungry(victim, now)):
            return None
        return victim

    def _displace_for(self, ordered: list[Sequence], allowed: set[str] | None, decode_rows: int) -> None:
        """Preempt running requests so the head of `ordered` fits (inlaid_preempt_ratio), walking
        it as admit_prefills will (slots, token budget, allowed tasks, KV reserve). The victims
        go back to the waiting pool (recomputed later); schedule() reports them as this step's preempted."""
        cfg, bm = self.config, self.block_manager
        fraction = cfg.admission_reserve_fraction
        free = bm.num_free_blocks - reserved_blocks(bm, self.running, fraction)
        tokens, count = decode_rows, 0
        for seq in ordered:
            if len(self.running) + count >= self.running_limit():
                return
            if allowed is not None and seq.task not in allowed:
                continue
            if count and tokens + seq.num_tokens > cfg.max_num_batched_tokens:
                continue
            need = blocks_to_finish(bm, seq, fraction)
            while need > free:
                victim = self._displaceable_for(seq.sched_state.get("waiting_remaining",
                                                                    seq.predicted_remaining_tokens))
                if victim is None:
                    return
                free += len(victim.block_table) + blocks_to_finish(bm, victim, fraction)
                victim.sched_state["displaced"] = True
                self.preempt(victim)
            free -= need
            tokens += seq.num_tokens
            count += 1

    def _fill_seqs(self) -> int:
        """Batch slots the β tasks must fill before the cap binds (0: strict cap)."""
        return int(self.config.inlaid_beta_fill * self.running_limit())

    # ---- choices -----------------------------------------------------------
    def _prefill(self, now_s: float, decode_rows: int) -> tuple[list[Sequence], set[str] | None]:
        # Keys computed once per sequence: this runs over the whole waiting pool,
        # thousands of requests when the engine is saturated.
        keyed = []
        for seq in self.waiting:
            state = seq.sched_state
            remaining = state.get("waiting_remaining")
            if remaining is None:
                remaining = state["waiting_remaining"] = seq.predicted_remaining_tokens
            doomed = self.misses_deadline(seq, remaining, now_s)
            if doomed or self.is_late(seq, remaining, now_s):
                remaining += LATE_RANK_TOKENS
            keyed.append(((not self.is_hungry(seq, now_s), remaining, seq.seq_no), seq, doomed))
        keyed.sort(key=lambda item: item[0])
        ordered = [s for _, s, _ in keyed]
        self._last_ranking = ordered     # upcoming_tasks reads it until the next prefill step
        self._new_since_ranking = []
        allowed = None
        if self.config.max_adapters_per_batch:
            # Best (is_not_hungry, remaining) per task over running and waiting requests, and
            # each task's number of such requests (the fill rule's sizes), in the same pass.
            best: dict[str, tuple[bool, int]] = {}
            counts: collections.Counter[str] = collections.Counter()
            for task, seqs in group_by_task(self.running).items():
                best[task] = self.task_key(task, seqs, now_s, with_switch=False)
                counts[task] = len(seqs)
            for (not_hungry, remaining, _), seq, _ in keyed:
                old = best.get(seq.task)
                best[seq.task] = ((not_hungry, remaining) if old is None
                                  else (old[0] and not_hungry, min(old[1], remaining)))
                counts[seq.task] += 1
            switch = self.config.inlaid_task_switch_tokens
            allowed = choose_tasks(best, self.config.max_adapters_per_batch, lambda t: (
                best[t][0], best[t][1] + (0 if t in self.last_step_tasks else switch)),
                fill=self._fill_seqs(), size=counts.__getitem__, max_slots=self.config.max_adapter_slots)
        doomed = {id(seq) for (not_hungry, _, _), seq, misses in keyed if misses and not_hungry}
        if doomed:   # held while other work can run; with none, they run (their prediction may be long)
            live = [seq for seq in ordered if id(seq) not in doomed]
            if live or self.running:
                ordered = live
        if self.config.inlaid_preempt_ratio > 0 and self.running:
            self._displace_for(ordered, allowed, decode_rows)
        hungry = {id(seq) for (not_hungry, _, _), seq, _ in keyed if not not_hungry}
        admitted = admit_prefills(self, ordered, allowed, reserve_predicted=True,
                                  is_urgent=lambda seq: id(seq) in hungry, decode_rows=decode_rows)
        start_running(self, admitted, now_s)
        return admitted, allowed

    def upcoming_tasks(self, limit: int) -> list[str]:
        """Tasks of the waiting requests SRTF admits first (hungry ones ahead): the head of the
        order the last prefill step ranked the pool in, merged with the requests that arrived
        since, so a step pays for a few requests, not a pass over thousands waiting."""
        now = self.clock()
        head = []
        for seq in self._last_ranking:
            if seq.status is SequenceStatus.WAITING:
                head.append(seq)
                if len(head) >= 4 * limit:
                    break
        fresh = [s for s in self._new_since_ranking if s.status is SequenceStatus.WAITING]
        ranked = sorted(head + fresh, key=lambda s: (
            not self.is_hungry(s, now), s.sched_state.get("waiting_remaining", 0), s.seq_no))
        return distinct_tasks(ranked, limit) or distinct_tasks(self.waiting, limit)

    def task_key(self, task: str, seqs: list[Sequence], now_s: float, with_switch: bool = True) -> tuple:
        """Rank of a task for one of the β slots: hungry first, then shortest remaining.

        A task outside the previous step pays `inlaid_task_switch_tokens` extra
        (a new adapter in the batch), so it displaces a task of the previous
        step only when its shortest request is that much shorter. Tasks of
        running requests that lose their slot keep their KV and wait; prefill
        and decode use the same ranking, so a short request of a new task can
        overtake long running ones (SRTF) without thrashing between tasks.
        """
        switch = 0 if task in self.last_step_tasks or not with_switch else self.config.inlaid_task_switch_tokens
        return (not any(self.is_hungry(s, now_s) for s in seqs),
                min(s.predicted_remaining_tokens for s in seqs) + switch)

    def _decode(self, now_s: float, among: list[Sequence] | None = None, allowed: set[str] | None = None,
                protected: list[Sequence] = ()) -> tuple[list[Sequence], list[Sequence]]:
        candidates = self.decode_candidates(among, allowed)
        groups = group_by_task(candidates)

        per_seq = self.config.inlaid_decode_task_rank == "srtf_per_seq"

        def task_key(task: str) -> tuple:
            not_hungry, remaining = self.task_key(task, groups[task], now_s)
            # Hungry tasks still go first; among the rest, tokens a slot needs per sequence it advances.
            return (not_hungry, remaining / len(groups[task])) if per_seq else (not_hungry, remaining)

        chosen = choose_tasks(groups, self.config.max_adapters_per_batch, task_key,
                              fill=self._fill_seqs(), size=lambda t: len(groups.get(t, ())),
                              max_slots=self.config.max_adapter_slots)
        if len(chosen) < len(groups):
            candidates = [s for s in candidates if s.task in chosen]
        if self.block_manager.num_free_blocks < len(candidates):
            # Memory is tight: shortest remaining get slots first; the longest are victims.
            candidates = sorted(candidates, key=lambda s: s.predicted_remaining_tokens)
        return secure_decode_slots(self, list(candidates),
                                   victim_key=lambda s: (s.predicted_remaining_tokens, s.seq_no),
                                   protected=protected)
