"""env_values: role-prefixed variables → typed dataclass fields, with clear errors."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from services.common.env_config import env_values


@dataclass(frozen=True)
class _Config:
    port: int = 1
    ratio: float = 0.5
    name: str = "x"
    is_on: bool = False
    redis_url: str = ""


@pytest.mark.parametrize("env,expected", [
    ({}, {}),
    ({"ROLE_PORT": "0x10"}, {"port": 16}),
    ({"ROLE_RATIO": "2.5", "ROLE_NAME": "y"}, {"ratio": 2.5, "name": "y"}),
    ({"ROLE_IS_ON": "true"}, {"is_on": True}),
    ({"ROLE_IS_ON": "0"}, {"is_on": False}),
    ({"REDIS_URL": "redis://h:1", "ROLE_REDIS_URL": "ignored"}, {"redis_url": "redis://h:1"}),
    ({"ROLE_PORT": ""}, {}),
    ({"OTHER_PORT": "5"}, {}),
])
def test_env_values(env, expected):
    assert env_values(_Config, "ROLE", env) == expected


@pytest.mark.parametrize("env,needle", [
    ({"ROLE_PORT": "eighty"}, "ROLE_PORT='eighty' is not a valid int"),
    ({"ROLE_IS_ON": "maybe"}, "ROLE_IS_ON='maybe' is not a valid bool"),
])
def test_bad_values_name_the_variable(env, needle):
    with pytest.raises(ValueError, match=needle):
        env_values(_Config, "ROLE", env)
