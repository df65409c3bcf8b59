"""Background packing of adapter host packs (LoraManager.prefetch, lora_packs) and the tasks the
policies name for it (Scheduler.upcoming_tasks)."""
from __future__ import annotations

import threading
import time

import torch

from services.engine.block_manager import BlockManager
from services.engine.lora import LoraManager
from services.engine.lora_packs import HostPacks
from services.engine.policies.fifo import FifoScheduler
from services.engine.scheduler import SchedulerConfig
from tests.unit.engine.test_lora import DIMS, frame_bytes, make_adapter
from tests.unit.engine.test_policy_inlaid import make_sched, make_seq


def settle(mgr: LoraManager) -> None:
    """Until the background packer has nothing queued or in flight (wait() would cancel a queued pack)."""
    deadline = time.monotonic() + 10
    while mgr._packer.num_pending and time.monotonic() < deadline:
        time.sleep(0.005)
    assert not mgr._packer.num_pending


def manager(frames: int) -> LoraManager:
    return LoraManager(DIMS, num_slots=1, max_rank=16, device="cpu", dtype=torch.float32,
                       host_cache_bytes=frames * frame_bytes(8, ("q_proj",)))


def test_host_packs_reserve_commit_release() -> None:
    packs = HostPacks(numel=4, dtype=torch.float32, pin=False, max_frames=2)
    i = packs.reserve()
    packs.commit("a", i)
    j = packs.reserve()
    assert j != i and "a" in packs and packs.names == ["a"]
    packs.release(j)
    packs.take("b", evict=False)
    assert packs.names == ["a", "b"]
    k = packs.reserve()                        # full: evicts the least recently used, "a"
    assert k == i and packs.names == ["b"]
    assert packs.reserve(evict=False) is None  # nothing free and no eviction allowed


def test_prefetch_packs_in_the_background_and_loads_use_the_pack() -> None:
    mgr = manager(frames=2)
    for i, name in enumerate("abcd"):
        mgr.add_adapter(make_adapter(name, 4, ("q_proj",), seed=i))
    assert mgr.packed_names == ["a", "b"]      # packed at add time within the budget
    assert mgr.can_prefetch                    # 4 adapters, 2 packs
    assert mgr.prefetch(["a", "c", "x"], limit=1) == 1        # a is packed, x unknown: c only
    settle(mgr)
    assert mgr.packed_names == ["b", "c"] and mgr.num_prefetched == 1
    calls = []
    pack = mgr._layout.pack
    mgr._layout.pack = lambda adapter, row: (calls.append(adapter.name), pack(adapter, row))
    slot = mgr.acquire({"c"})["c"]
    assert calls == []                         # the load copied the prefetched pack
    direct = torch.zeros(mgr._layout.numel)
    pack(mgr._registered["c"], direct)
    assert torch.equal(mgr._store[slot], direct)
    assert mgr.prefetch(["c"], limit=4) == 0   # resident in a slot: nothing to do
    mgr.close()


def test_a_pack_made_stale_while_in_flight_is_dropped() -> None:
    mgr = manager(frames=2)
    mgr.add_adapter(make_adapter("a", 4, ("q_proj",), seed=0))
    mgr.add_adapter(make_adapter("b", 4, ("q_proj",), seed=1))
    mgr.add_adapter(make_adapter("c", 4, ("q_proj",), seed=2))      # over budget: not packed
    gate = threading.Event()
    pack = mgr._layout.pack
    mgr._layout.pack = lambda adapter, row: (gate.wait(5), pack(adapter, row))
    assert mgr.prefetch(["c"], limit=1) == 1
    mgr._layout.pack = pack
    mgr.add_adapter(make_adapter("c", 4, ("q_proj",), seed=9))      # replaced while packing
    gate.set()
    settle(mgr)
    slot = mgr.acquire({"c"})["c"]                                  # the new weights, not the old
    fresh = torch.zeros(mgr._layout.numel)
    pack(mgr._registered["c"], fresh)
    assert torch.equal(mgr._store[slot], fresh)
    mgr.close()


def test_prefetch_is_a_no_op_without_host_packs() -> None:
    mgr = LoraManager(DIMS, num_slots=1, max_rank=16, device="cpu", dtype=torch.float32)   # CPU: budget 0
    mgr.add_adapter(make_adapter("a", 4, ("q_proj",)))
    assert mgr.prefetch(["a"], limit=4) == 0 and not mgr.can_prefetch


def test_upcoming_tasks_follow_each_policys_admission_order() -> None:
    fifo = FifoScheduler(SchedulerConfig(max_num_seqs=1), BlockManager(100, 4))
    for rid, task in (("r1", "x"), ("r2", ""), ("r3", "y"), ("r4", "x"), ("r5", "z")):
        fifo.add(make_seq(rid, task=task))
    assert fifo.upcoming_tasks(2) == ["x", "y"]                     # queue order, distinct, base skipped
    inlaid, _ = make_sched(max_num_seqs=1)
    for rid, task, pred in (("r1", "long", 500), ("r2", "short", 5), ("r3", "mid", 50), ("r4", "min", 1)):
        inlaid.add(make_seq(rid, task=task, predicted=pred))
    assert inlaid.upcoming_tasks(2) == ["min", "short"]             # shortest predicted first
    inlaid.schedule()                                               # admits "min", ranks the rest
    assert inlaid.upcoming_tasks(2) == ["short", "mid"]
    inlaid.add(make_seq("r5", task="new", predicted=2))             # arrived after the ranking
    assert inlaid.upcoming_tasks(2) == ["new", "short"]
    assert inlaid.upcoming_tasks(5) == ["new", "short", "mid", "long"]


def test_a_load_does_not_wait_behind_queued_prefetches() -> None:
    mgr = manager(frames=4)
    for i, name in enumerate("abcdef"):
        mgr.add_adapter(make_adapter(name, 4, ("q_proj",), seed=i))
    gate = threading.Event()
    pack = mgr._layout.pack
    mgr._layout.pack = lambda adapter, row: (gate.wait(5), pack(adapter, row))
    assert mgr.prefetch(["e", "f"], limit=2) == 2     # e blocks the worker, f queues behind it
    assert mgr.prefetch(["a", "b", "c", "d", "e"], limit=2) == 0   # two pending: at the limit
    mgr._layout.pack = pack
    t0 = time.perf_counter()
    slot = mgr.acquire({"f"})["f"]                     # cancels the queued pack, packs inline
    assert time.perf_counter() - t0 < 2.0 and not mgr._packer.is_pending("f")
    fresh = torch.zeros(mgr._layout.numel)
    pack(mgr._registered["f"], fresh)
    assert torch.equal(mgr._store[slot], fresh)
    gate.set()
    mgr.close()
    assert "e" in mgr.packed_names


def test_a_prefetch_that_finds_no_frame_is_forgotten() -> None:
    """A job that ends at once (no frame to pack into) must not stay 'pending' and block prefetching."""
    mgr = manager(frames=1)
    for i, name in enumerate("abc"):
        mgr.add_adapter(make_adapter(name, 4, ("q_proj",), seed=i))
    packs = mgr._packs
    with mgr._packer.lock:
        held = packs.reserve()                      # the only frame, taken: reserve() finds none
    for _ in range(3):
        assert mgr.prefetch(["b"], limit=1) == 1
        settle(mgr)                                 # the job found no frame and is forgotten
    with mgr._packer.lock:
        packs.release(held)
    assert mgr.prefetch(["b"], limit=1) == 1
    settle(mgr)
    assert "b" in mgr.packed_names
    mgr.close()
