"""API-key authentication for gRPC servers: keys map to tenants (and admin rights), enforced by an interceptor."""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import inspect
import logging
import os
import re
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import yaml

from services.common.logging import bind_log_context

# Health checks and reflection must work without a key: kubelet and load balancers have none.
DEFAULT_PUBLIC_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
_DIGEST_RE = re.compile(r"^sha256:([0-9a-f]{64})$")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant a key belongs to, and whether it may manage tasks of any tenant."""

    tenant: str
    is_admin: bool = False


# With auth disabled (local `inlaid serve`) there is one user who may do everything;
# tenant "" means "no tenancy".
LOCAL_PRINCIPAL = Principal(tenant="", is_admin=True)

# A contextvar, not a global: every gRPC call runs in its own asyncio task (own context copy).
_PRINCIPAL: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "inlaid_principal", default=None)


def current_principal() -> Principal | None:
    """The caller of the gRPC method being served (None outside an intercepted call)."""
    return _PRINCIPAL.get()


def current_tenant() -> str:
    """The caller's tenant; "" when auth is disabled or outside a call."""
    principal = _PRINCIPAL.get()
    return principal.tenant if principal is not None else ""


class AuthConfigError(ValueError):
    """The API-key configuration cannot be used; the message says why."""


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeyStore:
    """API key → Principal. Keys are held only as SHA-256 digests.

    Source format (JSON or YAML), one entry per key:
        {"<key>": {"tenant": "acme", "is_admin": false}, "sha256:<hex digest>": {"tenant": "ops",
         "is_admin": true}, "<key>": "acme"}   # a bare string is the tenant, not admin
    """

    def __init__(self, principals_by_digest: Mapping[str, Principal]) -> None:
        self._by_digest = dict(principals_by_digest)

    def __len__(self) -> int:
        return len(self._by_digest)

    @classmethod
    def from_mapping(cls, data: Any, source: str = "api keys") -> "ApiKeyStore":
        if not isinstance(data, Mapping):
            raise AuthConfigError(f"{source}: expected a mapping of key -> {{tenant, is_admin}}")
        by_digest: dict[str, Principal] = {}
        for key, entry in data.items():
            if not isinstance(key, str) or not key.strip():
                raise AuthConfigError(f"{source}: keys must be non-empty strings, got {key!r}")
            match = _DIGEST_RE.match(key)
            digest = match.group(1) if match else _digest(key)
            label = f"{source}: entry {key[:12] if match else '#' + str(len(by_digest) + 1)}"
            if isinstance(entry, str):
                entry = {"tenant": entry}
            if not isinstance(entry, Mapping):
                raise AuthConfigError(f"{label}: expected {{tenant, is_admin}} or a tenant string")
            unknown = set(entry) - {"tenant", "is_admin"}
            if unknown:
                raise AuthConfigError(f"{label}: unknown fields {sorted(unknown)}")
            tenant, is_admin = entry.get("tenant"), entry.get("is_admin", False)
            if not isinstance(tenant, str) or not tenant:
                raise AuthConfigError(f"{label}: 'tenant' must be a non-empty string")
            if not isinstance(is_admin, bool):
                raise AuthConfigError(f"{label}: 'is_admin' must be true or false")
            if digest in by_digest:
                raise AuthConfigError(f"{label}: duplicate key")
            by_digest[digest] = Principal(tenant=tenant, is_admin=is_admin)
        return cls(by_digest)

    @classmethod
    def parse(cls, text: str, source: str = "api keys") -> "ApiKeyStore":
        """Parse JSON or YAML text (JSON is valid YAML, so one parser reads both)."""
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise AuthConfigError(f"{source}: not valid JSON/YAML: {exc}") from exc
        return cls.from_mapping(data if data is not None else {}, source)

    @classmethod
    def load(cls, path: str | Path) -> "ApiKeyStore":
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise AuthConfigError(f"cannot read API key file {path}: {exc}") from exc
        return cls.parse(text, source=str(path))

    def merged(self, other: "ApiKeyStore") -> "ApiKeyStore":
        """Union of two stores; a key present in both is a configuration error."""
        clash = self._by_digest.keys() & other._by_digest.keys()
        if clash:
            raise AuthConfigError("the same API key is configured twice (env and file)")
        return ApiKeyStore({**self._by_digest, **other._by_digest})

    def lookup(self, key: str) -> Principal | None:
        return self._by_digest.get(_digest(key))


@dataclass(frozen=True)
class AuthConfig:
    """INLAID_AUTH_ENABLED (default false), INLAID_API_KEYS (inline JSON/YAML), INLAID_API_KEYS_FILE."""

    is_enabled: bool = False
    api_keys: str | None = None
    api_keys_file: Path | None = None

    def __post_init__(self) -> None:
        if self.is_enabled and not self.api_keys and self.api_keys_file is None:
            raise AuthConfigError("auth is enabled but no keys are configured: set INLAID_API_KEYS "
                                  "or INLAID_API_KEYS_FILE (or INLAID_AUTH_ENABLED=false)")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "AuthConfig":
        env = os.environ if env is None else env
        raw = env.get("INLAID_AUTH_ENABLED", "").strip().lower()
        if raw not in _TRUE + _FALSE:
            raise AuthConfigError(f"INLAID_AUTH_ENABLED must be true or false, got {raw!r}")
        keys_file = env.get("INLAID_API_KEYS_FILE", "").strip()
        return cls(is_enabled=raw in _TRUE, api_keys=env.get("INLAID_API_KEYS") or None,
                   api_keys_file=Path(keys_file) if keys_file else None)

    def load_store(self) -> ApiKeyStore:
        store = ApiKeyStore({})
        if self.api_keys:
            store = store.merged(ApiKeyStore.parse(self.api_keys, source="INLAID_API_KEYS"))
        if self.api_keys_file is not None:
            store = store.merged(ApiKeyStore.load(self.api_keys_file))
        if self.is_enabled and len(store) == 0:
            raise AuthConfigError("auth is enabled but the configured key sources hold no keys")
        return store


def extract_api_key(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The key from `authorization: Bearer <key>` or `x-api-key: <key>`; None when absent or malformed."""
    for name, value in metadata or ():
        name = name.lower()
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if name == "authorization":
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        elif name == "x-api-key" and value.strip():
            return value.strip()
    return None


@contextlib.contextmanager
def _acting_as(principal: Principal) -> Iterator[None]:
    token = _PRINCIPAL.set(principal)
    try:
        with bind_log_context(tenant=principal.tenant or None):
            yield
    finally:
        # An abandoned streaming generator may be finalized from another context; the
        # call's own context dies with its task anyway.
        with contextlib.suppress(ValueError):
            _PRINCIPAL.reset(token)


def _wrap_unary_response(behavior: Callable, principal: Principal) -> Callable:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
        with _acting_as(principal):
            result = behavior(request, context)
            return await result if inspect.isawaitable(result) else result
    return wrapped


def _wrap_stream_response(behavior: Callable, principal: Principal) -> Callable:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
        with _acting_as(principal):
            result = behavior(request, context)
            if inspect.isawaitable(result):  # a coroutine that writes with context.write()
                await result
                return
            if hasattr(result, "__aiter__"):
                async for response in result:
                    yield response
            else:
                for response in result:
                    yield response
    return wrapped


def _replace_behavior(handler: grpc.RpcMethodHandler,
                      make: Callable[[Callable, bool], Callable]) -> grpc.RpcMethodHandler:
    kinds = (("unary_unary", grpc.unary_unary_rpc_method_handler, False),
             ("unary_stream", grpc.unary_stream_rpc_method_handler, True),
             ("stream_unary", grpc.stream_unary_rpc_method_handler, False),
             ("stream_stream", grpc.stream_stream_rpc_method_handler, True))
    for attr, factory, is_stream_response in kinds:
        behavior = getattr(handler, attr)
        if behavior is not None:
            return factory(make(behavior, is_stream_response),
                           request_deserializer=handler.request_deserializer,
                           response_serializer=handler.response_serializer)
    raise TypeError(f"RPC handler {handler!r} has no behavior")


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Reject calls without a known API key (UNAUTHENTICATED); expose the caller via current_principal().

    With is_enabled=False every call runs as LOCAL_PRINCIPAL. Methods starting with one of
    `public_method_prefixes` (health, reflection) need no key.
    """

    def __init__(self, store: ApiKeyStore, is_enabled: bool = True,
                 public_method_prefixes: Iterable[str] = DEFAULT_PUBLIC_METHOD_PREFIXES) -> None:
        if is_enabled and len(store) == 0:
            raise AuthConfigError("AuthInterceptor: auth is enabled with an empty key store")
        self._store = store
        self._is_enabled = is_enabled
        self._public = tuple(public_method_prefixes)
        self._log = logging.getLogger(__name__)

    @classmethod
    def from_config(cls, config: AuthConfig) -> "AuthInterceptor":
        return cls(config.load_store(), is_enabled=config.is_enabled)

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(self._public):
            return handler
        if not self._is_enabled:
            principal: Principal | None = LOCAL_PRINCIPAL
            reason = ""
        else:
            key = extract_api_key(handler_call_details.invocation_metadata)
            principal = self._store.lookup(key) if key is not None else None
            reason = "missing API key" if key is None else "unknown API key"
        if principal is None:
            self._log.warning("rejected call", extra={"method": method, "reason": reason})
            return _replace_behavior(handler, lambda _behavior, _stream: _deny(reason))
        return _replace_behavior(handler, lambda behavior, stream: (
            _wrap_stream_response if stream else _wrap_unary_response)(behavior, principal))


def _deny(reason: str) -> Callable:
    detail = f"{reason}: send 'authorization: Bearer <key>' or 'x-api-key: <key>' metadata"

    # One coroutine serves every handler shape: grpc.aio accepts a coroutine for streaming
    # responses too, and abort() ends the call before any response is read.
    async def deny(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, detail)
    return deny


async def require_admin(context: grpc.aio.ServicerContext) -> Principal:
    """Abort with PERMISSION_DENIED unless the caller holds an admin key (or auth is disabled)."""
    principal = current_principal()
    if principal is None or not principal.is_admin:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "this call needs an admin API key")
    return principal
