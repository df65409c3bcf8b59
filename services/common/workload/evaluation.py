"""Greedy generation on a task's test split and its metric, with or without an adapter."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from services.common.workload.chat import prompt_token_ids
from services.common.workload.metrics import get_metric
from services.common.workload.task import TaskError, TaskSource, get_task


def load_base_weights(model, path: str | Path) -> int:
    """Overwrite base weights in place from a safetensors file (e.g. dequantized linears).

    Every tensor must name an existing parameter of the same shape; returns how many were replaced.
    """
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    # state_dict, not named_parameters: tied weights (lm_head = embed_tokens) keep both names.
    params = model.state_dict(keep_vars=True)
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise TaskError(f"{path}: {len(unknown)} tensors match no model parameter, e.g. {unknown[:3]}")
    with torch.no_grad():
        for name, value in tensors.items():
            if params[name].shape != value.shape:
                raise TaskError(f"{path}: {name} has shape {tuple(value.shape)}, "
                                f"model expects {tuple(params[name].shape)}")
            params[name].copy_(value.to(params[name].dtype))
    return len(tensors)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int,
             batch_size: int = 16) -> list[tuple[str, int]]:
    """Greedy completions of chat-rendered prompts: (text, number of tokens before EOS) per prompt."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    pad = eos if pad is None else pad
    encoded = [prompt_token_ids(tokenizer, p) for p in prompts]
    # Similar lengths share a batch: less left padding to compute.
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    results: list[tuple[str, int]] = [("", 0)] * len(prompts)
    model.eval()
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        input_ids = torch.full((len(idx), width), pad, dtype=torch.long)  # [B, T], left-padded
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids = encoded[i]
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            mask[row, width - len(ids):] = 1
        device = next(model.parameters()).device
        out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=eos, pad_token_id=pad)
        for row, i in enumerate(idx):
            new = out[row, width:].tolist()
            num_tokens = new.index(eos) if eos in new else len(new)
            results[i] = (tokenizer.decode(new[:num_tokens], skip_special_tokens=True), num_tokens)
    return results


def evaluate(task: str | TaskSource, model, tokenizer, adapter_dir: str | Path | None = None,
             num_examples: int = 100, max_new_tokens: int | None = None, batch_size: int = 16,
             split: str = "test", return_outputs: bool = False) -> dict:
    """Score `model` (+ the adapter in adapter_dir, if any) on `num_examples` of the task's split.

    The model is used as given, so a caller may first replace its base linears (quantized
    versions) and compare scores; an adapter is attached for this call only and removed after.
    """
    task = get_task(task) if isinstance(task, str) else task
    metric = get_metric(task.metric)
    examples = task.examples(split, num_examples)
    budget = max_new_tokens or task.max_new_tokens
    runner = model
    if adapter_dir is not None:
        from peft import PeftModel

        if not (Path(adapter_dir) / "adapter_config.json").exists():
            raise TaskError(f"{adapter_dir} is not a PEFT adapter directory (no adapter_config.json)")
        runner = PeftModel.from_pretrained(model, str(adapter_dir))
    t0 = time.perf_counter()
    try:
        outputs = generate(runner, tokenizer, [e.prompt for e in examples], budget, batch_size)
    finally:
        if adapter_dir is not None:
            runner.unload()  # the caller's model goes back to the bare base
    scores = [metric(text, e) for (text, _), e in zip(outputs, examples)]
    result = {
        "task": task.name, "metric": task.metric, "split": split, "num_examples": len(examples),
        "adapter": str(adapter_dir) if adapter_dir is not None else None,
        "score": sum(scores) / len(scores) if scores else 0.0,
        "mean_output_tokens": sum(n for _, n in outputs) / max(1, len(outputs)),
        "max_new_tokens": budget, "seconds": round(time.perf_counter() - t0, 1),
    }
    if return_outputs:
        result["outputs"] = [{"prompt": e.prompt, "reference": e.completion, "output": text,
                              "output_tokens": n, "score": s}
                             for e, (text, n), s in zip(examples, outputs, scores)]
    return result
