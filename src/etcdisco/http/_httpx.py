"""What the sync and async httpx transports share.

Each instance gets an httpcore connection pool of its own (httpx's pools), whose
network backend dials that instance whatever the URL says. So a request keeps its URL
(``http://users/v1/me``): httpx's ``Host`` header, the TLS server name (SNI) and the
certificate check all say ``users``, while the bytes go to the picked instance, and no
URL is parsed again on the way (rewriting one costs ~45 us per request here).

Errors come out as httpx's own (``httpx.ConnectError``...), as ``httpx.HTTPTransport``
raises them.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

import httpcore
import httpx

from .._address import parse_address
from .._errors import InvalidAddressError
from .._routing import Attempt, Outcome
from ._errors import NoInstanceError
from ._route import Route

__all__ = [
    "AsyncPinnedBackend",
    "HttpxNoInstanceError",
    "PinnedBackend",
    "PoolOptions",
    "core_request",
    "map_error",
    "outcome_of_error",
    "replayable",
]


class HttpxNoInstanceError(NoInstanceError, httpx.ConnectError):
    """No live instance of ``service`` can take the request (an ``httpx.ConnectError``
    and an ``etcdisco.http.NoInstanceError``)."""

    def __init__(self, service: str, message: str, *, request: httpx.Request | None = None) -> None:
        httpx.ConnectError.__init__(self, message, request=request)
        self.service = service


# httpcore's errors and httpx's, as httpx.HTTPTransport maps them.
_ERRORS: dict[type[Exception], type[httpx.TransportError]] = {
    httpcore.TimeoutException: httpx.TimeoutException,
    httpcore.ConnectTimeout: httpx.ConnectTimeout,
    httpcore.ReadTimeout: httpx.ReadTimeout,
    httpcore.WriteTimeout: httpx.WriteTimeout,
    httpcore.PoolTimeout: httpx.PoolTimeout,
    httpcore.NetworkError: httpx.NetworkError,
    httpcore.ConnectError: httpx.ConnectError,
    httpcore.ReadError: httpx.ReadError,
    httpcore.WriteError: httpx.WriteError,
    httpcore.ProxyError: httpx.ProxyError,
    httpcore.UnsupportedProtocol: httpx.UnsupportedProtocol,
    httpcore.ProtocolError: httpx.ProtocolError,
    httpcore.LocalProtocolError: httpx.LocalProtocolError,
    httpcore.RemoteProtocolError: httpx.RemoteProtocolError,
}


def map_error(exc: Exception) -> Exception:
    """httpx's error for an httpcore one (the most specific); others as they are.
    httpcore 1.0.0-1.0.5 (checked) let a failed TLS handshake out as a bare
    ``ssl.SSLError``: that is a connect error too."""
    for cls in type(exc).__mro__:
        mapped = _ERRORS.get(cls)
        if mapped is not None:
            error = mapped(str(exc))
            error.__cause__ = exc
            return error
    if isinstance(exc, ssl.SSLError):
        connect = httpx.ConnectError(str(exc))
        connect.__cause__ = exc
        return connect
    return exc


def outcome_of_error(exc: BaseException) -> Outcome:
    """An attempt's error, sorted for the retry rule (see ``_options``)."""
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return Outcome.NOT_SENT
    if isinstance(exc, httpx.ReadError | httpx.WriteError | httpx.RemoteProtocolError):
        return Outcome.FAILED
    return Outcome.DONE


def replayable(stream: object) -> bool:
    """Can this request body be sent again? (bytes, text, a form or JSON can; an
    iterator or a multipart upload may not)."""
    return isinstance(stream, httpx.ByteStream)


def core_request(route: Route[Any], request: httpx.Request) -> httpcore.Request:
    """The httpcore request for ``request``: same URL, headers and body (as
    ``httpx.HTTPTransport`` builds it), with the route's TLS server name and Host
    header when it sets them."""
    url = request.url
    headers = request.headers.raw
    if route.host_header is not None:
        host = route.host_header.encode("ascii")
        headers = [(k, host) if k.lower() == b"host" else (k, v) for k, v in headers]
    extensions = request.extensions
    if route.server_name is not None and url.raw_scheme == b"https":
        extensions = {**extensions, "sni_hostname": route.server_name}
    return httpcore.Request(
        method=request.method,
        url=httpcore.URL(
            scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path
        ),
        headers=headers,
        content=request.stream,
        extensions=extensions,
    )


class PoolOptions:
    """How each instance's connection pool is made (httpx.HTTPTransport's options)."""

    def __init__(
        self,
        *,
        verify: ssl.SSLContext | str | bool,
        cert: Any,
        trust_env: bool,
        http1: bool,
        http2: bool,
        limits: httpx.Limits,
    ) -> None:
        # One context for every instance: loading the CA bundle costs milliseconds.
        self.ssl_context = (
            verify
            if isinstance(verify, ssl.SSLContext) and cert is None
            else httpx.create_ssl_context(verify=verify, cert=cert, trust_env=trust_env)
        )
        self.trust_env = trust_env
        self.http1 = http1
        self.http2 = http2
        self.limits = limits

    def pool_kwargs(self) -> dict[str, Any]:
        limits = self.limits
        return {
            "ssl_context": self.ssl_context,
            "max_connections": limits.max_connections,
            "max_keepalive_connections": limits.max_keepalive_connections,
            "keepalive_expiry": limits.keepalive_expiry,
            "http1": self.http1,
            "http2": self.http2,
        }

    def fallback(self) -> httpx.HTTPTransport:
        """The transport for hosts that are not services (httpx's own)."""
        return httpx.HTTPTransport(
            verify=self.ssl_context,
            trust_env=self.trust_env,
            http1=self.http1,
            http2=self.http2,
            limits=self.limits,
        )

    def async_fallback(self) -> httpx.AsyncHTTPTransport:
        return httpx.AsyncHTTPTransport(
            verify=self.ssl_context,
            trust_env=self.trust_env,
            http1=self.http1,
            http2=self.http2,
            limits=self.limits,
        )


def _target(address: str) -> tuple[str, int] | str:
    """The instance's host and port, or why it has none (an address no one can
    dial: it fails like a refused connection, so requests go elsewhere)."""
    try:
        return parse_address(address)
    except InvalidAddressError as exc:
        return str(exc)


class PinnedBackend(httpcore.NetworkBackend):
    """Dials one instance, whatever host and port the request's URL names."""

    def __init__(self, address: str, inner: httpcore.NetworkBackend | None = None) -> None:
        self._target = _target(address)
        self._inner = inner if inner is not None else httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        if isinstance(self._target, str):
            raise httpcore.ConnectError(self._target)
        return self._inner.connect_tcp(
            self._target[0],
            self._target[1],
            timeout=timeout,
            local_address=local_address,
            socket_options=socket_options,
        )

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:  # pragma: no cover - pools are never given a uds
        raise httpcore.ConnectError("instances are reached over TCP")

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class AsyncPinnedBackend(httpcore.AsyncNetworkBackend):
    """The async twin of :class:`PinnedBackend` (anyio: asyncio or trio)."""

    def __init__(self, address: str, inner: httpcore.AsyncNetworkBackend | None = None) -> None:
        self._target = _target(address)
        self._inner = inner if inner is not None else httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        if isinstance(self._target, str):
            raise httpcore.ConnectError(self._target)
        return await self._inner.connect_tcp(
            self._target[0],
            self._target[1],
            timeout=timeout,
            local_address=local_address,
            socket_options=socket_options,
        )

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:  # pragma: no cover - pools are never given a uds
        raise httpcore.ConnectError("instances are reached over TCP")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class Body(httpx.SyncByteStream):
    """A response body read from an instance; its attempt ends when it is closed,
    which is when the request stops counting as in flight there."""

    __slots__ = ("_attempt", "_stream")

    def __init__(self, stream: Iterable[bytes], attempt: Attempt[Any]) -> None:
        self._stream = stream
        self._attempt = attempt

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._stream
        except Exception as exc:
            error = map_error(exc)
            if outcome_of_error(error) is not Outcome.DONE:
                self._attempt.ok = False
            if error is exc:
                raise
            raise error from exc

    def close(self) -> None:
        try:
            close = getattr(self._stream, "close", None)
            if close is not None:
                try:
                    close()
                except Exception as exc:
                    error = map_error(exc)
                    if error is exc:
                        raise
                    raise error from exc
        finally:
            self._attempt.end()


class AsyncBody(httpx.AsyncByteStream):
    """The async twin of :class:`Body`."""

    __slots__ = ("_attempt", "_stream")

    def __init__(self, stream: Any, attempt: Attempt[Any]) -> None:
        self._stream = stream
        self._attempt = attempt

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for part in self._stream:
                yield part
        except Exception as exc:
            error = map_error(exc)
            if outcome_of_error(error) is not Outcome.DONE:
                self._attempt.ok = False
            if error is exc:
                raise
            raise error from exc

    async def aclose(self) -> None:
        try:
            aclose = getattr(self._stream, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception as exc:
                    error = map_error(exc)
                    if error is exc:
                        raise
                    raise error from exc
        finally:
            self._attempt.end()
