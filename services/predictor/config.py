"""Configuration of the predictor service (one frozen dataclass, built from PREDICTOR_* env vars)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# The shipped model lives in the repository, two levels above this package.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "predictor"


def _env_int(env: dict[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from exc


def _env_float(env: dict[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be a number, got {raw!r}") from exc


@dataclass(frozen=True)
class PredictorConfig:
    """Settings of the predictor service.

    model_dir: directory with model.onnx + metadata.json; None (or a directory
    without them) serves from running statistics only.
    redis_url: optional Redis to seed statistics from `inlaid:stats:{task}`.
    """

    host: str = "0.0.0.0"
    port: int = 50052
    model_dir: Path | None = DEFAULT_MODEL_DIR
    max_batch: int = 64
    # Extra wait to fill a batch; 0 = batch only what queued up while the last batch ran.
    max_wait_ms: float = 0.0
    max_prompt_chars: int = 32768
    max_items: int = 4096
    num_threads: int = 1
    redis_url: str | None = None
    redis_namespace: str = "inlaid"
    stats_window: int = 512
    default_output_tokens: int = 128
    # Reports after which statistics weigh as much as the model (blend prior).
    blend_prior_count: int = 32
    grace_s: float = 5.0

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        for name in ("max_batch", "max_prompt_chars", "max_items", "num_threads",
                     "stats_window", "default_output_tokens", "blend_prior_count"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0 or self.grace_s < 0:
            raise ValueError("max_wait_ms and grace_s must be >= 0")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "PredictorConfig":
        """Build from PREDICTOR_* variables (REDIS_URL is the shared fallback for the Redis URL)."""
        env = dict(os.environ if env is None else env)
        model_dir_raw = env.get("PREDICTOR_MODEL_DIR")
        if model_dir_raw is None:
            model_dir: Path | None = DEFAULT_MODEL_DIR
        elif model_dir_raw.strip().lower() in ("", "none"):
            model_dir = None  # explicitly statistics-only
        else:
            model_dir = Path(model_dir_raw)
        return cls(
            host=env.get("PREDICTOR_HOST", cls.host),
            port=_env_int(env, "PREDICTOR_PORT", cls.port),
            model_dir=model_dir,
            max_batch=_env_int(env, "PREDICTOR_MAX_BATCH", cls.max_batch),
            max_wait_ms=_env_float(env, "PREDICTOR_MAX_WAIT_MS", cls.max_wait_ms),
            max_prompt_chars=_env_int(env, "PREDICTOR_MAX_PROMPT_CHARS", cls.max_prompt_chars),
            max_items=_env_int(env, "PREDICTOR_MAX_ITEMS", cls.max_items),
            num_threads=_env_int(env, "PREDICTOR_NUM_THREADS", cls.num_threads),
            redis_url=env.get("PREDICTOR_REDIS_URL") or env.get("REDIS_URL") or None,
            redis_namespace=env.get("PREDICTOR_REDIS_NAMESPACE", cls.redis_namespace),
            stats_window=_env_int(env, "PREDICTOR_STATS_WINDOW", cls.stats_window),
            default_output_tokens=_env_int(env, "PREDICTOR_DEFAULT_OUTPUT_TOKENS",
                                           cls.default_output_tokens),
            blend_prior_count=_env_int(env, "PREDICTOR_BLEND_PRIOR_COUNT", cls.blend_prior_count),
            grace_s=_env_float(env, "PREDICTOR_GRACE_S", cls.grace_s),
        )
