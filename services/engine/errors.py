"""Exceptions the engine raises for bad requests or adapters (mapped to gRPC codes by callers)."""
from __future__ import annotations


class EngineError(Exception):
    """Base of engine-specific errors."""


class InvalidRequestError(EngineError, ValueError):
    """A request that can never be served as given (empty prompt, too long, bad params)."""


class DuplicateRequestError(InvalidRequestError):
    """A request id that is already in the engine."""


class UnknownTaskError(EngineError, KeyError):
    """The request names a task (adapter) the engine does not have."""

    def __init__(self, task: str) -> None:
        super().__init__(task)
        self.task = task

    def __str__(self) -> str:  # KeyError would print the repr of the key only
        return f"unknown task {self.task!r}: no adapter with that name is loaded"


class AdapterInUseError(EngineError, ValueError):
    """An adapter cannot be removed while requests still use it."""


class AdapterCapacityError(EngineError, RuntimeError):
    """A batch needs more distinct adapters than the engine has adapter slots."""
