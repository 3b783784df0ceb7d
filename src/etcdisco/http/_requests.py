"""The requests adapter: ``session.get("http://users/v1/me")`` reaches a live instance
of service ``users``, through an :class:`etcdisco.Client`, on the same routes, picks
and retry rule as the httpx transports (``_route``, ``_options``).

Each instance gets a ``requests`` adapter of its own (its urllib3 pools), closed once
the instance has left the registry and its last response is closed. A request is sent
to the instance's address with the ``Host`` header of the original URL, and TLS is
checked against the URL host (the service name) or ``server_name``, which is also the
SNI. Hosts that are not services go through the adapter as a plain
``requests.adapters.HTTPAdapter``, untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests
import requests.adapters
import urllib3.exceptions

from .._model import Instance
from .._routing import DEFAULT_RETRY_BUDGET, Attempt, Outcome, RetryBudget, SubChannel
from ..balancing import Picker
from ..outlier import OutlierDetector
from ..sync import Client as EtcdiscoClient
from ._errors import NoInstanceError
from ._options import DEFAULT_FAILURE_STATUSES, DEFAULT_IDEMPOTENT_METHODS, HashKey, settings
from ._route import ConnectionPoolInfo, Route, SyncRoutes, build_routes

log = logging.getLogger("etcdisco.http")


class RequestsNoInstanceError(NoInstanceError, requests.ConnectionError):
    """No live instance of ``service`` can take the request (a
    ``requests.ConnectionError`` and an ``etcdisco.http.NoInstanceError``)."""

    def __init__(
        self, service: str, message: str, *, request: requests.PreparedRequest | None = None
    ) -> None:
        requests.ConnectionError.__init__(self, message, request=request)
        self.service = service


def outcome_of_error(exc: BaseException) -> Outcome:
    """An attempt's error, sorted for the retry rule (see ``_options``)."""
    if isinstance(exc, requests.ConnectTimeout | requests.exceptions.SSLError):
        return Outcome.NOT_SENT
    if isinstance(exc, requests.ConnectionError):
        cause = exc.args[0] if exc.args else None
        if isinstance(cause, urllib3.exceptions.MaxRetryError):
            cause = cause.reason
        if isinstance(
            cause, urllib3.exceptions.ConnectTimeoutError | urllib3.exceptions.ClosedPoolError
        ):
            return Outcome.NOT_SENT  # NewConnectionError (refused) is a ConnectTimeoutError
        return Outcome.FAILED  # "Connection aborted": it may have reached the instance
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return Outcome.FAILED
    return Outcome.DONE


def _replayable(body: object) -> bool:
    return body is None or isinstance(body, bytes | str)


class _InstanceAdapter(requests.adapters.HTTPAdapter):
    """The urllib3 pools of one instance, with TLS checked against the route's name."""

    def __init__(self, address: str, server_name: str, pool_kwargs: dict[str, Any]) -> None:
        self.netloc = address
        self.server_name = server_name
        super().__init__(max_retries=0, **pool_kwargs)

    def init_poolmanager(
        self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any
    ) -> None:
        # urllib3 uses server_hostname for SNI and the certificate check, and drops it
        # for plain http.
        pool_kwargs.setdefault("server_hostname", self.server_name)
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)

    def close(self) -> None:
        # Close the pools themselves: a PoolManager forgets them on clear() but (urllib3
        # 2.8) no longer closes them, which would leave the instance's idle
        # connections open after it left.
        pools = self.poolmanager.pools
        for key in list(pools.keys()):
            pool = pools.get(key)
            if pool is not None:
                pool.close()
        super().close()


class _Opener:
    def __init__(self, server_name: str, pool_kwargs: dict[str, Any]) -> None:
        self._server_name = server_name
        self._pool_kwargs = pool_kwargs

    def open(self, address: str) -> _InstanceAdapter:
        return _InstanceAdapter(address, self._server_name, self._pool_kwargs)

    def watch(self, sub: SubChannel[_InstanceAdapter]) -> None:
        return None

    def close(self, sub: SubChannel[_InstanceAdapter]) -> None:
        try:
            sub.channel.close()
        except Exception:
            log.exception("closing the connection pools of %s failed", sub.instance.address)


class RequestsAdapter(requests.adapters.HTTPAdapter):
    """A ``requests`` transport adapter that sends requests for the given services to
    their live instances, and every other URL as ``HTTPAdapter`` does.

    Mount it for both schemes (or use :class:`etcdisco.http.Session`, which does)::

        adapter = etcdisco.http.RequestsAdapter(registry, services=["users"])
        session.mount("http://", adapter)
        session.mount("https://", adapter)

    ``source`` is an :class:`etcdisco.Client`; the routing arguments are those of
    :class:`etcdisco.http.Transport` (``hash_key`` gets the ``PreparedRequest``);
    ``pool_connections``, ``pool_maxsize`` and ``pool_block`` are ``HTTPAdapter``'s,
    for each instance too. Service requests never go through a proxy. No instance:
    :class:`etcdisco.http.RequestsNoInstanceError`, a ``requests.ConnectionError``
    naming the service.
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
        pool_connections: int = requests.adapters.DEFAULT_POOLSIZE,
        pool_maxsize: int = requests.adapters.DEFAULT_POOLSIZE,
        pool_block: bool = requests.adapters.DEFAULT_POOLBLOCK,
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
        pool_kwargs: dict[str, Any] = {
            "pool_connections": pool_connections,
            "pool_maxsize": pool_maxsize,
            "pool_block": pool_block,
        }
        super().__init__(**pool_kwargs)

        def opener(host: str, service: str) -> _Opener:
            name = config.name_for(config.server_name, host, service)
            return _Opener(name or host, pool_kwargs)

        routes: dict[str, Route[_InstanceAdapter]] = build_routes(
            config, policy, policy_options, outlier, opener
        )
        self._routes = SyncRoutes(source, routes)
        self._by_name = self._routes.routes

    # -- what it serves ------------------------------------------------------------

    @property
    def hosts(self) -> tuple[str, ...]:
        return tuple(self._routes.routes)

    def instances(self, host: str) -> tuple[Instance, ...]:
        return self._routes.routes[host].pool.instances()

    def pools(self, host: str | None = None) -> tuple[ConnectionPoolInfo, ...]:
        routes = self._routes.routes
        chosen = routes.values() if host is None else [routes[host]]
        return tuple(info for route in chosen for info in route.info())

    def route(self, host: str) -> Route[_InstanceAdapter]:
        return self._routes.routes[host]

    # -- requests ------------------------------------------------------------------

    def send(
        self,
        request: requests.PreparedRequest,
        stream: bool = False,
        timeout: Any = None,
        verify: bool | str = True,
        cert: Any = None,
        proxies: dict[str, str] | None = None,
    ) -> requests.Response:
        url = urlsplit(request.url or "")
        route = self._by_name.get(url.hostname or "")
        if route is None:
            return super().send(
                request, stream=stream, timeout=timeout, verify=verify, cert=cert, proxies=proxies
            )
        if not route.ready:
            reason = self._routes.ensure_ready(route)
            if reason is not None:
                raise RequestsNoInstanceError(
                    route.service, route.why_none(reason), request=request
                )
        idempotent = route.settings.is_idempotent(
            request.method or "GET", request.headers
        ) and _replayable(request.body)
        host = route.host_header or url.netloc.rpartition("@")[2]
        retries = route.retries(
            route.key(request),
            lambda: RequestsNoInstanceError(route.service, route.why_none(), request=request),
        )
        held: tuple[requests.Response, Attempt[_InstanceAdapter]] | None = None
        while (attempt := retries.next()) is not None:
            if held is not None:
                _discard(*held)
                held = None
            adapter = attempt.sub.channel
            sent = request.copy()
            sent.url = urlunsplit(url._replace(netloc=adapter.netloc))
            sent.headers["Host"] = host
            try:
                response = adapter.send(
                    sent, stream=True, timeout=timeout, verify=verify, cert=cert, proxies=None
                )
            except requests.RequestException as exc:
                retry = retries.decide(attempt, exc, outcome_of_error(exc), idempotent)
                attempt.end()
                if retry:
                    log.debug("%s: %s on %s; trying another", route.service, exc, adapter.netloc)
                    continue
                raise
            except BaseException:
                attempt.end()
                raise
            outcome = route.outcome_of_status(response.status_code)
            if outcome is Outcome.DONE or not retries.decide(attempt, None, outcome, idempotent):
                return self._deliver(request, response, attempt, stream)
            held = (response, attempt)
        if held is not None:
            return self._deliver(request, *held, stream)
        raise retries.exhausted()

    def _deliver(
        self,
        request: requests.PreparedRequest,
        response: requests.Response,
        attempt: Attempt[_InstanceAdapter],
        stream: bool,
    ) -> requests.Response:
        """The response as the caller asked for it, its attempt ending with its body:
        read now (``stream=False``), or when the caller closes it or reads it all."""
        # As if it came from the URL asked for: redirects and cookies resolve against
        # the service's URL, and a resend (auth) comes back through this adapter.
        response.url = request.url or response.url
        response.request = request
        response.connection = self
        if stream:
            raw = response.raw
            release = raw.release_conn

            def release_and_end() -> None:
                try:
                    release()
                finally:
                    attempt.end()

            raw.release_conn = release_and_end
            return response
        try:
            response.content  # noqa: B018 - reads and releases the body
        except requests.RequestException as exc:
            attempt.ok = outcome_of_error(exc) is Outcome.DONE
            raise
        finally:
            attempt.end()
        return response

    # -- end -----------------------------------------------------------------------

    def close(self) -> None:
        """Close every instance's pools and let go of the discovery caches; the plain
        HTTPAdapter's pools too. Mounted twice, a Session closes it twice: only the
        first call does anything for the services."""
        try:
            self._routes.close()
        finally:
            super().close()


def _discard(response: requests.Response, attempt: Attempt[Any]) -> None:
    try:
        response.close()
    except Exception as exc:
        log.debug("closing a discarded response failed: %s", exc)
    finally:
        attempt.end()


class Session(requests.Session):
    """A ``requests.Session`` whose requests to ``services`` go to their live
    instances: a :class:`RequestsAdapter` mounted for ``http://`` and ``https://``
    (``balancer``). The arguments are the adapter's."""

    def __init__(
        self,
        source: EtcdiscoClient,
        services: Iterable[str] | Mapping[str, str],
        policy: str | Picker = "round_robin",
        **options: Any,
    ) -> None:
        super().__init__()
        self.balancer = RequestsAdapter(source, services, policy, **options)
        self.mount("http://", self.balancer)
        self.mount("https://", self.balancer)
