"""The quality benchmark's weight path: quantize → pack → dequantize → substitute into the model.

Guards the sanity checks behind docs/mlgptq.md "Why the drop is large": the checkpoint
round trip must equal an independent fake quant, substitution must touch exactly the decoder
linears (never the tied embedding / lm_head), and 8 bits must be nearly lossless.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from services.quantizer.checkpoint import dequantize, packed_tensors
from services.quantizer.config import QuantConfig
from services.quantizer.rtn import rtn_quantize

ROOT = Path(__file__).resolve().parents[3]


def _bench():
    spec = importlib.util.spec_from_file_location(
        "bench_quant_quality", ROOT / "benchmarks" / "bench_quant_quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def _load_packed(model, packed: dict[str, torch.Tensor], bits: int) -> None:
    """The benchmark's substitution path: checkpoint tensors → dequantized weights → Evaluator.load."""
    weights = {}
    for key in [k for k in packed if k.endswith(".qweight")]:
        p = key[: -len(".qweight")]
        weights[f"{p}.weight"] = dequantize(packed[key], packed[f"{p}.qzeros"], packed[f"{p}.scales"],
                                            packed[f"{p}.g_idx"], bits)
    _bench().Evaluator(model, None, {}, None, None).load(weights)


def fake_quant(w: torch.Tensor, bits: int, group_size: int, sym: bool) -> torch.Tensor:
    """Quantize–dequantize written independently of services.quantizer (AutoGPTQ min/max rule)."""
    maxq = 2 ** bits - 1
    gs = w.shape[1] if group_size == -1 else group_size
    out = torch.empty_like(w)
    for start in range(0, w.shape[1], gs):  # the last group may be shorter (576 = 4·128 + 64)
        g = w[:, start:start + gs]
        lo = g.amin(1, keepdim=True).clamp(max=0)
        hi = g.amax(1, keepdim=True).clamp(min=0)
        if sym:
            hi = torch.maximum(lo.abs(), hi)
            lo = -hi
        scale = ((hi - lo) / maxq).half().float()
        zero = torch.full_like(scale, (maxq + 1) // 2) if sym else torch.round(-lo / scale).clamp(0, maxq)
        out[:, start:start + gs] = (torch.clamp(torch.round(g / scale) + zero, 0, maxq) - zero) * scale
    return out


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("group_size", [128, 32, -1])
@pytest.mark.parametrize("sym", [True, False])
def test_checkpoint_round_trip_equals_fake_quant(bits, group_size, sym):
    torch.manual_seed(bits * 100 + group_size)
    w = torch.randn(64, 192) * 0.2
    w[3, 7] = 2.5  # an outlier stretches one group's range
    res = rtn_quantize(w, QuantConfig(bits=bits, group_size=group_size, sym=sym))
    t = packed_tensors("x", res, bits)
    dq = dequantize(t["x.qweight"], t["x.qzeros"], t["x.scales"], t["x.g_idx"], bits)
    torch.testing.assert_close(dq, fake_quant(w, bits, group_size, sym), rtol=0, atol=0)
    torch.testing.assert_close(dq, res.dequant, rtol=0, atol=0)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=192, intermediate_size=384, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                      max_position_embeddings=64, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def _packed(model, bits: int) -> dict[str, torch.Tensor]:
    cfg = QuantConfig(bits=bits, group_size=128)
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            out.update(packed_tensors(name, rtn_quantize(module.weight.detach(), cfg), bits))
    return out


def test_substitution_touches_exactly_the_decoder_linears():
    torch.set_num_threads(1)
    model = _tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    packed = _packed(model, 4)
    _load_packed(model, packed, 4)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    expected = {k[: -len(".qweight")] + ".weight" for k in packed if k.endswith(".qweight")}
    assert changed == expected and len(expected) == 2 * 7
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    for key in expected:
        p = key[: -len(".weight")]
        want = dequantize(packed[f"{p}.qweight"], packed[f"{p}.qzeros"], packed[f"{p}.scales"],
                          packed[f"{p}.g_idx"], 4)
        torch.testing.assert_close(after[key], want, rtol=0, atol=0)


def test_eight_bits_is_nearly_lossless_four_bits_is_not():
    torch.set_num_threads(1)
    model = _tiny_llama()
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        ref = model(ids).logits
        errors = {}
        original = {k: v.clone() for k, v in model.state_dict().items()}
        for bits in (8, 4):
            model.load_state_dict(original)
            _load_packed(model, _packed(model, bits), bits)
            errors[bits] = ((model(ids).logits - ref).norm() / ref.norm()).item()
    assert errors[8] < 0.03, errors
    assert errors[4] > 5 * errors[8], errors
