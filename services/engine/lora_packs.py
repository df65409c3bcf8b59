"""Host-side adapter packs for LoraManager's slot loads, and the thread that makes them ahead of use.

A pack is one slot's whole row (SlotLayout.pack: A and B of every key, scaling folded, zero
padding), so a slot load is one contiguous copy. Making a pack is host work (8.5-11.4 ms for a
33.5 MB Llama-2-7B row on a 2-core CPU, benchmarks/results/lora_prefetch_cpu.md), which is in the
step's path when the pack is missing at load time, as it often is with more tasks than host packs
(1000 tasks against 128). BackgroundPacker makes
the packs of the tasks the scheduler will admit next on a worker thread while the step runs
(torch's copies release the GIL).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

_CHUNK_BYTES = 256 << 20   # pinned frames are carved from chunks this big (see HostPacks)


class HostPacks:
    """Host copies of adapters, each one slot row (SlotLayout.pack), LRU by name, ≤ max_frames.

    On CUDA the frames are pinned and carved from chunks of ~_CHUNK_BYTES: the pinned caching
    allocator rounds every block up to a power of two, which would double the memory of a frame
    of 33 MB. A frame is rewritten only after its last slot copy has finished (an event per frame),
    since the copies are non_blocking.
    """

    def __init__(self, numel: int, dtype: torch.dtype, pin: bool, max_frames: int) -> None:
        self.numel, self.dtype, self.pin, self.max_frames = numel, dtype, pin, max_frames
        self._frames: list[torch.Tensor] = []
        self._events: list[torch.cuda.Event | None] = []
        self._free: list[int] = []
        self._frame_of: OrderedDict[str, int] = OrderedDict()   # LRU order: oldest first

    @property
    def names(self) -> list[str]:
        return list(self._frame_of)

    def get(self, name: str) -> torch.Tensor | None:
        i = self._frame_of.get(name)
        if i is None:
            return None
        self._frame_of.move_to_end(name)
        return self._frames[i]

    def __contains__(self, name: str) -> bool:
        return name in self._frame_of

    def frame(self, i: int) -> torch.Tensor:
        return self._frames[i]

    def take(self, name: str, evict: bool) -> torch.Tensor | None:
        """A writable frame now owned by `name` (its old one freed); None when none can be had."""
        self.drop(name)
        i = self.reserve(evict)
        if i is None:
            return None
        self.commit(name, i)
        return self._frames[i]

    def reserve(self, evict: bool = True) -> int | None:
        """A free frame's index, owned by nobody until commit/release (the least recently used
        pack is evicted for it when `evict`); None when none can be had. Its last slot copy has
        finished when this returns."""
        if not self._free and len(self._frames) < self.max_frames:
            self._grow()
        if not self._free and evict and self._frame_of:
            self._free.append(self._frame_of.pop(next(iter(self._frame_of))))
        if not self._free:
            return None
        i = self._free.pop()
        if self._events[i] is not None:
            self._events[i].synchronize()   # its last copy to a slot has finished
            self._events[i] = None
        return i

    def commit(self, name: str, i: int) -> None:
        """Frame i (from reserve, now holding name's pack) becomes name's, most recently used."""
        self.drop(name)
        self._frame_of[name] = i

    def release(self, i: int) -> None:
        self._free.append(i)

    def after_copy(self, name: str) -> None:
        if self.pin and name in self._frame_of:
            event = torch.cuda.Event()
            event.record()
            self._events[self._frame_of[name]] = event

    def drop(self, name: str) -> None:
        i = self._frame_of.pop(name, None)
        if i is not None:
            self._free.append(i)

    def _grow(self) -> None:
        frame_bytes = self.numel * torch.empty((), dtype=self.dtype).element_size()
        n = max(1, min(self.max_frames - len(self._frames), _CHUNK_BYTES // max(frame_bytes, 1)))
        chunk = torch.empty(n, self.numel, dtype=self.dtype, pin_memory=self.pin)
        for j in range(n):
            self._free.insert(0, len(self._frames))
            self._frames.append(chunk[j])
            self._events.append(None)


class BackgroundPacker:
    """One worker thread that packs adapters into a HostPacks; `lock` guards every HostPacks call
    (the worker's and the caller's), packing itself runs outside it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pending: dict[str, Future] = {}
        self.num_packed = 0          # packs the worker committed

    def is_pending(self, name: str) -> bool:
        return name in self._pending

    def submit(self, name: str, packs: HostPacks, pack: Callable[[torch.Tensor], None],
               is_current: Callable[[], bool]) -> None:
        """Pack `name` in the background: pack(frame) fills a reserved frame; the frame is
        committed to `name` only if is_current() still holds then (checked under the lock: the
        adapter was not replaced or removed and the layout did not change), else released."""
        if self._pool is None:
            # One intra-op thread for the worker (an OpenMP setting of that thread only): sharing
            # the step's threads oversubscribes the cores and slowed this 2-core CPU's loads 2.7x
            # (benchmarks/results/lora_prefetch_cpu.md).
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-pack",
                                            initializer=torch.set_num_threads, initargs=(1,))
        future = self._pool.submit(self._run, name, packs, pack, is_current)
        self._pending[name] = future
        # Forgotten when done or cancelled; registered after the assignment (a job that is already
        # done runs the callback here), so a fast job cannot leave a stale entry behind.
        future.add_done_callback(lambda f, n=name: self._pending.pop(n) if self._pending.get(n) is f else None)

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    def wait(self, name: str) -> None:
        """Before a load of `name`: a pack of it that the worker has started is waited for (its
        errors are raised here); one still queued is cancelled, the caller packs it itself rather
        than wait behind the packs queued before it."""
        future = self._pending.get(name)
        if future is not None and not future.cancel():
            future.result()

    def _run(self, name: str, packs: HostPacks, pack: Callable[[torch.Tensor], None],
             is_current: Callable[[], bool]) -> None:
        with self.lock:
            i = packs.reserve()
        if i is None:
            return
        try:
            with torch.inference_mode():
                pack(packs.frame(i))
        except BaseException:
            with self.lock:
                packs.release(i)
            raise
        with self.lock:
            if is_current():
                packs.commit(name, i)
                self.num_packed += 1
            else:
                packs.release(i)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
