"""Screen a PEFT LoRA adapter before it joins quantization: per-module ‖B@A‖, NaN/Inf, outliers.

Calibration data flows through every task's adapter (MLGPTQ), so one broken or adversarial
adapter (exploding delta, NaN) would distort the shared quantized base for all tasks. The
screen computes each module's scaled delta ΔW = s·B@A without materialising it (r×r Gram
matrices) and flags absolute, relative-to-base and statistical outliers.

    python -m services.common.adapter_screening ADAPTER_DIR [--base-model smollm2-135m]
"""
from __future__ import annotations

import argparse
import enum
import json
import math
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight, optionally with the adapter
# name before ".weight" (lora_A.default.weight).
_KEY_RE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<half>[AB])(?:\.[\w-]+)?\.weight$")
# Median absolute deviation → standard deviation for normal data.
_MAD_TO_SIGMA = 1.4826


class Verdict(str, enum.Enum):
    PASS = "pass"
    WARN = "warn"
    QUARANTINE = "quarantine"


class ScreeningError(ValueError):
    """The adapter directory cannot be read at all (missing files, unreadable config)."""


@dataclass(frozen=True)
class ScreeningConfig:
    """Thresholds. Norms are Frobenius norms of the scaled delta s·B@A."""

    max_norm: float = 100.0           # absolute guard: larger than a whole base weight matrix
    max_relative_norm: float = 1.0    # ‖ΔW‖/‖W‖, only when base norms are known
    warn_z_score: float = 4.0         # robust z-score of log10 norm among modules of one type
    max_z_score: float = 8.0
    min_modules_for_z: int = 6        # fewer modules of a type → z-scores pooled over all types
    # Floor on the spread of log10 norms: nearly identical norms (a briefly trained adapter)
    # would otherwise turn a harmless 2x difference into a huge z. With 0.1, quarantine needs
    # a module ≥ 10^(0.1·max_z) ≈ 6.3x away from its type's median.
    min_log10_sigma: float = 0.1

    def __post_init__(self) -> None:
        if min(self.max_norm, self.max_relative_norm, self.warn_z_score, self.min_log10_sigma) <= 0:
            raise ValueError("screening thresholds must be > 0")
        if self.max_z_score < self.warn_z_score:
            raise ValueError("max_z_score must be >= warn_z_score")
        if self.min_modules_for_z < 3:
            raise ValueError("min_modules_for_z must be >= 3")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "ScreeningConfig":
        """SCREENING_MAX_NORM, SCREENING_MAX_RELATIVE_NORM, SCREENING_WARN_Z, SCREENING_MAX_Z."""
        env = os.environ if env is None else env
        names = {"max_norm": "SCREENING_MAX_NORM", "max_relative_norm": "SCREENING_MAX_RELATIVE_NORM",
                 "warn_z_score": "SCREENING_WARN_Z", "max_z_score": "SCREENING_MAX_Z"}
        values = {}
        for attr, var in names.items():
            if env.get(var):
                try:
                    values[attr] = float(env[var])
                except ValueError:
                    raise ValueError(f"{var} must be a number, got {env[var]!r}") from None
        return cls(**values)


@dataclass(frozen=True)
class ModuleStats:
    """One adapted linear: its scaled delta's norms (None when A/B are not finite or malformed)."""

    module: str
    rank: int
    scaling: float
    norm: float | None
    spectral_norm: float | None
    max_abs_weight: float | None
    relative_norm: float | None = None
    z_score: float | None = None


@dataclass(frozen=True)
class ScreeningReport:
    """Verdict, reasons (one line each) and per-module statistics."""

    verdict: Verdict
    reasons: tuple[str, ...]
    modules: tuple[ModuleStats, ...] = field(repr=False)

    @property
    def should_quarantine(self) -> bool:
        return self.verdict is Verdict.QUARANTINE

    def summary(self, max_reasons: int = 3) -> str:
        """One line for TaskInfo.message: the verdict and the first reasons."""
        if not self.reasons:
            return f"screening: {self.verdict.value}"
        shown = "; ".join(self.reasons[:max_reasons])
        more = len(self.reasons) - max_reasons
        return f"screening: {self.verdict.value}: {shown}" + (f" (+{more} more)" if more > 0 else "")

    def to_dict(self) -> dict:
        norms = [m.norm for m in self.modules if m.norm is not None]
        zs = [abs(m.z_score) for m in self.modules if m.z_score is not None]
        return {"verdict": self.verdict.value, "reasons": list(self.reasons),
                "num_modules": len(self.modules),
                "max_norm": max(norms, default=None),
                "median_norm": float(torch.tensor(norms).median()) if norms else None,
                "max_abs_z_score": max(zs, default=None),
                "modules": [asdict(m) for m in self.modules]}


def delta_norms(a: torch.Tensor, b: torch.Tensor, scaling: float) -> tuple[float, float]:
    """(Frobenius, spectral) norm of scaling·B@A from r×r Gram matrices: O(r²(in+out)), no [out, in]."""
    a64, b64 = a.double(), b.double()  # [r, in], [out, r]
    gram_a = a64 @ a64.T  # [r, r]
    gram_b = b64.T @ b64  # [r, r]
    fro = math.sqrt(max(float((gram_a * gram_b).sum()), 0.0))
    # σ_max(BA)² = λ_max(G_a^½ G_b G_a^½): symmetric, so eigvalsh is stable.
    evals, evecs = torch.linalg.eigh(gram_a)
    half = evecs * evals.clamp(min=0).sqrt()  # [r, r] = U diag(√λ)
    spectral = math.sqrt(max(float(torch.linalg.eigvalsh(half.T @ gram_b @ half).max()), 0.0))
    return abs(scaling) * fro, abs(scaling) * spectral


def _module_type(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def _robust_z(values: list[float], min_sigma: float) -> list[float]:
    """Robust z-scores: (x - median) / max(MAD·1.4826, min_sigma); one outlier cannot hide itself."""
    t = torch.tensor(values, dtype=torch.float64)
    med = t.median()
    sigma = max(float((t - med).abs().median()) * _MAD_TO_SIGMA, min_sigma)
    return ((t - med) / sigma).tolist()


def screen_modules(pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                   scalings: Mapping[str, float], config: ScreeningConfig = ScreeningConfig(),
                   base_norms: Mapping[str, float] | None = None) -> ScreeningReport:
    """Screen module → (A [r, in], B [out, r]) pairs; `scalings[module]` is PEFT's alpha/r."""
    reasons: list[tuple[Verdict, str]] = []
    stats: dict[str, ModuleStats] = {}
    if not pairs:
        reasons.append((Verdict.QUARANTINE, "adapter holds no LoRA modules"))
    for module, (a, b) in sorted(pairs.items()):
        rank, scaling = int(a.shape[0]) if a.dim() == 2 else 0, float(scalings.get(module, 1.0))
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            reasons.append((Verdict.QUARANTINE, f"{module}: shapes A{tuple(a.shape)} B{tuple(b.shape)} "
                                                "do not form B@A"))
            stats[module] = ModuleStats(module, rank, scaling, None, None, None)
            continue
        bad = int((~torch.isfinite(a)).sum() + (~torch.isfinite(b)).sum())
        if bad:
            reasons.append((Verdict.QUARANTINE, f"{module}: {bad} NaN/Inf weights"))
            stats[module] = ModuleStats(module, rank, scaling, None, None, None)
            continue
        norm, spectral = delta_norms(a, b, scaling)
        max_abs = max(float(a.abs().max()), float(b.abs().max()))
        rel = None
        if base_norms is not None and base_norms.get(module):
            rel = norm / base_norms[module]
        stats[module] = ModuleStats(module, rank, scaling, norm, spectral, max_abs, rel)
        if norm > config.max_norm:
            reasons.append((Verdict.QUARANTINE, f"{module}: ‖ΔW‖={norm:.3g} exceeds max_norm "
                                                f"{config.max_norm:g}"))
        if rel is not None and rel > config.max_relative_norm:
            reasons.append((Verdict.QUARANTINE, f"{module}: ‖ΔW‖/‖W‖={rel:.3g} exceeds "
                                                f"max_relative_norm {config.max_relative_norm:g}"))
    finite = {m: s for m, s in stats.items() if s.norm is not None}
    if finite and all(s.norm == 0 for s in finite.values()):
        reasons.append((Verdict.WARN, "every delta is zero (B == 0): the adapter was never trained"))
    else:
        _add_z_scores(finite, stats, config, reasons)
    verdict = max((v for v, _ in reasons), key=_severity, default=Verdict.PASS)
    return ScreeningReport(verdict, tuple(r for _, r in reasons), tuple(stats.values()))


def _severity(verdict: Verdict) -> int:
    return [Verdict.PASS, Verdict.WARN, Verdict.QUARANTINE].index(verdict)


def _add_z_scores(finite: dict[str, ModuleStats], stats: dict[str, ModuleStats],
                  config: ScreeningConfig, reasons: list[tuple[Verdict, str]]) -> None:
    """z-scores of log10‖ΔW‖ within each module type (q_proj, down_proj, ...); types differ in scale."""
    positive = {m: s for m, s in finite.items() if s.norm > 0}
    groups: dict[str, list[str]] = {}
    for module in positive:
        groups.setdefault(_module_type(module), []).append(module)
    small = [m for g in groups.values() if len(g) < config.min_modules_for_z for m in g]
    groups = {k: g for k, g in groups.items() if len(g) >= config.min_modules_for_z}
    if len(small) >= config.min_modules_for_z:
        groups["*pooled*"] = small
    for members in groups.values():
        zs = _robust_z([math.log10(positive[m].norm) for m in members], config.min_log10_sigma)
        for module, z in zip(members, zs, strict=True):
            stats[module] = ModuleStats(**{**asdict(stats[module]), "z_score": z})
            if abs(z) > config.max_z_score:
                reasons.append((Verdict.QUARANTINE, f"{module}: norm z-score {z:+.1f} beyond "
                                                    f"±{config.max_z_score:g}"))
            elif abs(z) > config.warn_z_score:
                reasons.append((Verdict.WARN, f"{module}: norm z-score {z:+.1f} beyond "
                                              f"±{config.warn_z_score:g}"))


def _pattern_value(patterns: Mapping[str, object], module: str, default: object) -> object:
    """PEFT rank_pattern / alpha_pattern: a key matches a suffix of the module path."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter(path: str | Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]],
                                            dict[str, float], list[str]]:
    """(module → (A, B), module → scaling, problems) straight from a PEFT directory, NaNs kept."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        cfg = json.loads((path / CONFIG_FILE).read_text())
        tensors = load_file(str(path / WEIGHTS_FILE), device="cpu")
    except (OSError, json.JSONDecodeError, SafetensorError) as exc:
        raise ScreeningError(f"adapter {path}: cannot read {CONFIG_FILE}/{WEIGHTS_FILE}: {exc}") from exc
    if not isinstance(cfg, dict):
        raise ScreeningError(f"adapter {path}: {CONFIG_FILE} is not a JSON object")
    halves: dict[str, dict[str, torch.Tensor]] = {}
    problems = []
    for key, tensor in tensors.items():
        match = _KEY_RE.match(key)
        if match is None:
            problems.append(f"unexpected tensor {key!r} (not a lora_A/lora_B weight)")
            continue
        halves.setdefault(match["module"], {})[match["half"]] = tensor
    r_default = int(cfg.get("r", 8))
    alpha_default = float(cfg.get("lora_alpha", r_default))
    pairs, scalings = {}, {}
    for module, pair in halves.items():
        if set(pair) != {"A", "B"}:
            problems.append(f"{module}: has lora_{''.join(sorted(pair))} but not both A and B")
            continue
        pairs[module] = (pair["A"], pair["B"])
        r = int(_pattern_value(cfg.get("rank_pattern") or {}, module, r_default))
        alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, module, alpha_default))
        scalings[module] = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / max(r, 1)
    return pairs, scalings, problems


def base_weight_norms(model_dir: str | Path, modules: list[str]) -> dict[str, float]:
    """Frobenius norms of the base linears the adapter touches (reads only those tensors)."""
    from safetensors import safe_open

    norms: dict[str, float] = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            names = set(f.keys())
            for module in modules:
                if f"{module}.weight" in names:
                    norms[module] = float(f.get_tensor(f"{module}.weight").double().norm())
    return norms


def screen_adapter_dir(path: str | Path, config: ScreeningConfig = ScreeningConfig(),
                       base_model_dir: str | Path | None = None) -> ScreeningReport:
    """Screen a PEFT adapter directory; with base_model_dir, also check ‖ΔW‖/‖W‖."""
    pairs, scalings, problems = read_adapter(path)
    base = base_weight_norms(base_model_dir, list(pairs)) if base_model_dir is not None else None
    report = screen_modules(pairs, scalings, config, base)
    if not problems:
        return report
    return ScreeningReport(Verdict.QUARANTINE, tuple(problems) + report.reasons, report.modules)


def main(argv: list[str] | None = None) -> int:
    """Exit 0 for pass/warn, 2 for quarantine, 1 when the adapter cannot be read."""
    parser = argparse.ArgumentParser(prog="python -m services.common.adapter_screening",
                                     description="Screen a PEFT LoRA adapter before quantization.")
    parser.add_argument("adapter_dir")
    parser.add_argument("--base-model", help="model name or HF dir, for ‖ΔW‖/‖W‖ checks")
    parser.add_argument("--modules", action="store_true", help="include per-module statistics")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    base_dir = None
    if args.base_model:
        from services.common.model_source import resolve_model
        base_dir = resolve_model(args.base_model).path
    try:
        report = screen_adapter_dir(args.adapter_dir, ScreeningConfig.from_env(), base_dir)
    except ScreeningError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    out = report.to_dict()
    if not args.modules:
        out.pop("modules")
    print(json.dumps(out, indent=2))
    return 2 if report.should_quarantine else 0


if __name__ == "__main__":
    sys.exit(main())
