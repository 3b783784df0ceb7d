"""The blocking httpx transport and client: ``http://users/...`` reaches a live
instance of service ``users``, through an :class:`etcdisco.Client`.

Per request: the picker chooses an instance among those the shared discovery cache
knows (skipping draining, unhealthy, suspect and ejected ones), the request goes out on
that instance's own connection pool, and the attempt stays counted there (p2c's
in-flight count, the pool's life) until the response is closed. See ``_options`` for
the retry rule, ``_httpx`` for how a request reaches its instance.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping
from typing import Any

import httpcore
import httpx

from .._model import Instance
from .._routing import DEFAULT_RETRY_BUDGET, Attempt, Outcome, RetryBudget, SubChannel
from ..balancing import Picker
from ..outlier import OutlierDetector
from ..sync import Client as EtcdiscoClient
from ._httpx import (
    Body,
    HttpxNoInstanceError,
    PinnedBackend,
    PoolOptions,
    core_request,
    map_error,
    outcome_of_error,
    replayable,
)
from ._options import DEFAULT_FAILURE_STATUSES, DEFAULT_IDEMPOTENT_METHODS, HashKey, settings
from ._route import ConnectionPoolInfo, Route, SyncRoutes, build_routes

log = logging.getLogger("etcdisco.http")

DEFAULT_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20)


class _Opener:
    """Opens and closes the per-instance connection pools of one route."""

    def __init__(self, options: PoolOptions) -> None:
        self._options = options

    def open(self, address: str) -> httpcore.ConnectionPool:
        return httpcore.ConnectionPool(
            network_backend=PinnedBackend(address), **self._options.pool_kwargs()
        )

    def watch(self, sub: SubChannel[httpcore.ConnectionPool]) -> None:
        return None

    def close(self, sub: SubChannel[httpcore.ConnectionPool]) -> None:
        try:
            sub.channel.close()
        except Exception:
            log.exception("closing the connection pool of %s failed", sub.instance.address)


class Transport(httpx.BaseTransport):
    """An httpx transport that sends requests for the given services to their live
    instances, and every other host to ``fallback``.

    ``source``: an :class:`etcdisco.Client`; each service's discovery cache is shared
    with every other transport on it. ``services``: service names (each is its URL
    host: ``http://users/``), or a mapping of URL host to service. Mount it with
    :meth:`mounts` (``httpx.Client(mounts=transport.mounts())``), or use
    :class:`etcdisco.http.Client`, which does.

    Choice: ``policy`` (``round_robin``, ``random``, ``weighted_round_robin``, ``p2c``,
    ``ring_hash``, ``zone_aware``; ``policy_options`` configure it, e.g. ``{"zone":
    "a"}``), with ring hash keyed on the ``hash_header`` request header or on
    ``hash_key(request)``. ``outlier``: True (a detector per service), False, or an
    OutlierDetector.

    Retries (see ``etcdisco.http``): a request that never reached an instance goes to
    another one; one that did, only when it is idempotent (methods in ``idempotent``
    or an ``Idempotency-Key`` header) and failed with a broken connection or one of
    ``failure_statuses``; at most ``max_attempts`` attempts, within ``retry_budget``.

    TLS: certificates are checked against the URL host (the service name), or
    ``server_name`` (``"{service}.internal"``: ``{service}`` and ``{host}`` are
    filled in), which is also the SNI. ``host_header`` replaces the Host header the
    same way. ``verify``, ``cert``, ``trust_env``, ``http1``, ``http2`` and ``limits``
    are httpx's, for each instance's connection pool.

    A request made before the registry answered waits for it up to ``ready_timeout``
    seconds. No instance: :class:`etcdisco.http.HttpxNoInstanceError`, an
    ``httpx.ConnectError`` naming the service.
    """

    def __init__(
        self,
        source: EtcdiscoClient,
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
        fallback: httpx.BaseTransport | None = None,
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
        opener = _Opener(self._options)
        routes: dict[str, Route[httpcore.ConnectionPool]] = build_routes(
            config, policy, policy_options, outlier, lambda host, service: opener
        )
        self._routes = SyncRoutes(source, routes)
        self._by_host = self._routes.by_host
        self._fallback = fallback
        self._fallback_lock = threading.Lock()

    # -- what it serves ------------------------------------------------------------

    @property
    def hosts(self) -> tuple[str, ...]:
        """The URL hosts routed to services."""
        return tuple(self._routes.routes)

    def mounts(self) -> dict[str, httpx.BaseTransport]:
        """``{"all://users": self, ...}``: httpx's ``mounts=`` for the service hosts,
        so that every other host keeps the client's own transport."""
        return {f"all://{host}": self for host in self._routes.routes}

    def instances(self, host: str) -> tuple[Instance, ...]:
        """The instances of ``host``'s service that have a connection pool (draining
        ones included)."""
        return self._routes.routes[host].pool.instances()

    def pools(self, host: str | None = None) -> tuple[ConnectionPoolInfo, ...]:
        """Every open per-instance connection pool (of ``host``'s service, or of all),
        retired ones still finishing requests included."""
        routes = self._routes.routes
        chosen = routes.values() if host is None else [routes[host]]
        return tuple(info for route in chosen for info in route.info())

    def route(self, host: str) -> Route[httpcore.ConnectionPool]:
        """The route of ``host`` (its ``pool``, ``budget``...; read, do not drive)."""
        return self._routes.routes[host]

    # -- requests ------------------------------------------------------------------

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        route = self._by_host.get(request.url.raw_host)
        if route is None:
            return self._other_host().handle_request(request)
        if not route.ready:
            reason = self._routes.ensure_ready(route)
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
        held: tuple[httpcore.Response, Attempt[httpcore.ConnectionPool]] | None = None
        while (attempt := retries.next()) is not None:
            if held is not None:
                _discard(*held)
                held = None
            try:
                response = attempt.sub.channel.handle_request(core)
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
            held = (response, attempt)  # returned if no other instance can be tried
        if held is not None:
            return _response(*held)
        raise retries.exhausted()

    def _other_host(self) -> httpx.BaseTransport:
        fallback = self._fallback
        if fallback is None:
            with self._fallback_lock:
                fallback = self._fallback
                if fallback is None:
                    fallback = self._fallback = self._options.fallback()
        return fallback

    # -- end -----------------------------------------------------------------------

    def close(self) -> None:
        """Close every connection pool and let go of the discovery caches (a request
        still running on a pool may fail). Mounted under several hosts, httpx closes it
        once per host: only the first call does anything."""
        if self._routes.closed:
            return
        try:
            self._routes.close()
        finally:
            if self._fallback is not None:
                self._fallback.close()

    def __repr__(self) -> str:
        return f"<etcdisco.http.Transport {', '.join(self.hosts)}>"


def _response(response: httpcore.Response, attempt: Attempt[Any]) -> httpx.Response:
    return httpx.Response(
        status_code=response.status,
        headers=response.headers,
        stream=Body(response.stream, attempt),  # type: ignore[arg-type]
        extensions=response.extensions,
    )


def _discard(response: httpcore.Response, attempt: Attempt[Any]) -> None:
    """A failure answer given up for another attempt."""
    try:
        response.close()
    except Exception as exc:
        log.debug("closing a discarded response failed: %s", exc)
    finally:
        attempt.end()


class Client(httpx.Client):
    """An ``httpx.Client`` whose requests to ``services`` go to their live instances
    (through a :class:`Transport`, mounted for their hosts); every other host is
    reached as any ``httpx.Client`` reaches it.

    >>> with etcdisco.Client() as registry:                        # doctest: +SKIP
    ...     with etcdisco.http.Client(registry, services=["users"]) as http:
    ...         http.get("http://users/v1/me").json()

    ``source``, ``services``, ``policy`` and the keyword arguments up to
    ``ready_timeout`` are the :class:`Transport`'s; the others are ``httpx.Client``'s
    (``verify``, ``cert``, ``trust_env``, ``http1``, ``http2`` and ``limits`` apply to
    the instances' connection pools too). ``balancer`` is the transport.
    """

    def __init__(
        self,
        source: EtcdiscoClient,
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
        mounts: Mapping[str, httpx.BaseTransport | None] | None = None,
        **kwargs: Any,
    ) -> None:
        self.balancer = Transport(
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
        try:
            super().__init__(
                mounts={**self.balancer.mounts(), **(mounts or {})},
                trust_env=trust_env,
                http1=http1,
                http2=http2,
                limits=limits,
                **tls,
                **kwargs,
            )
        except BaseException:
            self.balancer.close()
            raise
