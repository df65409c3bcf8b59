"""Our paged-KV multi-LoRA forward against Hugging Face transformers + PEFT (fp32, CPU)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from services.common.model_source import resolve_model
from services.engine.block_manager import BlockManager
from services.engine.config import EngineConfig
from services.engine.llama import LlamaShape, random_weights
from services.engine.llm_engine import LLMEngine
from services.engine.model_runner import ModelRunner
from services.engine.sequence import SamplingParams, Sequence
from peft_adapters import make_peft_adapter

# name → (rank, target modules): different ranks and different module subsets.
ADAPTERS = {
    "qv8": (8, ["q_proj", "v_proj"]),
    "all16": (16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "mlp4": (4, ["gate_proj", "down_proj"]),
}
MESSAGES = ["What is the capital of France?", "List three colors.",
            "Translate 'good morning' to Spanish.", "Count from one to five."]
REL_TOL = 1e-4


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).norm() / ref.norm())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    src = resolve_model()
    root = tmp_path_factory.mktemp("adapters")
    paths = {name: make_peft_adapter(src.path, root / name, r, t, seed=i)
             for i, (name, (r, t)) in enumerate(ADAPTERS.items())}
    engine = LLMEngine(EngineConfig(num_kv_blocks=96, device="cpu", dtype="float32"))
    for name, path in paths.items():
        engine.add_adapter(name, path)
    hf = AutoModelForCausalLM.from_pretrained(src.path, dtype=torch.float32).eval()
    first, *rest = paths
    peft_model = PeftModel.from_pretrained(hf, paths[first], adapter_name=first)
    for name in rest:
        peft_model.load_adapter(paths[name], adapter_name=name)
    peft_model.eval()
    tok = engine.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": m}], tokenize=False,
                                       add_generation_prompt=True) for m in MESSAGES]
    return engine, peft_model, [tok.encode(p) for p in prompts]


def hf_logits(peft_model, ids: list[int], task: str) -> torch.Tensor:
    with torch.no_grad():
        x = torch.tensor([ids])
        if not task:
            with peft_model.disable_adapter():
                return peft_model(input_ids=x).logits[0]
        peft_model.set_adapter(task)
        return peft_model(input_ids=x).logits[0]


def hf_greedy(peft_model, ids: list[int], task: str, n: int) -> list[int]:
    """Greedy decoding with HF's own forward and KV cache, never stopping at EOS."""
    def run():
        out, past, x = [], None, torch.tensor([ids])
        for _ in range(n):
            res = peft_model(input_ids=x, past_key_values=past, use_cache=True)
            past, tok = res.past_key_values, int(res.logits[0, -1].argmax())
            out.append(tok)
            x = torch.tensor([[tok]])
        return out

    with torch.no_grad():
        if not task:
            with peft_model.disable_adapter():
                return run()
        peft_model.set_adapter(task)
        return run()


TASKS = ["qv8", "", "all16", "mlp4"]   # three adapters and the bare base in one batch


@pytest.mark.parametrize("gather_max_tokens", [0, 10**6])  # per-segment LoRA, gather + bmm
def test_mixed_adapter_prefill_logits_match_peft(setup, gather_max_tokens):
    engine, peft_model, prompts = setup
    runner, bm = engine.runner, BlockManager(engine.runner.num_kv_blocks, engine.config.block_size)
    seqs = [Sequence(f"r{i}", p, SamplingParams(), task=t)
            for i, (p, t) in enumerate(zip(prompts, TASKS))]
    for s in seqs:
        bm.allocate(s)
    saved, runner.lora.gather_max_tokens = runner.lora.gather_max_tokens, gather_max_tokens
    try:
        logits = runner.compute_logits(seqs)
    finally:
        runner.lora.gather_max_tokens = saved
    for seq, ours in zip(seqs, logits):
        ref = hf_logits(peft_model, seq.prompt_token_ids, seq.task)
        assert ours.shape == ref.shape
        assert rel_err(ours, ref) < REL_TOL, seq.task
    # The adapters really change the output (else the comparison above proves little).
    base = hf_logits(peft_model, prompts[0], "")
    assert rel_err(hf_logits(peft_model, prompts[0], "qv8"), base) > 1e-3


def test_cached_prefix_and_decode_logits_match_peft(setup):
    """Compute a prefix, then the rest (multi-token with cache) and single tokens (decode)."""
    engine, peft_model, prompts = setup
    runner, bm = engine.runner, BlockManager(engine.runner.num_kv_blocks, engine.config.block_size)
    seqs = [Sequence(f"c{i}", p, SamplingParams(), task=t)
            for i, (p, t) in enumerate(zip(prompts, TASKS))]
    cut = {0: 5, 1: 17, 2: -1, 3: -1}   # seq 0,1: multi-token rest; seq 2,3: decode one token
    for i, s in enumerate(seqs):
        bm.allocate(s)
        prefix = Sequence("p", s.prompt_token_ids[:cut[i]] if cut[i] > 0 else
                          s.prompt_token_ids[:-1], SamplingParams(), task=s.task)
        prefix.block_table = s.block_table
        runner.compute_logits([prefix])
        s.num_cached_tokens = prefix.num_tokens
    logits = runner.compute_logits(seqs)
    for s, ours in zip(seqs, logits):
        ref = hf_logits(peft_model, s.prompt_token_ids, s.task)[s.num_cached_tokens:]
        assert ours.shape == ref.shape
        assert rel_err(ours, ref) < REL_TOL, s.task


def test_greedy_generation_matches_peft_token_for_token(setup):
    engine, peft_model, prompts = setup
    n = 16
    params = SamplingParams(max_tokens=n, ignore_eos=True)
    results = engine.generate(prompts, params, tasks=TASKS)
    for ids, task, res in zip(prompts, TASKS, results):
        assert res.token_ids == hf_greedy(peft_model, ids, task, n), task
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_base_linear_is_swappable(setup):
    engine, _, prompts = setup
    runner = engine.runner
    original = runner.base_linear(3, "q_proj")

    class Wrapped(nn.Module):   # same contract a dequantize-on-the-fly module follows
        def __init__(self, inner, scale):
            super().__init__()
            self.inner, self.scale, self.calls = inner, scale, 0

        def forward(self, x):
            self.calls += 1
            return self.inner(x) * self.scale

    def logits_with(module):
        runner.set_base_linear(3, "q_proj", module)
        bm = BlockManager(runner.num_kv_blocks, engine.config.block_size)
        seq = Sequence("s", prompts[0], SamplingParams(), task="qv8")
        bm.allocate(seq)
        return runner.compute_logits([seq])[0]

    try:
        same = Wrapped(original, 1.0)
        ref = logits_with(original)
        assert torch.equal(logits_with(same), ref) and same.calls == 1
        assert runner.base_linear(3, "q_proj") is same
        assert rel_err(logits_with(Wrapped(original, 0.0)), ref) > 1e-3
    finally:
        runner.set_base_linear(3, "q_proj", original)
    with pytest.raises(KeyError):
        runner.base_linear(0, "lm_head")


def test_random_weights_give_finite_logits():
    torch.set_num_threads(1)
    shape = LlamaShape(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5,
                       rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=False)
    config = EngineConfig(num_kv_blocks=8, block_size=4, device="cpu", dtype="float32")
    runner = ModelRunner(config, shape, random_weights(shape, "cpu", torch.float32), "cpu",
                         torch.float32)
    bm = BlockManager(runner.num_kv_blocks, config.block_size)
    seq = Sequence("s", list(range(10)), SamplingParams())
    bm.allocate(seq)
    (logits,) = runner.compute_logits([seq])
    assert logits.shape == (10, 128) and torch.isfinite(logits).all()


def test_fp8_kv_cache_holds_more_tokens_and_stays_close():
    """kv_cache_dtype fp8_e4m3: one byte per cached element (4x the blocks of an fp32 cache in the same
    bytes), a cached prefix then decode attends the rounded K/V, and the logits stay near the fp32
    cache's (this tiny random model: ~5 %) without being equal; an unknown dtype is a config error."""
    torch.set_num_threads(1)
    shape = LlamaShape(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5,
                       rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=False)
    weights = random_weights(shape, "cpu", torch.float32, seed=1)
    runners = {}
    for kv in ("auto", "fp8_e4m3"):
        config = EngineConfig(kv_cache_bytes=2**20, block_size=4, device="cpu", dtype="float32", kv_cache_dtype=kv)
        runners[kv] = ModelRunner(config, shape, dict(weights), "cpu", torch.float32)
    assert runners["fp8_e4m3"].kv_caches[0][0].dtype == torch.float8_e4m3fn
    assert runners["fp8_e4m3"].num_kv_blocks == 4 * runners["auto"].num_kv_blocks
    logits = {}
    for kv, runner in runners.items():
        bm = BlockManager(runner.num_kv_blocks, 4)
        seq = Sequence("s", list(range(3, 30)), SamplingParams())
        bm.allocate(seq)
        prefix = Sequence("p", seq.prompt_token_ids[:-5], SamplingParams())
        prefix.block_table = seq.block_table
        runner.compute_logits([prefix])
        seq.num_cached_tokens = prefix.num_tokens
        (logits[kv],) = runner.compute_logits([seq])
    err = float((logits["fp8_e4m3"] - logits["auto"]).norm() / logits["auto"].norm())
    assert 1e-4 < err < 0.15, err
    with pytest.raises(ValueError, match="ENGINE_KV_CACHE_DTYPE"):
        EngineConfig(kv_cache_dtype="int8")
    assert EngineConfig.from_env({"ENGINE_KV_CACHE_DTYPE": "fp8_e4m3"}).kv_cache_dtype == "fp8_e4m3"


def test_a_token_major_v_cache_needs_the_gpu_fast_path() -> None:
    """ENGINE_KV_V_LAYOUT: a bad value is a config error; token_major on the torch path a clear one."""
    with pytest.raises(ValueError, match="ENGINE_KV_V_LAYOUT"):
        EngineConfig(kv_v_layout="transposed")
    assert EngineConfig.from_env({"ENGINE_KV_V_LAYOUT": "token_major"}).kv_v_layout == "token_major"
    # auto: token-major for an fp8 cache on the fast path only; an explicit layout stays as set
    fp8 = EngineConfig(kv_cache_dtype="fp8_e4m3")
    assert fp8.resolved_kv_v_layout(True) == "token_major" and fp8.resolved_kv_v_layout(False) == "key"
    assert EngineConfig().resolved_kv_v_layout(True) == "key"
    assert dataclasses.replace(fp8, kv_v_layout="key").resolved_kv_v_layout(True) == "key"
    shape = LlamaShape(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=1,
                       num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5,
                       rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=False)
    config = EngineConfig(kv_cache_bytes=2**20, block_size=4, device="cpu", dtype="float32",
                          kv_v_layout="token_major")
    with pytest.raises(ValueError, match="needs the GPU fast path"):
        ModelRunner(config, shape, random_weights(shape, "cpu", torch.float32, seed=1), "cpu", torch.float32)
    with pytest.raises(ValueError, match="needs the GPU fast path"):
        config.check_device()


@pytest.mark.parametrize("env", [{"ENGINE_KV_V_LAYOUT": "token_major", "ENGINE_DEVICE": "cpu"},
                                 {"ENGINE_KV_CACHE_DTYPE": "int8"}, {"ENGINE_INLAID_STEP_TIME_RATIO": "0.5"}])
def test_the_engine_process_reports_a_bad_setting_without_a_traceback(env: dict) -> None:
    """`python -m services.engine.server` with a bad setting: its message and exit status 2, before the
    model loads (no traceback)."""
    import os
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "services.engine.server"], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "engine configuration error" in proc.stderr + proc.stdout and "Traceback" not in proc.stderr


@pytest.mark.parametrize("rope", [{"rope_type": "default", "rope_theta": 5000.0},
                                  {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 16}])
def test_tiny_untied_checkpoint_matches_hf(tmp_path, rope):
    """An HF directory with an untied LM head and (llama3-scaled) RoPE loads and matches HF."""
    torch.set_num_threads(1)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=128, tie_word_embeddings=False,
                      rope_parameters=rope)
    hf = LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "tiny")
    runner = ModelRunner.load(EngineConfig(model=str(tmp_path / "tiny"), num_kv_blocks=8,
                                           block_size=8, device="cpu", dtype="float32"))
    assert not runner.shape.tie_word_embeddings and runner.shape.head_dim == 16
    ids = torch.randint(0, 96, (50,)).tolist()
    bm = BlockManager(runner.num_kv_blocks, 8)
    seq = Sequence("t", ids, SamplingParams())
    bm.allocate(seq)
    (ours,) = runner.compute_logits([seq])
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert rel_err(ours, ref) < REL_TOL


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype, tol", [("float32", 1e-4), ("bfloat16", 3e-2)])
def test_cuda_matches_hf(tmp_path, dtype, tol):
    """Same torch ops on CUDA: a tiny checkpoint, mixed prefill + decode, against HF on CUDA."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=128, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "tiny")
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "tiny", dtype=getattr(torch, dtype)).cuda()
    runner = ModelRunner.load(EngineConfig(model=str(tmp_path / "tiny"), num_kv_blocks=16,
                                           block_size=8, device="cuda", dtype=dtype))
    bm = BlockManager(runner.num_kv_blocks, 8)
    seqs = [Sequence(f"s{i}", torch.randint(0, 96, (n,)).tolist(), SamplingParams())
            for i, n in enumerate((30, 9))]
    for s in seqs:
        bm.allocate(s)
    seqs[1].num_cached_tokens = 0
    runner.compute_logits([seqs[1]])
    seqs[1].prompt_token_ids.append(5)         # decode one more token for seq 1
    bm.allocate(seqs[1])
    seqs[1].num_cached_tokens = 9
    ours = runner.compute_logits(seqs)
    for s, o in zip(seqs, ours):
        with torch.no_grad():
            ref = hf(torch.tensor([s.prompt_token_ids], device="cuda")).logits[0].float()
        assert rel_err(o, ref[s.num_cached_tokens:]) < tol


# ---- 4-bit base (the GPU fast path's weights; on CPU the dequantized fallback) ----------------
QSHAPE = LlamaShape(vocab_size=128, hidden_size=128, intermediate_size=256, num_layers=2,
                    num_heads=2, num_kv_heads=1, head_dim=64, rms_norm_eps=1e-5,
                    rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=False)


def _dequantized_weights(runner, weights):
    from services.common.adapters import ATTN_MODULES
    from services.engine.llama import LINEAR_NAMES
    out = dict(weights)
    for layer in range(QSHAPE.num_layers):
        for name in LINEAR_NAMES:
            sub = "self_attn." if name in ATTN_MODULES else "mlp."
            dense = runner.base_linear(layer, name).dense_weight(torch.float32)   # [in, out]
            out[f"model.layers.{layer}.{sub}{name}.weight"] = dense.t().contiguous()
    return out


def _logits(runner, ids):
    bm = BlockManager(runner.num_kv_blocks, runner.block_size)
    seq = Sequence("s", ids, SamplingParams())
    bm.allocate(seq)
    return runner.compute_logits([seq])[0]


def test_4bit_runner_on_cpu_equals_its_dequantized_weights():
    torch.set_num_threads(1)
    weights = random_weights(QSHAPE, "cpu", torch.float32, std=0.05)
    q = ModelRunner(EngineConfig(num_kv_blocks=8, block_size=16, device="cpu", dtype="float32",
                                 quant_bits=4), QSHAPE, weights, "cpu", torch.float32)
    assert not q.is_fast and q.graphs is None          # CPU: no Triton path, no graphs
    dense = ModelRunner(EngineConfig(num_kv_blocks=8, block_size=16, device="cpu", dtype="float32"),
                        QSHAPE, _dequantized_weights(q, weights), "cpu", torch.float32)
    full = ModelRunner(EngineConfig(num_kv_blocks=8, block_size=16, device="cpu", dtype="float32"),
                       QSHAPE, weights, "cpu", torch.float32)
    ids = list(range(3, 40))
    ref = _logits(dense, ids)
    assert rel_err(_logits(q, ids), ref) < 1e-5
    # 4-bit RTN is close to, but not, the full-precision model
    assert 1e-3 < rel_err(_logits(full, ids), ref) < 0.5


def test_4bit_swap_of_a_gptq_quant_linear_is_in_place_and_exact():
    """A quantizer QuantLinear (GPTQ v1) swapped into a 4-bit runner is repacked into the existing
    kernel weights (model_epoch unchanged: CUDA graphs stay valid); an act-order one, whose row
    permutation differs, becomes a new kernel module (epoch bumped); a plain module replaces."""
    torch.set_num_threads(1)
    from services.engine.kernels.gptq_format import quantize_gptq_v1
    from services.engine.kernels.quant_linear import TritonQuantLinear
    from services.quantizer.qlinear import QuantLinear
    weights = random_weights(QSHAPE, "cpu", torch.float32, std=0.05)
    runner = ModelRunner(EngineConfig(num_kv_blocks=8, block_size=16, device="cpu",
                                      dtype="float32", quant_bits=4), QSHAPE, weights, "cpu",
                         torch.float32)
    gen = torch.Generator().manual_seed(1)
    k, n = QSHAPE.intermediate_size, QSHAPE.hidden_size                     # down_proj: 2 groups
    w = torch.randn(k, n, generator=gen) * 0.05                            # [in, out]
    plain = quantize_gptq_v1(w, 128)
    module = QuantLinear(plain.qweight, plain.qzeros, plain.scales, plain.g_idx, 4)
    before = runner.base_linear(0, "down_proj")
    runner.set_base_linear(1, "down_proj", module)
    after = runner.base_linear(1, "down_proj")
    assert runner.model_epoch == 0 and after is not module
    assert torch.equal(after.dense_weight(torch.float32), module.dequantized().t())
    assert torch.equal(runner.base_linear(0, "down_proj").dense_weight(torch.float32),
                       before.dense_weight(torch.float32))
    act = quantize_gptq_v1(w, 128, torch.randperm(k, generator=gen))
    act_module = QuantLinear(act.qweight, act.qzeros, act.scales, act.g_idx, 4)
    runner.set_base_linear(1, "down_proj", act_module)
    swapped = runner.base_linear(1, "down_proj")
    assert runner.model_epoch == 1 and isinstance(swapped, TritonQuantLinear)
    assert swapped.kw.perm is not None
    assert torch.allclose(swapped.dense_weight(torch.float32), act_module.dequantized().t())
    x = torch.randn(3, k, generator=gen)
    assert torch.allclose(swapped(x), act_module(x), atol=1e-5)
    # a layout the kernel cannot take (group 32) and a module that is not 4-bit replace the
    # linear as given (and bump the epoch)
    g32 = quantize_gptq_v1(w, 32)
    g32_module = QuantLinear(g32.qweight, g32.qzeros, g32.scales, g32.g_idx, 4)
    runner.set_base_linear(0, "down_proj", g32_module)
    assert runner.model_epoch == 2 and runner.base_linear(0, "down_proj") is g32_module
    runner.set_base_linear(1, "o_proj", nn.Linear(128, 128, bias=False))
    assert runner.model_epoch == 3 and isinstance(runner.base_linear(1, "o_proj"), nn.Linear)


def test_fused_quant_linear_parts_round_trip():
    torch.set_num_threads(1)
    from services.engine.kernels.gptq_format import rtn_kernel_weights
    from services.engine.kernels.quant_linear import FusedQuantLinear, TritonQuantLinear
    gen = torch.Generator().manual_seed(2)
    parts = {n: TritonQuantLinear(rtn_kernel_weights(torch.randn(out, 256, generator=gen), 128),
                                  None, None)
             for n, out in (("q", 192), ("k", 64), ("v", 64))}     # 192: not a 128-column tile
    fused = FusedQuantLinear(parts, None)
    x = torch.randn(5, 256, generator=gen)
    y = fused(x)
    for name, part in parts.items():
        start, end = fused.bounds(name)
        assert torch.allclose(y[:, start:end], part(x), atol=1e-5)
        assert torch.equal(fused.part(name).dense_weight(torch.float32),
                           part.dense_weight(torch.float32))
    new_k = rtn_kernel_weights(torch.randn(64, 256, generator=gen), 128)
    fused.load_part_("k", new_k)
    assert torch.equal(fused.part("k").kw.qweight, new_k.qweight)
    assert torch.equal(fused.part("q").dense_weight(torch.float32),
                       parts["q"].dense_weight(torch.float32))
    with pytest.raises(ValueError):
        fused.load_part_("v", rtn_kernel_weights(torch.randn(32, 256), 128))  # wrong width


def test_dense_layer_fuses_and_swaps_split_the_group():
    """The fp16 base's fast path: q|k|v and gate|up become one dense GEMM each; parts read back
    exactly, and swapping one part splits its group back (nothing written into a dense fusion)."""
    torch.set_num_threads(1)
    from services.engine.llama import FusedDenseLinear
    shape = LlamaShape(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=1, num_heads=4,
                       num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
                       max_position_embeddings=64, tie_word_embeddings=False)
    config = EngineConfig(device="cpu", dtype="float32", num_kv_blocks=8, block_size=16)
    runner = ModelRunner(config, shape, random_weights(shape, "cpu", torch.float32, seed=1), "cpu",
                         torch.float32)
    layer = runner.model.layers[0]
    before = {n: runner.base_linear(0, n).weight.clone() for n in ("q_proj", "k_proj", "v_proj", "gate_proj")}
    layer.fuse(None)
    assert {g: type(m) for g, m in layer.fused.items()} == {"qkv_proj": FusedDenseLinear,
                                                            "gate_up_proj": FusedDenseLinear}
    x = torch.randn(3, 64)
    qkv = layer._group("qkv_proj", x, None)
    for name in ("q_proj", "k_proj", "v_proj"):
        start, end = layer.fused["qkv_proj"].bounds(name)
        assert torch.equal(runner.base_linear(0, name).weight, before[name])
        torch.testing.assert_close(qkv[:, start:end], x @ before[name].t())
    new_k = nn.Linear(64, 32, bias=False)
    runner.set_base_linear(0, "k_proj", new_k)
    assert "qkv_proj" not in layer.fused and "gate_up_proj" in layer.fused
    assert runner.base_linear(0, "k_proj") is new_k
    torch.testing.assert_close(layer._group("qkv_proj", x, None)[:, 64:96], new_k(x))
    assert torch.equal(runner.base_linear(0, "gate_proj").weight, before["gate_proj"])


@pytest.mark.parametrize("max_num_seqs, sizes", [
    (1, [1]), (8, [1, 2, 4, 8]), (40, [1, 2, 4, 8, 16, 32, 40]),
    (64, [1, 2, 4, 8, 16, 32, 48, 64]), (100, [1, 2, 4, 8, 16, 32, 48, 64, 80, 96, 100]),
])
def test_graph_batch_sizes(max_num_seqs, sizes):
    from services.engine.cuda_graphs import bucket_for, graph_batch_sizes
    assert graph_batch_sizes(max_num_seqs) == sizes
    for n in range(1, max_num_seqs + 1):
        b = bucket_for(n, sizes)
        assert b >= n and not [s for s in sizes if n <= s < b]
    assert bucket_for(max_num_seqs + 1, sizes) is None


@pytest.mark.parametrize("slot_of", [[-1], [2, -1, 0, 2, 2, -1, 1], [3, 3, 3], [0, 1, 2, 3, -1, -1]])
def test_host_lora_grouping_equals_the_device_one(slot_of):
    from services.engine.cuda_graphs import lora_grouping
    from services.engine.kernels.lora import prepare_lora_batch
    batch = prepare_lora_batch(torch.tensor(slot_of))
    host = lora_grouping(slot_of)
    for row, ref in zip(host, (batch.order, batch.sorted_slots, batch.seg_start, batch.seg_end)):
        assert row.tolist() == ref.tolist()


def test_3bit_runner_and_swaps_between_widths():
    """quant_bits=3 serves W3A16 kernel weights (CPU: their dequantized form); a 3-bit quantizer
    QuantLinear swaps into a 3-bit runner in place, and into a 4-bit runner as a new kernel module."""
    torch.set_num_threads(1)
    from services.engine.kernels.gptq_format import rtn_codes
    from services.engine.kernels.quant_linear import TritonQuantLinear
    from services.quantizer.packing import pack_qweight, pack_qzeros
    from services.quantizer.qlinear import QuantLinear
    weights = random_weights(QSHAPE, "cpu", torch.float32, std=0.05)
    q3 = ModelRunner(EngineConfig(num_kv_blocks=8, block_size=16, device="cpu", dtype="float32",
                                  quant_bits=3), QSHAPE, weights, "cpu", torch.float32)
    assert q3.base_linear(0, "q_proj").kw.bits == 3
    dense = ModelRunner(EngineConfig(num_kv_blocks=8, block_size=16, device="cpu", dtype="float32"),
                        QSHAPE, _dequantized_weights(q3, weights), "cpu", torch.float32)
    ids = list(range(3, 40))
    assert rel_err(_logits(q3, ids), _logits(dense, ids)) < 1e-5
    gen = torch.Generator().manual_seed(2)
    k, n = QSHAPE.intermediate_size, QSHAPE.hidden_size
    codes, zeros, scales, g_idx = rtn_codes(torch.randn(k, n, generator=gen) * 0.05, 128, 3)
    module = QuantLinear(pack_qweight(codes.T.to(torch.int32), 3), pack_qzeros(zeros.to(torch.int32), 3),
                         scales, g_idx, 3)
    q3.set_base_linear(1, "down_proj", module)
    assert q3.model_epoch == 0
    assert torch.equal(q3.base_linear(1, "down_proj").dense_weight(torch.float32), module.dequantized().t())
    q4 = ModelRunner(EngineConfig(num_kv_blocks=8, block_size=16, device="cpu", dtype="float32",
                                  quant_bits=4), QSHAPE, weights, "cpu", torch.float32)
    q4.set_base_linear(1, "down_proj", module)
    swapped = q4.base_linear(1, "down_proj")
    assert q4.model_epoch == 1 and isinstance(swapped, TritonQuantLinear) and swapped.kw.bits == 3
    assert torch.equal(swapped.dense_weight(torch.float32), module.dequantized().t())


def test_consume_empties_the_given_weights_and_the_default_keeps_them():
    """load() passes consume=True so the unfused originals do not outlive the model's copies."""
    shape = QSHAPE
    weights = random_weights(shape, "cpu", torch.float32, std=0.05)
    n = len(weights)
    cfg = EngineConfig(num_kv_blocks=8, block_size=16, device="cpu", dtype="float32")
    kept = ModelRunner(cfg, shape, weights, "cpu", torch.float32)
    assert len(weights) == n
    consumed = ModelRunner(cfg, shape, weights, "cpu", torch.float32, consume=True)
    assert weights == {}
    ids = list(range(3, 30))
    assert rel_err(_logits(consumed, ids), _logits(kept, ids)) == 0.0


def test_a_cpu_runner_leaves_the_kernel_switches_alone(monkeypatch):
    """The Triton switches are process-wide and set by the runner that launches the kernels; a CPU
    runner built beside it (the GPU tests' float32 reference) must not reset them."""
    from services.engine.kernels import launch, w4a16
    monkeypatch.setattr(launch, "ENABLED", False)
    monkeypatch.setattr(w4a16, "SERIAL_SPLIT_K", True)
    shape = LlamaShape(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=1,
                       num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5,
                       rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=False)
    config = EngineConfig(num_kv_blocks=8, block_size=4, device="cpu", dtype="float32")   # switch defaults
    runner = ModelRunner(config, shape, random_weights(shape, "cpu", torch.float32), "cpu", torch.float32)
    assert not runner.is_fast
    assert launch.ENABLED is False and w4a16.SERIAL_SPLIT_K is True
