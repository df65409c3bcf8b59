"""Batch-building steps shared by the multi-task policies: KV reservation, task choice, decode slots."""
from __future__ import annotations

from collections.abc import Callable, Iterable

from services.engine.block_manager import BlockManager
from services.engine.scheduler import Scheduler
from services.engine.sequence import Sequence, SequenceStatus


def blocks_to_finish(bm: BlockManager, seq: Sequence, fraction: float = 1.0) -> int:
    """KV blocks seq still needs to reach `fraction` of its predicted remaining output (0 if it
    already holds them).

    Reserves at least one token, so a sequence that outran its prediction (or a fraction 0)
    reserves one more token at a time instead of nothing.
    """
    predicted_total = seq.num_tokens + max(1, round(seq.predicted_remaining_tokens * fraction))
    return max(0, bm.blocks_needed(predicted_total) - len(seq.block_table))


def reserved_blocks(bm: BlockManager, running: Iterable[Sequence], fraction: float = 1.0) -> int:
    """Blocks the running sequences will still claim to reach `fraction` of their predicted output."""
    return sum(blocks_to_finish(bm, s, fraction) for s in running)


def group_by_task(seqs: Iterable[Sequence]) -> dict[str, list[Sequence]]:
    groups: dict[str, list[Sequence]] = {}
    for seq in seqs:
        groups.setdefault(seq.task, []).append(seq)
    return groups


def choose_tasks(groups: dict[str, object], max_adapters: int,
                 task_key: Callable[[str], tuple], fill: int = 0,
                 size: Callable[[str], int] | None = None, max_slots: int = 0) -> set[str]:
    """The max_adapters tasks with the smallest task_key, plus the base model "".

    The base model needs no adapter, so it never takes one of the β slots
    (as in S-LoRA's cap); max_adapters 0 means unlimited. fill > 0 makes the cap
    work-conserving: while the chosen tasks hold fewer than `fill` sequences
    (size(task) each), the next tasks in key order are chosen as well, up to
    max_slots adapters (0: no bound).
    """
    adapters = [t for t in groups if t]
    if max_adapters == 0 or len(adapters) <= max_adapters:
        return set(groups)
    ranked = sorted(adapters, key=task_key)
    chosen = set(ranked[:max_adapters])
    if fill > 0 and size is not None:
        held = sum(size(t) for t in chosen) + (size("") if "" in groups else 0)
        for task in ranked[max_adapters:]:
            if held >= fill or (max_slots and len(chosen) >= max_slots):
                break
            chosen.add(task)
            held += size(task)
    if "" in groups:
        chosen.add("")
    return chosen


def secure_decode_slots(sched: Scheduler, ordered: list[Sequence],
                        victim_key: Callable[[Sequence], tuple],
                        protected: Iterable[Sequence] = ()) -> tuple[list[Sequence], list[Sequence]]:
    """Give each sequence of `ordered` (best first) a KV slot for its next token.

    When the free list is empty, the running sequence with the largest
    victim_key among those not yet given a slot this step (nor `protected`,
    e.g. this step's prefills) is preempted (its KV dropped; it recomputes
    later) — possibly the sequence being served itself.
    Returns (sequences that decode this step, sequences preempted).
    """
    bm = sched.block_manager
    kept: list[Sequence] = []
    kept_ids: set[int] = {id(s) for s in protected}
    preempted: list[Sequence] = []
    preempted_ids: set[int] = set()
    for seq in ordered:
        if id(seq) in preempted_ids:
            continue
        while not bm.can_append(seq):
            candidates = [s for s in sched.running if id(s) not in kept_ids]
            victim = max(candidates, key=victim_key)
            sched.preempt(victim)
            preempted.append(victim)
            preempted_ids.add(id(victim))
            if victim is seq:
                break
        if id(seq) in preempted_ids:
            continue
        bm.append_slot(seq)
        kept.append(seq)
        kept_ids.add(id(seq))
    return kept, preempted


def admit_prefills(sched: Scheduler, ordered: Iterable[Sequence], allowed_tasks: set[str] | None,
                   reserve_predicted: bool, is_urgent: Callable[[Sequence], bool],
                   decode_rows: int = 0) -> list[Sequence]:
    """Admit waiting sequences (best first) into a prefill batch and allocate their KV blocks.

    Limits: sched.running_limit() running (max_num_seqs unless the policy holds it lower),
    max_num_batched_tokens computed (a lone
    over-long prompt is still admitted so it cannot block forever; the budget
    keeps `decode_rows` tokens for the decode batch the prefills join),
    allowed_tasks (None = any), and KV memory. With reserve_predicted, a
    sequence is admitted only if the blocks for its prompt *plus a fraction of its
    predicted output* (`admission_reserve_fraction`) fit after the running
    sequences' own reserved needs, so admitted requests rarely get preempted later.
    When an urgent sequence does not fit, admission stops so that freed memory
    goes to it rather than to later ones.
    """
    cfg = sched.config
    bm = sched.block_manager
    free = bm.num_free_blocks
    fraction = cfg.admission_reserve_fraction
    if reserve_predicted:
        free -= reserved_blocks(bm, sched.running, fraction)
    num_tokens = decode_rows
    admitted: list[Sequence] = []
    for seq in ordered:
        if len(sched.running) + len(admitted) >= sched.running_limit():
            break
        if free <= 0 and (sched.running or admitted):
            break
        if allowed_tasks is not None and seq.task not in allowed_tasks:
            continue
        new_tokens = seq.num_tokens
        if admitted and num_tokens + new_tokens > cfg.max_num_batched_tokens:
            continue
        need_now = bm.blocks_needed(new_tokens)
        need = blocks_to_finish(bm, seq, fraction) if reserve_predicted else need_now
        fits = need <= free
        # Nothing else would ever free memory for it: take it if its prompt fits at all.
        if not fits and not sched.running and not admitted and need_now <= bm.num_free_blocks:
            fits = True
        if not fits:
            if is_urgent(seq):
                break
            continue
        bm.allocate(seq)
        free -= need
        num_tokens += new_tokens
        admitted.append(seq)
    return admitted


def start_running(sched: Scheduler, admitted: list[Sequence], now_s: float) -> None:
    """Move admitted sequences from waiting to running (their blocks are already allocated)."""
    if not admitted:
        return
    ids = {id(s) for s in admitted}
    sched.waiting = [s for s in sched.waiting if id(s) not in ids]
    for seq in admitted:
        seq.status = SequenceStatus.RUNNING
        if seq.first_scheduled_s is None:
            seq.first_scheduled_s = now_s
        sched.running.append(seq)
