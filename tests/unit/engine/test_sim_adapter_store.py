"""The simulator's adapter store: slot loads, host packs and the background packer on the clock."""
from __future__ import annotations

import pytest

from services.engine.simulator.adapter_store import AdapterStoreConfig, AdapterStoreSim


def store(slots=2, packs=2, prefetch=0) -> AdapterStoreSim:
    return AdapterStoreSim(AdapterStoreConfig(slots=slots, host_packs=packs, slot_load_s=0.001, pack_s=0.010,
                                              prefetch=prefetch))


def test_loads_pack_in_the_step_and_keep_lru_slots_and_packs() -> None:
    s = store()
    assert s.step(0.0, {"a"}) == pytest.approx(0.011)          # pack + load
    assert s.step(1.0, {"a"}) == 0.0                           # resident
    assert s.step(2.0, {"b", "c"}) == pytest.approx(0.022)     # 2 slots: a evicted; packs: b, c (a evicted)
    assert s.step(3.0, {"a"}) == pytest.approx(0.011)          # no slot, no pack: packed again (b's slot goes)
    assert s.step(4.0, {"c"}) == 0.0                           # still resident
    assert s.step(5.0, {"b"}) == pytest.approx(0.011)          # its pack went with a's return
    s2 = store(slots=1, packs=2)
    s2.step(0.0, {"a"})
    s2.step(1.0, {"b"})                                        # a's slot goes, its pack stays
    assert s2.step(2.0, {"a"}) == pytest.approx(0.001)         # load only
    assert (s.num_loads, s.num_packs_in_step) == (5, 5)


def test_background_packs_are_ready_waited_for_or_made_in_the_step() -> None:
    s = store(slots=4, packs=4, prefetch=2)
    s.prefetch(0.0, ["a", "b", "c"])                           # a: 0-10 ms, b: 10-20 ms; c over the limit
    assert s.step(0.011, {"a"}) == pytest.approx(0.001)        # a ready: only the load
    assert s.step(0.015, {"b"}) == pytest.approx(0.005 + 0.001)   # b being made: waits 5 ms, then loads
    s.prefetch(0.020, ["c", "d"])                              # c: 20-30 ms, d: 30-40 ms (queued)
    assert s.step(0.021, {"d"}) == pytest.approx(0.011)        # d only queued: made in the step
    assert s.num_packs_in_background == 2 and s.num_packs_in_step == 1


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError):
        AdapterStoreConfig(slots=0, host_packs=1, slot_load_s=0.0, pack_s=0.0)


def test_a_step_never_evicts_its_own_tasks() -> None:
    """As LoraManager.acquire: the victim is the least recent slot the step does not use (evicting
    the oldest outright reloaded tasks of the same step and tripled the loads at 1000 tasks)."""
    s = store(slots=3, packs=8)
    s.step(0.0, {"a", "b", "c"})
    s.step(1.0, {"d"})                                          # evicts a
    assert s.step(2.0, {"b", "c", "e"}) == pytest.approx(0.011)  # only e loads; d goes, not b or c
    assert s.num_loads == 5


def test_two_workers_pack_side_by_side() -> None:
    s = AdapterStoreSim(AdapterStoreConfig(slots=4, host_packs=4, slot_load_s=0.001, pack_s=0.010, prefetch=2,
                                           workers=2))
    s.prefetch(0.0, ["a", "b"])                                # both 0-10 ms
    assert s.step(0.011, {"a", "b"}) == pytest.approx(0.002)   # both ready: two loads
