"""GemmTuner's on-disk cache (TunerCache): round trip, identity, damaged files (no GPU needed)."""
from __future__ import annotations

import json
import sys
import types

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
    monkeypatch.setattr(gemm_tuner, "candidate_configs", lambda m, frag=0: real(m, frag)[:-1])
    assert candidates_digest() != base


def test_skipped_kinds_are_never_picked_and_key_the_cache(monkeypatch):
    """GemmTuner(skip_kinds=STREAM_KINDS) (EngineConfig.gemm_stream_k off) drops those kinds from the
    list it times (on CPU it returns the list's first, so a list led by one shows the filter), keeps
    the list whole if nothing else is left, and tunes under its own cache identity."""
    import torch

    from services.engine.kernels.gemm_configs import STREAM_KINDS
    from services.engine.kernels.gemm_tuner import GemmTuner, tuner_identity

    lead = GemmConfig("mma8_sk", 16, 64, 2, 4, 3, fast_deq=True, zsub=True)
    real = gemm_tuner.candidate_configs
    monkeypatch.setattr(gemm_tuner, "candidate_configs", lambda m, frag=0: [lead] + real(m, frag))
    x = torch.zeros(1, 256, dtype=torch.float16)
    key = (1, 320, 256, 4)
    assert GemmTuner()._tune(key, x, None) == lead
    assert GemmTuner(skip_kinds=STREAM_KINDS)._tune(key, x, None).kind not in STREAM_KINDS
    monkeypatch.setattr(gemm_tuner, "candidate_configs", lambda m, frag=0: [lead])
    assert GemmTuner(skip_kinds=STREAM_KINDS)._tune(key, x, None) == lead     # nothing else to pick
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "H100")
    monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace(__version__="3.6.0"))   # CI has none
    assert "without mma8_sk" in tuner_identity(None, STREAM_KINDS)
    assert "without" not in tuner_identity(None)


def test_tma_kinds_are_skipped_unless_asked(monkeypatch):
    """The fragment layout's candidates include the TMA kinds; a tuner skipping them (the engine's unless
    EngineConfig.gemm_tma) never picks one (on CPU it returns the list's first, so a list led by one shows the
    filter); W4Decoder.use_gemm_tma switches them and drops only the fragment-layout picks (tiled keys have
    four fields)."""
    import torch

    from services.engine.kernels.gemm_configs import TMA_KINDS
    from services.engine.kernels.gemm_tuner import GemmTuner
    from services.engine.kernels.w4_decoder import W4Decoder

    cands = gemm_tuner.candidate_configs(4, 4)
    assert {c.kind for c in cands} >= set(TMA_KINDS)
    lead = next(c for c in cands if c.kind in TMA_KINDS)
    monkeypatch.setattr(gemm_tuner, "candidate_configs", lambda m, frag=0: [lead] + cands)
    x = torch.zeros(4, 256, dtype=torch.float16)
    frag_key = (4, 320, 256, 4, 4, 1)
    assert GemmTuner()._tune(frag_key, x, None) == lead
    assert GemmTuner(skip_kinds=TMA_KINDS)._tune(frag_key, x, None).kind not in TMA_KINDS
    decoder = types.SimpleNamespace(tuner=GemmTuner(skip_kinds=TMA_KINDS))
    decoder.tuner.best = {KEY: CFG, frag_key: cands[0]}
    W4Decoder.use_gemm_tma(decoder, True)
    assert decoder.tuner.skip_kinds == () and decoder.tuner.best == {KEY: CFG}
    decoder.tuner.best[frag_key] = cands[0]
    W4Decoder.use_gemm_tma(decoder, True)             # no change: picks kept
    assert frag_key in decoder.tuner.best
    W4Decoder.use_gemm_tma(decoder, False)
    assert decoder.tuner.skip_kinds == TMA_KINDS and decoder.tuner.best == {KEY: CFG}
