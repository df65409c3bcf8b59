"""Our paged-KV multi-LoRA forward against Hugging Face transformers + PEFT (fp32, CPU)."""
from __future__ import annotations

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
