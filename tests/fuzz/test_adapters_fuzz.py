"""Hostile adapter directories through services.common.adapters.load_adapter: every one is
either served (well-formed kinds) or rejected with AdapterError; nothing else escapes, and no
pickle is ever unpickled."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from tests.fuzz import hostile_adapters as ha


def _run(tmp_path, dims, num: int, seed: int) -> Counter:
    rng, marker, outcomes = random.Random(seed), tmp_path / "MARKER", Counter()
    kinds = list(ha.KINDS) + [None] * (num - len(ha.KINDS))  # every kind at least once
    for kind in kinds[:max(num, len(ha.KINDS))]:
        kind, path = ha.make(rng, tmp_path, dims, marker, kind)
        outcome = ha.check(kind, path, dims, marker)
        if outcome.startswith("FAIL: bad adapter") and kind in ha.KNOWN_FINDINGS:
            outcome = "known finding"
        outcomes[(kind, outcome)] += 1
    return outcomes


def _failures(outcomes: Counter) -> dict:
    return {k: n for k, n in outcomes.items() if k[1].startswith(("CRASH", "FAIL"))}


def test_hostile_adapters_ci(tmp_path, dims):
    outcomes = _run(tmp_path, dims, 120, seed=0)
    assert not _failures(outcomes), _failures(outcomes)
    assert outcomes[("valid", "accepted")] >= 1


@pytest.mark.slow
def test_hostile_adapters_many(tmp_path, dims):
    outcomes = _run(tmp_path, dims, 1000, seed=1)
    assert not _failures(outcomes), _failures(outcomes)
