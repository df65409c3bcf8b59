"""The torch length model: mean of hashed n-gram embeddings + task embedding + dense features → MLP → log1p(tokens)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from services.predictor.features import NUM_DENSE


@dataclass(frozen=True)
class LengthModelConfig:
    """Shape of the model (stored in metadata.json so the exporter can rebuild it)."""

    num_buckets: int = 1 << 15
    num_tasks: int = 1  # known tasks + 1 (index 0 = unknown)
    embed_dim: int = 32
    task_dim: int = 16
    hidden_dim: int = 128

    def to_dict(self) -> dict:
        return asdict(self)


class LengthModel(nn.Module):
    """Predicts log1p(output tokens) for (task, prompt).

    Inputs: ngram_ids [B, L] int64 (0 = padding), task_ids [B] int64, dense [B, F] float32.
    Output: [B] float32.
    """

    def __init__(self, cfg: LengthModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.ngram = nn.Embedding(cfg.num_buckets, cfg.embed_dim, padding_idx=0)
        self.task = nn.Embedding(cfg.num_tasks, cfg.task_dim)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.embed_dim + cfg.task_dim + NUM_DENSE, cfg.hidden_dim),
            nn.ReLU(),
            nn.Linear(cfg.hidden_dim, cfg.hidden_dim // 2),
            nn.ReLU(),
            nn.Linear(cfg.hidden_dim // 2, 1),
        )
        # Task-conditioned output offset: most of a task's length level is one number.
        self.task_bias = nn.Embedding(cfg.num_tasks, 1)
        nn.init.normal_(self.ngram.weight, std=0.1)
        with torch.no_grad():
            self.ngram.weight[0].zero_()
            self.task_bias.weight.zero_()

    def forward(self, ngram_ids: torch.Tensor, task_ids: torch.Tensor,
                dense: torch.Tensor) -> torch.Tensor:
        mask = (ngram_ids != 0).to(torch.float32).unsqueeze(-1)  # [B, L, 1]
        summed = (self.ngram(ngram_ids) * mask).sum(dim=1)  # [B, E]
        pooled = summed / mask.sum(dim=1).clamp(min=1.0)  # [B, E]
        h = torch.cat([pooled, self.task(task_ids), dense], dim=-1)  # [B, E+T+F]
        return self.mlp(h).squeeze(-1) + self.task_bias(task_ids).squeeze(-1)  # [B]
