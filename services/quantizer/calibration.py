"""Calibration inputs: JSONL → token sequences, and LoRA adapters applied to base linears with hooks."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from services.common.adapters import BaseDims, LoraAdapter, load_adapter

MAX_ADAPTER_RANK = 256


class CalibrationError(ValueError):
    """Calibration data that cannot be used (missing, empty, malformed, too short)."""


@dataclass(frozen=True)
class TaskSpec:
    """One task's quantization inputs: its adapter (None = bare base) and calibration JSONL."""

    name: str
    adapter_path: str | None
    calibration_path: str

    @classmethod
    def parse(cls, text: str) -> "TaskSpec":
        """NAME=ADAPTER_DIR:CALIB.jsonl (ADAPTER_DIR may be empty: NAME=:CALIB.jsonl)."""
        name, sep, rest = text.partition("=")
        adapter, sep2, calib = rest.rpartition(":")
        if not sep or not sep2 or not name or not calib:
            raise CalibrationError(f"task spec {text!r} is not NAME=ADAPTER_DIR:CALIB.jsonl")
        return cls(name=name, adapter_path=adapter or None, calibration_path=calib)

    def to_dict(self) -> dict:
        return {"name": self.name, "adapter_path": self.adapter_path,
                "calibration_path": self.calibration_path}


def read_examples(path: str | Path) -> list[tuple[str, str]]:
    """(prompt, completion) pairs of a JSONL file; raise CalibrationError with the line number."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration file {path} does not exist")
    examples = []
    with open(path, encoding="utf-8") as f:
        for num, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise CalibrationError(f"{path}:{num}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise CalibrationError(f"{path}:{num}: need an object with a string 'prompt'")
            examples.append((row["prompt"], str(row.get("completion", ""))))
    if not examples:
        raise CalibrationError(f"calibration file {path} is empty")
    return examples


def format_example(tokenizer, prompt: str, completion: str) -> str:
    """The text a served request looks like: chat template when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return prompt + completion + (tokenizer.eos_token or "")


def calibration_tokens(path: str | Path, tokenizer, num_seqs: int, seq_len: int) -> torch.Tensor:
    """[N, seq_len] token ids: examples concatenated and cut into full sequences, N ≤ num_seqs."""
    ids: list[int] = []
    for prompt, completion in read_examples(path):
        ids.extend(tokenizer(format_example(tokenizer, prompt, completion),
                             add_special_tokens=False)["input_ids"])
        if len(ids) >= num_seqs * seq_len:
            break
    count = min(num_seqs, len(ids) // seq_len)
    if count == 0:
        raise CalibrationError(
            f"calibration file {path} is too short: {len(ids)} tokens, need at least seq_len={seq_len}")
    return torch.tensor(ids[:count * seq_len], dtype=torch.long).view(count, seq_len)


def base_dims(config) -> BaseDims:
    """Shape of a HF Llama-style config, for adapter validation."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return BaseDims(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                    num_layers=config.num_hidden_layers, num_heads=config.num_attention_heads,
                    num_kv_heads=config.num_key_value_heads, head_dim=head_dim)


def read_adapter(spec: TaskSpec, config) -> LoraAdapter | None:
    """The task's adapter checked against the base (AdapterError on another base's shapes)."""
    if spec.adapter_path is None:
        return None
    return load_adapter(spec.name, spec.adapter_path, base_dims(config), MAX_ADAPTER_RANK)


class LoraHooks:
    """Context manager adding an adapter's scaling·B·A·x to the outputs of one layer's linears."""

    def __init__(self, layer: nn.Module, layer_idx: int, adapter: LoraAdapter | None):
        self.layer, self.layer_idx, self.adapter = layer, layer_idx, adapter
        self._handles: list = []

    def __enter__(self) -> "LoraHooks":
        if self.adapter is None:
            return self
        for (idx, module), (a, b) in self.adapter.weights.items():
            if idx != self.layer_idx:
                continue
            prefix = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            linear = self.layer.get_submodule(f"{prefix}.{module}")
            scaling = self.adapter.scaling[(idx, module)]
            a_dev, b_dev = a.to(linear.weight.device), b.to(linear.weight.device)
            self._handles.append(linear.register_forward_hook(
                lambda _m, args, out, a=a_dev, b=b_dev, s=scaling:
                    out + s * ((args[0].to(a.dtype) @ a.T) @ b.T).to(out.dtype)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
