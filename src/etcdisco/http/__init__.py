"""HTTP clients that follow the registry: ``http://users/v1/me`` reaches a live
instance of service ``users``.

Needs the ``http`` extra (``pip install 'etcdisco[http]'``): httpx for
:class:`Client`, :class:`AsyncClient`, :class:`Transport` and :class:`AsyncTransport`;
requests for :class:`RequestsAdapter` and :class:`Session`. Each is imported on first
use, so either library alone is enough for its half.

    with etcdisco.Client() as registry, etcdisco.http.Client(registry, services=["users"]) as http:
        http.get("http://users/v1/me")       # a live instance of "users"
        http.get("https://example.com/")     # not a service: httpx as usual

Which hosts: exactly the configured ``services`` (each name is its URL host, or give a
``{host: service}`` mapping); every other host is left alone. The port in a service
URL is ignored (each instance has its own).

Per request: a pick by policy (round robin by default; ``random``,
``weighted_round_robin``, ``p2c`` with in-flight counts that last until the response
is closed, ``ring_hash`` on a header, ``zone_aware``) among the instances the shared
discovery cache knows, skipping draining, unhealthy, suspect and ejected ones; one
connection pool per instance, closed once the instance has left and its last response
is closed. The ``Host`` header and the TLS name (SNI, certificate check) stay the
URL's host, the service name (``host_header=`` and ``server_name=`` change them).

Retries (the rule is ``etcdisco._routing``'s, shared with the gRPC channels): a
request that never reached an instance (connection refused, connect timeout, TLS
failure) is sent to another one, whatever its method; one that did is sent again only
when it is idempotent (GET, HEAD, OPTIONS, TRACE, PUT, DELETE, or an
``Idempotency-Key`` header; its body replayable) and failed with a broken connection
or a 502/503/504 (``failure_statuses``); at most ``max_attempts`` (3) attempts, and at
most 20% more requests than asked for plus 10 a second (``RetryBudget``). Connect
failures, broken connections and failure statuses feed the outlier detector.

No instance: :class:`NoInstanceError` (an :class:`etcdisco.EtcdiscoError`), raised as
:class:`HttpxNoInstanceError` (also an ``httpx.ConnectError``) or
:class:`RequestsNoInstanceError` (also a ``requests.ConnectionError``), naming the
service, at once, instead of a DNS failure for a host called ``users``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .._routing import RetryBudget
from ._errors import NoInstanceError
from ._options import DEFAULT_FAILURE_STATUSES, DEFAULT_IDEMPOTENT_METHODS
from ._route import ConnectionPoolInfo

if TYPE_CHECKING:
    from ._aio_transport import AsyncClient, AsyncTransport
    from ._httpx import HttpxNoInstanceError
    from ._requests import RequestsAdapter, RequestsNoInstanceError, Session
    from ._transport import Client, Transport

__all__ = [
    "DEFAULT_FAILURE_STATUSES",
    "DEFAULT_IDEMPOTENT_METHODS",
    "AsyncClient",
    "AsyncTransport",
    "Client",
    "ConnectionPoolInfo",
    "HttpxNoInstanceError",
    "NoInstanceError",
    "RequestsAdapter",
    "RequestsNoInstanceError",
    "RetryBudget",
    "Session",
    "Transport",
]

_HTTPX = ("httpx", "httpcore")
_REQUESTS = ("requests", "urllib3")
# name -> (module, the packages it needs)
_LAZY = {
    "AsyncClient": ("._aio_transport", _HTTPX),
    "AsyncTransport": ("._aio_transport", _HTTPX),
    "Client": ("._transport", _HTTPX),
    "Transport": ("._transport", _HTTPX),
    "HttpxNoInstanceError": ("._httpx", _HTTPX),
    "RequestsAdapter": ("._requests", _REQUESTS),
    "RequestsNoInstanceError": ("._requests", _REQUESTS),
    "Session": ("._requests", _REQUESTS),
}


def __getattr__(name: str) -> Any:
    found = _LAZY.get(name)
    if found is None:
        raise AttributeError(f"module 'etcdisco.http' has no attribute {name!r}")
    module_name, needs = found
    try:
        module = importlib.import_module(module_name, __name__)
    except ModuleNotFoundError as exc:
        if exc.name not in needs:
            raise
        raise ImportError(
            f"etcdisco.http.{name} needs {needs[0]} ({exc.name} is missing): "
            "pip install 'etcdisco[http]'"
        ) from exc
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
