"""Layer-by-layer quantization of a base model (rtn, gptq, gptq-mixed, mlgptq) into a new version.

Calibration always flows through the *unquantized* base (DESIGN.md §4): layer l's inputs
never depend on how earlier layers were quantized, so a task's statistics are the same
whatever other tasks exist, which is what lets incremental quantization equal full.
Only one decoder layer's weights sit on the device at a time.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.common.adapters import LoraAdapter
from services.common.model_source import resolve_model
from services.quantizer import cache
from services.quantizer.aggregate import AggState, make_aggregation
from services.quantizer.calibration import (CalibrationError, LoraHooks, TaskSpec, calibration_tokens,
                                            read_adapter)
from services.quantizer.checkpoint import packed_tensors, write_files, write_version
from services.quantizer.config import QuantConfig
from services.quantizer.gptq import gptq_quantize
from services.quantizer.hessian import INPUT_GROUPS, LayerHessians
from services.quantizer.rtn import QuantResult, rtn_quantize

BATCH_SEQS = 8
ProgressFn = Callable[[int, int], None]


@dataclass
class Stream:
    """Calibration sequences flowing through the base with one adapter (None = bare base)."""

    name: str
    tokens: torch.Tensor  # [N, S]
    adapter: LoraAdapter | None
    inputs: list = field(default_factory=list)  # per batch: (hidden [B, S, D], layer kwargs)


class _Captured(Exception):
    def __init__(self, args, kwargs):
        self.args_, self.kwargs_ = args, kwargs


def load_base(model: str):
    """(model, tokenizer, HF dir) of a model name or directory, fp32 on the CPU."""
    src = resolve_model(model)
    if src.kind != "hf":
        raise ValueError(f"quantization needs real weights; {model!r} resolves to {src.kind}")
    hf = AutoModelForCausalLM.from_pretrained(str(src.path), dtype=torch.float32)
    hf.eval()
    return hf, AutoTokenizer.from_pretrained(str(src.path)), Path(src.path)


def capture_inputs(hf, stream: Stream, device: str) -> None:
    """Inputs of decoder layer 0 (and the kwargs every layer gets), per batch of sequences."""
    inner = hf.model
    inner.embed_tokens.to(device)
    inner.rotary_emb.to(device)

    def hook(_module, args, kwargs):
        raise _Captured(args, kwargs)

    handle = inner.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, stream.tokens.shape[0], BATCH_SEQS):
            batch = stream.tokens[start:start + BATCH_SEQS].to(device)
            try:
                inner(input_ids=batch, use_cache=False)
            except _Captured as cap:
                hidden = cap.args_[0] if cap.args_ else cap.kwargs_.pop("hidden_states")
                stream.inputs.append((hidden, dict(cap.kwargs_)))
    finally:
        handle.remove()
        inner.embed_tokens.to("cpu")
        inner.rotary_emb.to("cpu")


def _linear(layer, name: str):
    return layer.get_submodule(name)


def run_layer(layer, layer_idx: int, stream: Stream) -> dict[str, torch.Tensor]:
    """Forward one stream through the unquantized layer; return its Hessians, advance its inputs."""
    with LoraHooks(layer, layer_idx, stream.adapter), LayerHessians(layer) as stats:
        advanced = []
        for hidden, kwargs in stream.inputs:
            out = layer(hidden, **kwargs)
            advanced.append((out[0] if isinstance(out, tuple) else out, kwargs))
    stream.inputs = advanced
    return stats.hessians()


class LayerQuantizer:
    """Quantizes one decoder layer's linears given the streams' Hessians (method-specific)."""

    def __init__(self, cfg: QuantConfig, device: str):
        self.cfg, self.device = cfg, device
        self.aggregation = make_aggregation(cfg.aggregation, cfg.damp_percent)

    def hessian_for(self, per_stream: list[dict[str, torch.Tensor]], group: str,
                    cached: AggState | None) -> tuple[torch.Tensor, AggState | None]:
        if self.cfg.method in ("gptq", "gptq-mixed"):
            return per_stream[0][group], None
        states = ([cached.to(self.device)] if cached is not None else []) + [
            self.aggregation.task_state(h[group]) for h in per_stream]
        state = self.aggregation.reduce(states)
        return self.aggregation.finalize(state), state

    def quantize(self, layer, per_stream, cached: dict[str, AggState] | None):
        # GPTQ's column sweep is thousands of tiny ops: on a CPU, OpenMP barriers between
        # threads cost more than the work (measured 35× slower with 2 threads on a busy host).
        threads = torch.get_num_threads()
        if torch.device(self.device).type == "cpu":
            torch.set_num_threads(1)
        try:
            return self._quantize(layer, per_stream, cached)
        finally:
            torch.set_num_threads(threads)

    def _quantize(self, layer, per_stream, cached: dict[str, AggState] | None):
        results, states = {}, {}
        for group, members in INPUT_GROUPS.items():
            if self.cfg.method == "rtn":
                for name in members:
                    results[name] = rtn_quantize(_linear(layer, name).weight, self.cfg)
                continue
            h, state = self.hessian_for(per_stream, group, cached[group] if cached else None)
            if state is not None:
                states[group] = state
            # Linears sharing an input share H, and GPTQ treats rows independently: one sweep
            # over the stacked rows (q;k;v or gate;up) costs one column loop instead of three.
            weights = [_linear(layer, name).weight.detach() for name in members]
            res = gptq_quantize(torch.cat(weights), h.to(self.device), self.cfg)
            start = 0
            for name, w in zip(members, weights):
                rows = slice(start, start + w.shape[0])
                start += w.shape[0]
                results[name] = QuantResult(codes=res.codes[rows].cpu().clone(), scales=res.scales[:, rows].cpu().clone(),
                                            zeros=res.zeros[:, rows].cpu().clone(), g_idx=res.g_idx.cpu().clone(),
                                            dequant=res.dequant[rows].cpu().clone())
        return results, states


def _streams(cfg: QuantConfig, tasks: list[TaskSpec], hf, tokenizer) -> list[Stream]:
    """Calibration streams of a method: one per task (mlgptq) or all tasks pooled (gptq)."""
    if cfg.method == "rtn":
        return []
    if not tasks:
        raise CalibrationError(f"method {cfg.method} needs at least one task's calibration data")
    tokens = {t.name: calibration_tokens(t.calibration_path, tokenizer, cfg.num_seqs, cfg.seq_len)
              for t in tasks}
    if cfg.method == "mlgptq":
        return [Stream(t.name, tokens[t.name], read_adapter(t, hf.config)) for t in tasks]
    return [Stream("pooled", torch.cat([tokens[t.name] for t in tasks]), None)]


@torch.no_grad()
def run_pipeline(hf, tokenizer, base_dir: Path, cfg: QuantConfig, new_tasks: list[TaskSpec],
                 all_tasks: list[TaskSpec], out_dir: Path, device: str = "cpu",
                 cached_version: Path | None = None, progress: ProgressFn | None = None,
                 show_progress: bool = True) -> dict:
    """Quantize every decoder layer into out_dir (weights, configs, aggregate cache); return timings."""
    t0 = time.perf_counter()
    streams = _streams(cfg, new_tasks, hf, tokenizer)
    for stream in tqdm(streams, desc="tasks", disable=not show_progress):
        capture_inputs(hf, stream, device)
    layers = hf.model.layers
    quantizer = LayerQuantizer(cfg, device)
    quantized: set[str] = set()
    tensors: dict[str, torch.Tensor] = {}
    stats_s = quant_s = 0.0
    for idx in tqdm(range(len(layers)), desc="layers", disable=not show_progress):
        layer = layers[idx].to(device)
        t1 = time.perf_counter()
        per_stream = [run_layer(layer, idx, s) for s in streams]
        t2 = time.perf_counter()
        cached = (cache.load_layer(cached_version, idx, cfg.aggregation)
                  if cached_version is not None else None)
        results, states = quantizer.quantize(layer, per_stream, cached)
        if cfg.method == "mlgptq":
            cache.save_layer(out_dir, idx, states, cfg.aggregation)
        for name, res in results.items():
            prefix = f"model.layers.{idx}.{name}"
            tensors.update(packed_tensors(prefix, res, cfg.bits))
            quantized.add(f"{prefix}.weight")
        layer.to("cpu")
        stats_s += t2 - t1
        quant_s += time.perf_counter() - t2
        if progress is not None:
            progress(idx + 1, len(layers))
    for key, value in hf.state_dict().items():
        if key in quantized or (key == "lm_head.weight" and hf.config.tie_word_embeddings):
            continue
        tensors[key] = value.detach().cpu()
    quant_config = {
        "bits": cfg.bits, "group_size": cfg.group_size, "desc_act": cfg.desc_act, "sym": cfg.sym,
        "mse": cfg.mse, "damp_percent": cfg.damp_percent, "method": cfg.method,
        "checkpoint_format": "gptq",
        "aggregation": cfg.aggregation if cfg.method == "mlgptq" else None,
        "tasks": [t.to_dict() for t in all_tasks], "base_model": str(base_dir),
        "config": cfg.to_dict(),
    }
    write_files(out_dir, tensors, quant_config, hf.config.to_dict(), base_dir)
    return {"stats_s": stats_s, "quantize_s": quant_s, "total_s": time.perf_counter() - t0}


def _check_names(tasks: list[TaskSpec]) -> None:
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise CalibrationError(f"duplicate task names in {names}")


def quantize(model: str, tasks: list[TaskSpec], cfg: QuantConfig, out_root: str | Path,
             device: str = "cpu", progress: ProgressFn | None = None,
             show_progress: bool = True, base: tuple | None = None) -> Path:
    """Full quantization with every task; publishes and returns a new version directory.

    `base`: `load_base(model)`'s result when the caller already holds it (not loaded again)."""
    _check_names(tasks)
    hf, tokenizer, base_dir = base if base is not None else load_base(model)
    timings = {}

    def build(tmp: Path) -> None:
        timings.update(run_pipeline(hf, tokenizer, base_dir, cfg, tasks, tasks, tmp, device,
                                    progress=progress, show_progress=show_progress))
        (tmp / "timings.json").write_text(json.dumps(timings) + "\n")

    return write_version(out_root, build)
