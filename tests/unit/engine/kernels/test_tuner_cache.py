"""GemmTuner's on-disk cache (TunerCache): round trip, identity, damaged files (no GPU needed)."""
from __future__ import annotations

import json

from services.engine.kernels import gemm_tuner
from services.engine.kernels.gemm_tuner import TunerCache, candidates_digest
from services.engine.kernels.gemm_configs import GemmConfig

KEY = (1, 11008, 4096, 4)
CFG = GemmConfig("gemv_h2", 1, 32, 8, 2, 1, 1)


def test_round_trip_across_instances(tmp_path):
    path = tmp_path / "sub" / "gemm_tuner.json"
    TunerCache(path, "H100 | triton 3.6.0 | candidates abc").put(KEY, CFG)
    again = TunerCache(path, "H100 | triton 3.6.0 | candidates abc")
    assert again.get(KEY) == CFG
    assert again.get((4, 11008, 4096, 4)) is None
    assert not list(path.parent.glob("*.tmp*"))            # written through a rename


def test_another_identity_retunes(tmp_path):
    path = tmp_path / "gemm_tuner.json"
    TunerCache(path, "H100 | triton 3.6.0 | candidates abc").put(KEY, CFG)
    assert TunerCache(path, "H200 | triton 3.6.0 | candidates abc").get(KEY) is None
    assert TunerCache(path, "H100 | triton 3.6.0 | candidates xyz").get(KEY) is None


def test_damaged_or_foreign_files_are_ignored(tmp_path, caplog):
    path = tmp_path / "gemm_tuner.json"
    path.write_text("{not json")
    assert TunerCache(path, "id").get(KEY) is None
    assert "ignored" in caplog.text
    path.write_text(json.dumps({"identity": "id", "best": {"1,11008,4096,4": {"kind": "gemv_row", "bogus": 1}}}))
    assert TunerCache(path, "id").get(KEY) is None        # fields of another GemmConfig version
    cache = TunerCache(path, "id")
    cache.put(KEY, CFG)                                    # and a good entry replaces the file
    assert TunerCache(path, "id").get(KEY) == CFG


def test_unwritable_directory_only_costs_a_retune(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cache = TunerCache(blocker / "gemm_tuner.json", "id")   # parent is a file: cannot be created
    cache.put(KEY, CFG)
    assert cache.get(KEY) == CFG                           # still remembered in memory
    assert "not written" in caplog.text


def test_digest_follows_the_candidate_lists(monkeypatch):
    base = candidates_digest()
    assert base == candidates_digest()
    real = gemm_tuner.candidate_configs
    monkeypatch.setattr(gemm_tuner, "candidate_configs", lambda m: real(m)[:-1])
    assert candidates_digest() != base
