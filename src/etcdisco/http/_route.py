"""A service as an HTTP transport sees it, whatever the HTTP library.

A :class:`Route` joins one URL host to one service: the ``etcdisco._routing`` pool of
per-instance connection pools (``C``: an httpcore pool, a requests adapter), the
picker and outlier detector behind it, its retry budget, and the names its requests
carry (TLS server name, Host header). :class:`SyncRoutes` and :class:`AsyncRoutes` keep
a transport's routes following the registry through the shared discovery caches
(``_caches``), with an :class:`etcdisco.Client` (``SyncServiceCache.follow``) or an
:class:`etcdisco.AsyncClient` (cache listeners on its loop).

A route is ready once its cache has loaded the first list. A request before that
waits for it, up to ``ready_timeout``, rather than fail for want of instances that
are only not known yet.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .._async_client import AsyncClient
from .._errors import ClosedError, ConfigError, EtcdTimeoutError
from .._model import Instance
from .._routing import Attempt, Budget, Outcome, Pool, Retries, SubChannel, Transport, place
from ..balancing import Picker, picker_from
from ..discovery import CacheState, ServiceCache
from ..outlier import OutlierDetector
from ..sync import Client, SyncServiceCache
from . import _caches
from ._options import HttpSettings

log = logging.getLogger("etcdisco.http")

C = TypeVar("C")


@dataclass(frozen=True)
class ConnectionPoolInfo:
    """One instance's connection pool, as a transport reports it (for inspection,
    tests and metrics)."""

    service: str
    key: str
    address: str
    in_flight: int
    """Requests placed on it whose response has not been closed yet."""
    retired: bool
    """Its instance left the registry: no new request goes there, and the pool closes
    once ``in_flight`` reaches 0."""


class Route(Generic[C]):
    """One URL host of a transport and the service behind it."""

    def __init__(
        self,
        host: str,
        service: str,
        settings: HttpSettings,
        picker: Picker,
        outlier: OutlierDetector | None,
        opener: Transport[C],
    ) -> None:
        self.host = host
        self.service = service
        self.settings = settings
        self.pool: Pool[C] = Pool(service, picker, outlier, opener)
        self.budget = Budget(settings.retry_budget) if settings.retry_budget is not None else None
        self.server_name = settings.name_for(settings.server_name, host, service)
        self.host_header = settings.name_for(settings.host_header, host, service)
        self.ready = False
        self.cache: Any = None  # the shared SyncServiceCache or ServiceCache
        self._place = functools.partial(place, self.pool)

    def key(self, request: Any) -> str | None:
        """The request's ring hash key (None without hash_header or hash_key)."""
        settings = self.settings
        if settings.hash_header is not None:
            value = request.headers.get(settings.hash_header)
            return None if value is None else str(value)
        if settings.hash_key is not None:
            return settings.hash_key(request)
        return None

    def retries(
        self, key: str | None, no_instance: Callable[[], BaseException]
    ) -> Retries[Attempt[C]]:
        return Retries(
            self._place,
            key,
            max_attempts=self.settings.max_attempts,
            deadline=None,
            no_instance=no_instance,
            budget=self.budget,
        )

    def outcome_of_status(self, status: int) -> Outcome:
        return self.settings.outcome_of_status(status)

    def on_snapshot(self, instances: tuple[Instance, ...]) -> None:
        self.pool.update(instances)

    def why_none(self, not_ready: str | None = None) -> str:
        """Why no instance could take a request, for the error message."""
        service = self.service
        if not_ready is not None:
            return f"no instance of service {service!r} is known: {not_ready}"
        known = self.pool.instances()
        if not known:
            return f"no instance of service {service!r} is registered"
        outlier = self.pool.outlier
        ejected = sum(1 for i in known if outlier is not None and outlier.is_ejected(i.key))
        return (
            f"no available instance of service {service!r}: {len(known)} registered, none "
            f"up (draining, unhealthy or failing){f'; {ejected} ejected' if ejected else ''}"
        )

    def info(self) -> tuple[ConnectionPoolInfo, ...]:
        return tuple(_info(self.service, s) for s in self.pool.subchannels())


def _info(service: str, sub: SubChannel[Any]) -> ConnectionPoolInfo:
    return ConnectionPoolInfo(
        service, sub.instance.key, sub.instance.address, sub.in_flight, sub.retired
    )


def build_routes(
    settings: HttpSettings,
    policy: str | Picker,
    policy_options: Mapping[str, Any] | None,
    outlier: OutlierDetector | bool,
    opener: Callable[[str, str], Transport[C]],
) -> dict[str, Route[C]]:
    """One route per configured host: a picker of its own for each (a policy name
    makes one per service), and an outlier detector of its own unless one is given
    (an object is shared). ``opener(host, service)`` gives each route's transport."""
    options = dict(policy_options or {})
    if not isinstance(policy, str) and len(settings.hosts) > 1:
        raise ConfigError(
            "a picker object serves one service: give a policy name (and policy_options) "
            "for several, or one transport per service"
        )
    if outlier is not True and outlier is not False and not isinstance(outlier, OutlierDetector):
        raise ConfigError(f"outlier must be True, False or an OutlierDetector, not {outlier!r}")
    routes: dict[str, Route[C]] = {}
    for host, service in settings.hosts:
        picker = picker_from(policy, options, "policy")
        detector = OutlierDetector() if outlier is True else outlier or None
        routes[host] = Route(host, service, settings, picker, detector, opener(host, service))
    return routes


class SyncRoutes(Generic[C]):
    """A sync transport's routes, following the registry through an etcdisco.Client."""

    def __init__(self, client: Client, routes: dict[str, Route[C]]) -> None:
        if not isinstance(client, Client):
            raise ConfigError(
                "takes an etcdisco.Client (an etcdisco.AsyncClient goes with the async "
                f"transport), not {type(client).__name__}"
            )
        self.client = client
        self.routes = routes
        self.by_host = {route.host.encode("ascii"): route for route in routes.values()}
        self.closed = False
        opened: list[Route[C]] = []
        try:
            for route in routes.values():
                route.cache = _caches.acquire_sync(client, route.service)
                opened.append(route)
                # Read before following: the snapshot follow() applies is at least that
                # recent. (Read after, the list could land in between, its snapshot
                # still on its way to the callback thread.)
                listed = route.cache.state is not CacheState.CONNECTING
                # The first snapshot is applied before this returns, later ones on the
                # client's callback thread.
                route.cache.follow(route.on_snapshot)
                route.ready = listed
        except BaseException:
            self._release(opened)
            raise

    def ensure_ready(self, route: Route[C]) -> str | None:
        """Wait for the route's first list; None once it is there, else why not."""
        cache: SyncServiceCache = route.cache
        try:
            cache.wait_ready(route.settings.ready_timeout)
        except EtcdTimeoutError as exc:
            return f"the registry did not answer ({exc})"
        except ClosedError:
            return "the etcdisco client is closed"
        # The list's own snapshot reaches on_snapshot on the callback thread, maybe
        # after this request: apply the current one now (later ones follow in order).
        route.pool.update(cache.instances())
        route.ready = True
        return None

    def _release(self, routes: list[Route[C]]) -> None:
        for route in routes:
            cache: SyncServiceCache = route.cache
            if not self.client.closed:
                cache.remove_listener(route.on_snapshot)
            _caches.release_sync(self.client, route.service)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self._release(list(self.routes.values()))
        finally:
            for route in self.routes.values():
                route.pool.close()


class AsyncRoutes(Generic[C]):
    """An async transport's routes, following the registry through an
    etcdisco.AsyncClient, on its loop. Each route opens its cache on first use (or
    at ``start()``): an object cannot await in ``__init__``."""

    def __init__(self, client: AsyncClient, routes: dict[str, Route[C]]) -> None:
        if not isinstance(client, AsyncClient):
            raise ConfigError(
                "takes an etcdisco.AsyncClient (an etcdisco.Client goes with the sync "
                f"transport), not {type(client).__name__}"
            )
        self.client = client
        self.routes = routes
        self.by_host = {route.host.encode("ascii"): route for route in routes.values()}
        self.closed = False
        self._listeners: dict[str, Callable[[Any], None]] = {}

    async def start(self, route: Route[C]) -> None:
        """Open the route's cache and follow it (once; no waiting for etcd)."""
        if route.cache is not None:
            return
        if self.closed:
            raise ClosedError("the HTTP transport is closed")
        cache = await _caches.acquire_async(self.client, route.service)
        if route.cache is not None or self.closed:  # another task was quicker
            await _caches.release_async(self.client, route.service)
            return

        def on_events(_: Any) -> None:
            route.pool.update(cache.instances())

        route.cache = cache
        self._listeners[route.host] = on_events
        cache.add_listener(on_events)
        route.pool.update(cache.instances())
        route.ready = cache.state is not CacheState.CONNECTING

    async def ensure_ready(self, route: Route[C]) -> str | None:
        """Open the route's cache if needed and wait for its first list; None once it
        is there, else why not."""
        await self.start(route)
        cache: ServiceCache | None = route.cache
        if cache is None:
            return "the HTTP transport is closed"
        try:
            await cache.wait_ready(route.settings.ready_timeout)
        except EtcdTimeoutError as exc:
            return f"the registry did not answer ({exc})"
        route.pool.update(cache.instances())
        route.ready = True
        return None

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            for route in self.routes.values():
                cache: ServiceCache | None = route.cache
                if cache is None:
                    continue
                listener = self._listeners.pop(route.host, None)
                if listener is not None:
                    cache.remove_listener(listener)
                await _caches.release_async(self.client, route.service)
        finally:
            for route in self.routes.values():
                route.pool.close()
