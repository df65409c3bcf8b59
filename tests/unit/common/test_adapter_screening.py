"""Tests for services/common/adapter_screening.py on synthetic adapters with planted defects."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from services.common.adapter_screening import (ScreeningConfig, ScreeningError, Verdict, delta_norms,
                                               main, read_adapter, screen_adapter_dir,
                                               screen_modules)

torch.set_num_threads(1)
HIDDEN, RANK, LAYERS = 64, 4, 12


def _adapter(seed=0, types=("q_proj", "v_proj")):
    gen = torch.Generator().manual_seed(seed)
    pairs = {}
    for layer in range(LAYERS):
        for t in types:
            a = torch.randn(RANK, HIDDEN, generator=gen) / math.sqrt(HIDDEN)
            b = torch.randn(HIDDEN, RANK, generator=gen) * 0.01
            pairs[f"model.layers.{layer}.self_attn.{t}"] = (a, b)
    return pairs, {m: 2.0 for m in pairs}


@pytest.mark.parametrize("out_f, in_f, r, scaling", [(8, 5, 1, 1.0), (16, 32, 4, 2.0),
                                                      (32, 16, 8, -0.5), (7, 9, 3, 0.25)])
def test_delta_norms_match_the_materialised_product(out_f, in_f, r, scaling):
    gen = torch.Generator().manual_seed(out_f * in_f + r)
    a, b = torch.randn(r, in_f, generator=gen), torch.randn(out_f, r, generator=gen)
    delta = scaling * (b.double() @ a.double())
    fro, spectral = delta_norms(a, b, scaling)
    assert fro == pytest.approx(float(torch.linalg.matrix_norm(delta)), rel=1e-9)
    assert spectral == pytest.approx(float(torch.linalg.matrix_norm(delta, ord=2)), rel=1e-6)


def test_clean_adapter_passes():
    pairs, scalings = _adapter()
    report = screen_modules(pairs, scalings)
    assert report.verdict is Verdict.PASS and report.reasons == ()
    assert len(report.modules) == 2 * LAYERS
    assert all(abs(m.z_score) < 4 for m in report.modules)


@pytest.mark.parametrize("factor, verdict", [(1.5, Verdict.PASS), (4.0, Verdict.WARN),
                                             (100.0, Verdict.QUARANTINE), (0.001, Verdict.QUARANTINE)])
def test_one_scaled_module_is_graded_by_its_z_score(factor, verdict):
    pairs, scalings = _adapter()
    target = "model.layers.5.self_attn.v_proj"
    a, b = pairs[target]
    pairs[target] = (a, b * factor)
    report = screen_modules(pairs, scalings)
    assert report.verdict is verdict
    if verdict is not Verdict.PASS:
        assert all(target in reason for reason in report.reasons)
    assert report.should_quarantine == (verdict is Verdict.QUARANTINE)


def test_nan_inf_and_bad_shapes_quarantine():
    pairs, scalings = _adapter()
    a, b = pairs["model.layers.0.self_attn.q_proj"]
    a = a.clone()
    a[0, 0] = float("nan")
    a[1, 1] = float("inf")
    pairs["model.layers.0.self_attn.q_proj"] = (a, b)
    pairs["model.layers.1.self_attn.q_proj"] = (torch.zeros(RANK, HIDDEN), torch.zeros(HIDDEN, RANK + 1))
    report = screen_modules(pairs, scalings)
    assert report.verdict is Verdict.QUARANTINE
    assert any("2 NaN/Inf" in r for r in report.reasons)
    assert any("do not form B@A" in r for r in report.reasons)


def test_absolute_and_relative_norm_limits():
    pairs, scalings = _adapter()
    norms = {m: delta_norms(a, b, scalings[m])[0] for m, (a, b) in pairs.items()}
    tight = ScreeningConfig(max_norm=min(norms.values()) / 2)
    assert screen_modules(pairs, scalings, tight).verdict is Verdict.QUARANTINE
    big_base = {m: n * 100 for m, n in norms.items()}
    assert screen_modules(pairs, scalings, base_norms=big_base).verdict is Verdict.PASS
    small_base = dict(big_base, **{"model.layers.3.self_attn.q_proj": 1e-9})
    report = screen_modules(pairs, scalings, base_norms=small_base)
    assert report.verdict is Verdict.QUARANTINE and "layers.3.self_attn.q_proj" in report.reasons[0]


def test_summary_line_for_task_state_messages():
    pairs, scalings = _adapter()
    assert screen_modules(pairs, scalings).summary() == "screening: pass"
    for layer in range(4):
        a, b = pairs[f"model.layers.{layer}.self_attn.q_proj"]
        pairs[f"model.layers.{layer}.self_attn.q_proj"] = (a * float("nan"), b)
    line = screen_modules(pairs, scalings).summary(max_reasons=2)
    assert line.startswith("screening: quarantine: model.layers.0.self_attn.q_proj: ")
    assert line.endswith("(+2 more)") and line.count("NaN/Inf") == 2


def test_untrained_adapter_warns_and_empty_adapter_quarantines():
    pairs, scalings = _adapter()
    zero_b = {m: (a, torch.zeros_like(b)) for m, (a, b) in pairs.items()}
    report = screen_modules(zero_b, scalings)
    assert report.verdict is Verdict.WARN and "never trained" in report.reasons[0]
    assert screen_modules({}, {}).verdict is Verdict.QUARANTINE


def _write_peft(path, pairs, config, suffix=".weight"):
    path.mkdir()
    tensors = {}
    for module, (a, b) in pairs.items():
        tensors[f"base_model.model.{module}.lora_A{suffix}"] = a.contiguous()
        tensors[f"base_model.model.{module}.lora_B{suffix}"] = b.contiguous()
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def test_reads_peft_directories_with_patterns_and_named_adapters(tmp_path):
    pairs, _ = _adapter()
    cfg = {"r": RANK, "lora_alpha": 8, "alpha_pattern": {"v_proj": 2}}
    pairs_r, scalings, problems = read_adapter(_write_peft(tmp_path / "a", pairs, cfg,
                                                           suffix=".default.weight"))
    assert problems == [] and set(pairs_r) == set(pairs)
    assert scalings["model.layers.0.self_attn.q_proj"] == 2.0
    assert scalings["model.layers.0.self_attn.v_proj"] == 0.5
    _, scalings, _ = read_adapter(_write_peft(tmp_path / "b", pairs, {"r": 4, "lora_alpha": 8,
                                                                      "use_rslora": True}))
    assert scalings["model.layers.0.self_attn.q_proj"] == 4.0


def test_directory_with_missing_half_is_quarantined(tmp_path):
    pairs, _ = _adapter()
    path = _write_peft(tmp_path / "a", pairs, {"r": RANK, "lora_alpha": 8})
    tensors = {k: v for k, v in load_file(str(path / "adapter_model.safetensors")).items()
               if "layers.2.self_attn.q_proj.lora_B" not in k}
    save_file(tensors, str(path / "adapter_model.safetensors"))
    report = screen_adapter_dir(path)
    assert report.verdict is Verdict.QUARANTINE
    assert "layers.2.self_attn.q_proj: has lora_A but not both" in report.reasons[0]


def test_cli_exit_codes(tmp_path, capsys):
    pairs, _ = _adapter()
    good = _write_peft(tmp_path / "good", pairs, {"r": RANK, "lora_alpha": 8})
    assert main([str(good)]) == 0
    assert json.loads(capsys.readouterr().out)["verdict"] == "pass"
    a, b = pairs["model.layers.0.self_attn.q_proj"]
    bad = _write_peft(tmp_path / "bad", dict(pairs, **{"model.layers.0.self_attn.q_proj": (a, b * 1e4)}),
                      {"r": RANK, "lora_alpha": 8})
    assert main([str(bad), "--modules"]) == 2
    out = json.loads(capsys.readouterr().out)
    assert out["verdict"] == "quarantine" and len(out["modules"]) == 2 * LAYERS
    assert main([str(tmp_path / "absent")]) == 1
    with pytest.raises(ScreeningError):
        read_adapter(tmp_path / "absent")


def test_config_validation():
    assert ScreeningConfig.from_env({"SCREENING_MAX_Z": "12"}).max_z_score == 12
    with pytest.raises(ValueError):
        ScreeningConfig.from_env({"SCREENING_MAX_NORM": "big"})
    with pytest.raises(ValueError):
        ScreeningConfig(warn_z_score=5, max_z_score=4)
    with pytest.raises(ValueError):
        ScreeningConfig(max_norm=0)
