"""Adapter training on a tiny random Llama: files, loss masking, checkpoint + resume, eval round trip."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from services.common.workload.evaluation import evaluate
from services.common.workload.task import TaskError, get_task
from services.common.workload.training import (TrainConfig, completion_loss, encode_example,
                                               train_adapter)

CFG = dict(rank=4, alpha=8, steps=4, batch_size=2, max_len=96, save_every=2, lr=1e-2)


def test_labels_mask_the_prompt(tokenizer):
    ids, labels = encode_example(tokenizer, "Spell out 7 in English words.", "seven", 200)
    num_prompt = sum(1 for x in labels if x == -100)
    assert num_prompt > 5 and len(ids) == len(labels)
    assert labels[num_prompt:] == ids[num_prompt:]
    assert tokenizer.decode(ids[num_prompt:]) == "seven<|im_end|>"


def test_completion_loss_matches_hf_labels_loss(tokenizer, tiny_llama):
    from services.common.workload.training import _collate

    rows = [encode_example(tokenizer, "Spell out 7.", "seven", 64),
            encode_example(tokenizer, "Spell out 12 please.", "twelve", 64)]
    batch = _collate(rows, tokenizer.eos_token_id)
    with torch.no_grad():
        ours = completion_loss(tiny_llama, batch)
        theirs = tiny_llama(**batch).loss
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_train_saves_fp16_peft_adapter_and_loss_drops(tokenizer, tiny_llama, tmp_path):
    out = tmp_path / "a"
    summary = train_adapter(tiny_llama, tokenizer, get_task("arith"), out,
                            TrainConfig(**{**CFG, "steps": 12}), show_progress=False)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and set(config["target_modules"]) == {"q_proj", "v_proj"}
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert tensors and all(t.dtype == torch.float16 for t in tensors.values())
    assert not (out / "checkpoint").exists()
    losses = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])
    assert summary["resumed_from_step"] == 0
    # the base model is restored (no LoRA layers left behind)
    assert not any("lora" in name for name, _ in tiny_llama.named_parameters())


def test_resume_continues_from_checkpoint(tokenizer, tiny_llama, tmp_path, monkeypatch):
    import services.common.workload.training as training

    out = tmp_path / "a"
    real_save = training.save_adapter

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # simulate a kill after the last step, before the final save

    monkeypatch.setattr(training, "save_adapter", crash)
    with pytest.raises(KeyboardInterrupt):
        train_adapter(tiny_llama, tokenizer, get_task("arith"), out, TrainConfig(**CFG),
                      show_progress=False)
    assert (out / "checkpoint" / "state.pt").exists()
    assert not any("lora" in name for name, _ in tiny_llama.named_parameters())
    monkeypatch.setattr(training, "save_adapter", real_save)
    with pytest.raises(TaskError, match="--resume"):
        train_adapter(tiny_llama, tokenizer, get_task("arith"), out, TrainConfig(**CFG),
                      show_progress=False)
    summary = train_adapter(tiny_llama, tokenizer, get_task("arith"), out, TrainConfig(**CFG),
                            resume=True, show_progress=False)
    assert summary["resumed_from_step"] == 2 and summary["steps_run"] == 2
    assert (out / "adapter_model.safetensors").exists()


def test_evaluate_with_and_without_adapter(tokenizer, tiny_llama, tmp_path):
    out = tmp_path / "a"
    train_adapter(tiny_llama, tokenizer, get_task("num2words_en"), out, TrainConfig(**CFG),
                  show_progress=False)
    base = evaluate("num2words_en", tiny_llama, tokenizer, None, num_examples=3, max_new_tokens=4)
    tuned = evaluate("num2words_en", tiny_llama, tokenizer, out, num_examples=3, max_new_tokens=4,
                     return_outputs=True)
    assert base["num_examples"] == tuned["num_examples"] == 3
    assert 0.0 <= tuned["score"] <= 1.0 and len(tuned["outputs"]) == 3
    assert all(o["output_tokens"] <= 4 for o in tuned["outputs"])
    assert not any("lora" in name for name, _ in tiny_llama.named_parameters())


def test_load_base_weights_replaces_and_validates(tiny_llama, tmp_path):
    from safetensors.torch import save_file

    from services.common.workload.evaluation import load_base_weights

    name = "model.layers.0.self_attn.q_proj.weight"
    new = torch.full_like(tiny_llama.state_dict()[name], 0.5)
    save_file({name: new, "lm_head.weight": tiny_llama.lm_head.weight.detach().clone()},
              str(tmp_path / "w.safetensors"))
    assert load_base_weights(tiny_llama, tmp_path / "w.safetensors") == 2
    assert torch.equal(tiny_llama.model.layers[0].self_attn.q_proj.weight, new)
    save_file({"model.nope.weight": new}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(TaskError, match="match no model parameter"):
        load_base_weights(tiny_llama, tmp_path / "bad.safetensors")
    save_file({name: new[:2].contiguous()}, str(tmp_path / "shape.safetensors"))
    with pytest.raises(TaskError, match="shape"):
        load_base_weights(tiny_llama, tmp_path / "shape.safetensors")
