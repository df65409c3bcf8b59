"""Quantized checkpoints in GPTQ v1 layout, written as atomic versions under one root directory.

Root layout: `<root>/v<N>/` (model.safetensors with qweight/qzeros/scales/g_idx per linear
plus the unquantized tensors, config.json with `quantization_config`, quantize_config.json,
tokenizer files, aggregates/ cache) and `<root>/CURRENT` naming the newest version.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from services.quantizer.grid import dequantize_codes
from services.quantizer.packing import pack_qweight, pack_qzeros, unpack_qweight, unpack_qzeros
from services.quantizer.rtn import QuantResult

QUANT_CONFIG = "quantize_config.json"
WEIGHTS = "model.safetensors"
CURRENT = "CURRENT"
SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


class CheckpointError(ValueError):
    """A directory that is not a readable quantized checkpoint."""


def packed_tensors(prefix: str, result: QuantResult, bits: int) -> dict[str, torch.Tensor]:
    """GPTQ v1 tensors of one linear (prefix like model.layers.0.self_attn.q_proj)."""
    return {
        f"{prefix}.qweight": pack_qweight(result.codes, bits),
        f"{prefix}.qzeros": pack_qzeros(result.zeros, bits),
        f"{prefix}.scales": result.scales.to(torch.float16).contiguous(),
        f"{prefix}.g_idx": result.g_idx.to(torch.int32).contiguous(),
    }


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
               g_idx: torch.Tensor, bits: int) -> torch.Tensor:
    """fp32 weight [out, in] from GPTQ v1 tensors (same arithmetic as GPTQ's own dequant)."""
    codes = unpack_qweight(qweight, bits).float()
    zeros = unpack_qzeros(qzeros, bits).float()
    gi = g_idx.long()
    return dequantize_codes(codes, scales.float()[gi].T, zeros[gi].T)


def resolve(path: str | Path) -> Path:
    """A version directory from a root (via CURRENT) or a version directory itself."""
    path = Path(path)
    if (path / QUANT_CONFIG).is_file():
        return path
    current = path / CURRENT
    if current.is_file():
        version = path / current.read_text().strip()
        if (version / QUANT_CONFIG).is_file():
            return version
    raise CheckpointError(f"{path} is not a quantized checkpoint (no {QUANT_CONFIG} or {CURRENT})")


def latest_version(root: Path) -> int:
    """Newest version number under root, 0 when none."""
    try:
        return int(resolve(root).name.lstrip("v"))
    except (CheckpointError, ValueError):
        return 0


def write_version(root: str | Path, build: Callable[[Path], None]) -> Path:
    """Run build(tmp_dir), then publish tmp_dir as the next version; on failure nothing changes.

    The rename of a complete directory and the os.replace of CURRENT are both atomic, so a
    reader sees either the old version or the whole new one.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    number = latest_version(root) + 1
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-v{number}-", dir=root))
    try:
        build(tmp)
        final = root / f"v{number}"
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pointer = root / f".{CURRENT}.tmp"
    pointer.write_text(final.name + "\n")
    os.replace(pointer, root / CURRENT)
    return final


def write_files(out_dir: Path, tensors: dict[str, torch.Tensor], quant_config: dict,
                model_config: dict, base_dir: Path | None) -> None:
    """Weights + configs (+ the base's tokenizer files) of one version, into out_dir."""
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / WEIGHTS),
              metadata={"format": "pt"})
    (out_dir / QUANT_CONFIG).write_text(json.dumps(quant_config, indent=2) + "\n")
    config = dict(model_config)
    config["quantization_config"] = {
        "quant_method": "gptq", "checkpoint_format": "gptq", "bits": quant_config["bits"],
        "group_size": quant_config["group_size"], "desc_act": quant_config["desc_act"],
        "sym": quant_config["sym"], "damp_percent": quant_config["damp_percent"]}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if base_dir is not None:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                     "generation_config.json", "chat_template.jinja"):
            if (base_dir / name).is_file():
                shutil.copy2(base_dir / name, out_dir / name)


@dataclass
class QuantizedCheckpoint:
    """A loaded version: its quantize_config, HF config and every tensor."""

    path: Path
    quant_config: dict
    model_config: dict
    tensors: dict[str, torch.Tensor]

    @property
    def bits(self) -> int:
        return int(self.quant_config["bits"])

    def linear_names(self) -> list[str]:
        return sorted(k[: -len(".qweight")] for k in self.tensors if k.endswith(".qweight"))

    def linear_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {s: self.tensors[f"{prefix}.{s}"] for s in SUFFIXES}

    def dequantized(self, prefix: str) -> torch.Tensor:
        t = self.linear_tensors(prefix)
        return dequantize(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], self.bits)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A plain fp32 state dict (dequantized linears), loadable into the HF model."""
        out = {k: v for k, v in self.tensors.items() if not k.endswith(tuple("." + s for s in SUFFIXES))}
        for prefix in self.linear_names():
            out[f"{prefix}.weight"] = self.dequantized(prefix)
        return out


def load_checkpoint(path: str | Path) -> QuantizedCheckpoint:
    """Read a version (or a root's CURRENT version)."""
    version = resolve(path)
    try:
        quant_config = json.loads((version / QUANT_CONFIG).read_text())
        model_config = json.loads((version / "config.json").read_text())
        tensors = load_file(str(version / WEIGHTS))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{version}: unreadable checkpoint ({e})") from e
    return QuantizedCheckpoint(version, quant_config, model_config, tensors)
