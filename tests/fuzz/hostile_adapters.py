"""Hostile adapter directories for services.common.adapters.load_adapter, drawn from a random.Random.

Each directory is one `kind` of damage. `check()` loads it and answers the outcome: "accepted",
"AdapterError", or "CRASH: <type>" for any other exception; a known-bad kind that is accepted,
or a pickle payload that ran, is a failure too."""
from __future__ import annotations

import json
import math
import pickle
import random
from pathlib import Path

import torch
from safetensors.torch import save_file

from services.common.adapters import AdapterError, BaseDims, load_adapter

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: kinds whose directory is well-formed; every other kind must be rejected
VALID_KINDS = {"valid"}
#: kinds whose random damage may or may not make the adapter unservable (either answer is fine)
EITHER_KINDS = {"config_random_types", "rank_pattern_garbage"}
#: bad kinds load_adapter is known to accept (none since int/bool tensors are rejected)
KNOWN_FINDINGS: set[str] = set()


class _Payload:
    """Unpickling this writes a marker file: proof that a pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def _config(rng: random.Random, rank: int, targets: list[str]) -> dict:
    return {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": targets,
            "bias": "none", "fan_in_fan_out": False, "use_dora": False}


def _tensors(dims: BaseDims, rank: int, targets: list[str], layers: list[int]) -> dict:
    out = {}
    for layer in layers:
        for module in targets:
            fan_in, fan_out = dims.features(module)
            part = "self_attn" if module in MODULES[:4] else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{part}.{module}"
            out[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in) * 0.01
            out[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank) * 0.01
    return out


KINDS = ("valid", "bad_json", "json_not_object", "config_random_types", "rank_huge", "rank_zero",
         "rank_negative", "peft_type", "dora", "bias", "fan_in_fan_out", "targets_garbage",
         "weights_garbage", "weights_empty", "weights_header_lies", "pickle_only",
         "pickle_named_safetensors", "nan", "inf", "wrong_shape", "transposed", "one_d",
         "three_d", "wrong_dtype", "layer_out_of_range", "missing_b", "unknown_key",
         "rank_mismatch", "symlink_weights", "no_config", "config_is_dir", "empty_tensor_file",
         "alpha_nan", "r_garbage", "rank_pattern_garbage")


def make(rng: random.Random, root: Path, dims: BaseDims, marker: Path, kind: str | None = None) -> tuple[str, Path]:
    """Write one hostile adapter directory under root; returns (kind, path)."""
    kind = kind or rng.choice(KINDS)
    path = root / f"{kind}-{rng.randrange(10**9)}"
    path.mkdir(parents=True)
    rank = rng.choice([1, 2, 4, 8])
    targets = rng.sample(list(MODULES), rng.randint(1, 3))
    layers = sorted(rng.sample(range(dims.num_layers), rng.randint(1, 3)))
    config = _config(rng, rank, targets)
    tensors = _tensors(dims, rank, targets, layers)
    weights = path / "adapter_model.safetensors"
    a_key = next(k for k in tensors if ".lora_A." in k)
    b_key = a_key.replace("lora_A", "lora_B")

    if kind == "rank_huge":
        config["r"] = rng.choice([65, 10**6, 2**31])
    elif kind == "rank_zero":
        config["r"] = 0
    elif kind == "rank_negative":
        config["r"] = -rank
    elif kind == "peft_type":
        config["peft_type"] = rng.choice(["IA3", "PREFIX_TUNING", "", None, 7])
    elif kind == "dora":
        config["use_dora"] = True
    elif kind == "bias":
        config["bias"] = rng.choice(["all", "lora_only", 1])  # None means "none" in PEFT
    elif kind == "fan_in_fan_out":
        config["fan_in_fan_out"] = True
    elif kind == "targets_garbage":
        config["target_modules"] = rng.choice([["lm_head"], ["../../x"], "embed_tokens", ["q_proj", "lm_head"],
                                               [None], [[1]], ["q_proj", 3]])
    elif kind == "config_random_types":
        for key in rng.sample(sorted(config), 3):
            config[key] = rng.choice([None, [], {}, "x", -1, 1.5, True, "NaN"])
    elif kind == "alpha_nan":
        config["lora_alpha"] = rng.choice(["NaN", "inf", "-inf"])
    elif kind == "r_garbage":
        config["r"] = rng.choice([None, "x", [], {}, "8.5", "1e999"])
    elif kind == "rank_pattern_garbage":
        config["rank_pattern"] = rng.choice([[1], "q_proj", {"(": 4}, {"q_proj": "x"},
                                             {"q_proj": None}])
    elif kind == "nan":
        tensors[a_key][0, 0] = math.nan
    elif kind == "inf":
        tensors[b_key][-1, -1] = rng.choice([math.inf, -math.inf])
    elif kind == "wrong_shape":
        tensors[a_key] = torch.randn(rank, tensors[a_key].shape[1] + rng.choice([-1, 1, 7]))
    elif kind == "transposed":
        tensors[a_key] = tensors[a_key].T.contiguous()
    elif kind == "one_d":
        tensors[a_key] = tensors[a_key].flatten()
    elif kind == "three_d":
        tensors[a_key] = tensors[a_key].unsqueeze(0)
    elif kind == "wrong_dtype":
        tensors[a_key] = rng.choice([tensors[a_key].to(torch.int8), tensors[a_key] > 0,
                                     tensors[a_key].to(torch.int64)])
    elif kind == "layer_out_of_range":
        value = tensors.pop(a_key)
        tensors[a_key.replace(f"layers.{layers[0]}.", f"layers.{dims.num_layers + rng.randint(0, 99)}.")] = value
    elif kind == "missing_b":
        del tensors[b_key]
    elif kind == "unknown_key":
        tensors["base_model.model.lm_head.lora_A.weight"] = torch.randn(rank, dims.hidden_size)
    elif kind == "rank_mismatch":
        tensors[b_key] = torch.randn(tensors[b_key].shape[0], rank + 1)

    if kind == "bad_json":
        (path / "adapter_config.json").write_text(rng.choice(["{", "", "\xff", "[1,", "{'r': 8}"]))
    elif kind == "json_not_object":
        (path / "adapter_config.json").write_text(json.dumps(rng.choice([[1, 2], "LORA", 8, None])))
    elif kind == "config_is_dir":
        (path / "adapter_config.json").mkdir()
    elif kind != "no_config":
        (path / "adapter_config.json").write_text(json.dumps(config))

    if kind == "weights_garbage":
        weights.write_bytes(rng.randbytes(rng.choice([1, 8, 100, 4096])))
    elif kind == "weights_empty":
        weights.write_bytes(b"")
    elif kind == "weights_header_lies":  # header length far beyond the file
        weights.write_bytes((10**12).to_bytes(8, "little") + b'{"a":1}')
    elif kind == "pickle_only":
        torch.save(tensors, path / "adapter_model.bin")
        (path / "payload.pkl").write_bytes(pickle.dumps(_Payload(marker)))
    elif kind == "pickle_named_safetensors":
        weights.write_bytes(pickle.dumps({"x": _Payload(marker)}))
    elif kind == "symlink_weights":
        weights.symlink_to("/etc/passwd")
    elif kind == "empty_tensor_file":
        save_file({}, str(weights))
    else:
        save_file(tensors, str(weights))
    return kind, path


def check(kind: str, path: Path, dims: BaseDims, marker: Path, max_rank: int = 64) -> str:
    """Outcome of loading one directory: accepted / AdapterError / a failure description."""
    try:
        load_adapter(path.name, path, dims, max_rank)
        outcome = "accepted"
    except AdapterError:
        outcome = "AdapterError"
    except Exception as exc:  # noqa: BLE001 - anything else is exactly what the fuzzer looks for
        return f"CRASH: {type(exc).__name__}: {str(exc)[:200]}"
    if marker.exists():
        return "FAIL: pickle payload executed"
    if outcome == "accepted" and kind not in VALID_KINDS | EITHER_KINDS:
        return f"FAIL: bad adapter ({kind}) accepted"
    if outcome == "AdapterError" and kind in VALID_KINDS:
        return "FAIL: valid adapter rejected"
    return outcome
