"""The GPU fast path (4-bit Triton linears, fused ops, Triton LoRA/attention, CUDA graphs) against the
CPU reference path (float32, the same dequantized weights), with mixed adapters."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
pytest.importorskip("triton")

from services.common.adapters import ATTN_MODULES, TARGET_MODULES, LoraAdapter  # noqa: E402
from services.engine.block_manager import BlockManager  # noqa: E402
from services.engine.config import EngineConfig  # noqa: E402
from services.engine.kernels import pdl  # noqa: E402
from services.engine.llama import LINEAR_NAMES, LlamaShape, random_weights  # noqa: E402
from services.engine.llm_engine import LLMEngine  # noqa: E402
from services.engine.model_runner import ModelRunner  # noqa: E402
from services.engine.sequence import SamplingParams, Sequence  # noqa: E402

# K of every linear a multiple of 128 (the W4A16 kernel's block); GQA 4:2; two KV blocks+ per prompt
SHAPE = LlamaShape(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=64, rms_norm_eps=1e-5,
                   rope_theta=10000.0, max_position_embeddings=512, tie_word_embeddings=False)
TOL = 1e-2          # fp16 fast path vs float32 reference (relative L2 of the logits)
# fp8 KV caches on both sides: a key or value whose fp16 and fp32 forms round to neighbouring e4m3
# values (a step is 6-12 %) moves the logits; fp8 itself moves them ~5 % from an fp32 cache here
TOL_KV_FP8 = 2.5e-2
TASKS = ["a", "", "b", "c", "b", "a"]
PROMPT_LENS = [5, 17, 33, 3, 20, 40]
ADAPTERS = {"a": (8, ("q_proj", "v_proj")), "b": (16, TARGET_MODULES), "c": (4, ("gate_proj", "down_proj"))}


def make_adapter(name: str, rank: int, targets: tuple[str, ...], seed: int, shape: LlamaShape = SHAPE) -> LoraAdapter:
    gen = torch.Generator().manual_seed(seed)
    dims = shape.dims()
    weights, scaling = {}, {}
    for layer in range(shape.num_layers):
        for m in targets:
            in_f, out_f = dims.features(m)
            weights[(layer, m)] = (torch.randn(rank, in_f, generator=gen) * in_f ** -0.5,
                                   torch.randn(out_f, rank, generator=gen) * 0.1)
            scaling[(layer, m)] = 0.5
    return LoraAdapter(name=name, path=Path("/nonexistent"), rank=rank, targets=targets,
                       weights=weights, scaling=scaling)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float().cpu(), ref.float().cpu()
    assert torch.isfinite(out).all()
    return float((out - ref).norm() / ref.norm())


@pytest.fixture(autouse=True)
def _pdl_off_after():
    """PDL is a process-wide switch (a runner built with EngineConfig.pdl sets it): off after each test."""
    yield
    pdl.set_pdl(0)


def gpu_runner(weights, graphs: bool, bits: int = 4, shape: LlamaShape = SHAPE, **config_overrides) -> ModelRunner:
    # the tiled layout unless a test names another ("auto" would take the fragment layout at 8 sequences)
    config = EngineConfig(device="cuda", quant_bits=bits, cuda_graphs=graphs, num_kv_blocks=64,
                          block_size=16, max_num_seqs=8, max_adapters=4,
                          max_adapters_per_batch=4, **{"w4_layout": "tiles", **config_overrides})
    runner = ModelRunner(config, shape, weights, "cuda", torch.float16)
    assert runner.is_fast and runner.model.layers[0].fused.keys() == {"qkv_proj", "gate_up_proj"}
    return runner


def reference_runner(gpu: ModelRunner, weights, shape: LlamaShape = SHAPE) -> ModelRunner:
    """CPU float32 runner over exactly the 4-bit weights the GPU runner serves (dequantized)."""
    ref = {k: v.float().cpu() for k, v in weights.items()}
    for layer in range(shape.num_layers):
        for name in LINEAR_NAMES:
            sub = "self_attn." if name in ATTN_MODULES else "mlp."
            linear = gpu.base_linear(layer, name)
            if gpu.config.quant_bits:
                dense = linear.dense_weight(torch.float32).t()                  # [out, in]
            else:
                dense = linear.weight.float()                                   # fp16 base
            ref[f"model.layers.{layer}.{sub}{name}.weight"] = dense.contiguous().cpu()
    config = EngineConfig(device="cpu", dtype="float32", num_kv_blocks=64, block_size=16,
                          kv_cache_dtype=gpu.config.kv_cache_dtype)
    return ModelRunner(config, shape, ref, "cpu", torch.float32)


@pytest.fixture(scope="module")
def weights():
    return random_weights(SHAPE, "cuda", torch.float16, seed=3, std=0.05)


def new_batch(bm: BlockManager, seed: int = 0, shape: LlamaShape = SHAPE) -> list[Sequence]:
    gen = torch.Generator().manual_seed(seed)
    seqs = []
    for i, (task, n) in enumerate(zip(TASKS, PROMPT_LENS, strict=True)):
        seq = Sequence(f"r{i}", torch.randint(0, shape.vocab_size, (n,), generator=gen).tolist(),
                       SamplingParams(), task=task)
        bm.allocate(seq)
        seqs.append(seq)
    return seqs


def advance(seqs: list[Sequence], bm: BlockManager, tokens: list[int]) -> None:
    for seq, tok in zip(seqs, tokens, strict=True):
        seq.num_cached_tokens = seq.num_tokens
        seq.output_token_ids.append(tok)
        bm.append_slot(seq)


@pytest.mark.parametrize("bits,variant", [(4, ""), (3, ""), (0, ""), (4, "serial"), (4, "lora-rows"), (4, "pdl1"),
                                          (4, "pdl-prefetch"), (4, "unfused-attn"), (4, "fused-all"),
                                          (4, "fused-all-no-down-lora"), (4, "frag"), (4, "fragb"), (4, "fragb-tma"), (4, "kv-fp8"),
                                          (4, "kv-fp8-unfused-attn"), (4, "kv-fp8-vtm"), (4, "kv-fp8-vtm-unfused-attn")],
                         ids=["w4", "w3", "fp16", "w4-serial-split", "w4-lora-rows", "w4-pdl1", "w4-pdl-prefetch",
                              "w4-unfused-attn", "w4-fused-all", "w4-fused-all-no-down-lora", "w4-frag", "w4-fragb", "w4-fragb-tma",
                              "w4-kv-fp8", "w4-kv-fp8-unfused-attn", "w4-kv-fp8-vtm", "w4-kv-fp8-vtm-unfused-attn"])
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_engine_logits_match_cpu_reference(weights, graphs, bits, variant):
    """variant: EngineConfig.serial_split_k (experimental), lora_expand_rows, pdl (the default, 0:
    off; 1: PDL launches, where this GPU has them; 2: also the GEMMs' L2 prefetch) or
    fused_decode_attention (the default: decode steps rotate and cache K/V in the attention kernel;
    "unfused-attn": the separate RoPE kernel), with fused_mlp_activation too ("fused-all": adapters
    b and c target down_proj, so its GEMM keeps the separate SiLU·mul; "...-no-down-lora": none does,
    so every layer computes it in the GEMM) or w4_layout "frag" (codes in fragment order, the frag GEMM
    kinds; "fragb" stored block-major) or kv_cache_dtype "fp8_e4m3" ("kv-fp8", the reference's cache fp8
    too; with the separate RoPE kernel's cache write: "kv-fp8-unfused-attn"; "kv-fp8-vtm...": V cache
    token-major within blocks, kv_v_layout; "fragb-tma": the tuner may pick the TMA kind, gemm_tma), eager and
    graph-replayed."""
    serial = variant == "serial"
    kv8 = variant.startswith("kv-fp8")
    tol = TOL_KV_FP8 if kv8 else TOL
    mode = {"pdl1": 1, "pdl-prefetch": 2}.get(variant, EngineConfig.pdl)
    fused_attn = variant.startswith("fused-all") or (not variant.endswith("unfused-attn")
                                                     and EngineConfig.fused_decode_attention)
    fused_act = variant.startswith("fused-all")
    gpu = gpu_runner(weights, graphs, bits, serial_split_k=serial, lora_expand_rows=variant == "lora-rows", pdl=mode,
                     fused_decode_attention=fused_attn, fused_mlp_activation=fused_act,
                     w4_layout=variant.removesuffix("-tma") if variant.startswith("frag") else "tiles",
                     gemm_tma=variant.endswith("-tma"),
                     kv_cache_dtype="fp8_e4m3" if kv8 else "auto",
                     kv_v_layout="token_major" if variant.startswith("kv-fp8-vtm") else "auto")
    assert gpu.kv_caches[0][0].dtype == (torch.float8_e4m3fn if kv8 else torch.float16)
    assert (gpu.kv_caches[0][1].stride(1) == 1) == kv8     # auto: token-major V for fp8 caches on the fast path
    if variant.startswith("frag"):
        from services.engine.kernels.gptq_format import frag_block_major
        from services.engine.kernels.w4a16_frag import frag_k_width
        for kw in (gpu.model.layers[0].fused["gate_up_proj"].inner.kw, gpu.model.layers[0].down_proj.kw):
            assert kw.frag == frag_k_width() and frag_block_major(kw) == variant.startswith("fragb")
    assert pdl.MODE == (mode if pdl.supported() else 0)
    assert all(layer.fused_decode_attention == fused_attn for layer in gpu.model.layers)
    assert all(layer.fused_mlp_activation == fused_act for layer in gpu.model.layers)
    if bits:
        assert gpu.base_linear(0, "down_proj").kw.bits == bits
    ref = reference_runner(gpu, weights)
    adapters = ADAPTERS
    if variant.endswith("no-down-lora"):
        adapters = {name: (rank, tuple(t for t in targets if t != "down_proj"))
                    for name, (rank, targets) in ADAPTERS.items()}
    for i, (name, (rank, targets)) in enumerate(adapters.items()):
        gpu.add_adapter(make_adapter(name, rank, targets, i))
        ref.add_adapter(make_adapter(name, rank, targets, i))
    assert gpu.lora.covers(0, "down_proj") == (not variant.endswith("no-down-lora"))
    bm_g, bm_r = BlockManager(64, 16), BlockManager(64, 16)
    seqs_g, seqs_r = new_batch(bm_g), new_batch(bm_r)
    errs = [rel_err(a, b) for a, b in zip(gpu.compute_logits(seqs_g), ref.compute_logits(seqs_r))]
    assert max(errs) <= tol, f"prefill {errs}"
    for step in range(4):                               # pure decode steps (graphs when on)
        tokens = [int(t) for t in torch.randint(0, SHAPE.vocab_size, (len(seqs_g),))]
        advance(seqs_g, bm_g, tokens)
        advance(seqs_r, bm_r, tokens)
        out_g, out_r = gpu.compute_logits(seqs_g), ref.compute_logits(seqs_r)
        errs = [rel_err(a, b) for a, b in zip(out_g, out_r)]
        assert max(errs) <= tol, f"decode step {step}: {errs}"
    if graphs:
        assert gpu.graphs.num_captures >= 1
    # a subset (another bucket) and a step mixing a new prompt with decodes (eager path)
    sub_g, sub_r = seqs_g[1:4], seqs_r[1:4]
    advance(sub_g, bm_g, [1, 2, 3])
    advance(sub_r, bm_r, [1, 2, 3])
    errs = [rel_err(a, b) for a, b in zip(gpu.compute_logits(sub_g), ref.compute_logits(sub_r))]
    assert max(errs) <= tol, f"subset {errs}"
    extra_g = Sequence("x", list(range(1, 30)), SamplingParams(), task="c")
    extra_r = Sequence("x", list(range(1, 30)), SamplingParams(), task="c")
    bm_g.allocate(extra_g)
    bm_r.allocate(extra_r)
    advance(sub_g, bm_g, [4, 5, 6])
    advance(sub_r, bm_r, [4, 5, 6])
    out_g = gpu.compute_logits(sub_g + [extra_g])
    out_r = ref.compute_logits(sub_r + [extra_r])
    errs = [rel_err(a, b) for a, b in zip(out_g, out_r)]
    assert max(errs) <= tol, f"mixed prefill+decode {errs}"
    # the adapters matter far beyond the tolerance (so a broken LoRA path would fail above)
    base_r = Sequence("y", list(range(1, 30)), SamplingParams(), task="")
    bm_r.allocate(base_r)
    assert rel_err(out_g[-1][:1], ref.compute_logits([base_r])[0][:1]) > 5 * TOL
    if serial:
        from services.engine.kernels import w4a16
        assert w4a16.SERIAL_SPLIT_K and w4a16._locks    # the serial path ran
        w4a16.set_serial_split_k(False)


MHA = dataclasses.replace(SHAPE, num_kv_heads=SHAPE.num_heads)   # q|k|v equally wide: their LoRA stacks


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_stacked_qkv_lora_matches_cpu_reference(graphs):
    """With MHA, q|k|v's adapters are stacked (one shrink and one expand for the fused projection),
    as gate|up's are in every shape: logits still match the per-module CPU reference."""
    weights = random_weights(MHA, "cuda", torch.float16, seed=5, std=0.05)
    gpu = gpu_runner(weights, graphs, shape=MHA)
    ref = reference_runner(gpu, weights, shape=MHA)
    for i, (name, (rank, targets)) in enumerate(ADAPTERS.items()):
        gpu.add_adapter(make_adapter(name, rank, targets, i, MHA))
        ref.add_adapter(make_adapter(name, rank, targets, i, MHA))
    bm_g, bm_r = BlockManager(64, 16), BlockManager(64, 16)
    seqs_g, seqs_r = new_batch(bm_g, shape=MHA), new_batch(bm_r, shape=MHA)
    errs = [rel_err(a, b) for a, b in zip(gpu.compute_logits(seqs_g), ref.compute_logits(seqs_r))]
    assert max(errs) <= TOL, f"prefill {errs}"
    assert {group for _, group in gpu.lora._group} == {"qkv_proj", "gate_up_proj"}
    for step in range(3):
        tokens = [int(t) for t in torch.randint(0, MHA.vocab_size, (len(seqs_g),))]
        advance(seqs_g, bm_g, tokens)
        advance(seqs_r, bm_r, tokens)
        errs = [rel_err(a, b) for a, b in zip(gpu.compute_logits(seqs_g), ref.compute_logits(seqs_r))]
        assert max(errs) <= TOL, f"decode step {step}: {errs}"


def test_graph_replay_gives_the_eager_tokens(weights):
    """Lockstep greedy decode: graph logits equal eager logits, so the greedy tokens agree."""
    eager, graphed = gpu_runner(weights, False), gpu_runner(weights, True)
    for runner in (eager, graphed):
        for i, (name, (rank, targets)) in enumerate(ADAPTERS.items()):
            runner.add_adapter(make_adapter(name, rank, targets, i))
    bm_e, bm_g = BlockManager(64, 16), BlockManager(64, 16)
    seqs_e, seqs_g = new_batch(bm_e, seed=1), new_batch(bm_g, seed=1)
    tokens = eager.run(seqs_e)
    graphed.run(seqs_g)                                      # prefill: eager in both
    for _ in range(12):
        advance(seqs_e, bm_e, tokens)
        advance(seqs_g, bm_g, tokens)
        le, lg = eager.compute_logits(seqs_e), graphed.compute_logits(seqs_g)
        for a, b in zip(le, lg):
            assert rel_err(b, a) <= 5e-3      # fp16 split-K sums differ run to run (~2e-3 seen)
            top2 = a[0].topk(2).values
            if float(top2[0] - top2[1]) > 1e-2:              # clear winner: must be identical
                assert int(a.argmax()) == int(b.argmax())
        tokens = [int(x[0].argmax()) for x in le]
    assert graphed.graphs.num_captures >= 1


def test_llm_engine_generates_with_graphs_and_in_place_weight_swap(weights):
    """Through LLMEngine: graphs on and off give the same greedy tokens; a 4-bit weight swap
    lands in place (no recapture) and changes the output like the reference says."""
    outs = {}
    for graphs in (False, True):
        runner = gpu_runner(weights, graphs)
        engine = LLMEngine(runner.config, runner=runner, load_tokenizer=False)
        for i, (name, (rank, targets)) in enumerate(ADAPTERS.items()):
            runner.add_adapter(make_adapter(name, rank, targets, i))
        prompts = [list(range(3 + i, 20 + 3 * i)) for i in range(len(TASKS))]
        params = SamplingParams(max_tokens=10, ignore_eos=True)
        outs[graphs] = [r.token_ids for r in engine.generate(prompts, params, tasks=TASKS)]
        assert all(len(t) == 10 for t in outs[graphs])
    assert runner.graphs.num_captures >= 1
    # Free-running greedy decodes can part at a near-tie (fp16 split-K sums are not
    # bit-reproducible); the lockstep test above checks every step, here the starts must agree.
    assert [t[:3] for t in outs[True]] == [t[:3] for t in outs[False]]
    num_equal = sum(a == b for a, b in zip(outs[True], outs[False]))
    assert num_equal >= len(TASKS) - 1, f"only {num_equal}/{len(TASKS)} sequences identical"
    epoch = runner.model_epoch
    donor = gpu_runner(random_weights(SHAPE, "cuda", torch.float16, seed=9, std=0.05), False)
    runner.set_base_linear(1, "k_proj", donor.base_linear(1, "k_proj"))
    runner.set_base_linear(1, "down_proj", donor.base_linear(1, "down_proj"))
    assert runner.model_epoch == epoch                       # written in place: graphs kept
    swapped = runner.base_linear(1, "k_proj").dense_weight(torch.float32)
    assert torch.equal(swapped, donor.base_linear(1, "k_proj").dense_weight(torch.float32))
    assert runner.base_linear(1, "q_proj").dense_weight(torch.float32).shape == (256, 256)


def test_fragment_layout_takes_tiled_weight_swaps_in_place(weights):
    """With w4_layout "frag", weights swapped in from a tiled-layout runner are written in place into
    the fragment-ordered (fused and unfused) linears: graphs kept, the dense weights equal the donor's."""
    runner = gpu_runner(weights, True, w4_layout="frag")
    for i, (name, (rank, targets)) in enumerate(ADAPTERS.items()):
        runner.add_adapter(make_adapter(name, rank, targets, i))
    runner.compute_logits(new_batch(BlockManager(64, 16)))
    epoch = runner.model_epoch
    donor = gpu_runner(random_weights(SHAPE, "cuda", torch.float16, seed=9, std=0.05), False)
    for name in ("k_proj", "down_proj"):
        runner.set_base_linear(1, name, donor.base_linear(1, name))
        assert runner.base_linear(1, name).kw.frag
        assert torch.equal(runner.base_linear(1, name).dense_weight(torch.float32),
                           donor.base_linear(1, name).dense_weight(torch.float32))
    assert runner.model_epoch == epoch


@pytest.mark.parametrize("act_order", [False, True])
def test_dense_gemm_config_matches_reference(act_order):
    """The prefill path at large M: one Triton dequantization to fp16, then cuBLAS."""
    from services.engine.kernels.gptq_format import dequantize_reference, quantize_gptq_v1, repack_for_kernel
    from services.engine.kernels.gemm_configs import GemmConfig
    from services.engine.kernels.w4a16 import w4a16_matmul
    k, n = 768, 320
    w = torch.randn(k, n, device="cuda")
    t = quantize_gptq_v1(w, 128, torch.randperm(k, device="cuda") if act_order else None)
    x = torch.randn(300, k, device="cuda").half()
    y = w4a16_matmul(x, repack_for_kernel(t), GemmConfig("dense", 0, 128, 1))
    assert rel_err(y, x.float() @ dequantize_reference(t)) <= 1e-2


def test_long_prefill_matches_cpu_reference(weights):
    """A 400-token prompt: the GEMM tuner's large-M choice (tiled or dense) inside the engine."""
    gpu = gpu_runner(weights, True)
    ref = reference_runner(gpu, weights)
    gpu.add_adapter(make_adapter("b", 16, TARGET_MODULES, 1))
    ref.add_adapter(make_adapter("b", 16, TARGET_MODULES, 1))
    ids = torch.randint(0, SHAPE.vocab_size, (400,), generator=torch.Generator().manual_seed(4)).tolist()
    out = []
    for runner in (gpu, ref):
        bm = BlockManager(64, 16)
        seq = Sequence("long", ids, SamplingParams(), task="b")
        bm.allocate(seq)
        out.append(runner.compute_logits([seq])[0])
    assert rel_err(out[0], out[1]) <= TOL


def test_graphs_recapture_after_lora_stacks_grow(weights):
    """Graphs captured, then an adapter with a new module and a larger rank arrives (the LoRA
    stacks are reallocated): the next decode step recaptures and still matches the reference."""
    gpu = gpu_runner(weights, True)
    ref = reference_runner(gpu, weights)
    bm_g, bm_r = BlockManager(64, 16), BlockManager(64, 16)
    seq_g = Sequence("g", list(range(5, 30)), SamplingParams(), task="")
    seq_r = Sequence("g", list(range(5, 30)), SamplingParams(), task="")
    bm_g.allocate(seq_g)
    bm_r.allocate(seq_r)
    gpu.compute_logits([seq_g])
    ref.compute_logits([seq_r])
    advance([seq_g], bm_g, [7])
    advance([seq_r], bm_r, [7])
    gpu.compute_logits([seq_g])                               # captures (bucket 1, no LoRA)
    ref.compute_logits([seq_r])
    captures = gpu.graphs.num_captures
    for runner in (gpu, ref):
        runner.add_adapter(make_adapter("a", 8, ("q_proj", "v_proj"), 0))
        runner.add_adapter(make_adapter("big", 32, TARGET_MODULES, 5))
    for task in ("a", "big"):
        extra_g = Sequence(task, list(range(9, 40)), SamplingParams(), task=task)
        extra_r = Sequence(task, list(range(9, 40)), SamplingParams(), task=task)
        bm_g.allocate(extra_g)
        bm_r.allocate(extra_r)
        gpu.compute_logits([extra_g])
        ref.compute_logits([extra_r])
        advance([seq_g, extra_g], bm_g, [3, 4])
        advance([seq_r, extra_r], bm_r, [3, 4])
        seq_g.task = seq_r.task = task
        errs = [rel_err(a, b) for a, b in zip(gpu.compute_logits([seq_g, extra_g]),
                                              ref.compute_logits([seq_r, extra_r]))]
        assert max(errs) <= TOL, f"{task}: {errs}"
    assert gpu.graphs.num_captures > captures
