"""LoraManager: per-segment multi-LoRA math, zero padding, slot reuse and LRU eviction."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.common.adapters import BaseDims, LoraAdapter
from services.engine.errors import AdapterCapacityError, UnknownTaskError
from services.engine.lora import LoraManager

DIMS = BaseDims(hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=4)


def make_adapter(name: str, rank: int, targets: tuple[str, ...], scaling: float = 0.5,
                 seed: int = 0, dims: BaseDims = DIMS) -> LoraAdapter:
    gen = torch.Generator().manual_seed(seed)
    weights, scale = {}, {}
    for layer in range(dims.num_layers):
        for m in targets:
            in_f, out_f = dims.features(m)
            weights[(layer, m)] = (torch.randn(rank, in_f, generator=gen),
                                   torch.randn(out_f, rank, generator=gen))
            scale[(layer, m)] = scaling
    return LoraAdapter(name=name, path=Path("/nonexistent"), rank=rank, targets=targets,
                       weights=weights, scaling=scale)


def reference(adapter: LoraAdapter | None, layer: int, module: str, x: torch.Tensor,
              dims: BaseDims = DIMS):
    if adapter is None or (layer, module) not in adapter.weights:
        return torch.zeros(x.shape[0], dims.features(module)[1])
    a, b = adapter.weights[(layer, module)]
    return adapter.scaling[(layer, module)] * (x @ a.t() @ b.t())


def manager(num_slots=4, max_rank=16, gather_max_tokens=0) -> LoraManager:
    return LoraManager(DIMS, num_slots=num_slots, max_rank=max_rank, device="cpu",
                       dtype=torch.float32, gather_max_tokens=gather_max_tokens)


@pytest.mark.parametrize("gather_max_tokens", [0, 64])   # per-segment matmuls, gather + bmm
def test_mixed_segments_match_per_adapter_math(gather_max_tokens):
    torch.set_num_threads(1)
    ads = [make_adapter("a", 2, ("q_proj", "v_proj"), seed=1),
           make_adapter("b", 8, ("q_proj", "down_proj"), 2.0, seed=2),
           make_adapter("c", 5, ("k_proj",), seed=3)]
    mgr = manager(gather_max_tokens=gather_max_tokens)
    for ad in ads:
        mgr.add_adapter(ad)
    slots = mgr.acquire({"a", "b", "c"})
    # tokens: 3 of a, 2 base, 4 of b, 1 of c
    plan = [(ads[0], 3), (None, 2), (ads[1], 4), (ads[2], 1)]
    segments, start = [], 0
    for ad, n in plan:
        segments.append((slots[ad.name] if ad else -1, start, start + n))
        start += n
    mgr.prepare(segments)
    assert (mgr._token_slots is not None) == bool(gather_max_tokens)
    for layer in range(2):
        for module in ("q_proj", "k_proj", "v_proj", "down_proj", "up_proj"):
            in_f, out_f = DIMS.features(module)
            x = torch.randn(start, in_f)
            y0 = torch.randn(start, out_f)
            got = mgr.apply(layer, module, x, y0.clone())
            want = y0.clone()
            for (ad, _), (_, s, e) in zip(plan, segments):
                want[s:e] += reference(ad, layer, module, x[s:e])
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_lru_eviction_and_capacity():
    mgr = manager(num_slots=2)
    for i, name in enumerate("abc"):
        mgr.add_adapter(make_adapter(name, 4, ("q_proj",), seed=i))
    mgr.acquire({"a"})
    mgr.acquire({"b"})
    mgr.acquire({"a"})                      # a is now most recently used
    slots = mgr.acquire({"c"})              # evicts b
    assert mgr.loaded_names == ["a", "c"] and mgr.num_loads == 3
    assert slots["c"] in (0, 1)
    with pytest.raises(AdapterCapacityError):
        mgr.acquire({"a", "b", "c"})
    with pytest.raises(UnknownTaskError):
        mgr.acquire({"zzz"})


def test_slot_reuse_clears_previous_modules():
    """A q-only adapter reusing a slot that held a q+v adapter must add nothing to v."""
    mgr = manager(num_slots=1)
    mgr.add_adapter(make_adapter("qv", 8, ("q_proj", "v_proj"), seed=1))
    mgr.add_adapter(make_adapter("q", 2, ("q_proj",), seed=2))
    mgr.acquire({"qv"})
    slot = mgr.acquire({"q"})["q"]
    mgr.prepare([(slot, 0, 3)])
    x = torch.randn(3, 16)
    assert torch.equal(mgr.apply(0, "v_proj", x, torch.zeros(3, 8)), torch.zeros(3, 8))
    # and the stacked tensors were really zeroed, not just skipped
    assert mgr._a[(0, "v_proj")][slot].abs().sum() == 0


def test_remove_and_replace():
    mgr = manager(num_slots=2)
    mgr.add_adapter(make_adapter("a", 4, ("q_proj",), seed=1))
    slot = mgr.acquire({"a"})["a"]
    new = make_adapter("a", 4, ("q_proj",), scaling=3.0, seed=9)
    mgr.add_adapter(new)                    # replacing rewrites the resident slot
    mgr.prepare([(slot, 0, 2)])
    x = torch.randn(2, 16)
    torch.testing.assert_close(mgr.apply(0, "q_proj", x, torch.zeros(2, 16)),
                               reference(new, 0, "q_proj", x), rtol=1e-5, atol=1e-5)
    mgr.remove_adapter("a")
    assert not mgr.has_adapter("a") and mgr.loaded_names == []
    with pytest.raises(UnknownTaskError):
        mgr.remove_adapter("a")


def test_rank_above_max_is_refused():
    with pytest.raises(ValueError, match="rank"):
        manager(max_rank=4).add_adapter(make_adapter("big", 8, ("q_proj",)))


def frame_bytes(rank_cap: int, targets: tuple[str, ...]) -> int:
    """Bytes of one fp32 slot row (SlotLayout) holding `targets` on every layer at rank_cap."""
    per_layer = sum(rank_cap * sum(DIMS.features(m)) for m in targets)
    return DIMS.num_layers * per_layer * 4


def test_host_packs_are_lru_within_their_budget_and_refreshed_on_replace():
    torch.set_num_threads(1)
    mgr = LoraManager(DIMS, num_slots=1, max_rank=16, device="cpu", dtype=torch.float32,
                      host_cache_bytes=2 * frame_bytes(8, ("q_proj",)))
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        mgr.add_adapter(make_adapter(name, 4, ("q_proj",), seed=seed))
    assert mgr.packed_names == ["a", "b"]                   # packed at add time, budget: 2
    for name in "abc":
        mgr.acquire({name})                                 # one slot: every acquire loads
    assert mgr.packed_names == ["b", "c"]                   # "c" packed on use, evicting "a"
    new_b = make_adapter("b", 4, ("q_proj",), seed=9)
    mgr.add_adapter(new_b)                                  # a replaced adapter is repacked
    assert mgr.packed_names == ["c", "b"]
    mgr.acquire({"b"})
    x = torch.randn(3, DIMS.hidden_size)
    mgr.prepare([(0, 0, 3)])
    y = mgr.apply(0, "q_proj", x, torch.zeros(3, DIMS.features("q_proj")[1]))
    assert torch.allclose(y, reference(new_b, 0, "q_proj", x), atol=1e-5)


@pytest.mark.parametrize("use_triton", [False, True])    # Bᵀ [r, out] rows, B [out, r] columns
def test_loaded_slot_is_the_adapter_zero_padded_in_one_contiguous_row(use_triton):
    torch.set_num_threads(1)
    mgr = LoraManager(DIMS, num_slots=3, max_rank=16, device="cpu", dtype=torch.float32,
                      use_triton=use_triton, host_cache_bytes=1 << 20)
    ad = make_adapter("a", 3, ("q_proj", "down_proj"), scaling=0.25, seed=4)
    other = make_adapter("o", 8, ("v_proj",), seed=5)      # widens the layout: v_proj too
    mgr.add_adapter(other)
    mgr.add_adapter(ad)
    assert mgr.packed_names == ["o", "a"]
    slot = mgr.acquire({"a"})["a"]
    rank_cap = 16 if use_triton else 8
    for key in [(l, m) for l in range(DIMS.num_layers) for m in ("q_proj", "v_proj", "down_proj")]:
        a_slot, b_slot = mgr._a[key][slot], mgr._bt[key][slot]
        in_f, out_f = DIMS.features(key[1])
        assert a_slot.shape == (rank_cap, in_f)
        want_a, want_b = torch.zeros(rank_cap, in_f), torch.zeros(rank_cap, out_f)
        if key in ad.weights:
            a, b = ad.weights[key]
            want_a[:3], want_b[:3] = a, 0.25 * b.t()
        assert torch.equal(a_slot, want_a)
        torch.testing.assert_close(b_slot.t() if use_triton else b_slot, want_b)
        # every slot's stacks are views of one row per slot: a load is one copy
        assert a_slot.data_ptr() - mgr._store[slot].data_ptr() in range(mgr._store[slot].numel() * 4)
    assert mgr._store.shape[1] == frame_bytes(rank_cap, ("q_proj", "v_proj", "down_proj")) // 4


def test_load_of_a_packed_adapter_does_not_repack():
    mgr = LoraManager(DIMS, num_slots=1, max_rank=16, device="cpu", dtype=torch.float32,
                      host_cache_bytes=1 << 20)
    for i, name in enumerate("ab"):
        mgr.add_adapter(make_adapter(name, 4, ("q_proj",), seed=i))
    calls = []
    pack = mgr._layout.pack
    mgr._layout.pack = lambda adapter, row: (calls.append(adapter.name), pack(adapter, row))
    for name in "abab":
        mgr.acquire({name})
    assert calls == [] and mgr.num_loads == 4


def test_layout_growth_reloads_resident_slots():
    """A larger rank and a new module arrive while an adapter is resident: the store is
    reallocated (new layout_version) and the resident adapter's math is unchanged."""
    torch.set_num_threads(1)
    mgr = manager(num_slots=2)
    small = make_adapter("s", 2, ("q_proj",), seed=1)
    mgr.add_adapter(small)
    slot = mgr.acquire({"s"})["s"]
    version = mgr.layout_version
    big = make_adapter("b", 16, ("q_proj", "up_proj"), seed=2)
    mgr.add_adapter(big)
    assert mgr.layout_version > version and mgr._a[(0, "q_proj")].shape[1] == 16
    slots = mgr.acquire({"s", "b"})
    assert slots["s"] == slot
    x = torch.randn(4, DIMS.hidden_size)
    for key, ad in (((1, "q_proj"), small), ((1, "up_proj"), big), ((1, "q_proj"), big)):
        mgr.prepare([(slots[ad.name], 0, 4)])
        got = mgr.apply(*key, x, torch.zeros(4, DIMS.features(key[1])[1]))
        torch.testing.assert_close(got, reference(ad, *key, x), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_slots_loaded_from_pinned_packs_feed_the_triton_kernels():
    """fp16 Triton path: packs are pinned, frames are reused under a 2-pack budget (event-guarded),
    and the per-slot views of the store give the kernels the reference math after evictions."""
    dims = BaseDims(hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=64)
    targets = ("q_proj", "v_proj")
    frame = dims.num_layers * sum(16 * sum(dims.features(m)) for m in targets) * 2
    mgr = LoraManager(dims, num_slots=2, max_rank=16, device="cuda", dtype=torch.float16,
                      use_triton=True, host_cache_bytes=2 * frame)
    ads = {n: make_adapter(n, r, targets, scaling=2.0, seed=i, dims=dims)
           for i, (n, r) in enumerate((("a", 8), ("b", 16), ("c", 4)))}
    for ad in ads.values():
        mgr.add_adapter(ad)
    assert mgr.packed_names == ["a", "b"] and mgr._packs.get("a").is_pinned()
    x = torch.randn(6, dims.hidden_size, device="cuda", dtype=torch.float16)
    for pair in (("a", "b"), ("b", "c"), ("c", "a"), ("a", "b")):   # every step evicts one
        slots = mgr.acquire(set(pair))
        slot_ids = torch.tensor([slots[pair[0]]] * 3 + [-1] + [slots[pair[1]]] * 2,
                                dtype=torch.int32, device="cuda")
        mgr.prepare_tokens(slot_ids)
        for key in [(0, "q_proj"), (1, "v_proj")]:
            y = mgr.apply(*key, x, torch.zeros(6, dims.features(key[1])[1], device="cuda",
                                               dtype=torch.float16))
            want = torch.cat([reference(ads[pair[0]], *key, x[:3].float().cpu(), dims),
                              torch.zeros(1, y.shape[1]),
                              reference(ads[pair[1]], *key, x[4:].float().cpu(), dims)])
            assert (y.float().cpu() - want).norm() <= 1e-2 * want.norm()   # fp16 rounding
    assert mgr.num_loads == 5


def test_covers_says_which_modules_an_adapter_targets():
    """The engine computes SiLU·mul inside down_proj's GEMM only where no registered adapter targets
    down_proj (the layout is the union of every registered adapter's modules)."""
    mgr = manager()
    assert not mgr.covers(0, "q_proj")
    mgr.add_adapter(make_adapter("a", 2, ("q_proj", "v_proj"), seed=1))
    mgr.acquire({"a"})
    assert mgr.covers(0, "q_proj") and mgr.covers(1, "v_proj")
    assert not mgr.covers(0, "down_proj")
    mgr.add_adapter(make_adapter("b", 4, ("down_proj",), seed=2))
    mgr.acquire({"b"})
    assert mgr.covers(1, "down_proj")
