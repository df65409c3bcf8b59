"""GatewayConfig: the gateway's settings in one frozen dataclass, built from GATEWAY_* variables."""
from __future__ import annotations

from dataclasses import dataclass

from services.common.env_config import env_values


@dataclass(frozen=True)
class GatewayConfig:
    """Gateway settings. `redis_url` "" means embedded Redis; `predictor_addr` /
    `quantizer_addr` "" mean no predictor (no length prediction) / no quantizer."""

    host: str = "0.0.0.0"
    port: int = 50051
    model: str = "smollm2-135m"            # tokenizer, chat template and context length
    redis_url: str = ""                    # REDIS_URL (no GATEWAY_ prefix: shared by the stack)
    redis_namespace: str = "inlaid"
    pool: str = "default"                  # request stream the engines of this pool read
    max_queue: int = 1024                  # queued + running requests before RESOURCE_EXHAUSTED
    retry_after_s: float = 1.0             # back-off hint sent with RESOURCE_EXHAUSTED
    max_streams: int = 4096                # open Generate + Resume streams per gateway
    max_tokens_limit: int = 4096           # largest max_tokens a request may ask for
    max_model_len: int = 0                 # prompt + output; 0 → the model's max positions
    max_prompt_chars: int = 1_000_000
    max_stop_strings: int = 16
    max_stop_chars: int = 256
    max_lora_rank: int = 64                # AddTask rejects larger adapters (ENGINE_MAX_LORA_RANK)
    predictor_addr: str = ""
    predictor_timeout_s: float = 0.1       # a slow predictor must never hold a request up
    quantizer_addr: str = ""
    quantizer_timeout_s: float = 5.0
    read_block_ms: int = 1000              # XREAD BLOCK per poll of an output stream
    grace_s: float = 5.0                   # SIGTERM: time for streams in flight to finish

    def __post_init__(self) -> None:
        for name in ("max_queue", "max_streams", "max_tokens_limit", "max_prompt_chars", "max_lora_rank",
                     "read_block_ms"):
            if getattr(self, name) <= 0:
                raise ValueError(f"GATEWAY_{name.upper()} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"GATEWAY_PORT must be in 0..65535, got {self.port}")
        for name in ("max_model_len", "max_stop_strings", "max_stop_chars"):
            if getattr(self, name) < 0:
                raise ValueError(f"GATEWAY_{name.upper()} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.retry_after_s < float("inf"):
            raise ValueError(f"GATEWAY_RETRY_AFTER_S must be > 0, got {self.retry_after_s}")
        if self.predictor_timeout_s <= 0 or self.quantizer_timeout_s <= 0:
            raise ValueError("peer timeouts must be > 0")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides) -> GatewayConfig:
        """Build from GATEWAY_<FIELD> variables (REDIS_URL for redis_url); overrides win."""
        return cls(**{**env_values(cls, "GATEWAY", env), **overrides})
