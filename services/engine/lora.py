"""Batched multi-LoRA: adapters in device slots (LRU), one adapter per token segment of a batch."""
from __future__ import annotations

from collections import OrderedDict

import torch

from services.common.adapters import BaseDims, LoraAdapter
from services.engine.errors import AdapterCapacityError, UnknownTaskError
from services.engine.lora_packs import BackgroundPacker, HostPacks

def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class SlotLayout:
    """Where each (layer, module)'s A and B sit inside one slot's flat row of the device store.

    Per key, in sorted key order: A [rank_cap, in], then B as the stacks want it — [out, rank_cap]
    for the Triton kernels, Bᵀ [rank_cap, out] for the PyTorch path (stacked groups, below, come
    first and keep their members together). A host pack of an adapter is one such row,
    zero-padded, so a slot load is one contiguous copy.

    `groups` (name → member modules, e.g. q|k|v): where a layer has every member of a group and
    the members' outputs are equally wide, their A's are laid out back to back and then their B's
    (rank last), so the group also reads as one stacked A [members · rank_cap, in] and one B
    [members · out, rank_cap]: one shrink and one expand launch over the fused projection's output
    instead of one pair per member.
    """

    def __init__(self, dims: BaseDims, keys, rank_cap: int, b_rank_last: bool,
                 groups: dict[str, tuple[str, ...]] | None = None) -> None:
        self.keys, self.rank_cap, self.b_rank_last = tuple(sorted(keys)), rank_cap, b_rank_last
        self.offsets: dict[tuple[int, str], tuple[int, int, int, int]] = {}  # a_off, b_off, in, out
        # (layer, group) -> (a_off, b_off, in, members, out per member)
        self.group_offsets: dict[tuple[int, str], tuple[int, int, int, int, int]] = {}
        units, grouped = [], set()
        for layer in sorted({layer for layer, _ in self.keys}):
            for group, members in (groups or {}).items() if b_rank_last else ():
                feats = {dims.features(m) for m in members}
                if len(feats) == 1 and all((layer, m) in self.keys for m in members):
                    units.append((group, tuple((layer, m) for m in members)))
                    grouped.update((layer, m) for m in members)
        units += [(None, (key,)) for key in self.keys if key not in grouped]
        offset = 0
        for group, unit in units:
            in_f, out_f = dims.features(unit[0][1])
            a_start, b_start = offset, offset + rank_cap * in_f * len(unit)
            for i, key in enumerate(unit):
                self.offsets[key] = (a_start + i * rank_cap * in_f, b_start + i * rank_cap * out_f, in_f, out_f)
            if group is not None:
                self.group_offsets[(unit[0][0], group)] = (a_start, b_start, in_f, len(unit), out_f)
            offset += rank_cap * (in_f + out_f) * len(unit)
        self.numel = offset

    def group_views(self, rows: torch.Tensor, key) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(A [..., members · rank_cap, in], B [..., members · out, rank_cap], out per member) of a
        (layer, group) in group_offsets."""
        a_off, b_off, in_f, members, out_f = self.group_offsets[key]
        a = rows[..., a_off:b_off].unflatten(-1, (members * self.rank_cap, in_f))
        b = rows[..., b_off:b_off + members * out_f * self.rank_cap].unflatten(-1, (members * out_f, self.rank_cap))
        return a, b, out_f

    def a_view(self, rows: torch.Tensor, key) -> torch.Tensor:
        """A of `key` in rows [..., numel] → [..., rank_cap, in]."""
        a_off, _, in_f, _ = self.offsets[key]
        return rows[..., a_off:a_off + self.rank_cap * in_f].unflatten(-1, (self.rank_cap, in_f))

    def b_view(self, rows: torch.Tensor, key) -> torch.Tensor:
        """B of `key` in rows [..., numel] → [..., out, rank_cap] or Bᵀ [..., rank_cap, out]."""
        _, b_off, _, out_f = self.offsets[key]
        shape = (out_f, self.rank_cap) if self.b_rank_last else (self.rank_cap, out_f)
        return rows[..., b_off:b_off + self.rank_cap * out_f].unflatten(-1, shape)

    def pack(self, adapter: LoraAdapter, row: torch.Tensor) -> None:
        """Write `adapter` into `row` [numel] exactly as a slot holds it (scaling folded, padding 0)."""
        row.zero_()
        for key, (a, b) in adapter.weights.items():
            r = a.shape[0]
            self.a_view(row, key)[:r].copy_(a)
            # Fold the scaling into B in fp32 before casting: one fewer multiply per token.
            b_scaled = b.float() * adapter.scaling[key]                 # [out, r]
            if self.b_rank_last:
                self.b_view(row, key)[:, :r].copy_(b_scaled)
            else:
                self.b_view(row, key)[:r].copy_(b_scaled.t())


class LoraManager:
    """Keeps registered adapters on the host and up to `num_slots` of them on the device.

    The device store is one tensor [slot_cap, numel]: row s is slot s, laid out by a SlotLayout
    over every (layer, module) that some registered adapter targets, at one rank_cap. The stacks
    the math reads are views of it: for every key A [slots, rank_cap, in] and Bᵀ [slots, rank_cap,
    out] with the scaling folded into Bᵀ; smaller ranks are zero-padded, untargeted modules stay
    zero. The layout grows (keys, rank) when an adapter that needs it is added, the slot count on
    demand (CPU only), so a CPU engine with small adapters stays small.
    A step calls `prepare(slot per token segment)`; each layer then calls
    `apply(layer, module, x, y)` which adds x Aᵀ Bᵀ per segment with one pair of matmuls.

    With `use_triton` (CUDA, fp16) the step runs the Triton shrink/expand kernels
    (services.engine.kernels.lora) instead: B is then viewed as [slots, out, rank_cap],
    rank_cap a power of two ≥ 16, and tokens are grouped by slot on the device, which is
    what lets a decode step with mixed adapters be captured in a CUDA graph.
    `layout_version` changes whenever the store is (re)allocated: graphs captured before
    hold stale addresses. Writing a slot is in place and keeps them valid.

    Slot loads are one copy of a host pack (SlotLayout.pack: the slot's whole row, padding
    included, so nothing is zeroed on the device). Packs are made when an adapter is added, while
    the host budget `host_cache_bytes` allows, else at its first load, and kept in an LRU within
    that budget; on CUDA they are pinned and the copy is non_blocking, so a load costs the host
    one call and the device one contiguous transfer on the step's stream.
    """

    def __init__(self, dims: BaseDims, num_slots: int, max_rank: int,
                 device: str | torch.device, dtype: torch.dtype,
                 gather_max_tokens: int | None = None, use_triton: bool = False,
                 host_cache_bytes: int | None = None, expand_rows: bool = True,
                 groups: dict[str, tuple[str, ...]] | None = None) -> None:
        self.dims, self.num_slots, self.max_rank = dims, num_slots, max_rank
        self.groups = groups or {}                             # Triton path: see SlotLayout
        self.device, self.dtype = torch.device(device), dtype
        self.use_triton = use_triton
        self.expand_rows = expand_rows                         # Triton path: lora_expand's variant
        self.layout_version = 0
        self._batch = None                                     # Triton path: LoraBatch this step
        self._registered: dict[str, LoraAdapter] = {}
        self._slot_of: OrderedDict[str, int] = OrderedDict()   # LRU order: oldest first
        self._free_slots = list(range(num_slots))
        self._layout: SlotLayout | None = None
        self._store: torch.Tensor | None = None                 # [slot_cap, layout.numel]
        self._a: dict[tuple[int, str], torch.Tensor] = {}       # views of the store
        self._bt: dict[tuple[int, str], torch.Tensor] = {}
        self._group: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, int]] = {}
        # rank of each (layer, module) per slot; absent = untargeted (skipped at apply time)
        self._ranks: list[dict[tuple[int, str], int]] = [{} for _ in range(num_slots)]
        self._slot_cap = 0
        self._segments: list[tuple[int, int, int]] = []        # (slot, start, end) this step
        # Small mixed batches (decode) on a GPU: one gather + two bmm per module instead of
        # two matmuls per segment, fewer kernel launches. Per-segment stays the default on
        # CPU (no copies) and for long prefills (the gathered A/B would be T copies).
        if gather_max_tokens is None:
            gather_max_tokens = 64 if self.device.type == "cuda" else 0
        self.gather_max_tokens = gather_max_tokens
        self._token_slots: torch.Tensor | None = None          # [T] long, gather path only
        self._token_mask: torch.Tensor | None = None           # [T, 1] 1 = has an adapter
        self.num_loads = 0                                     # host→device adapter copies
        if host_cache_bytes is None:
            host_cache_bytes = 4 << 30 if self.device.type == "cuda" else 0
        self.host_cache_bytes = host_cache_bytes
        self._packs: HostPacks | None = None                  # per layout
        self._packer = BackgroundPacker()                      # prefetch(): packs ahead of use

    # ---- registry ------------------------------------------------------------
    @torch.inference_mode()    # the store and packs are inference tensors, written only here
    def add_adapter(self, adapter: LoraAdapter) -> None:
        """Register (or replace) an adapter and pack it for the device; it reaches a slot when used."""
        if adapter.rank > self.max_rank:
            raise ValueError(f"adapter {adapter.name!r} rank {adapter.rank} > max {self.max_rank}")
        with self._packer.lock:
            self._registered[adapter.name] = adapter
            if self._packs is not None:
                self._packs.drop(adapter.name)        # a replaced adapter's pack is stale
        if not self._fit_layout(adapter):             # a new layout repacks and reloads all
            with self._packer.lock:
                frame = self._packs.take(adapter.name, evict=False)
                if frame is not None:
                    self._layout.pack(adapter, frame)
            if adapter.name in self._slot_of:
                self._write_slot(self._slot_of[adapter.name], adapter)

    @torch.inference_mode()
    def remove_adapter(self, name: str) -> None:
        if name not in self._registered:
            raise UnknownTaskError(name)
        with self._packer.lock:
            del self._registered[name]
            self._packs.drop(name)
        slot = self._slot_of.pop(name, None)
        if slot is not None:
            self._store[slot].zero_()   # gathered/Triton paths read every slot's rows
            self._ranks[slot] = {}
            self._free_slots.append(slot)

    def has_adapter(self, name: str) -> bool:
        return name in self._registered

    @property
    def adapter_names(self) -> list[str]:
        return sorted(self._registered)

    @property
    def loaded_names(self) -> list[str]:
        """Adapters resident in device slots, least recently used first."""
        return list(self._slot_of)

    @property
    def packed_names(self) -> list[str]:
        """Adapters with a host pack ready, least recently used first."""
        with self._packer.lock:
            return self._packs.names if self._packs is not None else []

    def prefetch(self, names, limit: int) -> int:
        """Pack, on a background thread, the first of `names` (in order) that are neither in a
        device slot nor packed, so their slot loads find the pack ready, keeping at most `limit`
        packs queued or in flight. Returns how many it queued. A no-op without host packs (CPU:
        host_cache_bytes 0)."""
        if self._packs is None or self._packs.max_frames == 0 or limit <= 0:
            return 0
        started = 0
        packs, layout = self._packs, self._layout
        for name in names:
            if self._packer.num_pending >= limit:
                break
            adapter = self._registered.get(name)
            if (adapter is None or name in self._slot_of or self._packer.is_pending(name)
                    or name in packs):
                continue
            self._packer.submit(
                name, packs, lambda frame, a=adapter: layout.pack(a, frame),
                lambda n=name, a=adapter: self._packs is packs and self._registered.get(n) is a)
            started += 1
        return started

    @property
    def can_prefetch(self) -> bool:
        """Host packs exist but cannot hold every registered adapter (else all are packed already)."""
        return self._packs is not None and 0 < self._packs.max_frames < len(self._registered)

    @property
    def num_prefetched(self) -> int:
        """Packs the background thread made (prefetch)."""
        return self._packer.num_packed

    def close(self) -> None:
        """Stop the background packer (waits for a pack in flight)."""
        self._packer.close()

    @property
    def slot_bytes(self) -> int:
        """Bytes of one slot (one host pack): every key of the layout at its rank_cap."""
        return 0 if self._store is None else self._store[0].numel() * self._store.element_size()

    # ---- slots ----------------------------------------------------------------
    @torch.inference_mode()
    def acquire(self, names: set[str]) -> dict[str, int]:
        """Make every named adapter resident; evict least recently used others if needed."""
        if len(names) > self.num_slots:
            raise AdapterCapacityError(
                f"batch uses {len(names)} adapters but only {self.num_slots} slots exist")
        for name in names:
            if name not in self._registered:
                raise UnknownTaskError(name)
        for name in sorted(names):
            if name in self._slot_of:
                self._slot_of.move_to_end(name)
                continue
            if not self._free_slots:
                victim = next(n for n in self._slot_of if n not in names)
                self._free_slots.append(self._slot_of.pop(victim))
            slot = self._free_slots.pop(0)
            self._write_slot(slot, self._registered[name])
            self._slot_of[name] = slot
        return {name: self._slot_of[name] for name in names}

    def _rank_cap_for(self, rank: int) -> int:
        if self.use_triton:  # the kernels take power-of-two ranks ≥ 16 (zero padding is exact)
            return max(16, 1 << (rank - 1).bit_length())
        return min(self.max_rank, _round_up(rank, 8))

    def _fit_layout(self, adapter: LoraAdapter) -> bool:
        """Grow the slot layout to hold `adapter`; True when it changed (store reallocated, every
        pack remade within the budget, resident slots reloaded)."""
        old = self._layout
        keys = set(old.keys if old else ()) | set(adapter.weights)
        rank_cap = max(old.rank_cap if old else 0, self._rank_cap_for(adapter.rank))
        if old is not None and keys == set(old.keys) and rank_cap == old.rank_cap:
            return False
        layout = SlotLayout(self.dims, keys, rank_cap, b_rank_last=self.use_triton, groups=self.groups)
        frame_bytes = layout.numel * torch.empty((), dtype=self.dtype).element_size()
        # The old packs' pinned chunks stay alive until their in-flight copies finish (allocator).
        self._packs = HostPacks(layout.numel, self.dtype, self.device.type == "cuda",
                                 self.host_cache_bytes // frame_bytes if frame_bytes else 0)
        self._layout = layout
        slot_cap = self.num_slots if self.use_triton else max(self._slot_cap, 1)
        self._alloc_store(slot_cap, keep_rows=False)
        for name in self._registered:              # packing happens here, not during steps
            frame = self._packs.take(name, evict=False)
            if frame is None:
                break
            self._layout.pack(self._registered[name], frame)
        for name, slot in self._slot_of.items():
            self._write_slot(slot, self._registered[name])
        return True

    def _alloc_store(self, slot_cap: int, keep_rows: bool) -> None:
        store = torch.zeros(slot_cap, self._layout.numel, device=self.device, dtype=self.dtype)
        if keep_rows and self._store is not None:
            store[:self._store.shape[0]] = self._store
        self._store, self._slot_cap = store, slot_cap
        self._a = {key: self._layout.a_view(store, key) for key in self._layout.keys}
        self._bt = {key: self._layout.b_view(store, key) for key in self._layout.keys}
        self._group = {key: self._layout.group_views(store, key) for key in self._layout.group_offsets}
        self.layout_version += 1

    def _write_slot(self, slot: int, adapter: LoraAdapter) -> None:
        if slot >= self._slot_cap:   # CPU: grow by doubling (the Triton path has every slot)
            self._alloc_store(min(self.num_slots, max(self._slot_cap, 1 << slot.bit_length())),
                              keep_rows=True)
        self._packer.wait(adapter.name)  # a prefetch in flight: its pack, not a second one
        with self._packer.lock:          # the worker cannot evict this frame before its copy
            frame = self._packs.get(adapter.name)
            if frame is None:            # over the host budget at add time, or evicted since
                frame = self._packs.take(adapter.name, evict=True)
                if frame is None:        # budget below one pack: a one-off buffer
                    frame = torch.empty(self._layout.numel, dtype=self.dtype,
                                        pin_memory=self.device.type == "cuda")
                self._layout.pack(adapter, frame)
            # The pack is the whole row (zero padding, untargeted modules): no clearing needed.
            self._store[slot].copy_(frame, non_blocking=True)
            self._packs.after_copy(adapter.name)
        self._ranks[slot] = {key: a.shape[0] for key, (a, _) in adapter.weights.items()}
        self.num_loads += 1

    # ---- the step ---------------------------------------------------------------
    def prepare(self, segments: list[tuple[int, int, int]]) -> None:
        """Set this step's (slot, token_start, token_end) runs; slot -1 = no adapter."""
        self._segments = [s for s in segments if s[0] >= 0]
        num_tokens = segments[-1][2] if segments else 0
        self._token_slots = self._token_mask = None
        self._batch = None
        if self.use_triton:
            if self._segments:
                slots = torch.cat([torch.full((e - b,), slot, dtype=torch.int32)
                                   for slot, b, e in segments])
                self.prepare_tokens(slots.to(self.device, non_blocking=True))
            return
        if len(self._segments) > 1 and num_tokens <= self.gather_max_tokens:
            slots = torch.cat([torch.full((e - b,), slot, dtype=torch.long)
                               for slot, b, e in segments])
            self._token_mask = (slots >= 0).to(self.dtype)[:, None].to(self.device)
            self._token_slots = slots.clamp(min=0).to(self.device)

    def prepare_tokens(self, slot_ids: torch.Tensor) -> None:
        """Triton path: this step's adapter slot per token (int [T] on the device, -1 = none).

        Device-only work (a sort), so a CUDA graph can capture it with static slot_ids."""
        from services.engine.kernels.lora import prepare_lora_batch
        self._batch = prepare_lora_batch(slot_ids)
        self._segments = [(0, 0, 0)]   # marks the step active; tokens are grouped on the device

    def use_batch(self, batch) -> None:
        """Triton path: a LoraBatch already laid out in device buffers (CUDA-graph inputs)."""
        self._batch = batch
        self._segments = [(0, 0, 0)]

    @property
    def is_active(self) -> bool:
        return bool(self._segments)

    def covers(self, layer: int, module: str) -> bool:
        """Whether the adapter layout holds this layer's module: a registered adapter targets it, so
        apply may add a delta there (the layout only grows; a change bumps layout_version)."""
        return (layer, module) in self._a

    def apply_group(self, layer: int, group: str, x: torch.Tensor, y: torch.Tensor) -> bool:
        """Triton path: y [T, members · out] (a fused projection's output, members in the group's
        order) += each member's LoRA, one shrink and one expand for the whole group. False when
        the group is not laid out stacked (members untargeted, unequal widths, CPU): the caller
        then applies per member."""
        views = self._group.get((layer, group))
        if views is None or self._batch is None:
            return False
        from services.engine.kernels.lora import triton_lora_apply
        a_stack, b_stack, n_slice = views
        if y.shape[-1] != b_stack.shape[1]:
            raise ValueError(f"group {group!r}: output has {y.shape[-1]} columns, its LoRA stacks {b_stack.shape[1]}")
        triton_lora_apply(y, x, a_stack, b_stack, self._batch, n_slice, rows=self.expand_rows)
        return True

    def apply(self, layer: int, module: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y [T, out] += per segment x Aᵀ Bᵀ of that segment's adapter (in place)."""
        key = (layer, module)
        if key not in self._a:
            return y
        a_stack, bt_stack = self._a[key], self._bt[key]
        if self._batch is not None:
            from services.engine.kernels.lora import triton_lora_apply
            return triton_lora_apply(y, x, a_stack, bt_stack, self._batch, rows=self.expand_rows)
        if self._token_slots is not None:
            # Ranks are zero-padded in the stacks, so the full rank_cap is exact.
            xa = torch.bmm(x[:, None, :], a_stack[self._token_slots].transpose(1, 2))  # [T,1,R]
            delta = torch.bmm(xa, bt_stack[self._token_slots])[:, 0, :]            # [T, out]
            return y.addcmul_(delta, self._token_mask)
        for slot, start, end in self._segments:
            r = self._ranks[slot].get(key, 0)
            if r == 0:
                continue
            xa = x[start:end] @ a_stack[slot, :r].t()                 # [n, r]
            y[start:end].addmm_(xa, bt_stack[slot, :r])              # += [n, r] @ [r, out]
        return y
