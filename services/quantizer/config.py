"""Quantization settings shared by every method (one frozen dataclass, validated on creation)."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from services.common.env_config import parse_bool

METHODS = ("rtn", "gptq", "gptq-mixed", "mlgptq")
AGGREGATIONS = ("max-inv", "max-h", "row-max", "mean")
SUPPORTED_BITS = (2, 3, 4, 8)


class QuantConfigError(ValueError):
    """Unsupported quantization settings."""


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize every linear of the decoder layers.

    group_size -1 means one group per output row. GPTQ sweeps columns in blocks of
    block_size; group boundaries must fall on block boundaries or inside a block, so a
    group size either divides block_size or is a multiple of it.
    """

    bits: int = 4
    group_size: int = 128
    # Asymmetric grid + act-order: the best measured setting on the demo tasks
    # (benchmarks/results/quality_variants.md, quality_act_order.md; docs/mlgptq.md).
    sym: bool = False
    desc_act: bool = True
    damp_percent: float = 0.01
    # MSE clipping: per row of each group, shrink the min/max range by p = 1, 1 − 1/mse_grid,
    # …, 1 − mse_max_shrink and keep the p with the smallest Σ|q(w) − w|^mse_norm (grid.py).
    mse: bool = False
    mse_grid: int = 100
    mse_max_shrink: float = 0.8
    mse_norm: float = 2.4
    block_size: int = 128
    method: str = "mlgptq"
    aggregation: str = "mean"
    num_seqs: int = 32
    seq_len: int = 128

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise QuantConfigError(f"bits={self.bits} is not supported (choose from {SUPPORTED_BITS})")
        g, b = self.group_size, self.block_size
        if g != -1 and (g <= 0 or (b % g != 0 and g % b != 0)):
            raise QuantConfigError(
                f"group_size={g} is not supported: use -1, a divisor of the block size {b} "
                f"(e.g. 32, 64, 128) or a multiple of it (256, 512, ...)")
        if not 0.0 < self.damp_percent < 1.0:
            raise QuantConfigError(f"damp_percent={self.damp_percent} must be in (0, 1)")
        if isinstance(self.mse_grid, bool) or not isinstance(self.mse_grid, int) or self.mse_grid < 1:
            raise QuantConfigError(f"mse_grid={self.mse_grid!r} must be a positive integer")
        if not 0.0 <= self.mse_max_shrink < 1.0:
            # A shrink of 1 would try the empty range [0, 0].
            raise QuantConfigError(f"mse_max_shrink={self.mse_max_shrink} must be in [0, 1)")
        if not self.mse_norm > 0.0:
            raise QuantConfigError(f"mse_norm={self.mse_norm} must be positive")
        if self.method not in METHODS:
            raise QuantConfigError(f"method={self.method!r} is not one of {METHODS}")
        if self.aggregation not in AGGREGATIONS:
            raise QuantConfigError(f"aggregation={self.aggregation!r} is not one of {AGGREGATIONS}")
        if self.num_seqs <= 0 or self.seq_len <= 0:
            raise QuantConfigError("num_seqs and seq_len must be positive")

    @property
    def maxq(self) -> int:
        return 2 ** self.bits - 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_env(cls, **overrides) -> "QuantConfig":
        """Defaults from QUANTIZER_* environment variables; explicit overrides win."""
        env = {
            "bits": ("QUANTIZER_BITS", int), "group_size": ("QUANTIZER_GROUP_SIZE", int),
            "method": ("QUANTIZER_METHOD", str), "aggregation": ("QUANTIZER_AGGREGATION", str),
            "num_seqs": ("QUANTIZER_NUM_SEQS", int), "seq_len": ("QUANTIZER_SEQ_LEN", int),
        }
        values = {}
        for field_name, (var, cast) in env.items():
            if os.environ.get(var):
                values[field_name] = cast(os.environ[var])
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


@dataclass(frozen=True)
class QuantizerServiceConfig:
    """The quantizer service (server.py): where it listens, which base it quantizes, where the
    versions go. `quant` holds the settings a first (full) job uses; later jobs reuse the
    settings stored in the current version, because incremental results must match it."""

    host: str = "0.0.0.0"
    port: int = 50054
    model: str = "smollm2-135m"
    checkpoint_dir: str = ""               # "" → <INLAID_CACHE_DIR>/quantized/<model name>
    device: str = "cpu"                    # cpu | cuda | cuda:N | auto
    num_threads: int = 1                   # torch threads for a job (shared CPUs: keep it small)
    redis_url: str = ""                    # REDIS_URL; "" → embedded Redis
    redis_namespace: str = "inlaid"
    grace_s: float = 5.0
    max_job_attempts: int = 2              # runs of a job a quantizer restart may interrupt
    quant: QuantConfig = QuantConfig(num_seqs=8)

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise QuantConfigError(f"QUANTIZER_PORT must be in 0..65535, got {self.port}")
        if self.num_threads <= 0:
            raise QuantConfigError(f"QUANTIZER_NUM_THREADS must be > 0, got {self.num_threads}")
        if self.max_job_attempts <= 0:
            raise QuantConfigError(f"QUANTIZER_MAX_JOB_ATTEMPTS must be > 0, got "
                                   f"{self.max_job_attempts}")
        if self.quant.method != "mlgptq":
            # Only MLGPTQ caches the per-layer aggregates that adding a task needs.
            raise QuantConfigError(f"QUANTIZER_METHOD={self.quant.method!r}: the service adds "
                                   "tasks incrementally, which needs method 'mlgptq'")

    def resolved_checkpoint_dir(self) -> str:
        if self.checkpoint_dir:
            return self.checkpoint_dir
        from services.common.model_source import cache_dir
        name = self.model.rstrip("/").split("/")[-1] or "model"
        return str(cache_dir() / "quantized" / name)

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides) -> "QuantizerServiceConfig":
        """QUANTIZER_* variables (QUANTIZER_MODEL falls back to ENGINE_MODEL so both serve
        and quantize one base; QUANTIZER_NUM_CALIB_SEQS or QUANTIZER_NUM_SEQS)."""
        env = os.environ if env is None else env
        plain = {"host": ("QUANTIZER_HOST", str), "port": ("QUANTIZER_PORT", int),
                 "checkpoint_dir": ("QUANTIZER_CHECKPOINT_DIR", str),
                 "device": ("QUANTIZER_DEVICE", str), "num_threads": ("QUANTIZER_NUM_THREADS", int),
                 "redis_url": ("REDIS_URL", str),
                 "redis_namespace": ("QUANTIZER_REDIS_NAMESPACE", str),
                 "grace_s": ("QUANTIZER_GRACE_S", float),
                 "max_job_attempts": ("QUANTIZER_MAX_JOB_ATTEMPTS", int)}
        quant_vars = {"bits": ("QUANTIZER_BITS", int), "group_size": ("QUANTIZER_GROUP_SIZE", int),
                      "method": ("QUANTIZER_METHOD", str),
                      "aggregation": ("QUANTIZER_AGGREGATION", str),
                      "num_seqs": ("QUANTIZER_NUM_CALIB_SEQS", int),
                      "seq_len": ("QUANTIZER_SEQ_LEN", int),
                      "mse": ("QUANTIZER_MSE", parse_bool)}
        values, quant = {}, {"num_seqs": 8}
        model = env.get("QUANTIZER_MODEL") or env.get("ENGINE_MODEL")
        if model:
            values["model"] = model
        if env.get("QUANTIZER_NUM_SEQS") and not env.get("QUANTIZER_NUM_CALIB_SEQS"):
            quant["num_seqs"] = _cast("QUANTIZER_NUM_SEQS", env["QUANTIZER_NUM_SEQS"], int)
        for target, table in ((values, plain), (quant, quant_vars)):
            for field_name, (var, cast) in table.items():
                if env.get(var):
                    target[field_name] = _cast(var, env[var], cast)
        values["quant"] = QuantConfig(**quant)
        values.update(overrides)
        return cls(**values)


def _cast(var: str, raw: str, cast):
    try:
        return cast(raw)
    except ValueError:
        raise QuantConfigError(f"{var}={raw!r} is not a valid "
                               f"{'boolean' if cast is parse_bool else cast.__name__}") from None
