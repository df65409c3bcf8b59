"""Quantization settings shared by every method (one frozen dataclass, validated on creation)."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

METHODS = ("rtn", "gptq", "gptq-mixed", "mlgptq")
AGGREGATIONS = ("max-inv", "max-h", "row-max")
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
    sym: bool = True
    desc_act: bool = False
    damp_percent: float = 0.01
    block_size: int = 128
    method: str = "mlgptq"
    aggregation: str = "max-inv"
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
