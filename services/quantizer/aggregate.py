"""MLGPTQ aggregation of per-task Hessians into one, associative and commutative by construction.

Every variant keeps a *state* (what the cache stores) that is combined with elementwise
max / selection / integer addition only — operations that are exactly associative and commutative, so aggregate(cached(T1), new(T2)) is bit-identical to aggregating T1+T2 at once.
`finalize` turns a state into a Hessian GPTQ can factor; it is never cached.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AggState:
    """Pre-repair aggregate of one linear's Hessians over a set of tasks.

    matrix: [in, in] (meaning depends on the variant), key: [in] per-row selection key
    (row-max only), dead: [in] inputs dead for every task so far.
    """

    matrix: torch.Tensor
    dead: torch.Tensor
    key: torch.Tensor | None = None

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.matrix": self.matrix.cpu().contiguous(),
               f"{prefix}.dead": self.dead.to(torch.uint8).cpu().contiguous()}
        if self.key is not None:
            out[f"{prefix}.key"] = self.key.cpu().contiguous()
        return out

    def to(self, device) -> "AggState":
        key = None if self.key is None else self.key.to(device)
        return AggState(matrix=self.matrix.to(device), dead=self.dead.to(device), key=key)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str) -> "AggState":
        key = tensors.get(f"{prefix}.key")
        return cls(matrix=tensors[f"{prefix}.matrix"], dead=tensors[f"{prefix}.dead"].bool(), key=key)


def _damped(h: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """Per-task H with GPTQ's dead-input fix and damping, so it can be inverted."""
    h = h.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    h += damp_percent * torch.mean(torch.diagonal(h)) * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    return h


def _repair(matrix: torch.Tensor) -> torch.Tensor:
    """An SPD matrix close to `matrix` (elementwise max of SPD matrices need not be SPD).

    Symmetrise, then add the smallest diagonal shift of a ladder (10⁻⁸ … 10⁻¹ · mean |diag|)
    that lets Cholesky succeed — a Cholesky attempt costs ~30× less than an eigendecomposition.
    Far-from-SPD matrices instead get their eigenvalues floored at 10⁻⁶ · the largest.
    """
    sym = (matrix + matrix.T) / 2
    scale = torch.diagonal(sym).abs().mean().clamp_min(torch.finfo(sym.dtype).tiny)
    eye = torch.eye(sym.shape[0], dtype=sym.dtype, device=sym.device)
    for shift in [0.0] + [10.0 ** k for k in range(-8, 0)]:
        candidate = sym + shift * scale * eye if shift else sym
        _, info = torch.linalg.cholesky_ex(candidate)
        if int(info) == 0:
            return candidate
    evals, evecs = torch.linalg.eigh(sym)
    evals = evals.clamp_min(1e-6 * evals.max().clamp_min(torch.finfo(sym.dtype).tiny))
    return (evecs * evals) @ evecs.T


class Aggregation:
    """One aggregation variant: task_state (one task), combine (two states), finalize."""

    name = ""

    def __init__(self, damp_percent: float = 0.01):
        self.damp_percent = damp_percent

    def task_state(self, hessian: torch.Tensor) -> AggState:
        raise NotImplementedError

    def combine(self, a: AggState, b: AggState) -> AggState:
        raise NotImplementedError

    def finalize(self, state: AggState) -> torch.Tensor:
        raise NotImplementedError

    def reduce(self, states: list[AggState]) -> AggState:
        if not states:
            raise ValueError("nothing to aggregate: no tasks")
        out = states[0]
        for s in states[1:]:
            out = self.combine(out, s)
        return out


class MaxInverse(Aggregation):
    """The seed's reading: H_tmp = elementwise max over tasks of H_t⁻¹, repaired, inverted back."""

    name = "max-inv"

    def task_state(self, hessian: torch.Tensor) -> AggState:
        dead = torch.diagonal(hessian) == 0
        inv = torch.linalg.inv(_damped(hessian, self.damp_percent))
        return AggState(matrix=inv.float(), dead=dead)

    def combine(self, a: AggState, b: AggState) -> AggState:
        return AggState(matrix=torch.maximum(a.matrix, b.matrix), dead=a.dead & b.dead)

    def finalize(self, state: AggState) -> torch.Tensor:
        h = torch.cholesky_inverse(torch.linalg.cholesky(_repair(state.matrix.double())))
        h = (h + h.T) / 2
        h[state.dead, :] = 0
        h[:, state.dead] = 0
        return h.float()


class MaxHessian(Aggregation):
    """Elementwise max of the H_t: every input pair weighted by its most demanding task."""

    name = "max-h"

    def task_state(self, hessian: torch.Tensor) -> AggState:
        return AggState(matrix=hessian.float().clone(), dead=torch.diagonal(hessian) == 0)

    def combine(self, a: AggState, b: AggState) -> AggState:
        return AggState(matrix=torch.maximum(a.matrix, b.matrix), dead=a.dead & b.dead)

    def finalize(self, state: AggState) -> torch.Tensor:
        h = _repair(state.matrix.double())
        h[state.dead, :] = 0
        h[:, state.dead] = 0
        return h.float()


class RowMax(Aggregation):
    """Per input row, the row of the task most sensitive there (largest H_t[i, i]).

    Ties take the elementwise max of the tied rows, so the result depends only on the set
    of tasks (associative, commutative). The row mix is symmetrised and repaired.
    """

    name = "row-max"

    def task_state(self, hessian: torch.Tensor) -> AggState:
        h = hessian.float().clone()
        return AggState(matrix=h, dead=torch.diagonal(h) == 0, key=torch.diagonal(h).clone())

    def combine(self, a: AggState, b: AggState) -> AggState:
        b_wins = (b.key > a.key)[:, None]
        tie = (b.key == a.key)[:, None]
        matrix = torch.where(b_wins, b.matrix, torch.where(tie, torch.maximum(a.matrix, b.matrix), a.matrix))
        return AggState(matrix=matrix, dead=a.dead & b.dead, key=torch.maximum(a.key, b.key))

    def finalize(self, state: AggState) -> torch.Tensor:
        h = _repair(state.matrix.double())
        h[state.dead, :] = 0
        h[:, state.dead] = 0
        return h.float()


class MeanHessian(Aggregation):
    """Mean of the H_t (each task weighted equally, whatever its calibration size).

    Float sums are not associative, so the state is an exact fixed-point sum: each H_t is
    rounded once to int64 multiples of 2⁻³² (resolution 2.3e-10) and integer addition is
    exactly associative and commutative. `key` holds the number of tasks.
    """

    name = "mean"
    FRAC_BITS = 32
    MAX_ABS = 2.0 ** 62

    def task_state(self, hessian: torch.Tensor) -> AggState:
        fixed = torch.round(hessian.double() * 2.0 ** self.FRAC_BITS)
        if fixed.abs().max() >= self.MAX_ABS / 1024:
            raise ValueError("Hessian entries too large for the fixed-point mean aggregate")
        return AggState(matrix=fixed.to(torch.int64), dead=torch.diagonal(hessian) == 0,
                        key=torch.ones(1, dtype=torch.int64, device=hessian.device))

    def combine(self, a: AggState, b: AggState) -> AggState:
        return AggState(matrix=a.matrix + b.matrix, dead=a.dead & b.dead, key=a.key + b.key)

    def finalize(self, state: AggState) -> torch.Tensor:
        h = state.matrix.double() / 2.0 ** self.FRAC_BITS / state.key.double()
        h[state.dead, :] = 0
        h[:, state.dead] = 0
        return h.float()


def make_aggregation(name: str, damp_percent: float = 0.01) -> Aggregation:
    """The aggregation variant called `name` (see config.AGGREGATIONS)."""
    for cls in (MaxInverse, MaxHessian, RowMax, MeanHessian):
        if cls.name == name:
            return cls(damp_percent)
    raise ValueError(f"unknown aggregation {name!r}")
