"""On-disk cache of per-layer MLGPTQ aggregate states, for incremental quantization."""
from __future__ import annotations

from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from services.quantizer.aggregate import AggState
from services.quantizer.hessian import INPUT_GROUPS

CACHE_DIR = "aggregates"


def layer_path(version_dir: Path, layer_idx: int) -> Path:
    return Path(version_dir) / CACHE_DIR / f"layer_{layer_idx:03d}.safetensors"


def save_layer(version_dir: Path, layer_idx: int, states: dict[str, AggState], aggregation: str) -> None:
    """Pre-repair states of one layer's input groups (never the repaired Hessians: repair
    is not associative, the raw elementwise-max state is)."""
    path = layer_path(version_dir, layer_idx)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for group, state in states.items():
        tensors.update(state.tensors(group))
    save_file(tensors, str(path), metadata={"aggregation": aggregation})


def load_layer(version_dir: Path, layer_idx: int, aggregation: str) -> dict[str, AggState]:
    """States written by save_layer; ValueError when missing or of another aggregation."""
    path = layer_path(version_dir, layer_idx)
    if not path.is_file():
        raise ValueError(f"no cached aggregate for layer {layer_idx} in {version_dir}")
    with safe_open(str(path), framework="pt") as f:
        found = (f.metadata() or {}).get("aggregation")
    if found != aggregation:
        raise ValueError(f"cached aggregate of layer {layer_idx} uses {found!r}, expected {aggregation!r}")
    tensors = load_file(str(path))
    return {group: AggState.from_tensors(tensors, group) for group in INPUT_GROUPS}
