"""LoRA fine-tuning of the base model on one task, resumable, saving a standard PEFT adapter."""
from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import save_file
from tqdm import tqdm

from services.common.workload.chat import completion_token_ids, prompt_token_ids
from services.common.workload.task import TaskError, TaskSource

_CHECKPOINT = "checkpoint"
_STATE_FILE = "state.pt"


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one adapter's training run (defaults: the shipped demo adapters)."""

    rank: int = 8
    alpha: int = 16
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    steps: int = 100
    lr: float = 1e-3
    batch_size: int = 8
    max_len: int = 192
    seed: int = 0
    save_every: int = 20
    warmup_steps: int = 5
    base_model: str = "smollm2-135m"

    def __post_init__(self) -> None:
        if self.rank < 1 or self.alpha < 1:
            raise ValueError(f"rank and alpha must be >= 1, got {self.rank}, {self.alpha}")
        if self.steps < 1 or self.batch_size < 1 or self.max_len < 8 or self.save_every < 1:
            raise ValueError("steps, batch_size, save_every must be >= 1 and max_len >= 8")
        if not self.targets:
            raise ValueError("targets must name at least one module (e.g. q_proj,v_proj)")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


def encode_example(tokenizer, prompt: str, completion: str, max_len: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels): loss only on completion tokens (prompt labels are -100)."""
    p_ids = prompt_token_ids(tokenizer, prompt)
    c_ids = completion_token_ids(tokenizer, completion)
    ids = (p_ids + c_ids)[:max_len]
    labels = ([-100] * len(p_ids) + c_ids)[:max_len]
    return ids, labels


def _collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [B, T]
    labels = torch.full((len(rows), width), -100, dtype=torch.long)  # [B, T]
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # [B, T]
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(lab)] = torch.tensor(lab)
        mask[i, :len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def completion_loss(causal_lm, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over completion tokens (equal to HF's `labels=` loss).

    Projects only completion positions through the 49k-wide LM head: for short answers the
    full [B, T, V] logits cost more than the transformer itself.
    """
    hidden = causal_lm.model(input_ids=batch["input_ids"],
                             attention_mask=batch["attention_mask"]).last_hidden_state  # [B, T, H]
    targets = batch["labels"][:, 1:]  # [B, T-1]: position t predicts token t+1
    selected = targets != -100
    logits = causal_lm.lm_head(hidden[:, :-1][selected])  # [N, V]
    return torch.nn.functional.cross_entropy(logits.float(), targets[selected])


def _order(num_examples: int, num_needed: int, seed: int) -> list[int]:
    # One seeded permutation per epoch: the batch of step s is fixed, so a resumed run
    # sees exactly the batches the uninterrupted run would have seen.
    order: list[int] = []
    epoch = 0
    while len(order) < num_needed:
        perm = list(range(num_examples))
        random.Random(f"{seed}:{epoch}").shuffle(perm)
        order += perm
        epoch += 1
    return order[:num_needed]


def _lr_lambda(config: TrainConfig):
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        # Linear decay to 10 % of the peak by the last step.
        frac = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 1.0 - 0.9 * min(1.0, frac)
    return factor


def _save_checkpoint(out_dir: Path, peft_model, optimizer, scheduler, step: int) -> None:
    ckpt = out_dir / _CHECKPOINT
    ckpt.mkdir(parents=True, exist_ok=True)
    state = {"step": step, "adapter": get_peft_model_state_dict(peft_model),
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    tmp = ckpt / (_STATE_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, ckpt / _STATE_FILE)  # atomic: a kill mid-save leaves the previous checkpoint


def save_adapter(peft_model, out_dir: Path, base_model: str) -> None:
    """adapter_config.json + adapter_model.safetensors with fp16 tensors (half the bytes)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous()
             for k, v in get_peft_model_state_dict(peft_model).items()}
    save_file(state, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = peft_model.peft_config["default"]
    config.base_model_name_or_path = base_model
    config.save_pretrained(str(out_dir))


def train_adapter(model, tokenizer, task: TaskSource, out_dir: str | Path, config: TrainConfig,
                  resume: bool = False, show_progress: bool = True) -> dict:
    """Fine-tune a LoRA adapter for `task` on `model` (modified in place, restored on return).

    Saves adapter + optimizer + step to out_dir/checkpoint every `save_every` steps; with
    resume=True a run continues from there. Returns a summary (also written to training.json).
    """
    out_dir = Path(out_dir)
    ckpt_file = out_dir / _CHECKPOINT / _STATE_FILE
    if ckpt_file.exists() and not resume:
        raise TaskError(f"{out_dir} holds a checkpoint: pass --resume to continue it, or use a new --out")
    examples = task.examples("train", config.steps * config.batch_size, seed=config.seed)
    if not examples:
        raise TaskError(f"task {task.name!r} has no training examples")
    rows = [encode_example(tokenizer, e.prompt, e.completion, config.max_len) for e in examples]
    order = _order(len(rows), config.steps * config.batch_size, config.seed)

    torch.manual_seed(config.seed)
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=list(config.targets),
                      lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config))
    start = 0
    if resume and ckpt_file.exists():
        state = torch.load(ckpt_file, weights_only=False)
        set_peft_model_state_dict(peft_model, state["adapter"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = state["step"]

    try:
        summary = _train_loop(peft_model, optimizer, scheduler, rows, order, start, task, out_dir,
                              config, tokenizer, show_progress)
    finally:
        peft_model.unload()  # strip the LoRA layers: the caller's model is the bare base again
    return summary


def _train_loop(peft_model, optimizer, scheduler, rows, order, start, task, out_dir, config,
                tokenizer, show_progress) -> dict:
    ckpt_file = out_dir / _CHECKPOINT / _STATE_FILE
    params = [p for p in peft_model.parameters() if p.requires_grad]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(peft_model.parameters()).device
    peft_model.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    bar = tqdm(total=config.steps, initial=start, desc=f"train {task.name}", disable=not show_progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "train_log.jsonl", "a") as log:
        for step in range(start, config.steps):
            idx = order[step * config.batch_size:(step + 1) * config.batch_size]
            batch = {k: v.to(device) for k, v in _collate([rows[i] for i in idx], pad_id).items()}
            loss = completion_loss(peft_model.get_base_model(), batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            log.write(json.dumps({"step": step + 1, "loss": round(losses[-1], 5)}) + "\n")
            log.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if (step + 1) % config.save_every == 0 and step + 1 < config.steps:
                _save_checkpoint(out_dir, peft_model, optimizer, scheduler, step + 1)
    bar.close()

    save_adapter(peft_model, out_dir, config.base_model)
    summary = {"task": task.name, "config": asdict(config), "steps_run": config.steps - start,
               "resumed_from_step": start, "final_loss": losses[-1] if losses else None,
               "mean_loss_last_10": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
               "train_seconds": round(time.perf_counter() - t0, 1),
               "num_train_examples": len(set(order))}
    (out_dir / "training.json").write_text(json.dumps(summary, indent=2))
    if ckpt_file.exists():
        ckpt_file.unlink()  # the finished adapter supersedes it; optimizer state is not shipped
        (out_dir / _CHECKPOINT).rmdir()
    return summary
