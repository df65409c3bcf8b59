"""The demo adapters in adapters/: one valid fp16 PEFT adapter per built-in task; (slow) each beats the base."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from services.common.workload.task import builtin_tasks

ROOT = Path(__file__).resolve().parents[3] / "adapters"
TASKS = list(builtin_tasks())


@pytest.mark.parametrize("task", TASKS)
def test_adapter_files_are_valid_small_peft_adapters(task):
    config = json.loads((ROOT / task / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == "smollm2-135m"
    assert config["r"] <= 8
    tensors = load_file(str(ROOT / task / "adapter_model.safetensors"))
    assert all(t.dtype == torch.float16 and torch.isfinite(t).all() for t in tensors.values())
    assert (ROOT / task / "adapter_model.safetensors").stat().st_size < 4 << 20


def test_shipped_results_show_every_adapter_beating_the_base():
    results = json.loads((ROOT.parent / "benchmarks/results/adapters.json").read_text())["results"]
    assert {r["task"] for r in results} == set(TASKS)
    assert all(r["adapter_score"] >= r["base_score"] + 0.15 for r in results)


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_adapter_beats_base_on_cpu(task):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from services.common.model_source import resolve_model
    from services.common.workload.evaluation import evaluate

    torch.set_num_threads(2)
    path = resolve_model().path
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tuned = evaluate(task, model, tokenizer, ROOT / task, num_examples=20)
    base = evaluate(task, model, tokenizer, None, num_examples=20)
    assert tuned["score"] > base["score"] + 0.1
