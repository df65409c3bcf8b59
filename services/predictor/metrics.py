"""Quality metrics of length predictions: Kendall τ-b, length-bucket accuracy, MAE."""
from __future__ import annotations

import numpy as np

# Upper bounds (exclusive) of the length buckets; the last bucket is open-ended.
BUCKET_EDGES = (16, 64, 128, 256)
BUCKET_NAMES = ("<16", "16-64", "64-128", "128-256", ">=256")


def kendall_tau_b(x, y, chunk: int = 1024) -> float:
    """Kendall τ-b (tie-corrected), O(n²) in chunks of rows; n up to ~10⁴ is fine."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError("x and y must be 1-D and of equal length")
    n = len(x)
    concordant_minus_discordant = 0.0
    pairs_x = pairs_y = 0.0  # pairs not tied in x (resp. y)
    for start in range(0, n, chunk):
        sx = np.sign(x[start:start + chunk, None] - x[None, :])  # [C, n]
        sy = np.sign(y[start:start + chunk, None] - y[None, :])
        concordant_minus_discordant += float((sx * sy).sum())
        pairs_x += float(np.abs(sx).sum())
        pairs_y += float(np.abs(sy).sum())
    denom = np.sqrt(pairs_x * pairs_y)
    return float(concordant_minus_discordant / denom) if denom > 0 else 0.0


def bucket_of(tokens) -> np.ndarray:
    return np.searchsorted(np.asarray(BUCKET_EDGES), np.asarray(tokens), side="right")


def bucket_accuracy(pred, true) -> float:
    return float(np.mean(bucket_of(pred) == bucket_of(true)))


def mae(pred, true) -> float:
    return float(np.mean(np.abs(np.asarray(pred, dtype=np.float64) - np.asarray(true))))


def summarize(pred, true) -> dict:
    """All metrics of one set of predictions against true lengths."""
    return {"n": int(len(true)), "kendall_tau": kendall_tau_b(pred, true),
            "bucket_accuracy": bucket_accuracy(pred, true), "mae_tokens": mae(pred, true)}
