"""Errors every service raises for bad input or capacity, and their gRPC status codes."""
from __future__ import annotations

import grpc


class InlaidError(Exception):
    """Base of errors meant for clients; `code` is the gRPC status they map to."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgumentError(InlaidError, ValueError):
    """A request parameter is wrong (the message says which and why)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(InlaidError, LookupError):
    """A named thing (task, request) does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(InlaidError):
    """A create call names something that already exists."""

    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDeniedError(InlaidError):
    """The caller is known but may not do this (e.g. change another tenant's task)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhaustedError(InlaidError):
    """A queue or cache is full; the client should back off and retry."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPreconditionError(InlaidError):
    """The system is not in a state that allows the call (e.g. no quantizer configured)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class UnavailableError(InlaidError):
    """A dependency (Redis, a peer service) cannot be reached right now."""

    code = grpc.StatusCode.UNAVAILABLE


def _foreign_codes() -> tuple[tuple[type[BaseException], grpc.StatusCode], ...]:
    """Error types of other layers that carry a client-facing meaning (imported lazily:
    adapters pulls in torch, which a bare gateway test should not pay for at import)."""
    import redis.exceptions

    from services.common.adapters import AdapterError
    from services.engine.errors import (AdapterCapacityError, InvalidRequestError,
                                        UnknownTaskError)
    return ((UnknownTaskError, grpc.StatusCode.NOT_FOUND),
            (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
            (AdapterError, grpc.StatusCode.INVALID_ARGUMENT),
            (AdapterCapacityError, grpc.StatusCode.RESOURCE_EXHAUSTED),
            (redis.exceptions.ConnectionError, grpc.StatusCode.UNAVAILABLE),
            (redis.exceptions.TimeoutError, grpc.StatusCode.UNAVAILABLE))


def status_code_for(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status for an exception; anything unrecognised is INTERNAL."""
    if isinstance(exc, InlaidError):
        return exc.code
    for kind, code in _foreign_codes():
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL
