"""Load and validate PEFT LoRA adapter directories (safetensors only; no engine imports)."""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
TARGET_MODULES = ATTN_MODULES + MLP_MODULES
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight (PEFT may drop the adapter name
# or keep it, e.g. ...lora_A.default.weight, depending on how the file was written).
_KEY_RE = re.compile(
    r"^(?:.*\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")


class AdapterError(ValueError):
    """An adapter directory that cannot be served; the message says why."""


@dataclass(frozen=True)
class BaseDims:
    """The base model's shape, to check an adapter against (in/out features per module)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    def features(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of a base linear."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}[module]


@dataclass
class LoraAdapter:
    """One adapter in plain tensors: y += scaling * B @ (A @ x) for each (layer, module).

    `weights[(layer, module)] = (A [r, in], B [out, r])`, float32 on CPU, scaling not folded.
    `rank` is the largest rank over modules (PEFT rank_pattern may vary it per module).
    """

    name: str
    path: Path
    rank: int
    targets: tuple[str, ...]
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(repr=False)
    scaling: dict[tuple[int, str], float] = field(repr=False)
    base_model_name: str | None = None

    @property
    def num_bytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size()
                   for a, b in self.weights.values())


def _pattern_value(patterns: dict, module_path: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches a suffix of the module path."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return value
    return default


def _read_config(path: Path) -> dict:
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise AdapterError(f"adapter {path}: missing {CONFIG_FILE}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterError(f"adapter {path}: unreadable {CONFIG_FILE}: {exc}") from exc
    if not isinstance(cfg, dict):
        raise AdapterError(f"adapter {path}: {CONFIG_FILE} is not a JSON object")
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"adapter {path}: peft_type {peft_type!r} is not LORA")
    if cfg.get("use_dora"):
        raise AdapterError(f"adapter {path}: DoRA adapters are not supported")
    if cfg.get("modules_to_save"):
        raise AdapterError(
            f"adapter {path}: modules_to_save {cfg['modules_to_save']} would replace base "
            "weights per task; only LoRA deltas are supported")
    if cfg.get("bias", "none") not in ("none", None):
        raise AdapterError(f"adapter {path}: bias={cfg['bias']!r} is not supported (need 'none')")
    if cfg.get("fan_in_fan_out"):
        raise AdapterError(f"adapter {path}: fan_in_fan_out=True is not supported")
    targets = cfg.get("target_modules")
    if isinstance(targets, str) and targets != "all-linear":
        # PEFT treats a string as a regex over module paths; accept it only when it names ours.
        targets = [m for m in TARGET_MODULES if re.search(targets, f"layers.0.self_attn.{m}")
                   or re.search(targets, f"layers.0.mlp.{m}")] or [targets]
    if isinstance(targets, list):
        unknown = sorted(set(targets) - set(TARGET_MODULES))
        if unknown:
            raise AdapterError(f"adapter {path}: unknown target modules {unknown}; "
                               f"supported: {list(TARGET_MODULES)}")
    return cfg


def load_adapter(name: str, path: str | Path, dims: BaseDims, max_rank: int) -> LoraAdapter:
    """Read a PEFT LoRA directory and check it against the base model; raise AdapterError."""
    try:
        return _load_adapter(name, path, dims, max_rank)
    except AdapterError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError, re.error) as exc:
        # Fuzzing (tests/fuzz) found malformed configs (r: null, target_modules: [[1]],
        # rank_pattern: []) escaping as TypeError & co., which AddTask answered as INTERNAL.
        raise AdapterError(f"adapter {name!r}: malformed {CONFIG_FILE} or tensors: "
                           f"{type(exc).__name__}: {exc}") from exc


def _load_adapter(name: str, path: str | Path, dims: BaseDims, max_rank: int) -> LoraAdapter:
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"adapter {name!r}: {path} is not a directory")
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickled:
            raise AdapterError(
                f"adapter {name!r}: only {WEIGHTS_FILE} is accepted; refusing pickle file(s) "
                f"{pickled} (they can run code when loaded) - re-save with safe_serialization")
        raise AdapterError(f"adapter {name!r}: missing {WEIGHTS_FILE} in {path}")
    cfg = _read_config(path)
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        tensors = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise AdapterError(f"adapter {name!r}: unreadable {WEIGHTS_FILE}: {exc}") from exc
    if not tensors:
        raise AdapterError(f"adapter {name!r}: {WEIGHTS_FILE} holds no tensors")

    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    paths: dict[tuple[int, str], str] = {}
    for key, tensor in tensors.items():
        match = _KEY_RE.match(key)
        if match is None:
            raise AdapterError(f"adapter {name!r}: unexpected tensor {key!r} "
                               "(only lora_A/lora_B of decoder-layer linears are supported)")
        layer, module, half = int(match.group(1)), match.group(2), match.group(3)
        if module not in TARGET_MODULES:
            raise AdapterError(f"adapter {name!r}: unknown target module {module!r} in {key!r}; "
                               f"supported: {list(TARGET_MODULES)}")
        if not 0 <= layer < dims.num_layers:
            raise AdapterError(f"adapter {name!r}: layer {layer} in {key!r} but the base model "
                               f"has {dims.num_layers} layers")
        halves.setdefault((layer, module), {})[half] = tensor
        paths[(layer, module)] = key.split(".lora_")[0]

    r_default = int(cfg.get("r", 8))
    alpha_default = float(cfg.get("lora_alpha", r_default))
    use_rslora = bool(cfg.get("use_rslora", False))
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    weights, scaling = {}, {}
    for (layer, module), pair in sorted(halves.items()):
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"adapter {name!r}: layer {layer} {module} has lora_{''.join(pair)} "
                               "but not both lora_A and lora_B")
        a, b = pair["A"], pair["B"]
        in_f, out_f = dims.features(module)
        if a.dim() != 2 or b.dim() != 2:
            raise AdapterError(f"adapter {name!r}: layer {layer} {module}: lora tensors must be 2-D")
        rank = a.shape[0]
        if a.shape != (rank, in_f) or b.shape != (out_f, rank):
            raise AdapterError(
                f"adapter {name!r}: layer {layer} {module}: shapes A{tuple(a.shape)} "
                f"B{tuple(b.shape)} do not fit the base model (expected A[r, {in_f}], "
                f"B[{out_f}, r]) - was it trained for another base model?")
        if rank > max_rank:
            raise AdapterError(f"adapter {name!r}: rank {rank} exceeds the engine's max LoRA rank "
                               f"{max_rank} (ENGINE_MAX_LORA_RANK)")
        if not (a.is_floating_point() and b.is_floating_point()):  # fuzzing: int/bool loaded
            raise AdapterError(f"adapter {name!r}: layer {layer} {module}: lora tensors must be "
                               f"floating point, got {a.dtype}/{b.dtype}")
        a, b = a.float(), b.float()
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterError(f"adapter {name!r}: layer {layer} {module} has NaN or Inf weights")
        module_path = paths[(layer, module)]
        r_cfg = int(_pattern_value(rank_pattern, module_path, r_default))
        if r_cfg != rank:
            raise AdapterError(f"adapter {name!r}: layer {layer} {module} has rank {rank} but "
                               f"{CONFIG_FILE} says r={r_cfg}")
        alpha = float(_pattern_value(alpha_pattern, module_path, alpha_default))
        if not math.isfinite(alpha):  # fuzzing: lora_alpha "NaN" made every output NaN
            raise AdapterError(f"adapter {name!r}: lora_alpha {alpha} is not finite")
        scaling[(layer, module)] = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        weights[(layer, module)] = (a.contiguous(), b.contiguous())

    targets = tuple(m for m in TARGET_MODULES if any(mod == m for _, mod in weights))
    return LoraAdapter(name=name, path=path, rank=max(a.shape[0] for a, _ in weights.values()),
                       targets=targets, weights=weights, scaling=scaling,
                       base_model_name=cfg.get("base_model_name_or_path"))
