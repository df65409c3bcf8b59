"""Batched multi-LoRA: adapters in device slots (LRU), one adapter per token segment of a batch."""
from __future__ import annotations

from collections import OrderedDict

import torch

from services.common.adapters import BaseDims, LoraAdapter
from services.engine.errors import AdapterCapacityError, UnknownTaskError


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class LoraManager:
    """Keeps registered adapters on the host and up to `num_slots` of them on the device.

    For every (layer, module) that some adapter targets there is one stacked pair
    A [slots, rank_cap, in] and Bᵀ [slots, rank_cap, out] with the scaling folded
    into Bᵀ; smaller ranks are zero-padded, untargeted modules stay zero. Stacks
    grow (slots, rank) on demand so a CPU engine with small adapters stays small.
    A step calls `prepare(slot per token segment)`; each layer then calls
    `apply(layer, module, x, y)` which adds x Aᵀ Bᵀ per segment with one pair of matmuls.

    With `use_triton` (CUDA, fp16) the step runs the Triton shrink/expand kernels
    (services.engine.kernels.lora) instead: Bᵀ is then stored as B [slots, out, rank_cap],
    rank_cap a power of two ≥ 16, and tokens are grouped by slot on the device, which is
    what lets a decode step with mixed adapters be captured in a CUDA graph.
    `layout_version` changes whenever a stack is (re)allocated: graphs captured before
    hold stale addresses. Writing a slot is in place and keeps them valid.

    Slot loads copy from a host copy of each adapter already in the device dtype and layout
    (scaling folded, B transposed as the stacks want it). On CUDA these copies sit in pinned
    memory in an LRU of up to `host_cache_bytes` and the copies are non_blocking: a load does
    no host-side math and never stalls the host on a pageable copy.
    """

    def __init__(self, dims: BaseDims, num_slots: int, max_rank: int,
                 device: str | torch.device, dtype: torch.dtype,
                 gather_max_tokens: int | None = None, use_triton: bool = False,
                 host_cache_bytes: int | None = None) -> None:
        self.dims, self.num_slots, self.max_rank = dims, num_slots, max_rank
        self.device, self.dtype = torch.device(device), dtype
        self.use_triton = use_triton
        self.layout_version = 0
        self._batch = None                                     # Triton path: LoraBatch this step
        self._registered: dict[str, LoraAdapter] = {}
        self._slot_of: OrderedDict[str, int] = OrderedDict()   # LRU order: oldest first
        self._free_slots = list(range(num_slots))
        self._a: dict[tuple[int, str], torch.Tensor] = {}
        self._bt: dict[tuple[int, str], torch.Tensor] = {}
        # rank of each (layer, module) per slot; 0 = untargeted (skipped at apply time)
        self._ranks: list[dict[tuple[int, str], int]] = [{} for _ in range(num_slots)]
        self._slot_cap, self._rank_cap = 0, 0
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
        # name → {(layer, module): (A [r, in], B in the stack's layout)}, LRU order, pinned on CUDA
        self._host: OrderedDict[str, dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self._host_bytes: dict[str, int] = {}

    # ---- registry ------------------------------------------------------------
    def add_adapter(self, adapter: LoraAdapter) -> None:
        """Register (or replace) an adapter; it reaches a device slot when first used."""
        if adapter.rank > self.max_rank:
            raise ValueError(f"adapter {adapter.name!r} rank {adapter.rank} > max {self.max_rank}")
        replaced = adapter.name in self._registered
        self._registered[adapter.name] = adapter
        self._drop_host(adapter.name)
        if replaced and adapter.name in self._slot_of:
            self._write_slot(self._slot_of[adapter.name], adapter)

    def remove_adapter(self, name: str) -> None:
        if name not in self._registered:
            raise UnknownTaskError(name)
        del self._registered[name]
        self._drop_host(name)
        slot = self._slot_of.pop(name, None)
        if slot is not None:
            with torch.inference_mode():    # the stacks are made inside the engine's steps
                for key in self._ranks[slot]:   # gathered/Triton paths read every slot's rows
                    self._a[key][slot].zero_()
                    self._bt[key][slot].zero_()
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

    # ---- slots ----------------------------------------------------------------
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

    def _grow(self, slot_cap: int, rank_cap: int) -> None:
        if slot_cap <= self._slot_cap and rank_cap <= self._rank_cap:
            return
        slot_cap, rank_cap = max(slot_cap, self._slot_cap), max(rank_cap, self._rank_cap)
        for key in list(self._a):
            self._a[key] = self._resized(self._a[key], slot_cap, rank_cap, rank_dim=1)
            self._bt[key] = self._resized(self._bt[key], slot_cap, rank_cap,
                                          rank_dim=2 if self.use_triton else 1)
        self._slot_cap, self._rank_cap = slot_cap, rank_cap
        self.layout_version += 1

    def _resized(self, old: torch.Tensor, slot_cap: int, rank_cap: int,
                 rank_dim: int) -> torch.Tensor:
        size = [slot_cap, *old.shape[1:]]
        size[rank_dim] = rank_cap
        new = torch.zeros(size, device=self.device, dtype=self.dtype)
        new[tuple(slice(0, n) for n in old.shape)] = old
        return new

    def _rank_cap_for(self, rank: int) -> int:
        if self.use_triton:  # the kernels take power-of-two ranks ≥ 16 (zero padding is exact)
            return max(16, 1 << (rank - 1).bit_length())
        return min(self.max_rank, _round_up(rank, 8))

    @torch.inference_mode()
    def _write_slot(self, slot: int, adapter: LoraAdapter) -> None:
        # The Triton path takes every slot at once: stacks that never grow keep graphs valid.
        slot_cap = self.num_slots if self.use_triton else min(
            self.num_slots, max(self._slot_cap, 1 << slot.bit_length()))
        self._grow(slot_cap, self._rank_cap_for(adapter.rank))
        for key in self._ranks[slot]:               # clear what the previous tenant left
            self._a[key][slot].zero_()
            self._bt[key][slot].zero_()
        ranks = {}
        host = self._host_copy(adapter)
        for key in adapter.weights:
            if key not in self._a:
                in_f, out_f = self.dims.features(key[1])
                self._a[key] = torch.zeros(self._slot_cap, self._rank_cap, in_f,
                                           device=self.device, dtype=self.dtype)
                b_size = ((self._slot_cap, out_f, self._rank_cap) if self.use_triton
                          else (self._slot_cap, self._rank_cap, out_f))
                self._bt[key] = torch.zeros(b_size, device=self.device, dtype=self.dtype)
                self.layout_version += 1
            a_host, b_host = host[key]
            r = a_host.shape[0]
            self._a[key][slot, :r].copy_(a_host, non_blocking=True)
            if self.use_triton:
                self._bt[key][slot, :, :r].copy_(b_host, non_blocking=True)
            else:
                self._bt[key][slot, :r].copy_(b_host, non_blocking=True)
            ranks[key] = r
        self._ranks[slot] = ranks
        self.num_loads += 1

    def _host_copy(self, adapter: LoraAdapter) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
        """The adapter's tensors as the slots take them (dtype, scaling folded, B's layout), from
        the LRU host cache or made now: one pinned buffer per adapter on CUDA."""
        cached = self._host.get(adapter.name)
        if cached is not None:
            self._host.move_to_end(adapter.name)
            return cached
        shapes = {}
        for key, (a, b) in adapter.weights.items():
            b_shape = tuple(b.shape) if self.use_triton else (b.shape[1], b.shape[0])
            shapes[key] = (tuple(a.shape), b_shape)
        total = sum(sa[0] * sa[1] + sb[0] * sb[1] for sa, sb in shapes.values())
        pin = self.device.type == "cuda"
        flat = torch.empty(total, dtype=self.dtype, pin_memory=pin)
        out, offset = {}, 0
        for key, (a, b) in adapter.weights.items():
            (ra, ca), (rb, cb) = shapes[key]
            a_host = flat[offset:offset + ra * ca].view(ra, ca)
            offset += ra * ca
            b_host = flat[offset:offset + rb * cb].view(rb, cb)
            offset += rb * cb
            a_host.copy_(a)
            # Fold the scaling into B in fp32 before casting: one fewer multiply per token.
            b_scaled = b.float() * adapter.scaling[key]                 # [out, r]
            b_host.copy_(b_scaled if self.use_triton else b_scaled.t())
            out[key] = (a_host, b_host)
        num_bytes = total * flat.element_size()
        if num_bytes <= self.host_cache_bytes:
            while self._host and sum(self._host_bytes.values()) + num_bytes > self.host_cache_bytes:
                self._drop_host(next(iter(self._host)))
            self._host[adapter.name] = out
            self._host_bytes[adapter.name] = num_bytes
        return out

    def _drop_host(self, name: str) -> None:
        # Safe with copies in flight: the pinned allocator holds a block until its copies finish.
        self._host.pop(name, None)
        self._host_bytes.pop(name, None)

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

    def apply(self, layer: int, module: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y [T, out] += per segment x Aᵀ Bᵀ of that segment's adapter (in place)."""
        key = (layer, module)
        if key not in self._a:
            return y
        a_stack, bt_stack = self._a[key], self._bt[key]
        if self._batch is not None:
            from services.engine.kernels.lora import triton_lora_apply
            return triton_lora_apply(y, x, a_stack, bt_stack, self._batch)
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
