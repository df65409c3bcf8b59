"""Read a frozen config dataclass's fields from role-prefixed environment variables."""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

# Variables shared by the whole stack carry no role prefix.
SHARED_VARS = {"redis_url": "REDIS_URL"}


def env_values(cls: type, prefix: str, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Field values for `cls` from `<PREFIX>_<FIELD>` variables (unset or empty → default).

    A field's type is taken from its default (int accepts 0x.. literals); a value that
    does not parse raises ValueError naming the variable, so bad deploy config fails at
    start-up with a clear message instead of deep inside a service.
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for f in fields(cls):
        name = SHARED_VARS.get(f.name, f"{prefix}_{f.name.upper()}")
        raw = env.get(name)
        if raw is None or raw == "":
            continue
        kind = type(f.default)
        try:
            if kind is bool:
                values[f.name] = parse_bool(raw)
            else:
                values[f.name] = int(raw, 0) if kind is int else kind(raw)
        except ValueError as exc:
            raise ValueError(f"{name}={raw!r} is not a valid {kind.__name__}") from exc
    return values


def parse_bool(raw: str) -> bool:
    """1/true/yes/on or 0/false/no/off (any case); anything else raises ValueError."""
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)
