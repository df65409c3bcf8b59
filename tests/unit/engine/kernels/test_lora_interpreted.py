"""The multi-LoRA shrink/expand kernels run under TRITON_INTERPRET on the CPU against the float32
reference: mixed segments (several adapters, the bare base, a segment longer than one 16-token
chunk), q|k|v-style slices, split-K 1, 2 and 4, both expand variants (segment chunks and
per-token rows). The GPU runs the same cases in tests/gpu/test_kernels.py.
Skipped without triton.
"""
from __future__ import annotations

import pytest
import torch

from tests.unit.engine.kernels.interpreted import run_interpreted


def check_interpreted(num_tokens: int, num_slots: int, num_slices: int, rank: int = 16) -> None:
    from services.engine.kernels.lora import lora_apply_reference, prepare_lora_batch, triton_lora_apply

    torch.manual_seed(num_tokens)
    k, n_slice = 256, 64
    x = torch.randn(num_tokens, k).half()
    a = (torch.randn(num_slots, num_slices * rank, k) * 0.05).half()
    b = (torch.randn(num_slots, num_slices * n_slice, rank) * 0.05).half()
    slots = torch.randint(-1, num_slots, (num_tokens,))
    slots[: min(20, num_tokens)] = num_slots - 1    # one segment longer than a 16-token chunk
    y = torch.randn(num_tokens, num_slices * n_slice).half()
    ref = lora_apply_reference(y, x, a, b, slots, n_slice)
    delta_ref = ref - y.float()
    for split_k, rows in ((1, False), (2, False), (4, False), (1, True), (4, True)):
        out = triton_lora_apply(y.clone(), x, a, b, prepare_lora_batch(slots), n_slice, split_k=split_k, rows=rows)
        err = ((out.float() - ref).norm() / delta_ref.norm()).item()
        assert err < 1e-2, (split_k, rows, err)
        untouched = slots < 0
        assert torch.equal(out[untouched], y[untouched]), (split_k, rows)


@pytest.mark.parametrize("num_tokens,num_slots,num_slices,rank", [(1, 1, 1, 16), (40, 3, 3, 16), (24, 5, 1, 16),
                                                                  (20, 2, 2, 64)])   # rank 64: the narrowest tiles
def test_lora_kernels_interpreted_match_the_reference(num_tokens: int, num_slots: int, num_slices: int,
                                                      rank: int) -> None:
    run_interpreted("tests.unit.engine.kernels.test_lora_interpreted", num_tokens, num_slots, num_slices, rank)
