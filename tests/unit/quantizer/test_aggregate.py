"""MLGPTQ aggregations: exact associativity/commutativity, and a factorable result."""
from __future__ import annotations

import itertools

import pytest
import torch

from services.quantizer.aggregate import make_aggregation
from services.quantizer.config import AGGREGATIONS
from services.quantizer.gptq import prepare_hessian


def _hessians(n: int = 4, dim: int = 24):
    out = []
    for seed in range(n):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(200, dim, generator=g) * (torch.rand(dim, generator=g) * 2 + 0.1)
        h = 2.0 / 200 * x.T @ x
        if seed == 1:
            h[3, :] = 0
            h[:, 3] = 0  # input 3 dead for this task only
        out.append(h)
    return out


@pytest.mark.parametrize("name", AGGREGATIONS)
def test_associative_and_commutative_exactly(name):
    agg = make_aggregation(name)
    states = [agg.task_state(h) for h in _hessians()]
    reference = agg.reduce(states)
    for order in itertools.permutations(range(4)):
        s = agg.reduce([states[i] for i in order])
        assert torch.equal(s.matrix, reference.matrix)
        assert torch.equal(s.dead, reference.dead)
    # Incremental shape: combine(cached(T1), reduce(T2)) == reduce(T1 + T2).
    split = agg.combine(agg.reduce(states[:2]), agg.reduce(states[2:]))
    assert torch.equal(split.matrix, reference.matrix)
    assert torch.equal(agg.finalize(split), agg.finalize(reference))


@pytest.mark.parametrize("name", AGGREGATIONS)
def test_finalized_aggregate_factors(name):
    agg = make_aggregation(name)
    h = agg.finalize(agg.reduce([agg.task_state(x) for x in _hessians()]))
    assert torch.allclose(h, h.T)
    u, dead = prepare_hessian(h, 0.01)
    assert torch.isfinite(u).all()
    assert not dead[3]  # alive for three of four tasks


def test_dead_only_when_dead_for_every_task():
    h = _hessians(2)
    for x in h:
        x[7, :] = 0
        x[:, 7] = 0
    for name in AGGREGATIONS:
        agg = make_aggregation(name)
        state = agg.reduce([agg.task_state(x) for x in h])
        assert state.dead.nonzero().flatten().tolist() == [7]
        assert agg.finalize(state)[7, 7] == 0


def test_single_task_max_variants_keep_hessian():
    h = _hessians(1)[0]
    out = make_aggregation("max-h").finalize(make_aggregation("max-h").task_state(h))
    assert torch.allclose(out, h, rtol=1e-4, atol=1e-5)
    inv = make_aggregation("max-inv")
    out = inv.finalize(inv.task_state(h))
    damped = h.double() + 0.01 * torch.mean(torch.diagonal(h.double())) * torch.eye(24, dtype=torch.float64)
    assert torch.allclose(out.double(), damped, rtol=1e-3, atol=1e-4)


def test_empty_reduce_rejected():
    with pytest.raises(ValueError):
        make_aggregation("max-h").reduce([])


def test_mean_is_the_float_mean_to_fixed_point_resolution():
    hs = _hessians(3)
    agg = make_aggregation("mean")
    out = agg.finalize(agg.reduce([agg.task_state(h) for h in hs]))
    expect = sum(h.double() for h in hs) / 3
    assert torch.allclose(out.double(), expect, atol=1e-6)
