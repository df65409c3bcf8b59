"""Request validation: turns a GenerateRequest's parameters into checked engine parameters."""
from __future__ import annotations

import math
import re

from services.common.errors import InvalidArgumentError
from services.common.pb.inlaid.v1 import common_pb2, gateway_pb2
from services.gateway.config import GatewayConfig

_REQUEST_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


def check_request_id(request_id: str) -> None:
    if not _REQUEST_ID.match(request_id):
        raise InvalidArgumentError(
            f"request_id {request_id[:140]!r} is invalid: use 1-128 characters of [A-Za-z0-9_.:-]")


def check_input(request: gateway_pb2.GenerateRequest, config: GatewayConfig) -> None:
    """Exactly one of prompt / messages, non-empty and within the size limit."""
    has_prompt, has_messages = bool(request.prompt), len(request.messages) > 0
    if has_prompt and has_messages:
        raise InvalidArgumentError("set either prompt or messages, not both")
    if not has_prompt and not has_messages:
        raise InvalidArgumentError("empty input: set a non-empty prompt or at least one message")
    if has_messages and not any(m.content for m in request.messages):
        raise InvalidArgumentError("every message has empty content")
    num_chars = len(request.prompt) + sum(len(m.content) for m in request.messages)
    if num_chars > config.max_prompt_chars:
        raise InvalidArgumentError(f"input has {num_chars} characters; the limit is "
                                   f"{config.max_prompt_chars} (GATEWAY_MAX_PROMPT_CHARS)")


def check_params(params: common_pb2.SamplingParams, config: GatewayConfig) -> dict:
    """Validated SamplingParams fields (services.engine.sequence.SamplingParams keywords)."""
    limit = config.max_tokens_limit
    if not 1 <= params.max_tokens <= limit:
        raise InvalidArgumentError(f"params.max_tokens must be in 1..{limit}, got {params.max_tokens}")
    if not math.isfinite(params.temperature) or params.temperature < 0:
        raise InvalidArgumentError(f"params.temperature must be >= 0, got {params.temperature}")
    if not math.isfinite(params.top_p) or not 0 <= params.top_p <= 1:
        raise InvalidArgumentError(f"params.top_p must be in [0, 1] (0 = disabled), got {params.top_p}")
    if params.top_k < 0:
        raise InvalidArgumentError(f"params.top_k must be >= 0 (0 = disabled), got {params.top_k}")
    stops = list(params.stop)
    if len(stops) > config.max_stop_strings:
        raise InvalidArgumentError(f"at most {config.max_stop_strings} stop strings, got {len(stops)}")
    for i, stop in enumerate(stops):
        if not stop:
            raise InvalidArgumentError(f"params.stop[{i}] is empty")
        if len(stop) > config.max_stop_chars:
            raise InvalidArgumentError(f"params.stop[{i}] has {len(stop)} characters; the limit is "
                                       f"{config.max_stop_chars}")
    return dict(max_tokens=params.max_tokens, temperature=float(params.temperature),
                top_p=float(params.top_p) or 1.0, top_k=params.top_k,
                seed=params.seed or None, stop=stops, ignore_eos=params.ignore_eos)


def check_length(num_prompt_tokens: int, max_tokens: int, max_model_len: int) -> None:
    if num_prompt_tokens == 0:
        raise InvalidArgumentError("the input tokenizes to zero tokens")
    if num_prompt_tokens + max_tokens > max_model_len:
        raise InvalidArgumentError(
            f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) = "
            f"{num_prompt_tokens + max_tokens} exceeds the context length {max_model_len}")


def check_quant_settings(request: gateway_pb2.AddTaskRequest) -> None:
    """AddTask's quantization settings, refused before anything is registered. The quantizer
    has the last word (it also refuses settings that differ from the quantized base's)."""
    from services.quantizer.config import SUPPORTED_BITS  # plain constants, no torch

    bits, group_size = request.quant_bits, request.quant_group_size
    if (bits or group_size) and not request.calibration_path:
        raise InvalidArgumentError("quant_bits / quant_group_size need calibration_path: "
                                   "without calibration data the task is not quantized")
    if bits and bits not in SUPPORTED_BITS:
        raise InvalidArgumentError(f"quant_bits={bits} is not supported: use one of "
                                   f"{SUPPORTED_BITS}, or 0 for the current setting")
    if group_size < -1:
        raise InvalidArgumentError(f"quant_group_size={group_size} is not supported: use a "
                                   "positive size (e.g. 128), -1 for one group per row, or 0 "
                                   "for the current setting")
