"""The asyncio httpx transport and client: the twin of ``_transport`` on an
:class:`etcdisco.AsyncClient`'s loop, with the same route, pick and retry decisions.

Each service's discovery cache is opened on the transport's first request for it, or
by ``async with`` (httpx's ``AsyncClient.__aenter__`` enters its transports), since
nothing can be awaited in ``__init__``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import httpcore
import httpx

from .._async_client import AsyncClient as EtcdiscoAsyncClient
from .._model import Instance
from .._routing import DEFAULT_RETRY_BUDGET, Attempt, Outcome, RetryBudget, SubChannel
from ..balancing import Picker
from ..outlier import OutlierDetector
from ._httpx import (
    AsyncBody,
    AsyncPinnedBackend,
    HttpxNoInstanceError,
    PoolOptions,
    core_request,
    map_error,
    outcome_of_error,
    replayable,
)
from ._options import DEFAULT_FAILURE_STATUSES, DEFAULT_IDEMPOTENT_METHODS, HashKey, settings
from ._route import AsyncRoutes, ConnectionPoolInfo, Route, build_routes
from ._transport import DEFAULT_LIMITS

log = logging.getLogger("etcdisco.http")


class _Opener:
    """Opens the per-instance connection pools of a route, and closes them on tasks it
    owns (a pool closes asynchronously; a retired one closes from a response's
    ``aclose``)."""

    def __init__(self, options: PoolOptions) -> None:
        self._options = options
        self._closing: set[asyncio.Task[None]] = set()

    def open(self, address: str) -> httpcore.AsyncConnectionPool:
        return httpcore.AsyncConnectionPool(
            network_backend=AsyncPinnedBackend(address), **self._options.pool_kwargs()
        )

    def watch(self, sub: SubChannel[httpcore.AsyncConnectionPool]) -> None:
        return None

    def close(self, sub: SubChannel[httpcore.AsyncConnectionPool]) -> None:
        task = asyncio.get_running_loop().create_task(self._close(sub))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close(self, sub: SubChannel[httpcore.AsyncConnectionPool]) -> None:
        try:
            await sub.channel.aclose()
        except Exception:
            log.exception("closing the connection pool of %s failed", sub.instance.address)

    async def wait_closed(self) -> None:
        while self._closing:
            await asyncio.gather(*list(self._closing), return_exceptions=True)


class AsyncTransport(httpx.AsyncBaseTransport):
    """An httpx async transport that sends requests for the given services to their
    live instances, and every other host to ``fallback``.

    ``source`` is an :class:`etcdisco.AsyncClient`; use it on that client's loop. The
    other arguments are those of :class:`etcdisco.http.Transport`. Mount it with
    :meth:`mounts`, or use :class:`etcdisco.http.AsyncClient`, which does.
    """

    def __init__(
        self,
        source: EtcdiscoAsyncClient,
        services: Iterable[str] | Mapping[str, str],
        policy: str | Picker = "round_robin",
        *,
        policy_options: Mapping[str, Any] | None = None,
        idempotent: bool | Iterable[str] = DEFAULT_IDEMPOTENT_METHODS,
        failure_statuses: Iterable[int] = DEFAULT_FAILURE_STATUSES,
        max_attempts: int = 3,
        retry_budget: RetryBudget | None = DEFAULT_RETRY_BUDGET,
        outlier: OutlierDetector | bool = True,
        server_name: str | None = None,
        host_header: str | None = None,
        hash_header: str | None = None,
        hash_key: HashKey | None = None,
        ready_timeout: float | None = 10.0,
        verify: Any = True,
        cert: Any = None,
        trust_env: bool = True,
        http1: bool = True,
        http2: bool = False,
        limits: httpx.Limits = DEFAULT_LIMITS,
        fallback: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        config = settings(
            services,
            idempotent=idempotent,
            failure_statuses=failure_statuses,
            max_attempts=max_attempts,
            retry_budget=retry_budget,
            server_name=server_name,
            host_header=host_header,
            hash_header=hash_header,
            hash_key=hash_key,
            ready_timeout=ready_timeout,
        )
        self._options = PoolOptions(
            verify=verify, cert=cert, trust_env=trust_env, http1=http1, http2=http2, limits=limits
        )
        self._opener = _Opener(self._options)
        routes: dict[str, Route[httpcore.AsyncConnectionPool]] = build_routes(
            config, policy, policy_options, outlier, lambda host, service: self._opener
        )
        self._routes = AsyncRoutes(source, routes)
        self._by_host = self._routes.by_host
        self._fallback = fallback

    # -- what it serves ------------------------------------------------------------

    @property
    def hosts(self) -> tuple[str, ...]:
        """The URL hosts routed to services."""
        return tuple(self._routes.routes)

    def mounts(self) -> dict[str, httpx.AsyncBaseTransport]:
        """``{"all://users": self, ...}``: httpx's ``mounts=`` for the service hosts."""
        return {f"all://{host}": self for host in self._routes.routes}

    def instances(self, host: str) -> tuple[Instance, ...]:
        """The instances of ``host``'s service that have a connection pool."""
        return self._routes.routes[host].pool.instances()

    def pools(self, host: str | None = None) -> tuple[ConnectionPoolInfo, ...]:
        """Every open per-instance connection pool, retired ones included."""
        routes = self._routes.routes
        chosen = routes.values() if host is None else [routes[host]]
        return tuple(info for route in chosen for info in route.info())

    def route(self, host: str) -> Route[httpcore.AsyncConnectionPool]:
        """The route of ``host`` (read, do not drive)."""
        return self._routes.routes[host]

    async def start(self) -> None:
        """Open every service's discovery cache now (without waiting for etcd)."""
        for route in self._routes.routes.values():
            await self._routes.start(route)

    async def __aenter__(self) -> AsyncTransport:
        await self.start()
        return self

    # -- requests ------------------------------------------------------------------

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        route = self._by_host.get(request.url.raw_host)
        if route is None:
            return await self._other_host().handle_async_request(request)
        if not route.ready:
            reason = await self._routes.ensure_ready(route)
            if reason is not None:
                raise HttpxNoInstanceError(route.service, route.why_none(reason), request=request)
        core = core_request(route, request)
        idempotent = route.settings.is_idempotent(request.method, request.headers) and replayable(
            request.stream
        )
        retries = route.retries(
            route.key(request),
            lambda: HttpxNoInstanceError(route.service, route.why_none(), request=request),
        )
        held: tuple[httpcore.Response, Attempt[httpcore.AsyncConnectionPool]] | None = None
        while (attempt := retries.next()) is not None:
            if held is not None:
                await _discard(*held)
                held = None
            try:
                response = await attempt.sub.channel.handle_async_request(core)
            except Exception as exc:
                error = map_error(exc)
                retry = retries.decide(attempt, error, outcome_of_error(error), idempotent)
                attempt.end()
                if retry:
                    log.debug(
                        "%s: %s on %s; trying another",
                        route.service,
                        error,
                        attempt.instance.address,
                    )
                    continue
                if error is exc:
                    raise
                raise error from exc
            except BaseException:
                attempt.end()
                raise
            outcome = route.outcome_of_status(response.status)
            if outcome is Outcome.DONE or not retries.decide(attempt, None, outcome, idempotent):
                return _response(response, attempt)
            held = (response, attempt)
        if held is not None:
            return _response(*held)
        raise retries.exhausted()

    def _other_host(self) -> httpx.AsyncBaseTransport:
        if self._fallback is None:
            self._fallback = self._options.async_fallback()
        return self._fallback

    # -- end -----------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close every connection pool and let go of the discovery caches. Mounted
        under several hosts, httpx closes it once per host: only the first call does
        anything."""
        if self._routes.closed:
            return
        try:
            await self._routes.close()
            await self._opener.wait_closed()
        finally:
            if self._fallback is not None:
                await self._fallback.aclose()

    def __repr__(self) -> str:
        return f"<etcdisco.http.AsyncTransport {', '.join(self.hosts)}>"


def _response(response: httpcore.Response, attempt: Attempt[Any]) -> httpx.Response:
    return httpx.Response(
        status_code=response.status,
        headers=response.headers,
        stream=AsyncBody(response.stream, attempt),
        extensions=response.extensions,
    )


async def _discard(response: httpcore.Response, attempt: Attempt[Any]) -> None:
    try:
        await response.aclose()
    except Exception as exc:
        log.debug("closing a discarded response failed: %s", exc)
    finally:
        attempt.end()


class AsyncClient(httpx.AsyncClient):
    """An ``httpx.AsyncClient`` whose requests to ``services`` go to their live
    instances (through an :class:`AsyncTransport` mounted for their hosts); every
    other host is reached as any ``httpx.AsyncClient`` reaches it.

    >>> async with etcdisco.AsyncClient() as registry:               # doctest: +SKIP
    ...     async with etcdisco.http.AsyncClient(registry, services=["users"]) as http:
    ...         (await http.get("http://users/v1/me")).json()

    The arguments are those of :class:`etcdisco.http.Client`, with an
    :class:`etcdisco.AsyncClient` as ``source``. ``balancer`` is the transport.
    """

    def __init__(
        self,
        source: EtcdiscoAsyncClient,
        services: Iterable[str] | Mapping[str, str],
        policy: str | Picker = "round_robin",
        *,
        policy_options: Mapping[str, Any] | None = None,
        idempotent: bool | Iterable[str] = DEFAULT_IDEMPOTENT_METHODS,
        failure_statuses: Iterable[int] = DEFAULT_FAILURE_STATUSES,
        max_attempts: int = 3,
        retry_budget: RetryBudget | None = DEFAULT_RETRY_BUDGET,
        outlier: OutlierDetector | bool = True,
        server_name: str | None = None,
        host_header: str | None = None,
        hash_header: str | None = None,
        hash_key: HashKey | None = None,
        ready_timeout: float | None = 10.0,
        verify: Any = True,
        cert: Any = None,
        trust_env: bool = True,
        http1: bool = True,
        http2: bool = False,
        limits: httpx.Limits = DEFAULT_LIMITS,
        mounts: Mapping[str, httpx.AsyncBaseTransport | None] | None = None,
        **kwargs: Any,
    ) -> None:
        self.balancer = AsyncTransport(
            source,
            services,
            policy,
            policy_options=policy_options,
            idempotent=idempotent,
            failure_statuses=failure_statuses,
            max_attempts=max_attempts,
            retry_budget=retry_budget,
            outlier=outlier,
            server_name=server_name,
            host_header=host_header,
            hash_header=hash_header,
            hash_key=hash_key,
            ready_timeout=ready_timeout,
            verify=verify,
            cert=cert,
            trust_env=trust_env,
            http1=http1,
            http2=http2,
            limits=limits,
        )
        tls: dict[str, Any] = {"verify": verify}
        if cert is not None:
            tls["cert"] = cert
        super().__init__(
            mounts={**self.balancer.mounts(), **(mounts or {})},
            trust_env=trust_env,
            http1=http1,
            http2=http2,
            limits=limits,
            **tls,
            **kwargs,
        )
