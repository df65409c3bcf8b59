"""Tiny random Llama, random PEFT adapters and synthetic calibration files for quantizer tests."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from services.common.model_source import resolve_model

HIDDEN, INTER, LAYERS = 64, 128, 2
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")


def make_tiny_llama(out_dir: Path, seed: int = 0, hidden: int = HIDDEN) -> Path:
    """A 2-layer random Llama with the SmolLM2 tokenizer (so chat formatting is real)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=INTER, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=49152,
                      max_position_embeddings=256, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out_dir)
    src = resolve_model("smollm2-135m").path
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out_dir / name)
    return out_dir


def make_adapter(model_dir: Path, out_dir: Path, seed: int, rank: int = 4) -> Path:
    """A PEFT LoRA adapter with random (non-zero) A and B on every linear."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=False,
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                     "up_proj", "down_proj"])
    peft_model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(3.0)
    peft_model.save_pretrained(out_dir)
    return out_dir


def make_calibration(path: Path, seed: int, num_lines: int = 40) -> Path:
    rng = random.Random(seed)
    words = [f"w{seed}_{i}" for i in range(30)] + ["alpha", "beta", "seven", "list", "json"]
    with open(path, "w") as f:
        for _ in range(num_lines):
            prompt = " ".join(rng.choice(words) for _ in range(rng.randint(5, 20)))
            completion = " ".join(rng.choice(words) for _ in range(rng.randint(2, 10)))
            f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_tasks(tiny_model, tmp_path_factory):
    """Three TaskSpecs with their own adapters and calibration files."""
    from services.quantizer.calibration import TaskSpec
    root = tmp_path_factory.mktemp("tasks")
    specs = []
    for i, name in enumerate(("alpha", "beta", "gamma")):
        adapter = make_adapter(tiny_model, root / f"adapter_{name}", seed=100 + i)
        calib = make_calibration(root / f"{name}.jsonl", seed=i)
        specs.append(TaskSpec(name, str(adapter), str(calib)))
    return specs
