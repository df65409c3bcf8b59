"""GPU kernels vs float32 references: W4A16 GEMM (every tuner candidate), multi-LoRA, paged attention,
fused ops, and a CUDA-graphed decode step equal to the eager one."""
from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

triton = pytest.importorskip("triton")

from services.engine.kernels.attention import (  # noqa: E402
    VarlenBatch, paged_decode_attention, paged_decode_reference, paged_decode_rope_attention, paged_varlen_attention,
    paged_varlen_reference,
)
from services.engine.kernels.fused_ops import (  # noqa: E402
    add_rmsnorm, add_rmsnorm_reference, rmsnorm, rope_and_cache, rope_reference, rope_tables, silu_mul,
)
from services.engine.kernels.gptq_format import (  # noqa: E402
    dequantize_codes, dequantize_reference, quantize_gptq_v1, repack_for_kernel, repack_values, rtn_codes,
    rtn_kernel_weights,
)
from services.engine.kernels.lora import lora_apply_reference, prepare_lora_batch, triton_lora_apply  # noqa: E402
from services.engine.kernels.gemm_tuner import GemmTuner  # noqa: E402
from services.engine.kernels.quant_linear import TritonQuantLinear  # noqa: E402
from services.engine.kernels.gemm_configs import GemmConfig, candidate_configs  # noqa: E402
from services.engine.kernels import pdl  # noqa: E402
from services.engine.kernels.w4a16 import w4a16_matmul  # noqa: E402
from services.engine.kernels.w4_decoder import DecoderShape, GraphedDecode, W4Decoder  # noqa: E402

DEV = torch.device("cuda")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all()
    return ((out.float() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("m", [1, 3, 16, 40, 128, 200])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits", [4, 3])
def test_w4a16_every_candidate_matches_reference(m: int, act_order: bool, bits: int) -> None:
    k, n = 768, 320  # 6 K-blocks, N not a multiple of 128 or 256: exercises the masks
    w = torch.randn(k, n, device=DEV)
    perm = torch.randperm(k, device=DEV) if act_order else None
    if bits == 4:
        t = quantize_gptq_v1(w, 128, perm)
        ref_w = dequantize_reference(t)
        kw = repack_for_kernel(t)
    else:
        codes, zeros, scales, g_idx = rtn_codes(w, 128, 3, perm)
        ref_w = dequantize_codes(codes, zeros, scales, g_idx)
        kw = repack_values(codes, zeros, scales, g_idx, 128, bits=3)
    x = torch.randn(m, k, device=DEV).half()
    bias = torch.randn(n, device=DEV).half()
    ref = x.float() @ ref_w + bias.float()
    for i, cfg in enumerate(candidate_configs(m)):
        b = bias if i == 0 else None  # bias on one config only: halves the kernels to compile
        out = w4a16_matmul(x, kw, cfg, b)
        assert out.shape == (m, n)
        assert rel_err(out, ref if b is not None else ref - bias.float()) < 1e-2, cfg


@pytest.mark.parametrize("m", [1, 40, 200])
def test_direct_launch_matches_tritons_path(m: int) -> None:
    """kernels.launch: the second call of a specialization skips Triton's binding; outputs stay
    equal to the reference on aligned and misaligned inputs (a new specialization each), and with
    the direct path off."""
    from services.engine.kernels import launch as L
    k, n = 768, 320
    w = torch.randn(k, n, device=DEV)
    t = quantize_gptq_v1(w, 128, None)
    ref_w, kw = dequantize_reference(t), repack_for_kernel(t)
    flat = torch.randn(m * k + 1, device=DEV).half()
    for x in (flat[:-1].view(m, k), flat[1:].view(m, k)):   # the second: 2 bytes past 16-byte alignment
        ref = x.float() @ ref_w
        for cfg in candidate_configs(m)[:6]:
            kept = len(L._kernels)
            first = w4a16_matmul(x, kw, cfg).clone()
            second = w4a16_matmul(x, kw, cfg)
            assert rel_err(first, ref) < 1e-2 and rel_err(second, ref) < 1e-2, cfg
            assert not L.ENABLED or len(L._kernels) >= kept, cfg
    assert not L.ENABLED or L._kernels, "no specialization was kept: the direct path never ran"


@pytest.mark.parametrize("m", [1, 16, 40, 200])
def test_serial_split_k_matches_reference(m: int, monkeypatch) -> None:
    """w4a16.SERIAL_SPLIT_K (experimental): one split candidate of every kind, 20 calls each
    (a lost or early count would show as a wrong tile), then replayed from a CUDA graph; the locks
    are back at zero after each call."""
    from services.engine.kernels import w4a16 as W
    monkeypatch.setattr(W, "SERIAL_SPLIT_K", True)
    k, n = 1536, 320
    t = quantize_gptq_v1(torch.randn(k, n, device=DEV), 128, None)
    ref_w, kw = dequantize_reference(t), repack_for_kernel(t)
    x = torch.randn(m, k, device=DEV).half()
    ref = x.float() @ ref_w
    kinds: dict[str, object] = {}   # one split candidate per kind (each is a fresh compile with SERIAL)
    for c in candidate_configs(m):
        if c.split_k > 1 and c.kind != "dense":
            kinds.setdefault(c.kind, c)
    for cfg in kinds.values():
        for _ in range(20):
            assert rel_err(w4a16_matmul(x, kw, cfg), ref) < 1e-2, cfg
        assert all(int(b.abs().sum()) == 0 for b in W._locks.values()), cfg
    cfg = next(c for c in candidate_configs(m) if c.split_k > 1 and c.kind != "dense")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = w4a16_matmul(x, kw, cfg)
    for _ in range(5):
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out, ref) < 1e-2, cfg


@pytest.mark.parametrize("group_size", [128, 256])
def test_quant_linear_forward_and_tuner(group_size: int) -> None:
    k, n = 1024, 512
    t = quantize_gptq_v1(torch.randn(k, n, device=DEV), group_size)
    tuner = GemmTuner(num_reps=3)
    lin = TritonQuantLinear.from_gptq(t, tuner=tuner)
    x = torch.randn(2, 3, k, device=DEV).half()
    out = lin(x)
    ref = x.float() @ dequantize_reference(t)
    assert out.shape == (2, 3, n)
    assert rel_err(out, ref) < 1e-2
    assert list(tuner.best) == [(8, n, k, 4)]  # 6 rows tune under the bucket of 8


def test_tuner_cache_skips_timing_after_a_restart(tmp_path) -> None:
    k, n = 1024, 512
    t = quantize_gptq_v1(torch.randn(k, n, device=DEV), 128)
    x = torch.randn(1, k, device=DEV).half()
    first = GemmTuner(num_reps=3, cache_path=tmp_path / "gemm_tuner.json")
    out1 = TritonQuantLinear.from_gptq(t, tuner=first)(x)
    assert first.timings_ms                                  # timed once
    second = GemmTuner(num_reps=3, cache_path=tmp_path / "gemm_tuner.json")
    out2 = TritonQuantLinear.from_gptq(t, tuner=second)(x)
    assert not second.timings_ms and second.best == first.best   # the restart reused the choice
    assert rel_err(out2, out1.float()) < 1e-3


@pytest.mark.parametrize("num_tokens,num_slots", [(1, 1), (7, 3), (64, 32), (300, 5)])
@pytest.mark.parametrize("num_slices", [1, 3])
@pytest.mark.parametrize("rank", [16, 64])
def test_lora_matches_reference(num_tokens: int, num_slots: int, num_slices: int, rank: int) -> None:
    k, n_slice = 512, 192
    x = torch.randn(num_tokens, k, device=DEV).half()
    a = (torch.randn(num_slots, num_slices * rank, k, device=DEV) * 0.05).half()
    b = (torch.randn(num_slots, num_slices * n_slice, rank, device=DEV) * 0.05).half()
    slots = torch.randint(-1, num_slots, (num_tokens,), device=DEV)
    y = torch.randn(num_tokens, num_slices * n_slice, device=DEV).half()
    ref = lora_apply_reference(y, x, a, b, slots, n_slice)
    for split_k, rows in ((1, False), (4, False), (4, True)):
        out = triton_lora_apply(y.clone(), x, a, b, prepare_lora_batch(slots), n_slice, split_k=split_k, rows=rows)
        delta_ref = ref - y.float()
        if delta_ref.norm() > 0:
            assert ((out.float() - ref).norm() / delta_ref.norm()).item() < 1e-2
        untouched = slots < 0
        assert torch.equal(out[untouched], y[untouched])


@pytest.mark.parametrize("num_heads,num_kv_heads", [(8, 8), (8, 2)])
def test_paged_decode_attention(num_heads: int, num_kv_heads: int) -> None:
    bsz, d, block_size, num_blocks = 5, 128, 16, 64
    lens = torch.tensor([1, 17, 64, 100, 130], dtype=torch.int32, device=DEV)
    max_blocks = 9
    tables = torch.randperm(num_blocks, device=DEV)[: bsz * max_blocks].reshape(bsz, max_blocks).int()
    kc = torch.randn(num_blocks, block_size, num_kv_heads, d, device=DEV).half()
    vc = torch.randn(num_blocks, block_size, num_kv_heads, d, device=DEV).half()
    q = torch.randn(bsz, num_heads, d, device=DEV).half()
    out = paged_decode_attention(q, kc, vc, tables, lens)
    assert rel_err(out, paged_decode_reference(q, kc, vc, tables, lens)) < 1e-2
    for block_n, warps in ((16, 4), (32, 4), (64, 8)):    # other launch shapes, with the register double buffer
        out = paged_decode_attention(q, kc, vc, tables, lens, block_n=block_n, num_warps=warps, prefetch=True,
                                     dot=False)
        assert rel_err(out, paged_decode_reference(q, kc, vc, tables, lens)) < 1e-2
    for block_n, warps, stages in ((32, 4, None), (64, 8, 4), (128, 4, 2)):   # the tile math on tensor cores
        out = paged_decode_attention(q, kc, vc, tables, lens, block_n=block_n, num_warps=warps, num_stages=stages,
                                     dot=True)
        assert rel_err(out, paged_decode_reference(q, kc, vc, tables, lens)) < 1e-2



@pytest.mark.parametrize("num_heads,num_kv_heads", [(32, 32), (32, 8)])
def test_paged_decode_rope_attention(num_heads: int, num_kv_heads: int) -> None:
    """The fused decode kernel against the two-kernel path it replaces (rope_and_cache, then
    paged_decode_attention) on the same inputs: output and the cache slots it writes."""
    bsz, d, block_size, num_blocks, max_blocks = 6, 128, 16, 80, 12
    lens = torch.tensor([1, 2, 17, 64, 100, 190], dtype=torch.int32, device=DEV)
    tables = torch.randperm(num_blocks, device=DEV)[: bsz * max_blocks].reshape(bsz, max_blocks).int()
    kc = torch.randn(num_blocks, block_size, num_kv_heads, d, device=DEV).half()
    vc = torch.randn(num_blocks, block_size, num_kv_heads, d, device=DEV).half()
    qkv = torch.randn(bsz, (num_heads + 2 * num_kv_heads) * d, device=DEV).half()
    pos = (lens - 1).long()
    slots = tables[torch.arange(bsz, device=DEV), pos // block_size].long() * block_size + pos % block_size
    cos, sin = rope_tables(256, d, 10000.0, DEV)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    q = rope_and_cache(qkv, pos, cos, sin, kc_ref, vc_ref, slots, num_heads, num_kv_heads)
    ref = paged_decode_attention(q, kc_ref, vc_ref, tables, lens)
    kc0, vc0 = kc.clone(), vc.clone()
    out = paged_decode_rope_attention(qkv, pos, cos, sin, kc, vc, slots, tables, lens, num_heads)
    assert rel_err(out, ref) < 1e-2
    assert rel_err(out, paged_decode_reference(q, kc_ref, vc_ref, tables, lens)) < 1e-2
    assert torch.equal(vc, vc_ref)
    assert (kc.float() - kc_ref.float()).abs().max().item() < 2e-3   # same rotation, maybe another rounding
    for block_n, warps in ((16, 4), (32, 4), (64, 8)):    # other launch shapes, with the register double buffer
        kc2, vc2 = kc.clone(), vc.clone()
        out = paged_decode_rope_attention(qkv, pos, cos, sin, kc2, vc2, slots, tables, lens, num_heads,
                                          block_n=block_n, num_warps=warps, prefetch=True, dot=False)
        assert rel_err(out, ref) < 1e-2 and torch.equal(kc2, kc) and torch.equal(vc2, vc)
    # split-KV (flash-decoding): runs of whole tiles, empty ones included, merged by a second launch;
    # the slots are written once, from the caches as they were before any write
    # and the tile math on tensor cores, split and not
    for splits, block_n, prefetch, dot in ((2, 64, False, False), (5, 16, True, False), (16, 32, False, False),
                                           (1, 64, False, True), (4, 32, False, True)):
        kc2, vc2 = kc0.clone(), vc0.clone()
        out = paged_decode_rope_attention(qkv, pos, cos, sin, kc2, vc2, slots, tables, lens, num_heads,
                                          block_n=block_n, prefetch=prefetch, splits=splits, dot=dot)
        assert rel_err(out, ref) < 1e-2, (splits, block_n, dot)
        assert torch.equal(kc2, kc) and torch.equal(vc2, vc)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(32, 32), (32, 8)])
def test_decode_attention_on_an_fp8_cache(num_heads: int, num_kv_heads: int) -> None:
    """fp8 (e4m3) caches: the fused kernel and the two-kernel path write each new K/V as torch rounds
    it (clamped to ±448, round to nearest even: cvt.rn.satfinite), bytes equal between the two paths,
    and attend as the float32 reference over the same fp8 values; split-KV, CUDA-core loop, varlen."""
    fp8 = torch.float8_e4m3fn
    bsz, d, block_size, num_blocks, max_blocks = 6, 128, 16, 80, 12
    lens = torch.tensor([1, 2, 17, 64, 100, 190], dtype=torch.int32, device=DEV)
    tables = torch.randperm(num_blocks, device=DEV)[: bsz * max_blocks].reshape(bsz, max_blocks).int()
    kc = (torch.randn(num_blocks, block_size, num_kv_heads, d, device=DEV) * 3).to(fp8)
    vc = torch.randn(num_blocks, block_size, num_kv_heads, d, device=DEV).to(fp8)
    qkv = torch.randn(bsz, (num_heads + 2 * num_kv_heads) * d, device=DEV).half()
    qkv[:, num_heads * d + 1] = 1000.0
    pos = (lens - 1).long()
    slots = tables[torch.arange(bsz, device=DEV), pos // block_size].long() * block_size + pos % block_size
    cos, sin = rope_tables(256, d, 10000.0, DEV)
    kc_two, vc_two = kc.clone(), vc.clone()
    q = rope_and_cache(qkv, pos, cos, sin, kc_two, vc_two, slots, num_heads, num_kv_heads)
    _, k_all, v_all = qkv.view(bsz, -1, d).split([num_heads, num_kv_heads, num_kv_heads], dim=1)
    k_rot = rope_reference(k_all, pos, cos, sin).float()
    want_k = k_rot.clamp(-448, 448).to(fp8).float()
    want_v = v_all.float().clamp(-448, 448).to(fp8).float()
    got_k = kc_two.view(-1, num_kv_heads, d)[slots].float()
    # the rotation in fp32 on both sides: at most a rare tie rounds the other way
    assert (got_k != want_k).float().mean().item() < 1e-3
    assert torch.equal(vc_two.view(-1, num_kv_heads, d)[slots].float(), want_v)
    assert got_k.abs().max().item() == 448.0
    ref = paged_decode_reference(q, kc_two.float(), vc_two.float(), tables, lens)
    for splits, block_n, dot in ((1, 64, True), (1, 64, False), (4, 32, True), (16, 16, False)):
        kc2, vc2 = kc.clone(), vc.clone()
        out = paged_decode_rope_attention(qkv, pos, cos, sin, kc2, vc2, slots, tables, lens, num_heads,
                                          block_n=block_n, splits=splits, dot=dot)
        assert rel_err(out, ref) < 1e-2, (splits, block_n, dot)
        assert torch.equal(kc2.view(torch.uint8), kc_two.view(torch.uint8))
        assert torch.equal(vc2.view(torch.uint8), vc_two.view(torch.uint8))
    for dot in (True, False):
        assert rel_err(paged_decode_attention(q, kc_two, vc_two, tables, lens, dot=dot), ref) < 1e-2


def test_split_decode_attention_in_a_cuda_graph() -> None:
    """Split-KV under CUDA graph capture: the grid is fixed at capture, each replay splits the
    contexts it finds (shorter and longer than at capture) and matches the eager unsplit kernel."""
    num_heads, d, block_size, num_blocks, max_blocks, bsz = 32, 128, 16, 160, 20, 4
    tables = torch.randperm(num_blocks, device=DEV)[: bsz * max_blocks].reshape(bsz, max_blocks).int()
    kc = torch.randn(num_blocks, block_size, num_heads, d, device=DEV).half()
    vc = torch.randn(num_blocks, block_size, num_heads, d, device=DEV).half()
    qkv = torch.randn(bsz, 3 * num_heads * d, device=DEV).half()
    cos, sin = rope_tables(512, d, 10000.0, DEV)
    lens = torch.tensor([40, 3, 200, 120], dtype=torch.int32, device=DEV)
    pos = torch.empty(bsz, dtype=torch.long, device=DEV)
    slots = torch.empty(bsz, dtype=torch.long, device=DEV)

    def place() -> None:
        pos.copy_((lens - 1).long())
        slots.copy_(tables[torch.arange(bsz, device=DEV), pos // block_size].long() * block_size + pos % block_size)

    place()
    run = lambda: paged_decode_rope_attention(qkv, pos, cos, sin, kc, vc, slots, tables, lens, num_heads,  # noqa: E731
                                              splits=8)
    run()   # compiled before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for new_lens in ([1, 17, 300, 64], [319, 2, 5, 250]):
        lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        place()
        graph.replay()
        want = paged_decode_rope_attention(qkv, pos, cos, sin, kc.clone(), vc.clone(), slots, tables, lens, num_heads,
                                           splits=1, dot=False)
        assert rel_err(out, want) < 1e-3, new_lens


@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("bits", [4, 3])
def test_stream_k_runs_cross_tiles_with_bias_and_residual(m: int, bits: int) -> None:
    """Stream-K at 1 and 3 programs per SM on 35 K blocks x 7 column tiles: runs of 2+ units start
    and end inside tiles, so a tile's partials come from several programs; the bias is added once
    per tile; the residual form adds onto the stream in place."""
    k, n = 4480, 448
    codes, zeros, scales, g_idx = rtn_codes(torch.randn(k, n, device=DEV), 128, bits, None)
    ref_w = dequantize_codes(codes, zeros, scales, g_idx)
    kw = repack_values(codes, zeros, scales, g_idx, 128, bits=bits)
    x = torch.randn(m, k, device=DEV).half()
    bias = torch.randn(n, device=DEV).half()
    ref = x.float() @ ref_w + bias.float()
    for per_sm in (1, 3):
        cfg = GemmConfig("mma8_sk", 16, 64, per_sm, 4, 3, fast_deq=True, zsub=True)
        assert rel_err(w4a16_matmul(x, kw, cfg, bias), ref) < 1e-2, cfg
        residual = torch.randn(m, n, device=DEV).half()
        want = residual.float() + ref
        got = w4a16_matmul(x, kw, cfg, bias, accumulate=residual)
        assert got.data_ptr() == residual.data_ptr()
        assert rel_err(got, want) < 1e-2, cfg


@pytest.mark.parametrize("m", [1, 4, 16, 64])
def test_glu_input_equals_silu_mul_then_gemm(m: int) -> None:
    """One tuner candidate per kernel kind at M, down_proj's shape (11008 x 4096): the GEMM on [gate | up] with
    glu=True against the same config on silu_mul's output (the same fp16 operand, so equal up to
    the split-K atomics' order)."""
    k, n = 11008, 4096
    kw = rtn_kernel_weights(torch.randn(n, k, device=DEV) * k ** -0.5, 128, 4)
    gate_up = torch.randn(m, 2 * k, device=DEV).half()
    act = silu_mul(gate_up)
    kinds = set()
    for cfg in candidate_configs(m):
        if cfg.kind in kinds:     # one config per kernel kind (each its own load sites)
            continue
        kinds.add(cfg.kind)
        want = w4a16_matmul(act, kw, cfg)
        got = w4a16_matmul(gate_up, kw, cfg, glu=True)
        assert rel_err(got, want.float()) < 2e-3, cfg


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(32, 32), (32, 8)])
def test_paged_varlen_attention(dtype: torch.dtype, num_heads: int, num_kv_heads: int) -> None:
    """Prefill, recompute after a cached prefix, decode and multi-tile prompts in one launch."""
    d, block_size, num_blocks = 128, 16, 256
    cases = [(60, 60), (1, 130), (200, 200), (17, 300), (1, 1), (64, 64), (65, 65)]  # (n, ctx)
    perm = torch.randperm(num_blocks).tolist()
    starts, lens, ctxs, tables, row = [], [], [], [], 0
    for n, ctx in cases:
        nb = -(-ctx // block_size)
        tables.append(perm[:nb])
        perm = perm[nb:]
        starts.append(row)
        lens.append(n)
        ctxs.append(ctx)
        row += n + 3                                       # 3 rows no sequence owns
    kc = torch.randn(num_blocks, block_size, num_kv_heads, d, device=DEV).to(dtype)
    vc = torch.randn(num_blocks, block_size, num_kv_heads, d, device=DEV).to(dtype)
    q = torch.randn(row, num_heads, d, device=DEV).to(dtype)
    out = paged_varlen_attention(q, kc, vc, VarlenBatch.build(starts, lens, ctxs, tables, DEV),
                                 out=torch.zeros_like(q))
    ref = paged_varlen_reference(q, kc, vc, starts, lens, ctxs, tables)
    assert rel_err(out, ref) < 1e-2
    owned = torch.zeros(row, dtype=torch.bool, device=DEV)
    for start, n in zip(starts, lens):
        owned[start:start + n] = True
    assert (out[~owned] == 0).all()


def test_fused_ops() -> None:
    t, h = 9, 4096
    x = torch.randn(t, h, device=DEV).half()
    r = torch.randn(t, h, device=DEV).half()
    w = torch.rand(h, device=DEV).half()
    out, res = add_rmsnorm(x, w, 1e-5, r)
    ref_out, ref_res = add_rmsnorm_reference(x, w, 1e-5, r)
    assert rel_err(out, ref_out) < 1e-2 and rel_err(res, ref_res) < 1e-2
    assert rel_err(rmsnorm(x, w, 1e-5), add_rmsnorm_reference(x, w, 1e-5)[0]) < 1e-2
    gu = torch.randn(t, 2 * 1000, device=DEV).half()
    ref = torch.nn.functional.silu(gu[:, :1000].float()) * gu[:, 1000:].float()
    assert rel_err(silu_mul(gu), ref) < 1e-2

    num_heads, num_kv, d, bs = 4, 2, 64, 16
    cos, sin = rope_tables(256, d, 10000.0, DEV)
    qkv = torch.randn(t, (num_heads + 2 * num_kv) * d, device=DEV).half()
    pos = torch.randint(0, 256, (t,), device=DEV)
    kc = torch.zeros(8, bs, num_kv, d, device=DEV).half()
    vc = torch.zeros_like(kc)
    slots = torch.randperm(8 * bs, device=DEV)[:t]
    q = rope_and_cache(qkv, pos, cos, sin, kc, vc, slots, num_heads, num_kv)
    parts = qkv.view(t, num_heads + 2 * num_kv, d)
    assert rel_err(q, rope_reference(parts[:, :num_heads], pos, cos, sin)) < 1e-2
    kflat = kc.view(-1, num_kv, d)[slots]
    assert rel_err(kflat, rope_reference(parts[:, num_heads:num_heads + num_kv], pos, cos, sin)) < 1e-2
    assert torch.equal(vc.view(-1, num_kv, d)[slots], parts[:, num_heads + num_kv:])


@pytest.mark.parametrize("with_pdl,fused", [(0, ""), (1, ""), (2, ""), (0, "attn"), (1, "attn"), (0, "all"),
                                            (1, "all")],
                         ids=["plain", "pdl", "pdl-prefetch", "fused-attn", "pdl-fused-attn", "fused-all",
                              "pdl-fused-all"])
def test_graphed_decode_equals_eager(with_pdl: int, fused: str) -> None:
    """with_pdl (a PDL mode): the reference is the plain eager step; eager and graphed steps with
    programmatic dependent launch (every Triton kernel launched while its predecessor runs; mode 2
    with the GEMMs' L2 prefetch of their weights before the wait) must match it. fused: the steps
    compared run RoPE and the KV-cache write inside the attention kernel ("attn"), and SiLU·mul
    inside the down GEMM ("all", compared without LoRA: the decoder's adapters cover down)."""
    if with_pdl and not pdl.supported():
        pytest.skip("programmatic dependent launch needs sm_90+ and Triton's griddepcontrol")
    # with PDL, Llama-2-7B widths: grids of hundreds of programs, so an early read would show
    hidden, inter, heads = (4096, 11008, 32) if with_pdl else (512, 1024, 4)
    shape = DecoderShape(hidden=hidden, intermediate=inter, num_layers=2, num_heads=heads, num_kv_heads=heads,
                         head_dim=128, vocab=1000)
    model = W4Decoder(shape, num_blocks=64, block_size=16, device=DEV)
    model.set_random_adapters(num_slots=3, rank=16)
    bsz = 4
    lens = torch.tensor([5, 20, 33, 1], dtype=torch.int32, device=DEV)
    tables = torch.arange(bsz * 4, device=DEV, dtype=torch.int32).reshape(bsz, 4)
    pos = (lens - 1).long()
    slot_map = (tables[torch.arange(bsz), pos // 16].long() * 16 + pos % 16)
    inputs = dict(token_ids=torch.randint(0, 1000, (bsz,), device=DEV), positions=pos, block_tables=tables,
                  context_lens=lens, slot_mapping=slot_map,
                  slot_ids=torch.tensor([0, -1, 2, 0], device=DEV))
    eager = model.decode(**inputs).clone()
    no_lora = model.decode(**{**inputs, "slot_ids": None})
    assert rel_err(no_lora, eager.float()) > 1e-3  # the adapters change the logits
    if fused == "all":
        inputs, eager = {**inputs, "slot_ids": None}, no_lora.clone()
    try:
        assert pdl.set_pdl(with_pdl) == with_pdl
        model.fused_decode_attention = fused in ("attn", "all")
        model.fused_mlp_activation = fused == "all"
        _check_decode_variants(model, inputs, eager)
    finally:
        pdl.set_pdl(0)
        model.fused_decode_attention = model.fused_mlp_activation = False


def _check_decode_variants(model, inputs: dict, eager: torch.Tensor) -> None:
    """The in-place and zeroed-output layouts, eager and graph-replayed, against `eager`."""
    assert rel_err(model.decode(**inputs), eager.float()) < 1e-2
    model.inplace_outputs = False   # zeroed o/down outputs + add_rmsnorm: the same step
    assert rel_err(model.decode(**inputs), eager.float()) < 1e-2
    model.inplace_outputs = True
    graphed = GraphedDecode(model, inputs)
    # split-K atomics make summation order vary: equal up to rounding, not bitwise
    assert rel_err(graphed.replay(), eager.float()) < 1e-2
    assert rel_err(graphed.replay(), eager.float()) < 1e-2


@pytest.mark.parametrize("k_width", [2, 4])
@pytest.mark.parametrize("m", [1, 5, 16, 40])
def test_fragment_tma_kernel_matches_reference(m: int, k_width: int) -> None:
    """The TMA kinds (block-major fragment codes fetched by TMA: frag_tma, and frag_gemv_tma at M <= 4) against
    the float32 reference: every tuner candidate at this M, bias and split-K, onto a residual, the GLU input, and replayed
    from a CUDA graph (the encoded descriptor captured with the launch)."""
    from services.engine.kernels.gemm_configs import tma_candidate_configs
    from services.engine.kernels.gptq_format import to_fragment_order
    from services.engine.kernels.w4a16 import w4a16_matmul
    from services.engine.kernels.w4a16_frag import frag_matmul
    k, n = 768, 328  # N a multiple of 8 but not of the tiles: the last box runs into the next block's codes
    codes, zeros, scales, g_idx = rtn_codes(torch.randn(k, n, device=DEV), 128, 4, torch.randperm(k, device=DEV))
    ref_w = dequantize_codes(codes, zeros, scales, g_idx)
    kw = to_fragment_order(repack_values(codes, zeros, scales, g_idx, 128, bits=4), k_width, block_major=True)
    x = torch.randn(m, k, device=DEV).half()
    bias = torch.randn(n, device=DEV).half()
    ref = x.float() @ ref_w
    for cfg in tma_candidate_configs(m):
        assert rel_err(w4a16_matmul(x, kw, cfg), ref) < 1e-2, cfg
        assert rel_err(w4a16_matmul(x, kw, cfg, bias=bias), ref + bias.float()) < 1e-2, cfg
    onto = torch.randn(m, n, device=DEV).half()
    want = onto.float() + ref
    cfg = next(c for c in tma_candidate_configs(m) if c.kind == "frag_tma")
    frag_matmul(x, kw, "frag_tma", cfg.block_m, cfg.block_n, 3, num_stages=cfg.num_stages, zsub=True, fma=True,
                accumulate=onto)
    assert rel_err(onto, want) < 1e-2
    out = torch.zeros(m, n, device=DEV, dtype=torch.float16)
    step = lambda: frag_matmul(x, kw, "frag_tma", cfg.block_m, cfg.block_n, 2, num_stages=cfg.num_stages,  # noqa: E731
                               zsub=True, fma=True, accumulate=out)
    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    out.zero_()
    graph.replay()
    assert rel_err(out, ref) < 1e-2
    codes, zeros, scales, g_idx = rtn_codes(torch.randn(k, n, device=DEV), 128, 4)
    plain = to_fragment_order(repack_values(codes, zeros, scales, g_idx, 128, bits=4), k_width, block_major=True)
    gate_up = torch.randn(m, 2 * k, device=DEV).half()
    want = silu_mul(gate_up).float() @ dequantize_codes(codes, zeros, scales, g_idx)
    out = frag_matmul(gate_up, plain, "frag_tma", cfg.block_m, cfg.block_n, 2, num_stages=cfg.num_stages,
                      zsub=True, fma=True, glu=True)
    assert rel_err(out, want) < 1e-2


@pytest.mark.parametrize("k_width", [2, 4])
@pytest.mark.parametrize("m", [1, 5, 16, 40, 128])
def test_fragment_kernels_match_reference(m: int, k_width: int) -> None:
    """kernels/w4a16_frag.py on the GPU: every form (PTX unpacking shift / fma, 1024 + q with the Σx
    correction, double buffer or Triton stages, swapped operands, the GEMV) against the float32 reference."""
    from services.engine.kernels.gptq_format import to_fragment_order
    from services.engine.kernels.w4a16_frag import frag_matmul
    k, n = 768, 328  # 6 K-blocks; N a multiple of 8 but not of the tiles: exercises the masks
    codes, zeros, scales, g_idx = rtn_codes(torch.randn(k, n, device=DEV), 128, 4, torch.randperm(k, device=DEV))
    ref_w = dequantize_codes(codes, zeros, scales, g_idx)
    kw = to_fragment_order(repack_values(codes, zeros, scales, g_idx, 128, bits=4), k_width)
    x = torch.randn(m, k, device=DEV).half()
    bias = torch.randn(n, device=DEV).half()
    ref = x.float() @ ref_w + bias.float()
    forms = [dict(zsub=True, fma=True), dict(zsub=True), dict(zsub=False)]
    for bm, bn, warps, split in [(16, 64, 2, 2), (16, 256, 4, 3), (32, 128, 4, 1), (64, 128, 8, 2), (128, 64, 4, 6)]:
        for form in forms:
            for prefetch in (False, True):
                out = frag_matmul(x, kw, "frag", bm, bn, split, num_warps=warps, num_stages=1 if prefetch else 2,
                                  prefetch=prefetch, bias=bias, **form)
                assert rel_err(out, ref) < 1e-2, (bm, bn, warps, split, form, prefetch)
    for bm, bn, warps, split in [(16, 64, 4, 2), (64, 128, 4, 1), (128, 64, 4, 3), (128, 128, 8, 1)]:
        for form in forms[:2]:     # swapped operands (frag_t): zsub only
            out = frag_matmul(x, kw, "frag_t", bm, bn, split, num_warps=warps, num_stages=2, bias=bias, **form)
            assert rel_err(out, ref) < 1e-2, ("frag_t", bm, bn, warps, split, form)
    for bn, warps, split in [(64, 1, 4), (128, 2, 1)]:
        for prefetch in (False, True):
            out = frag_matmul(x, kw, "frag_gemv", 1, bn, split, num_warps=warps, prefetch=prefetch, bias=bias)
            assert rel_err(out, ref) < 1e-2, (bn, warps, split, prefetch)
    # the codes stored block-major (other strides, same arithmetic): one split (plain stores, no atomics
    # in a varying order) gives the same output bits, every kind; split-K within the tolerance
    blocked = to_fragment_order(kw, k_width, block_major=True)
    for kind, bm, bn, extra in (("frag", 16, 256, dict(prefetch=True, num_stages=1)),
                                ("frag", 64, 128, dict(num_stages=2)), ("frag_t", 64, 128, {}),
                                ("frag_gemv", 1, 128, dict(prefetch=True))):
        want = frag_matmul(x, kw, kind, bm, bn, 1, zsub=True, bias=bias, **extra)
        assert torch.equal(frag_matmul(x, blocked, kind, bm, bn, 1, zsub=True, bias=bias, **extra), want), kind
        assert rel_err(frag_matmul(x, blocked, kind, bm, bn, 4, zsub=True, bias=bias, **extra), ref) < 1e-2, kind
    # [gate | up] input (no act-order): silu(gate) · up inside the loads
    codes, zeros, scales, g_idx = rtn_codes(torch.randn(k, n, device=DEV), 128, 4)
    kw = to_fragment_order(repack_values(codes, zeros, scales, g_idx, 128, bits=4), k_width)
    gate_up = torch.randn(m, 2 * k, device=DEV).half()
    ref = silu_mul(gate_up).float() @ dequantize_codes(codes, zeros, scales, g_idx)
    for kind, bm, bn in (("frag", 16, 128), ("frag_t", 64, 128), ("frag_gemv", 1, 64)):
        out = frag_matmul(gate_up, kw, kind, bm, bn, 2, zsub=True, fma=True, prefetch=kind != "frag_t", glu=True,
                          num_stages=1 if kind != "frag_t" else 2)
        assert rel_err(out, ref) < 1e-2, kind
