"""Structured (JSON) logging with per-request context (request id, tenant, task) carried in a contextvar."""
from __future__ import annotations

import contextlib
import contextvars
import datetime as _dt
import json as _json
import logging
import os
import sys
import types
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any

# One contextvar (not a global dict): asyncio copies contexts per task, so each gRPC
# call and everything it spawns sees its own fields and nothing leaks between calls.
# The default is read-only: fields are only ever added by setting a new mapping.
_LOG_CONTEXT: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "inlaid_log_context", default=types.MappingProxyType({}))
# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged.
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message",
                                                                                       "asctime"}
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass(frozen=True)
class LoggingConfig:
    """LOG_LEVEL (default INFO) and LOG_FORMAT ("json" or "text"; default json)."""

    level: str = "INFO"
    is_json: bool = True

    def __post_init__(self) -> None:
        if self.level.upper() not in _LEVELS:
            raise ValueError(f"log level must be one of {_LEVELS}, got {self.level!r}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "LoggingConfig":
        env = os.environ if env is None else env
        fmt = env.get("LOG_FORMAT", "json").strip().lower()
        if fmt not in ("json", "text"):
            raise ValueError(f"LOG_FORMAT must be 'json' or 'text', got {fmt!r}")
        return cls(level=env.get("LOG_LEVEL", cls.level).strip().upper() or cls.level,
                   is_json=fmt == "json")


def new_request_id() -> str:
    """A fresh request id (32 hex chars)."""
    return uuid.uuid4().hex


def log_context() -> Mapping[str, Any]:
    """The fields currently attached to every log line of this context."""
    return _LOG_CONTEXT.get()


def get_request_id() -> str | None:
    return _LOG_CONTEXT.get().get("request_id")


@contextlib.contextmanager
def bind_log_context(**fields: Any) -> Iterator[None]:
    """Attach fields (request_id=..., task=..., tenant=...) to log lines inside the block.

    Nested blocks add to (and may override) the outer fields; a value of None removes one.
    """
    merged = {**_LOG_CONTEXT.get(), **fields}
    token = _LOG_CONTEXT.set({k: v for k, v in merged.items() if v is not None})
    try:
        yield
    finally:
        # A streaming handler's generator abandoned by its client may be closed from another
        # context, where the token is foreign; the call's own context dies with its task.
        with contextlib.suppress(ValueError):
            _LOG_CONTEXT.reset(token)


def set_log_context(**fields: Any) -> None:
    """Like bind_log_context, for the rest of the current context (e.g. a whole gRPC call's task)."""
    merged = {**_LOG_CONTEXT.get(), **fields}
    _LOG_CONTEXT.set({k: v for k, v in merged.items() if v is not None})


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, context fields, `extra=` fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(_LOG_CONTEXT.get())
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # default=str: a stray non-JSON value (a Path, an enum) must not lose the log line.
        return _json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """Human-readable lines for local runs, with the context fields appended as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = dict(_LOG_CONTEXT.get())
        fields.update({k: v for k, v in vars(record).items()
                       if k not in _RECORD_FIELDS and not k.startswith("_")})
        if fields:
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return line


class _InlaidHandler(logging.StreamHandler):
    """Marks the handler setup_logging installed, so a second call replaces it instead of doubling lines."""


def setup_logging(level: str = "INFO", json: bool = True, stream: IO[str] | None = None) -> logging.Handler:
    """Configure the root logger once per process (call from a server's main, never at import).

    Returns the installed handler. Calling again replaces the previous Inlaid handler.
    """
    config = LoggingConfig(level=level, is_json=json)  # validates the level
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _InlaidHandler)]:
        root.removeHandler(handler)
    handler = _InlaidHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if config.is_json else TextFormatter())
    root.addHandler(handler)
    root.setLevel(config.level.upper())
    return handler
