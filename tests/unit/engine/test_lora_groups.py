"""LoraManager's stacked groups (q|k|v, gate|up): one shrink and one expand per fused projection.

The layout test runs in plain torch; the math runs the Triton kernels under TRITON_INTERPRET
(skipped without triton) against per-member application and the float32 formula.
"""
from __future__ import annotations

import torch

from services.common.adapters import BaseDims
from services.engine.llama import FUSED_GROUPS
from services.engine.lora import LoraManager
from tests.unit.engine.kernels.interpreted import run_interpreted
from tests.unit.engine.test_lora import make_adapter

MHA = BaseDims(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16)
GQA = BaseDims(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def grouped_manager(dims: BaseDims, dtype=torch.float32) -> LoraManager:
    return LoraManager(dims, num_slots=4, max_rank=16, device="cpu", dtype=dtype, use_triton=True,
                       host_cache_bytes=1 << 24, groups=FUSED_GROUPS)


def test_group_views_stack_the_members_and_keep_per_member_views() -> None:
    mgr = grouped_manager(MHA)
    ad = make_adapter("a", 8, ALL, scaling=0.5, seed=1, dims=MHA)
    mgr.add_adapter(ad)
    slot = mgr.acquire({"a"})["a"]
    assert set(mgr._group) == {(layer, g) for layer in range(2) for g in FUSED_GROUPS}
    for (layer, group), (a_stack, b_stack, n_slice) in mgr._group.items():
        members = FUSED_GROUPS[group]
        assert n_slice == MHA.features(members[0])[1]
        assert torch.equal(a_stack[slot], torch.cat([mgr._a[(layer, m)][slot] for m in members]))
        assert torch.equal(b_stack[slot], torch.cat([mgr._bt[(layer, m)][slot] for m in members]))
        for m in members:   # the per-member views still hold the adapter (rank 8 padded to 16)
            a, b = ad.weights[(layer, m)]
            assert torch.equal(mgr._a[(layer, m)][slot][:8], a)
            torch.testing.assert_close(mgr._bt[(layer, m)][slot][:, :8], 0.5 * b)
            assert not mgr._bt[(layer, m)][slot][:, 8:].any()


def test_groups_need_every_member_and_equal_widths() -> None:
    mgr = grouped_manager(GQA)            # k and v narrower than q: only gate|up stacks
    mgr.add_adapter(make_adapter("a", 8, ALL, dims=GQA))
    assert {g for _, g in mgr._group} == {"gate_up_proj"}
    mgr = grouped_manager(MHA)            # k untargeted: q|k|v cannot stack
    mgr.add_adapter(make_adapter("a", 8, ("q_proj", "v_proj", "gate_proj", "up_proj"), dims=MHA))
    assert {g for _, g in mgr._group} == {"gate_up_proj"}
    cpu = LoraManager(MHA, num_slots=2, max_rank=16, device="cpu", dtype=torch.float32, groups=FUSED_GROUPS)
    cpu.add_adapter(make_adapter("a", 8, ALL, dims=MHA))
    assert not cpu._group                 # the PyTorch path keeps Bᵀ per member


def check_interpreted() -> None:
    from services.engine.kernels.lora import lora_apply_reference  # noqa: F401  (triton present)
    torch.manual_seed(0)
    mgr = grouped_manager(MHA, torch.float16)
    adapters = [make_adapter(n, r, ALL, scaling=0.5, seed=i, dims=MHA) for i, (n, r) in enumerate([("a", 8), ("b", 16)])]
    for ad in adapters:
        mgr.add_adapter(ad)
    slots = mgr.acquire({"a", "b"})
    token_adapter = [None, adapters[0], adapters[1], adapters[0], None, adapters[1], adapters[1]]
    slot_ids = torch.tensor([-1 if ad is None else slots[ad.name] for ad in token_adapter], dtype=torch.int32)
    mgr.prepare_tokens(slot_ids)
    x = (torch.randn(len(token_adapter), 64) * 0.5).half()
    for layer in range(2):
        for group, members in FUSED_GROUPS.items():
            width = sum(MHA.features(m)[1] for m in members)
            y0 = torch.randn(len(token_adapter), width).half()
            grouped = y0.clone()
            assert mgr.apply_group(layer, group, x, grouped)
            per_member = y0.clone()
            start = 0
            for m in members:
                out_f = MHA.features(m)[1]
                mgr.apply(layer, m, x, per_member[:, start:start + out_f])
                start += out_f
            torch.testing.assert_close(grouped, per_member, atol=2e-3, rtol=0)
            want = y0.float().clone()
            start = 0
            for m in members:
                out_f = MHA.features(m)[1]
                for t, ad in enumerate(token_adapter):
                    if ad is not None:
                        a, b = ad.weights[(layer, m)]
                        want[t, start:start + out_f] += 0.5 * (b.float() @ (a.float() @ x[t].float()))
                start += out_f
            err = ((grouped.float() - want).norm() / (want - y0.float()).norm()).item()
            assert err < 1e-2, (layer, group, err)
            assert torch.equal(grouped[0], y0[0]) and torch.equal(grouped[4], y0[4])   # no adapter


def test_grouped_apply_matches_per_member_and_the_formula_interpreted() -> None:
    run_interpreted("tests.unit.engine.test_lora_groups")
