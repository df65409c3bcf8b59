"""QuantLinear matches the checkpoint's dequantized weights; the engine runs on the quantized base."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from services.quantizer.checkpoint import dequantize, load_checkpoint, packed_tensors
from services.quantizer.config import QuantConfig
from services.quantizer.gptq import gptq_quantize
from services.quantizer.pipeline import quantize
from services.quantizer.qlinear import QuantLinear, apply_checkpoint


@pytest.mark.parametrize("bits,desc_act", [(2, False), (3, True), (4, True), (8, False)])
def test_forward_is_linear_with_dequantized_weight(bits, desc_act):
    torch.manual_seed(0)
    w = torch.randn(96, 64)
    x = torch.randn(300, 64)
    res = gptq_quantize(w, 2 / 300 * x.T @ x, QuantConfig(bits=bits, group_size=32, desc_act=desc_act))
    t = {k.split(".")[-1]: v for k, v in packed_tensors("l", res, bits).items()}
    module = QuantLinear.from_tensors(t, bits)
    assert torch.equal(module.dequantized(), res.dequant)
    assert torch.equal(module.dequantized(), dequantize(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits))
    inp = torch.randn(2, 5, 64)
    assert torch.allclose(module(inp), F.linear(inp, res.dequant), rtol=1e-5, atol=1e-5)


def test_engine_logits_with_quantized_base_match_hf(tiny_model, tiny_tasks, tmp_path):
    from transformers import AutoModelForCausalLM
    from services.engine.block_manager import BlockManager
    from services.engine.config import EngineConfig
    from services.engine.model_runner import ModelRunner
    from services.engine.sequence import SamplingParams, Sequence

    root = quantize(str(tiny_model), tiny_tasks, QuantConfig(num_seqs=4, seq_len=32, group_size=32),
                    tmp_path / "q", show_progress=False)
    runner = ModelRunner.load(EngineConfig(model=str(tiny_model), device="cpu", dtype="float32",
                                           num_kv_blocks=16))
    ids = list(range(100, 140))

    def engine_logits():
        seq = Sequence("s", ids, SamplingParams())
        BlockManager(runner.num_kv_blocks, runner.block_size).allocate(seq)
        return runner.compute_logits([seq])[0]

    fp_logits = engine_logits()
    assert apply_checkpoint(runner, tmp_path / "q") == 14
    q_logits = engine_logits()
    hf = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    hf.load_state_dict(load_checkpoint(root).state_dict(), strict=False)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([ids])).logits[0]
    assert (q_logits - ref).norm() / ref.norm() < 1e-4
    assert (fp_logits - ref).norm() / ref.norm() > 1e-3  # quantization did change the model


def test_apply_checkpoint_rejects_other_base(tiny_model, tiny_tasks, tmp_path):
    from services.engine.config import EngineConfig
    from services.engine.model_runner import ModelRunner
    from tests.unit.quantizer.conftest import make_tiny_llama

    other = make_tiny_llama(tmp_path / "other", hidden=32)
    quantize(str(other), [], QuantConfig(method="rtn", group_size=32), tmp_path / "q", show_progress=False)
    runner = ModelRunner.load(EngineConfig(model=str(tiny_model), device="cpu", dtype="float32",
                                           num_kv_blocks=4))
    before = runner.base_linear(0, "q_proj")
    with pytest.raises(ValueError, match="does not fit"):
        apply_checkpoint(runner, tmp_path / "q")
    assert runner.base_linear(0, "q_proj") is before
