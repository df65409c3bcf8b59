"""Train the length model on (task, prompt, output_tokens) rows, evaluate on held-out prompts, export ONNX."""
from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from services.predictor.export import max_abs_diff, write_model_dir
from services.predictor.features import Featurizer, user_text
from services.predictor.metrics import summarize
from services.predictor.model import LengthModel, LengthModelConfig
from services.predictor.onnx_predictor import OnnxLengthModel


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of one training run."""

    epochs: int = 25
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-5
    seed: int = 0
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError("epochs and batch_size must be >= 1 and lr > 0")


def load_rows(path: Path) -> list[dict]:
    """JSONL of {task, prompt, output_tokens}; raises with the line number on a bad line."""
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows.append({"task": str(row["task"]), "prompt": str(row["prompt"]),
                             "output_tokens": int(row["output_tokens"])})
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{lineno}: expected JSON with task, prompt, "
                                 f"output_tokens ({exc})") from exc
            if rows[-1]["output_tokens"] < 0:
                raise ValueError(f"{path}:{lineno}: output_tokens must be >= 0")
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def split_rows(rows: list[dict], test_frac: float, seed: int,
               holdout_task: str | None = None) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, test, holdout): test = a random test_frac of each known task's rows; holdout = one whole task."""
    rng = random.Random(seed)
    holdout = [r for r in rows if r["task"] == holdout_task]
    train, test = [], []
    for r in rows:
        if r["task"] == holdout_task:
            continue
        (test if rng.random() < test_frac else train).append(r)
    return train, test, holdout


def _batch(featurizer: Featurizer, task_index: dict[str, int], rows: list[dict]):
    ids, dense = featurizer.batch([r["prompt"] for r in rows])
    task_ids = np.asarray([task_index.get(r["task"], 0) for r in rows], dtype=np.int64)
    return torch.from_numpy(ids), torch.from_numpy(task_ids), torch.from_numpy(dense)


def _pad(id_lists: list[list[int]]) -> torch.Tensor:
    ids = torch.zeros(len(id_lists), max(len(x) for x in id_lists), dtype=torch.int64)  # [B, L]
    for row, seq in enumerate(id_lists):
        ids[row, : len(seq)] = torch.tensor(seq)
    return ids


def fit(model: LengthModel, featurizer: Featurizer, tasks: list[str], rows: list[dict],
        cfg: TrainConfig) -> list[float]:
    """Minimise MSE on log1p(output_tokens); returns the mean loss of each epoch."""
    task_index = {t: i + 1 for i, t in enumerate(tasks)}
    rng = random.Random(cfg.seed)
    # Featurize once: hashing the prompts costs more than a step of this small model.
    texts = [user_text(r["prompt"]) for r in rows]
    id_lists = [featurizer.ngram_ids(t) for t in texts]
    dense_all = torch.tensor([featurizer.dense(t) for t in texts], dtype=torch.float32)  # [N, F]
    task_all = torch.tensor([task_index.get(r["task"], 0) for r in rows], dtype=torch.int64)
    target_all = torch.tensor([math.log1p(r["output_tokens"]) for r in rows], dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    order = list(range(len(rows)))
    epoch_losses = []
    bar = tqdm(range(cfg.epochs), desc="train-predictor", disable=not cfg.show_progress)
    for _ in bar:
        rng.shuffle(order)
        model.train()
        total = 0.0
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            pred = model(_pad([id_lists[i] for i in idx]), task_all[idx], dense_all[idx])
            loss = torch.nn.functional.mse_loss(pred, target_all[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        sched.step()
        epoch_losses.append(total / len(rows))
        bar.set_postfix(loss=f"{epoch_losses[-1]:.4f}")
    return epoch_losses


@torch.no_grad()
def predict_tokens(model: LengthModel, featurizer: Featurizer, tasks: list[str],
                   rows: list[dict], batch_size: int = 256) -> np.ndarray:
    """Torch-side predicted output tokens (float) for rows of known tasks."""
    task_index = {t: i + 1 for i, t in enumerate(tasks)}
    model.eval()
    out = []
    for start in range(0, len(rows), batch_size):
        out.append(model(*_batch(featurizer, task_index, rows[start:start + batch_size])).numpy())
    return np.expm1(np.concatenate(out)) if out else np.zeros(0)


def task_log_sigma(pred: np.ndarray, rows: list[dict]) -> dict[str, float]:
    """Per-task RMS error in log space (the served confidence is exp(-sigma))."""
    errs: dict[str, list[float]] = {}
    for p, r in zip(pred, rows):
        errs.setdefault(r["task"], []).append(math.log1p(max(p, 0.0)) - math.log1p(r["output_tokens"]))
    return {t: float(np.sqrt(np.mean(np.square(e)))) for t, e in errs.items()}


def new_model(num_tasks: int, featurizer: Featurizer,
              model_cfg: LengthModelConfig | None = None) -> LengthModel:
    """A fresh model sized for num_tasks known tasks and the featurizer's buckets."""
    base = model_cfg or LengthModelConfig()
    return LengthModel(LengthModelConfig(**{**asdict(base), "num_tasks": num_tasks + 1,
                                            "num_buckets": featurizer.num_buckets}))


def train_predictor(rows: list[dict], out_dir: Path, *, holdout_task: str | None = None,
                    test_frac: float = 0.2, quantize: bool = False,
                    model_cfg: LengthModelConfig | None = None,
                    featurizer: Featurizer | None = None,
                    train_cfg: TrainConfig = TrainConfig(), data_source: str = "",
                    pretrain_rows: list[dict] | None = None) -> dict:
    """Train on the train split, evaluate on held-out prompts, export ONNX to out_dir; returns the report.

    pretrain_rows (e.g. reference-completion lengths, cheap to generate in any
    number) are fitted first, then the model is fine-tuned on the real rows; only
    tasks present in the real train split are kept, the held-out task never.
    """
    torch.manual_seed(train_cfg.seed)
    train, test, _ = split_rows(rows, test_frac, train_cfg.seed, holdout_task)
    if not train:
        raise ValueError("no training rows left after the split")
    tasks = sorted({r["task"] for r in train})
    featurizer = featurizer or Featurizer()
    model = new_model(len(tasks), featurizer, model_cfg)
    pretrain = [r for r in (pretrain_rows or []) if r["task"] in set(tasks)]
    if pretrain:
        fit(model, featurizer, tasks, pretrain, train_cfg)
        train_cfg = replace(train_cfg, epochs=max(1, train_cfg.epochs * 3 // 5), lr=train_cfg.lr / 3)
    losses = fit(model, featurizer, tasks, train, train_cfg)
    eval_rows = test or train
    pred = predict_tokens(model, featurizer, tasks, eval_rows)
    report = {
        "data_source": data_source, "num_train": len(train), "num_test": len(test), "tasks": tasks,
        "holdout_task": holdout_task, "final_train_loss": losses[-1],
        "num_pretrain": len(pretrain),
        "test": summarize(pred, [r["output_tokens"] for r in eval_rows]),
        "train_config": asdict(train_cfg),
    }
    sigma = task_log_sigma(pred, eval_rows)
    write_model_dir(model, tasks, featurizer, out_dir, task_log_sigma=sigma, quantize=quantize)
    onnx_model = OnnxLengthModel(out_dir, num_threads=1)
    report["onnx_max_abs_diff"] = max_abs_diff(
        model, onnx_model, [(r["task"], r["prompt"]) for r in eval_rows[:512]])
    # Rewritten with the parity number, so metadata.json says what was checked.
    write_model_dir(model, tasks, featurizer, out_dir, task_log_sigma=sigma, quantize=quantize,
                    extra={"training": report})
    return report
