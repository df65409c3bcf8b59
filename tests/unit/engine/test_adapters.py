"""PEFT adapter loading: what is accepted, and every rejection with its message."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from services.common.adapters import AdapterError, BaseDims, load_adapter

DIMS = BaseDims(hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=4)
PREFIX = "base_model.model.model.layers"


def write_adapter(path, rank=4, targets=("q_proj", "v_proj"), alpha=8, dims=DIMS,
                  config_extra=None, tensors_extra=None, drop=(), fill=None):
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for layer in range(dims.num_layers):
        for m in targets:
            in_f, out_f = dims.features(m)
            sub = "self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"{PREFIX}.{layer}.{sub}.{m}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, in_f)
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_f, rank)
    for k in drop:
        tensors.pop(k)
    tensors.update(tensors_extra or {})
    if fill is not None:
        first = sorted(tensors)[0]
        tensors[first][0, 0] = fill
    save_file(tensors, str(path / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": list(targets),
           "bias": "none", "base_model_name_or_path": "tiny"}
    cfg.update(config_extra or {})
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


def test_loads_valid_adapter(tmp_path):
    ad = load_adapter("t", write_adapter(tmp_path / "a", rank=4, alpha=8), DIMS, max_rank=16)
    assert ad.rank == 4 and ad.targets == ("q_proj", "v_proj")
    assert set(ad.weights) == {(l, m) for l in range(2) for m in ("q_proj", "v_proj")}
    a, b = ad.weights[(1, "v_proj")]
    assert a.shape == (4, 16) and b.shape == (8, 4)
    assert all(s == 2.0 for s in ad.scaling.values())


def test_rslora_scaling(tmp_path):
    path = write_adapter(tmp_path / "a", rank=16, alpha=8, config_extra={"use_rslora": True})
    ad = load_adapter("t", path, DIMS, max_rank=16)
    assert ad.scaling[(0, "q_proj")] == pytest.approx(8 / math.sqrt(16))


def test_all_modules_and_all_linear(tmp_path):
    mods = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    path = write_adapter(tmp_path / "a", targets=mods, config_extra={"target_modules": "all-linear"})
    assert load_adapter("t", path, DIMS, max_rank=8).targets == mods


def test_real_peft_adapter_round_trip(tmp_path):
    torch.set_num_threads(1)
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=4)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(
        r=4, lora_alpha=4, target_modules=["k_proj", "down_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "peft")
    ad = load_adapter("t", tmp_path / "peft", DIMS, max_rank=8)
    assert ad.targets == ("k_proj", "down_proj") and ad.rank == 4
    ref = model.base_model.model.model.layers[1].mlp.down_proj.lora_B["default"].weight
    assert torch.equal(ad.weights[(1, "down_proj")][1], ref.detach())


@pytest.mark.parametrize("case, match", [
    ("pickle", "pickle"),
    ("no_weights", "missing adapter_model.safetensors"),
    ("no_config", "missing adapter_config.json"),
    ("not_a_dir", "not a directory"),
    ("nan", "NaN or Inf"),
    ("inf", "NaN or Inf"),
    ("unknown_target_config", "unknown target modules"),
    ("unknown_target_tensor", "unknown target module"),
    ("lm_head_tensor", "unexpected tensor"),
    ("rank_too_big", "exceeds the engine's max LoRA rank"),
    ("wrong_hidden", "do not fit the base model"),
    ("too_many_layers", "base model has 2 layers"),
    ("half_missing", "not both lora_A and lora_B"),
    ("rank_vs_config", "says r="),
    ("dora", "DoRA"),
    ("modules_to_save", "modules_to_save"),
    ("bad_json", "unreadable adapter_config.json"),
])
def test_rejections(tmp_path, case, match):
    path = tmp_path / "a"
    if case == "pickle":
        path.mkdir()
        torch.save({"x": torch.zeros(1)}, path / "adapter_model.bin")
        (path / "adapter_config.json").write_text("{}")
    elif case == "no_weights":
        write_adapter(path)
        (path / "adapter_model.safetensors").unlink()
    elif case == "no_config":
        write_adapter(path)
        (path / "adapter_config.json").unlink()
    elif case == "not_a_dir":
        path = tmp_path / "missing"
    elif case == "nan":
        write_adapter(path, fill=float("nan"))
    elif case == "inf":
        write_adapter(path, fill=float("inf"))
    elif case == "unknown_target_config":
        write_adapter(path, config_extra={"target_modules": ["q_proj", "foo_proj"]})
    elif case == "unknown_target_tensor":
        write_adapter(path, tensors_extra={
            f"{PREFIX}.0.self_attn.rotary.lora_A.weight": torch.zeros(4, 16),
            f"{PREFIX}.0.self_attn.rotary.lora_B.weight": torch.zeros(16, 4)})
    elif case == "lm_head_tensor":
        write_adapter(path, tensors_extra={"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 16)})
    elif case == "rank_too_big":
        write_adapter(path, rank=32)
    elif case == "wrong_hidden":
        write_adapter(path, dims=BaseDims(24, 32, 2, 4, 2, 6))
    elif case == "too_many_layers":
        write_adapter(path, dims=BaseDims(16, 32, 3, 4, 2, 4))
    elif case == "half_missing":
        write_adapter(path, drop=(f"{PREFIX}.1.self_attn.q_proj.lora_B.weight",))
    elif case == "rank_vs_config":
        write_adapter(path, config_extra={"r": 8})
    elif case == "dora":
        write_adapter(path, config_extra={"use_dora": True})
    elif case == "modules_to_save":
        write_adapter(path, config_extra={"modules_to_save": ["lm_head"]})
    elif case == "bad_json":
        write_adapter(path)
        (path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match=match):
        load_adapter("t", path, DIMS, max_rank=16)
    assert issubclass(AdapterError, ValueError)
