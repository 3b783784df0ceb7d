"""Channels to etcd's endpoints, failover, auth tokens, and error mapping.

Every unary call goes through :meth:`Connection.call`, which is the one place that
decides on retries: another endpoint after UNAVAILABLE, a fresh token after an
"invalid auth token" (an etcd restart invalidates simple tokens), all within the
call's deadline. Streams ask :meth:`Connection.stream_target` for a channel and
token and report failures back with :meth:`Connection.mark_failed`.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import grpc.aio

from .._errors import (
    AuthError,
    ClosedError,
    CompactedError,
    EtcdError,
    EtcdTimeoutError,
    LeaseNotFoundError,
    UnavailableError,
)
from .._tasks import cancelling
from ._config import EtcdConfig
from ._proto import rpc_pb2, rpc_pb2_grpc

log = logging.getLogger("etcdisco.etcd")

T = TypeVar("T")

# Ping connections with open calls (watch and keepalive streams) so a dead peer is
# noticed without waiting for TCP; etcd's default --grpc-keepalive-min-time is 5 s,
# and faster pings earn a GOAWAY. etcd also refuses pings while no stream is open
# (GOAWAY "too_many_pings"), so an idle client does not ping: its next call's
# deadline finds a dead peer instead.
_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    # Fail fast on a refused connection and let our own loop pick the next endpoint.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    ("grpc.enable_retries", 0),
]

_RETRY_ON_ANOTHER_ENDPOINT = {grpc.StatusCode.UNAVAILABLE}


class ConnectionState(enum.Enum):
    """The client's view of its link to etcd, changed in one place only."""

    IDLE = "idle"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    CLOSED = "closed"


StateListener = Callable[[ConnectionState], None]


class _Endpoint:
    __slots__ = ("address", "auth", "channel", "failed_at", "kv", "lease", "maint", "watch")

    def __init__(self, address: str, channel: grpc.aio.Channel) -> None:
        self.address = address
        self.channel = channel
        self.failed_at = 0.0
        stubs: Any = rpc_pb2_grpc  # generated stubs carry no annotations
        self.kv: Any = stubs.KVStub(channel)
        self.lease: Any = stubs.LeaseStub(channel)
        self.watch: Any = stubs.WatchStub(channel)
        self.auth: Any = stubs.AuthStub(channel)
        self.maint: Any = stubs.MaintenanceStub(channel)


class Connection:
    """Owns one gRPC channel per endpoint and the auth token."""

    def __init__(self, config: EtcdConfig) -> None:
        self.config = config
        self._endpoints: list[_Endpoint] = []
        self._current = 0
        self._token: str | None = None
        self._token_lock = asyncio.Lock()
        self.authentications = 0
        """How many times a token was obtained (a climbing count means re-auth churn)."""
        self._state = ConnectionState.IDLE
        self._listeners: list[StateListener] = []
        credentials: grpc.ChannelCredentials | None = None
        if config.tls is not None:
            ca, key, cert = config.tls.read()
            credentials = grpc.ssl_channel_credentials(ca, key, cert)
        for address in config.endpoints:
            if credentials is None:
                channel = grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
            else:
                channel = grpc.aio.secure_channel(address, credentials, options=_CHANNEL_OPTIONS)
            self._endpoints.append(_Endpoint(address, channel))

    # -- state -------------------------------------------------------------------

    @property
    def state(self) -> ConnectionState:
        return self._state

    @property
    def token(self) -> str | None:
        """The auth token in use (None without auth, or before the first call). It is a
        credential: never logged, never in a repr."""
        return self._token

    @property
    def closed(self) -> bool:
        return self._state is ConnectionState.CLOSED

    def add_listener(self, listener: StateListener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: StateListener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _set_state(self, state: ConnectionState) -> None:
        if state is self._state or self._state is ConnectionState.CLOSED:
            return
        old, self._state = self._state, state
        log.info("etcd connection %s -> %s", old.value, state.value)
        for listener in list(self._listeners):
            try:
                listener(state)
            except Exception:
                log.exception("connection state listener failed")

    def note_success(self) -> None:
        self._set_state(ConnectionState.CONNECTED)

    def note_failure(self) -> None:
        self._set_state(ConnectionState.DISCONNECTED)

    # -- endpoints ---------------------------------------------------------------

    def _pick(self) -> _Endpoint:
        return self._endpoints[self._current]

    def mark_failed(self, endpoint: _Endpoint) -> None:
        """Move on to the next endpoint after ``endpoint`` failed."""
        endpoint.failed_at = time.monotonic()
        if self._endpoints[self._current] is endpoint and len(self._endpoints) > 1:
            self._current = (self._current + 1) % len(self._endpoints)
            log.debug("etcd endpoint %s failed; next is %s", endpoint.address, self._pick().address)

    @property
    def endpoint_addresses(self) -> tuple[str, ...]:
        return tuple(ep.address for ep in self._endpoints)

    # -- auth --------------------------------------------------------------------

    async def _metadata(self, endpoint: _Endpoint, timeout: float) -> list[tuple[str, str]]:
        """Call metadata for ``endpoint``, authenticating on it first when no token is
        held. Raises grpc's own error, so that the caller's failover treats a member
        that cannot authenticate like one that cannot serve the call."""
        if self.config.username is None:
            return []
        if self._token is None:
            await self._authenticate(endpoint, timeout)
        assert self._token is not None
        return [("token", self._token)]

    async def _authenticate(self, endpoint: _Endpoint, timeout: float) -> None:
        stale = self._token
        async with self._token_lock:
            if self._token is not None and self._token != stale:
                return  # another task refreshed it while we waited
            request = rpc_pb2.AuthenticateRequest(
                name=self.config.username or "", password=self.config.password or ""
            )
            response = await endpoint.auth.Authenticate(request, timeout=max(timeout, 0.05))
            self.authentications += 1
            self._token = response.token

    def _invalidate_token(self, token: str | None) -> None:
        if token is not None and self._token == token:
            self._token = None

    # -- calls -------------------------------------------------------------------

    async def call(
        self,
        method: Callable[[_Endpoint], Callable[..., Awaitable[T]]],
        request: Any,
        *,
        timeout: float | None = None,
    ) -> T:
        """Run one unary call with failover, re-authentication and a deadline."""

        async def attempt(endpoint: _Endpoint, attempt_timeout: float) -> T:
            metadata = await self._metadata(endpoint, attempt_timeout)
            return await method(endpoint)(
                request, timeout=attempt_timeout, metadata=metadata or None
            )

        return await self._failover(attempt, timeout)

    async def _failover(
        self, attempt: Callable[[_Endpoint, float], Awaitable[T]], timeout: float | None
    ) -> T:
        """Run ``attempt(endpoint, attempt_timeout)`` on one endpoint after another
        until one answers or the deadline passes: another endpoint after UNAVAILABLE
        (or, with spares, a deadline: a stalled member answers nothing), a fresh token
        after "invalid auth token". Authentication happens inside the attempt, so a
        dead or stalled member never locks a client out while another one answers."""
        if self._state is ConnectionState.CLOSED:
            raise ClosedError("etcd client is closed")
        budget = self.config.timeout if timeout is None else timeout
        deadline = time.monotonic() + budget
        attempts = 0
        reauthenticated = False
        last_error: grpc.aio.AioRpcError | None = None
        tried: list[str] = []
        n = len(self._endpoints)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            endpoint = self._pick()
            if endpoint.address not in tried:
                tried.append(endpoint.address)
            # With spare endpoints, do not spend the whole budget on one that hangs.
            attempt_timeout = remaining if n == 1 else max(min(remaining, 1.0), remaining / 2)
            token = self._token
            try:
                result = await attempt(endpoint, attempt_timeout)
            except asyncio.CancelledError:
                if cancelling():
                    raise
                # The call was cancelled under us: its channel closed (close()).
                if self.closed:
                    raise ClosedError("etcd client is closed") from None
                raise UnavailableError("etcd call was cancelled", tuple(tried)) from None
            except grpc.aio.AioRpcError as exc:
                last_error = exc
                code = exc.code()
                if _is_invalid_token(exc) and not reauthenticated:
                    reauthenticated = True
                    # None before the attempt: the attempt itself authenticated.
                    self._invalidate_token(token if token is not None else self._token)
                    continue
                if code in _RETRY_ON_ANOTHER_ENDPOINT or (
                    code == grpc.StatusCode.DEADLINE_EXCEEDED and n > 1
                ):
                    attempts += 1
                    self.mark_failed(endpoint)
                    if attempts % n == 0:
                        self.note_failure()
                        # A whole round failed: wait a little before the next round.
                        await asyncio.sleep(min(0.05 * attempts, 0.5, max(remaining, 0.0)))
                    continue
                if code not in (grpc.StatusCode.DEADLINE_EXCEEDED,):
                    self.note_success()  # etcd answered, even if with an error
                raise map_error(exc, tuple(tried)) from None
            self.note_success()
            return result
        self.note_failure()
        if last_error is None:
            raise EtcdTimeoutError(f"etcd call timed out after {budget:.1f}s")
        raise map_error(last_error, tuple(tried), timed_out=True) from None

    async def stream_target(
        self, timeout: float | None = None
    ) -> tuple[_Endpoint, list[tuple[str, str]]]:
        """The endpoint and call metadata a new stream should use: the current
        endpoint, or the next one that can authenticate (with the same failover as a
        unary call)."""

        async def attempt(
            endpoint: _Endpoint, attempt_timeout: float
        ) -> tuple[_Endpoint, list[tuple[str, str]]]:
            return endpoint, await self._metadata(endpoint, attempt_timeout)

        return await self._failover(attempt, timeout)

    def stream_failed(
        self, endpoint: _Endpoint, exc: BaseException, token_used: str | None
    ) -> None:
        """Bookkeeping after a stream broke, so the next attempt can do better."""
        # etcd reports a stale token on a stream as an RPC error or, on a watch, as a
        # cancel reason: "invalid auth token" (3.4) or "permission denied" (3.5 watch
        # after a restart). Either way the next attempt authenticates again.
        text = (exc.details() or "") if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
        if "invalid auth token" in text or "permission denied" in text:
            self._invalidate_token(token_used)
            return
        if isinstance(exc, grpc.aio.AioRpcError):
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                self.mark_failed(endpoint)
                self.note_failure()
        elif isinstance(exc, (UnavailableError, EtcdTimeoutError)):
            self.mark_failed(endpoint)
            self.note_failure()

    async def close(self) -> None:
        self._set_state(ConnectionState.CLOSED)
        await asyncio.gather(*(ep.channel.close(None) for ep in self._endpoints))


def _is_invalid_token(exc: grpc.aio.AioRpcError) -> bool:
    details = exc.details() or ""
    return "invalid auth token" in details or (
        exc.code() == grpc.StatusCode.UNAUTHENTICATED and "token" in details
    )


# etcd 3.4 refuses a missing client certificate only after the TLS 1.3 handshake, so
# gRPC reports a corrupt frame instead of naming the certificate.
_TLS_FAILURE_MARKERS = ("TSI_DATA_CORRUPTED", "CERTIFICATE", "Tls handshake failed", "SSL")
_TLS_HINT = (
    "a TLS failure: does etcd require a client certificate (--cert/--key), "
    "and does --cacert sign etcd's certificate?"
)


def map_error(
    exc: grpc.aio.AioRpcError, endpoints: tuple[str, ...] = (), *, timed_out: bool = False
) -> EtcdError:
    """Turn a gRPC error from etcd into etcdisco's typed exception."""
    code = exc.code()
    details = exc.details() or code.name
    if "lease not found" in details:
        return LeaseNotFoundError(0)
    if "required revision has been compacted" in details:
        return CompactedError(0)
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED) or (
        "authentication failed" in details or "permission denied" in details
    ):
        return AuthError(f"etcd refused: {details}")
    # etcd's own deadline (no quorum to commit in time) comes back as UNKNOWN.
    if code == grpc.StatusCode.DEADLINE_EXCEEDED or "context deadline exceeded" in details:
        return EtcdTimeoutError(
            f"etcd call timed out ({details}); endpoints: {', '.join(endpoints)}"
        )
    if code == grpc.StatusCode.UNAVAILABLE or timed_out:
        if any(marker in details for marker in _TLS_FAILURE_MARKERS):
            details += f" ({_TLS_HINT})"
        return UnavailableError(f"etcd unavailable: {details}", endpoints)
    return EtcdError(f"etcd error {code.name}: {details}")
