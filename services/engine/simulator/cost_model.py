"""Step-time cost model of the engine: linear in the batch's work, fitted by least squares."""
from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

FEATURES = ("num_prefill_tokens", "num_decode_seqs", "num_adapters", "num_kv_tokens_read")


@dataclass(frozen=True)
class StepFeatures:
    """What one engine step computes; the inputs of the cost model."""

    num_prefill_tokens: int     # prompt (or recompute) tokens computed this step
    num_decode_seqs: int        # sequences computing one decode token
    num_adapters: int           # distinct adapters in the batch (base model not counted)
    num_kv_tokens_read: int     # KV entries attention reads (context lengths summed)


@dataclass(frozen=True)
class CostModel:
    """t_step = a + b·prefill_tokens + c·decode_seqs + d·adapters + e·kv_tokens_read
    + g·[step has a prefill] (seconds).

    The g term is the fixed price of a step that cannot replay a CUDA graph (any
    prefill makes the step eager): on the H100 a decode step of 64 took 13 ms
    and the same step with one extra 40-token prefill ~50 ms (serve_gpu.md).
    `source` says where the coefficients come from — "assumed: ..." for the
    defaults, or the measurement file and fit residual for a fit — and is
    printed with every simulated result.
    """

    a_s: float
    b_s_per_prefill_token: float
    c_s_per_decode_seq: float
    d_s_per_adapter: float
    e_s_per_kv_token: float
    source: str
    g_s_per_prefill_step: float = 0.0

    def __post_init__(self) -> None:
        coefs = (self.a_s, self.b_s_per_prefill_token, self.c_s_per_decode_seq,
                 self.d_s_per_adapter, self.e_s_per_kv_token, self.g_s_per_prefill_step)
        if any(c < 0 for c in coefs) or self.a_s + self.b_s_per_prefill_token + self.c_s_per_decode_seq <= 0:
            raise ValueError(f"cost model coefficients must be >= 0 and not all zero, got {coefs}")

    @classmethod
    def assumed_7b_4bit(cls) -> CostModel:
        """Round numbers for a 4-bit 7B base on one H100 — assumed, not measured here.

        a: 4-bit weights (~3.9 GB) read once per step at ~3 TB/s ≈ 1.3 ms plus
        launch/sampling overhead; b: 2·7e9 FLOP per prompt token at ~200
        TFLOP/s effective; c: per-sequence LoRA gather, sampling, bookkeeping;
        d: per distinct adapter, loading its weights and one more segment of
        the multi-LoRA kernel; e: 0.5 MB of fp16 KV per token (32 layers ×
        2 × 4096 × 2 B) at ~3 TB/s.
        """
        return cls(a_s=4e-3, b_s_per_prefill_token=7e-5, c_s_per_decode_seq=5e-5,
                   d_s_per_adapter=4e-4, e_s_per_kv_token=1.7e-7,
                   source="assumed (round numbers for a 4-bit 7B model on one H100; not fitted)")

    def step_time_s(self, f: StepFeatures) -> float:
        return (self.a_s + self.b_s_per_prefill_token * f.num_prefill_tokens
                + self.c_s_per_decode_seq * f.num_decode_seqs
                + self.d_s_per_adapter * f.num_adapters
                + self.e_s_per_kv_token * f.num_kv_tokens_read
                + (self.g_s_per_prefill_step if f.num_prefill_tokens > 0 else 0.0))

    def to_dict(self) -> dict:
        return asdict(self)

    # ---- fitting ---------------------------------------------------------------
    @classmethod
    def fit(cls, rows: list[dict], source: str) -> CostModel:
        """Weighted least-squares fit to measured steps: dicts with the FEATURES keys and `step_s`.

        Residuals are weighted by 1/sqrt(step time): unweighted, the few long
        prefill steps dominate and the many short decode steps were predicted
        4x too slow (measured on the H100, serve_gpu.md); fully relative
        weights (1/t) underestimate total time. Negative coefficients (a
        feature with no measurable cost, or collinear features) are clamped
        to zero and the rest refitted, so the model never predicts a cheaper
        step for more work.
        """
        if len(rows) < len(FEATURES) + 2:
            raise ValueError(f"need at least {len(FEATURES) + 2} measured steps to fit, got {len(rows)}")
        try:
            x = np.array([[1.0] + [float(r[k]) for k in FEATURES] + [float(float(r["num_prefill_tokens"]) > 0)]
                          for r in rows])
            y = np.array([float(r["step_s"]) for r in rows])
        except KeyError as e:
            raise ValueError(f"measured step is missing field {e}; need {FEATURES} and step_s") from None
        w = 1.0 / np.sqrt(np.maximum(y, 1e-9))
        xw, yw = x * w[:, None], y * w
        active = list(range(x.shape[1]))
        if x[:, -1].min() == x[:, -1].max():   # all steps prefill (or none): g is the intercept's twin
            active.pop()
        coef = np.zeros(x.shape[1])
        while active:
            sol, *_ = np.linalg.lstsq(xw[:, active], yw, rcond=None)
            if (sol >= 0).all():
                coef[:] = 0.0
                coef[active] = sol
                break
            active.pop(int(np.argmin(sol)))
        rel_err = float(np.median(np.abs(x @ coef - y) / np.maximum(y, 1e-12)))
        *linear, g = (float(c) for c in coef)
        return cls(*linear, source=f"fitted to {len(rows)} measured steps from {source} "
                                   f"(median relative error {rel_err:.1%})", g_s_per_prefill_step=g)

    @classmethod
    def fit_file(cls, path: str | Path) -> CostModel:
        """Fit to a CSV (header row) or JSON (list of objects, or {"steps": [...]}) of measured steps."""
        path = Path(path)
        if path.suffix == ".csv":
            with path.open() as f:
                rows = list(csv.DictReader(f))
        else:
            data = json.loads(path.read_text())
            rows = data["steps"] if isinstance(data, dict) else data
        return cls.fit(rows, source=str(path))

    @classmethod
    def from_dict(cls, data: dict) -> CostModel:
        return cls(**data)
