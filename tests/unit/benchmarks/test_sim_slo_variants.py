"""benchmarks/sim_slo_variants.py: the variant names and what each one changes."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks"))
from sim_slo_variants import variant  # noqa: E402

from services.engine.policies import POLICIES  # noqa: E402
from services.engine.scheduler import SchedulerConfig  # noqa: E402


def test_variant_names() -> None:
    sched = SchedulerConfig()
    cls, cfg = variant("streak2", sched, lambda p, o: 0.1, 5.0)
    assert cls is POLICIES["inlaid"] and cfg.max_decode_streak == 2
    _, cfg = variant("inlaid_overload_min_free=0", sched, lambda p, o: 0.1, 5.0)
    assert cfg.inlaid_overload_min_free == 0.0
    cls, cfg = variant("missed-last", sched, lambda p, o: 0.1, 5.0)
    assert issubclass(cls, POLICIES["inlaid"]) and cfg == sched
    cls, cfg = variant("missed-cap=48", sched, lambda p, o: 0.1, 5.0)
    assert issubclass(cls, POLICIES["inlaid"]) and cfg == sched
    with pytest.raises(SystemExit, match="unknown variant"):
        variant("nonsense", sched, lambda p, o: 0.1, 5.0)
