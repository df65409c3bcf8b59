"""Varlen paged attention (GPU fast path): its float32 reference vs the engine's torch path
(`paged_attention`), and the Triton kernel under the Triton interpreter on CPU (small shapes)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from services.engine.attention import AttentionMetadata, paged_attention
from services.engine.kernels import attention as kernels_attention

ROOT = Path(__file__).resolve().parents[3]
BLOCK_SIZE, NUM_BLOCKS = 4, 64

# (query rows, context): prefill (n == ctx), recompute after a cached prefix (n < ctx),
# decode (n == 1), and a prompt longer than one 64-row query tile.
CASES = [(5, 5), (3, 11), (1, 9), (70, 70), (1, 1), (6, 30)]


def make_step(num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, gap: int, seed: int = 0):
    """Random caches and queries; sequence i owns q rows q_starts[i]..+n, `gap` unowned rows after."""
    gen = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(NUM_BLOCKS, BLOCK_SIZE, num_kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(NUM_BLOCKS, BLOCK_SIZE, num_kv_heads, head_dim, generator=gen).to(dtype)
    perm = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
    q_starts, q_lens, ctx_lens, tables, row = [], [], [], [], 0
    for n, ctx in CASES:
        nb = -(-ctx // BLOCK_SIZE)
        tables.append(perm[:nb])
        perm = perm[nb:]
        q_starts.append(row)
        q_lens.append(n)
        ctx_lens.append(ctx)
        row += n + gap
    q = torch.randn(row, num_heads, head_dim, generator=gen).to(dtype)
    return q, k_cache, v_cache, q_starts, q_lens, ctx_lens, tables


def torch_path(q, k_cache, v_cache, q_starts, q_lens, ctx_lens, tables) -> torch.Tensor:
    """The engine's CPU attention (`paged_attention`) on the same step, one sequence at a time,
    with k/v of the new tokens read back from the cache (so its cache write changes nothing)."""
    out = torch.zeros_like(q)
    kv_heads, d = k_cache.shape[2], k_cache.shape[3]
    for start, n, ctx, table in zip(q_starts, q_lens, ctx_lens, tables):
        pos = torch.arange(ctx - n, ctx)
        slots = torch.tensor(table)[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
        k = k_cache.view(-1, kv_heads, d)[slots].clone()
        v = v_cache.view(-1, kv_heads, d)[slots].clone()
        meta = AttentionMetadata(slot_mapping=slots, query_starts=[0, n], context_lens=[ctx],
                                 prefill_ids=[] if n == 1 else [0], prefill_blocks=[torch.tensor(table)])
        if n == 1:
            meta.decode_token_idx = torch.tensor([0])
            meta.decode_blocks = torch.tensor([table])
            meta.decode_mask = (torch.arange(len(table) * BLOCK_SIZE) < ctx)[None, None, None, :]
        out[start:start + n] = paged_attention(q[start:start + n], k, v, k_cache, v_cache, meta)
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2)])
def test_reference_matches_the_torch_path(num_heads: int, num_kv_heads: int) -> None:
    q, kc, vc, starts, lens, ctxs, tables = make_step(num_heads, num_kv_heads, 16, torch.float32, gap=2)
    ref = kernels_attention.paged_varlen_reference(q, kc, vc, starts, lens, ctxs, tables)
    assert rel_err(ref, torch_path(q, kc, vc, starts, lens, ctxs, tables)) < 1e-5


def test_host_layout_tiles_never_span_sequences() -> None:
    flat, dims = kernels_attention.VarlenBatch.host_layout([0, 70, 71], [70, 1, 3], [70, 9, 11],
                                                           [[4, 5, 6, 7, 8], [1, 2, 3], [9, 10, 11]])
    batch = kernels_attention.VarlenBatch.from_flat(torch.tensor(flat), dims)
    assert batch.block_tables.tolist() == [[4, 5, 6, 7, 8], [1, 2, 3, 0, 0], [9, 10, 11, 0, 0]]
    assert batch.tile_seq.tolist() == [0, 0, 1, 2]
    assert batch.tile_m.tolist() == [0, 64, 0, 0]
    assert batch.max_ctx == 70


def check_interpreted(num_heads: int, num_kv_heads: int, fp8: bool = False, token_major: bool = False) -> None:
    """Kernel vs the torch path; run in a process started with TRITON_INTERPRET=1 (triton's own
    jit'd helpers must be created interpreted, so the flag has to be set before triton loads).
    fp8: the caches in float8_e4m3fn (the kernel widens its tiles to the query's fp16); token_major:
    the kernel reads V from a token-major copy (kernels.attention.token_major_v)."""
    torch.manual_seed(0)
    q, kc, vc, starts, lens, ctxs, tables = make_step(num_heads, num_kv_heads, 16, torch.float16, gap=2)
    if fp8:
        kc, vc = kc.to(torch.float8_e4m3fn), vc.to(torch.float8_e4m3fn)
    batch = kernels_attention.VarlenBatch.build(starts, lens, ctxs, tables, "cpu")
    sentinel = torch.full_like(q, 7.0)
    v_run = kernels_attention.token_major_v(vc) if token_major else vc
    out = kernels_attention.paged_varlen_attention(q, kc, v_run, batch, out=sentinel.clone())
    ref = torch_path(q.float(), kc.float(), vc.float(), starts, lens, ctxs, tables)
    owned = torch.zeros(q.shape[0], dtype=torch.bool)
    for start, n in zip(starts, lens):
        owned[start:start + n] = True
    err = rel_err(out[owned], ref[owned])
    assert err < 1e-2, err
    assert torch.equal(out[~owned], sentinel[~owned])   # rows of no sequence are not written


@pytest.mark.parametrize("num_heads,num_kv_heads,fp8,token_major", [(4, 4, False, False), (4, 2, False, False),
                                                                    (4, 2, True, False), (4, 2, True, True)])
def test_triton_kernel_interpreted_matches_the_torch_path(num_heads: int, num_kv_heads: int, fp8: bool,
                                                          token_major: bool) -> None:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(sys.path))
    code = ("import torch; torch.set_num_threads(1); "
            "from tests.unit.engine.test_attention_varlen import check_interpreted; "
            f"check_interpreted({num_heads}, {num_kv_heads}, {fp8}, {token_major})")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_the_torch_path_on_an_fp8_cache_attends_the_rounded_values() -> None:
    """paged_attention (the CPU path) on fp8 caches writes the new K/V as bytes (torch has no fp8
    index_copy_) and attends every key and value as stored, the new tokens' too: the same output as on
    float32 caches holding the fp8-rounded values, and a key past ±448 is stored clamped."""
    q, kc, vc, starts, lens, ctxs, tables = make_step(4, 2, 16, torch.float32, gap=0)
    kc8, vc8 = kc.to(torch.float8_e4m3fn), vc.to(torch.float8_e4m3fn)
    n, ctx, table = 3, 11, tables[1]
    pos = torch.arange(ctx - n, ctx)
    slots = torch.tensor(table)[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
    k_new, v_new = torch.randn(n, 2, 16) * 4, torch.randn(n, 2, 16)
    k_new[0, 0, 0] = -1000.0
    meta = AttentionMetadata(slot_mapping=slots, query_starts=[0, n], context_lens=[ctx], prefill_ids=[0],
                             prefill_blocks=[torch.tensor(table)])
    out8 = paged_attention(q[:n], k_new, v_new, kc8, vc8, meta)
    rounded = [x.clamp(-448, 448).to(torch.float8_e4m3fn).float() for x in (k_new, v_new)]
    ref = paged_attention(q[:n], *rounded, kc8.float(), vc8.float(), meta)
    assert rel_err(out8, ref) < 1e-6
    assert float(kc8.view(-1, 2, 16)[slots[0], 0, 0].float()) == -448.0
