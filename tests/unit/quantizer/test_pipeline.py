"""End to end on a tiny random Llama: methods, incremental == full, LoRA hooks, bad input."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from services.common.adapters import AdapterError
from services.quantizer.calibration import CalibrationError, LoraHooks, TaskSpec, read_adapter
from services.quantizer.checkpoint import load_checkpoint, resolve
from services.quantizer.config import QuantConfig
from services.quantizer.incremental import add_tasks
from services.quantizer.pipeline import Stream, capture_inputs, run_layer, quantize
from tests.unit.quantizer.conftest import make_adapter, make_calibration, make_tiny_llama

SMALL = dict(num_seqs=4, seq_len=32, group_size=32)


@pytest.mark.parametrize("aggregation,mse", [("max-inv", False), ("max-h", False), ("row-max", False),
                                             ("mean", False), ("mean", True)])
def test_incremental_equals_full_bit_for_bit(tiny_model, tiny_tasks, tmp_path, aggregation, mse):
    cfg = QuantConfig(aggregation=aggregation, mse=mse, **SMALL)
    quantize(str(tiny_model), tiny_tasks, cfg, tmp_path / "full", show_progress=False)
    quantize(str(tiny_model), tiny_tasks[:1], cfg, tmp_path / "inc", show_progress=False)
    v2 = add_tasks(tmp_path / "inc", tiny_tasks[1:], show_progress=False)
    assert v2.name == "v2" and resolve(tmp_path / "inc") == v2
    full, inc = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "inc")
    assert [t["name"] for t in inc.quant_config["tasks"]] == ["alpha", "beta", "gamma"]
    assert inc.quant_config["mse"] is mse and inc.quant_config["config"]["mse"] is mse
    assert full.tensors.keys() == inc.tensors.keys()
    for key in full.tensors:
        assert torch.equal(full.tensors[key], inc.tensors[key]), key


def test_tasks_change_the_result(tiny_model, tiny_tasks, tmp_path):
    cfg = QuantConfig(**SMALL)
    one = load_checkpoint(quantize(str(tiny_model), tiny_tasks[:1], cfg, tmp_path / "a", show_progress=False))
    three = load_checkpoint(quantize(str(tiny_model), tiny_tasks, cfg, tmp_path / "b", show_progress=False))
    key = "model.layers.1.mlp.down_proj.qweight"
    assert not torch.equal(one.tensors[key], three.tensors[key])


def test_checkpoint_loads_into_hf_model(tiny_model, tiny_tasks, tmp_path):
    # natural column order, so columns 0..31 form one group below
    cfg = QuantConfig(bits=3, desc_act=False, **SMALL)
    ckpt = load_checkpoint(quantize(str(tiny_model), tiny_tasks, cfg, tmp_path / "q", show_progress=False))
    assert ckpt.quant_config["bits"] == 3 and ckpt.model_config["quantization_config"]["bits"] == 3
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    base = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    missing, unexpected = model.load_state_dict(ckpt.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    q = model.model.layers[0].self_attn.q_proj.weight.detach()
    assert not torch.equal(q, base)
    assert len(torch.unique(q[0, :32])) <= 8  # 3-bit: at most 8 levels per group
    assert (q - base).abs().max() < base.abs().max()


@pytest.mark.parametrize("method", ["rtn", "gptq", "gptq-mixed"])
def test_other_methods(tiny_model, tiny_tasks, tmp_path, method):
    cfg = QuantConfig(method=method, **SMALL)
    tasks = [] if method == "rtn" else tiny_tasks
    ckpt = load_checkpoint(quantize(str(tiny_model), tasks, cfg, tmp_path / method, show_progress=False))
    assert ckpt.quant_config["method"] == method
    assert not (ckpt.path / "aggregates").exists()
    with pytest.raises(Exception, match="mlgptq"):
        add_tasks(tmp_path / method, tiny_tasks[:1], show_progress=False)


def test_lora_hooks_match_peft(tiny_model, tiny_tasks):
    from peft import PeftModel
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    spec = tiny_tasks[0]
    tokens = torch.randint(0, 1000, (2, 16))
    stream = Stream(spec.name, tokens, read_adapter(spec, base.config))
    capture_inputs(base, stream, "cpu")
    for idx, layer in enumerate(base.model.layers):
        run_layer(layer, idx, stream)
    ours = base.model.norm(stream.inputs[0][0])
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), spec.adapter_path)
    ref = peft.base_model.model.model(input_ids=tokens).last_hidden_state
    assert torch.allclose(ours, ref, atol=1e-4)
    bare = AutoModelForCausalLM.from_pretrained(tiny_model).model(input_ids=tokens).last_hidden_state
    assert not torch.allclose(bare, ref, atol=1e-3)  # the adapter matters


def _expect_failure(tiny_model, tasks, tmp_path, exc, **cfg):
    root = tmp_path / "out"
    with pytest.raises(exc):
        quantize(str(tiny_model), tasks, QuantConfig(**{**SMALL, **cfg}), root, show_progress=False)
    assert not root.exists() or list(root.iterdir()) == []  # nothing half-written


def test_missing_calibration(tiny_model, tiny_tasks, tmp_path):
    bad = TaskSpec("x", tiny_tasks[0].adapter_path, str(tmp_path / "nope.jsonl"))
    _expect_failure(tiny_model, [tiny_tasks[0], bad], tmp_path, CalibrationError)


def test_empty_and_short_calibration(tiny_model, tiny_tasks, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    _expect_failure(tiny_model, [TaskSpec("e", None, str(empty))], tmp_path, CalibrationError)
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"prompt": "hi", "completion": "yo"}) + "\n")
    _expect_failure(tiny_model, [TaskSpec("s", None, str(short))], tmp_path, CalibrationError,
                    seq_len=128)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    _expect_failure(tiny_model, [TaskSpec("b", None, str(bad))], tmp_path, CalibrationError)


def test_adapter_for_another_base(tiny_model, tmp_path):
    other = make_tiny_llama(tmp_path / "other", hidden=32)
    adapter = make_adapter(other, tmp_path / "other_adapter", seed=1)
    calib = make_calibration(tmp_path / "c.jsonl", seed=1)
    _expect_failure(tiny_model, [TaskSpec("o", str(adapter), str(calib))], tmp_path, AdapterError)


def test_duplicate_and_existing_task_names(tiny_model, tiny_tasks, tmp_path):
    _expect_failure(tiny_model, [tiny_tasks[0], tiny_tasks[0]], tmp_path, CalibrationError)
    quantize(str(tiny_model), tiny_tasks[:1], QuantConfig(**SMALL), tmp_path / "q", show_progress=False)
    with pytest.raises(CalibrationError):
        add_tasks(tmp_path / "q", tiny_tasks[:1], show_progress=False)
    assert resolve(tmp_path / "q").name == "v1"


def test_task_spec_parse():
    assert TaskSpec.parse("a=/x/ad:/y/c.jsonl") == TaskSpec("a", "/x/ad", "/y/c.jsonl")
    assert TaskSpec.parse("a=:c.jsonl") == TaskSpec("a", None, "c.jsonl")
    with pytest.raises(CalibrationError):
        TaskSpec.parse("nocolon")


def test_lora_hooks_noop_without_adapter(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with LoraHooks(model.model.layers[0], 0, None) as hooks:
        assert hooks._handles == []
