"""Fixtures: a tiny trained length model exported to ONNX on a synthetic two-task workload."""
from __future__ import annotations

import random

import pytest
import torch

from services.predictor.export import write_model_dir
from services.predictor.features import Featurizer
from services.predictor.model import LengthModel, LengthModelConfig
from services.predictor.train import TrainConfig, fit

TASKS = ["spell", "short"]


def synthetic_rows(num: int, seed: int = 0) -> list[dict]:
    """'spell' outputs grow with the number of items listed; 'short' outputs are ~3 tokens."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num):
        k = rng.randint(1, 40)
        items = ", ".join(str(rng.randint(0, 999)) for _ in range(k))
        rows.append({"task": "spell", "prompt": f"Spell out: {items}", "output_tokens": 4 * k + 2})
        rows.append({"task": "short", "prompt": f"Answer yes or no: is {k} even?",
                     "output_tokens": 3})
    return rows


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    featurizer = Featurizer(num_buckets=1024, max_ngrams=64)
    cfg = LengthModelConfig(num_buckets=1024, num_tasks=len(TASKS) + 1, embed_dim=8,
                            task_dim=4, hidden_dim=16)
    model = LengthModel(cfg)
    fit(model, featurizer, TASKS, synthetic_rows(150), TrainConfig(epochs=30, batch_size=32,
                                                                    show_progress=False))
    out = tmp_path_factory.mktemp("predictor_model")
    write_model_dir(model, TASKS, featurizer, out, task_log_sigma={"spell": 0.2, "short": 0.1})
    return out, model
