"""GatewayConfig.from_env: prefixes, REDIS_URL, validation."""
from __future__ import annotations

import pytest

from services.gateway.config import GatewayConfig


def test_from_env_reads_prefixed_variables():
    config = GatewayConfig.from_env({"GATEWAY_PORT": "6000", "GATEWAY_MAX_QUEUE": "7",
                                     "GATEWAY_PREDICTOR_TIMEOUT_S": "0.5",
                                     "REDIS_URL": "redis://h:1/0", "PORT": "1"})
    assert (config.port, config.max_queue, config.predictor_timeout_s, config.redis_url) == \
        (6000, 7, 0.5, "redis://h:1/0")


@pytest.mark.parametrize("env", [{"GATEWAY_PORT": "x"}, {"GATEWAY_MAX_QUEUE": "0"},
                                 {"GATEWAY_PORT": "70000"}, {"GATEWAY_PREDICTOR_TIMEOUT_S": "0"}])
def test_bad_values_are_rejected(env):
    with pytest.raises(ValueError):
        GatewayConfig.from_env(env)


def test_generate_timeout_must_be_positive_seconds(capsys):
    """`inlaid generate --timeout` takes seconds > 0: zero, negative or words are a usage error (exit 2)."""
    from services.cli import main as cli_main
    for bad in ("0", "-1", "soon"):
        with pytest.raises(SystemExit) as info:
            cli_main(["generate", "--prompt", "x", "--timeout", bad])
        assert info.value.code == 2
        assert "--timeout" in capsys.readouterr().err
