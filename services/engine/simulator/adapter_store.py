"""The adapter store's cost in the simulator: device slots and host packs, both LRU, and the
background packer (EngineConfig.lora_prefetch), on the simulator's virtual clock.

A step that uses a task whose adapter is not in a device slot loads it (slot_load_s, one copy);
if the adapter has no host pack either, the pack is made first, in the step (pack_s), unless the
background packer made it already; a pack it is still making is waited for, one it has only
queued is cancelled and made in the step (as LoraManager does). The packer makes one pack at a
time per worker thread, in the order the engine asked for them, while the steps run.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class AdapterStoreConfig:
    slots: int                 # adapter slots on the device
    host_packs: int            # host packs (frames) kept, LRU
    slot_load_s: float         # one slot load (host → device copy)
    pack_s: float              # making one host pack
    prefetch: int = 0          # packs the background packer keeps queued or in flight (0: off)
    workers: int = 1           # the packer's threads, each making one pack at a time

    def __post_init__(self) -> None:
        if (self.slots <= 0 or self.host_packs < 0 or self.slot_load_s < 0 or self.pack_s < 0 or self.prefetch < 0
                or self.workers <= 0):
            raise ValueError(f"bad adapter store config: {self}")


class AdapterStoreSim:
    def __init__(self, config: AdapterStoreConfig) -> None:
        self.config = config
        self._slots: OrderedDict[str, None] = OrderedDict()
        self._packs: OrderedDict[str, None] = OrderedDict()
        self._jobs: OrderedDict[str, tuple[float, float]] = OrderedDict()   # name -> (start, end), FIFO
        self._worker_free_s = [0.0] * config.workers
        self.num_loads = self.num_packs_in_step = self.num_packs_in_background = 0

    def _finish_jobs(self, now_s: float) -> None:
        for name, (_, end) in list(self._jobs.items()):
            if end <= now_s:
                self._complete(name)

    def _complete(self, name: str) -> None:
        """A background pack is done: it joins the host packs."""
        del self._jobs[name]
        self._add_pack(name)
        self.num_packs_in_background += 1

    def _add_pack(self, name: str) -> None:
        if self.config.host_packs == 0:
            return
        self._packs[name] = None
        self._packs.move_to_end(name)
        while len(self._packs) > self.config.host_packs:
            self._packs.popitem(last=False)

    def step(self, now_s: float, tasks: set[str]) -> float:
        """Seconds the step's adapter loads add (its tasks made resident, at now_s)."""
        self._finish_jobs(now_s)
        extra = 0.0
        for name in sorted(tasks):
            if name in self._slots:
                self._slots.move_to_end(name)
                continue
            job = self._jobs.get(name)
            if name in self._packs:
                self._packs.move_to_end(name)
            elif job is not None and job[0] <= now_s + extra:   # being made: wait for it
                extra = max(extra, job[1] - now_s)
                self._complete(name)
            else:                                               # none, or only queued: made here
                if job is not None:
                    del self._jobs[name]
                extra += self.config.pack_s
                self._add_pack(name)
                self.num_packs_in_step += 1
            extra += self.config.slot_load_s
            self.num_loads += 1
            if len(self._slots) >= self.config.slots:   # the least recent slot this step does not use
                del self._slots[next(n for n in self._slots if n not in tasks)]
            self._slots[name] = None
        return extra

    def prefetch(self, now_s: float, upcoming: list[str]) -> None:
        """The engine hands the packer the next tasks (at now_s, when the step starts running)."""
        for name in upcoming:
            if len(self._jobs) >= self.config.prefetch:
                break
            if name in self._slots or name in self._packs or name in self._jobs:
                continue
            worker = min(range(len(self._worker_free_s)), key=self._worker_free_s.__getitem__)
            start = max(now_s, self._worker_free_s[worker])
            self._worker_free_s[worker] = start + self.config.pack_s
            self._jobs[name] = (start, start + self.config.pack_s)
