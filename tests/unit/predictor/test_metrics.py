"""Kendall τ-b against a brute-force count; buckets at their edges; MAE."""
import itertools
import math
from collections import Counter

import numpy as np
import pytest

from services.predictor.metrics import bucket_accuracy, bucket_of, kendall_tau_b, mae


def _tau_b_brute(x, y):
    nc = nd = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        s = np.sign(x[i] - x[j]) * np.sign(y[i] - y[j])
        nc += s > 0
        nd += s < 0
    n0 = len(x) * (len(x) - 1) / 2
    n1 = sum(c * (c - 1) / 2 for c in Counter(x).values())
    n2 = sum(c * (c - 1) / 2 for c in Counter(y).values())
    return (nc - nd) / math.sqrt((n0 - n1) * (n0 - n2))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tau_b_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 6, 60)
    y = x + rng.integers(-2, 3, 60)
    assert kendall_tau_b(x, y, chunk=7) == pytest.approx(_tau_b_brute(list(x), list(y)))


def test_tau_extremes():
    assert kendall_tau_b([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert kendall_tau_b([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert kendall_tau_b([5, 5, 5], [1, 2, 3]) == 0.0  # constant predictions carry no order


def test_buckets_and_mae():
    assert list(bucket_of([0, 15, 16, 63, 64, 127, 128, 255, 256, 10_000])) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert bucket_accuracy([10, 20, 300], [12, 100, 400]) == pytest.approx(2 / 3)
    assert mae([1, 5], [2, 2]) == 2.0
