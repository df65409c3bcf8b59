"""Influence ("canary") screen: how much a task's adapter inflates the inputs of every base linear."""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from services.common.adapter_screening import Verdict
from services.common.adapters import LoraAdapter
from services.common.env_config import env_values
from services.quantizer.calibration import TaskSpec, calibration_tokens, format_example, read_adapter
from services.quantizer.hessian import INPUT_GROUPS
from services.quantizer.pipeline import Stream, capture_inputs, run_layer

GROUPS = tuple(INPUT_GROUPS)
# Generic text no task owns: an adapter that behaves on its own data but blows up the base
# on ordinary prompts shows here. Fixed, so a verdict never depends on the run.
CANARY_PROMPTS = (
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Write one sentence about the weather.", "It is sunny and mild today."),
    ("List three colors.", "Red, green and blue."),
    ("Explain in simple words what a computer does.", "It follows instructions to process data."),
    ("Translate 'good morning' into Spanish.", "Buenos días."),
    ("Add 17 and 25.", "42"),
)


@dataclass(frozen=True)
class InfluenceConfig:
    """When a task's adapter is quarantined before it joins quantization.

    A ratio is tr(H_adapter)/tr(H_bare) of one input group of one decoder layer: the mean
    squared input norm with the task's adapter over the same tokens without it. Under the
    `mean` aggregation a task's weight in the shared Hessian grows with it.
    """

    is_enabled: bool = True
    # SmolLM2-135M (benchmarks/results/influence.md): the seven demo adapters reach 1.59–2.26;
    # crafted poisons reach 3.6 / 10.7 / 43 and cost the other tasks +3.7 / +8.7 / +22.5 % GPTQ
    # loss on the worst layer group (end-task metrics at N=64 did not resolve a difference,
    # poison_quality.md). Quarantine sits 3.5× above the largest demo ratio.
    warn_ratio: float = 3.0
    max_ratio: float = 8.0        # quarantine above this
    num_seqs: int = 4             # first calibration sequences screened per task
    has_canaries: bool = True     # also screen the fixed generic CANARY_PROMPTS

    def __post_init__(self) -> None:
        if not (math.isfinite(self.warn_ratio) and self.warn_ratio > 1.0):
            raise ValueError(f"warn_ratio must be a finite number > 1, got {self.warn_ratio}")
        if not (math.isfinite(self.max_ratio) and self.max_ratio >= self.warn_ratio):
            raise ValueError(f"max_ratio ({self.max_ratio}) must be finite and >= warn_ratio "
                             f"({self.warn_ratio})")
        if self.num_seqs <= 0:
            raise ValueError(f"num_seqs must be > 0, got {self.num_seqs}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "InfluenceConfig":
        """QUANTIZER_INFLUENCE_IS_ENABLED, _WARN_RATIO, _MAX_RATIO, _NUM_SEQS, _HAS_CANARIES."""
        return cls(**env_values(cls, "QUANTIZER_INFLUENCE", env))


@dataclass(frozen=True)
class InfluenceReport:
    """One task's screen: the largest ratio and where, the verdict and why."""

    task: str
    verdict: Verdict
    max_ratio: float
    where: str                    # "layer 7 self_attn.o_proj (calibration)"
    reason: str
    num_nonfinite: int            # non-finite hidden states and logits with the adapter
    ratios: dict[str, list[list[float]]] = field(repr=False)  # source → [layer][group]

    @property
    def should_quarantine(self) -> bool:
        return self.verdict is Verdict.QUARANTINE

    def summary(self) -> str:
        """One line for TaskInfo.message and the job's message."""
        return f"influence screen: {self.verdict.value}: {self.reason}"

    def to_dict(self) -> dict:
        return {"task": self.task, "verdict": self.verdict.value, "max_ratio": self.max_ratio,
                "where": self.where, "reason": self.reason, "num_nonfinite": self.num_nonfinite,
                "groups": list(GROUPS), "ratios": self.ratios}


def canary_tokens(tokenizer, seq_len: int) -> torch.Tensor:
    """[N, seq_len]: the chat-formatted CANARY_PROMPTS concatenated, repeated to fill N rows."""
    ids: list[int] = []
    for prompt, completion in CANARY_PROMPTS:
        ids += tokenizer(format_example(tokenizer, prompt, completion),
                         add_special_tokens=False)["input_ids"]
    num_rows = max(1, math.ceil(len(ids) / seq_len))
    ids = (ids * math.ceil(num_rows * seq_len / len(ids)))[:num_rows * seq_len]
    return torch.tensor(ids, dtype=torch.long).view(num_rows, seq_len)


def _count_nonfinite_logits(hf, stream: Stream, device: str) -> int:
    norm, head = hf.model.norm.to(device), hf.lm_head.to(device)
    count = 0
    try:
        for hidden, _ in stream.inputs:
            for row in hidden:  # one sequence at a time: [S, vocab] logits, not [B, S, vocab]
                count += int((~torch.isfinite(head(norm(row)))).sum())
    finally:
        norm.to("cpu"), head.to("cpu")
    return count


def _ratio(with_adapter: float, bare: float) -> float:
    if bare > 0:
        return with_adapter / bare
    return 1.0 if with_adapter == 0 else math.inf


@torch.no_grad()
def measure_influence(hf, adapter: LoraAdapter | None, sources: Mapping[str, torch.Tensor],
                      device: str = "cpu") -> tuple[dict[str, list[list[float]]], int]:
    """(source → per layer, per input group tr(H_adapter)/tr(H_bare), non-finite count).

    Both streams run through the *unquantized* base layer by layer exactly as MLGPTQ's
    calibration does (same capture, hooks and Hessians), so a ratio is the factor by which
    this task's H_t would outweigh the bare base's in the aggregate.
    """
    pairs = {}
    for name, tokens in sources.items():
        pairs[name] = (Stream(f"{name}/bare", tokens, None), Stream(f"{name}/adapter", tokens, adapter))
        for stream in pairs[name]:
            capture_inputs(hf, stream, device)
    ratios: dict[str, list[list[float]]] = {name: [] for name in sources}
    num_nonfinite = 0
    for idx, layer in enumerate(hf.model.layers):
        layer.to(device)
        for name, (bare, adapted) in pairs.items():
            h_bare, h_adapted = run_layer(layer, idx, bare), run_layer(layer, idx, adapted)
            ratios[name].append([_ratio(float(torch.trace(h_adapted[g])), float(torch.trace(h_bare[g])))
                                 for g in GROUPS])
            num_nonfinite += sum(int((~torch.isfinite(h)).sum()) for h, _ in adapted.inputs)
        layer.to("cpu")
    for _, adapted in pairs.values():
        num_nonfinite += _count_nonfinite_logits(hf, adapted, device)
    return ratios, num_nonfinite


def judge(task: str, ratios: dict[str, list[list[float]]], num_nonfinite: int,
          config: InfluenceConfig) -> InfluenceReport:
    """The verdict: non-finite anywhere or a ratio above max_ratio quarantines; NaN ratios count
    as infinite (an overflowing x xᵀ is the same alarm as a NaN activation)."""
    worst, where = -math.inf, "nowhere"
    for name, per_layer in ratios.items():
        for idx, row in enumerate(per_layer):
            for group, value in zip(GROUPS, row):
                value = math.inf if math.isnan(value) else value
                if value > worst:
                    worst, where = value, f"layer {idx} {group} ({name})"
    if num_nonfinite or not math.isfinite(worst):
        return InfluenceReport(task, Verdict.QUARANTINE, worst, where,
                               f"{num_nonfinite} non-finite activations/logits with the adapter; "
                               f"largest input-energy ratio {worst:.3g} at {where}", num_nonfinite,
                               ratios)
    text = f"input energy {worst:.3g}x the bare base's at {where}"
    if worst > config.max_ratio:
        return InfluenceReport(task, Verdict.QUARANTINE, worst, where,
                               f"{text}, above the quarantine ratio {config.max_ratio:g}", 0, ratios)
    if worst > config.warn_ratio:
        return InfluenceReport(task, Verdict.WARN, worst, where,
                               f"{text}, above the warn ratio {config.warn_ratio:g}", 0, ratios)
    return InfluenceReport(task, Verdict.PASS, worst, where, text, 0, ratios)


def screen_influence(hf, name: str, adapter: LoraAdapter | None, tokens: torch.Tensor,
                     config: InfluenceConfig, canaries: torch.Tensor | None = None,
                     device: str = "cpu") -> InfluenceReport:
    """Screen one task: its first `config.num_seqs` calibration sequences, plus the canaries."""
    sources = {"calibration": tokens[:config.num_seqs]}
    if canaries is not None:
        sources["canary"] = canaries
    return judge(name, *measure_influence(hf, adapter, sources, device), config)


def screen_tasks(hf, tokenizer, tasks: list[TaskSpec], seq_len: int, config: InfluenceConfig,
                 device: str = "cpu") -> dict[str, InfluenceReport]:
    """Every task's report (task name → report), reading adapters and calibration like MLGPTQ."""
    canaries = canary_tokens(tokenizer, seq_len) if config.has_canaries else None
    reports = {}
    for spec in tasks:
        tokens = calibration_tokens(spec.calibration_path, tokenizer, config.num_seqs, seq_len)
        reports[spec.name] = screen_influence(hf, spec.name, read_adapter(spec, hf.config), tokens,
                                              config, canaries, device)
    return reports
