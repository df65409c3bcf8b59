"""The multi-LoRA shrink/expand kernels run under TRITON_INTERPRET on the CPU against the float32
reference: mixed segments (several adapters, the bare base, a segment longer than one 16-token
chunk), q|k|v-style slices, split-K 1 and 4. The GPU runs the same cases in tests/gpu/test_kernels.py.
Skipped without triton.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[4]


def check_interpreted(num_tokens: int, num_slots: int, num_slices: int) -> None:
    from services.engine.kernels.lora import lora_apply_reference, prepare_lora_batch, triton_lora_apply

    torch.manual_seed(num_tokens)
    k, n_slice, rank = 256, 64, 16
    x = torch.randn(num_tokens, k).half()
    a = (torch.randn(num_slots, num_slices * rank, k) * 0.05).half()
    b = (torch.randn(num_slots, num_slices * n_slice, rank) * 0.05).half()
    slots = torch.randint(-1, num_slots, (num_tokens,))
    slots[: min(20, num_tokens)] = num_slots - 1    # one segment longer than a 16-token chunk
    y = torch.randn(num_tokens, num_slices * n_slice).half()
    ref = lora_apply_reference(y, x, a, b, slots, n_slice)
    delta_ref = ref - y.float()
    for split_k in (1, 2, 4):
        out = triton_lora_apply(y.clone(), x, a, b, prepare_lora_batch(slots), n_slice, split_k=split_k)
        err = ((out.float() - ref).norm() / delta_ref.norm()).item()
        assert err < 1e-2, (split_k, err)
        untouched = slots < 0
        assert torch.equal(out[untouched], y[untouched]), split_k


@pytest.mark.parametrize("num_tokens,num_slots,num_slices", [(1, 1, 1), (40, 3, 3), (24, 5, 1)])
def test_lora_kernels_interpreted_match_the_reference(num_tokens: int, num_slots: int, num_slices: int) -> None:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    code = ("import torch; torch.set_num_threads(1); "
            "from tests.unit.engine.kernels.test_lora_interpreted import check_interpreted; "
            f"check_interpreted({num_tokens}, {num_slots}, {num_slices})")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
