"""gRPC servers ready to drain: the health service and an RPC activity tracker.

grpc fixes a server's interceptors when it is created and accepts servicers only
before ``start()``, so the parts a drain needs are put in here, at build time:

- the standard health service (``grpc.health.v1.Health``): SERVING for "" and for
  each registered name once the server runs, NOT_SERVING from the drain on;
- an interceptor noting when each RPC arrives, so that a drain can wait until
  clients have stopped sending (health checks do not count: probes never stop).

Build the server here, add servicers and ports, then hand it to
``serve_registered`` / ``aio_serve_registered``, which start it.
"""

from __future__ import annotations

import weakref
from collections.abc import Awaitable, Callable, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from .._drain import Activity
from .._errors import ConfigError

try:
    from grpc_health.v1 import _async as _health_aio
    from grpc_health.v1 import health as _health
    from grpc_health.v1 import health_pb2 as _health_pb2
    from grpc_health.v1 import health_pb2_grpc as _health_pb2_grpc
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "etcdisco.grpc needs grpcio-health-checking: pip install 'etcdisco[grpc]'"
    ) from exc

# The stubs make these generic; the runtime classes are not subscriptable.
if TYPE_CHECKING:
    _SyncInterceptorBase = grpc.ServerInterceptor[Any, Any]
    _AioInterceptorBase = grpc.aio.ServerInterceptor[Any, Any]
else:
    _SyncInterceptorBase = grpc.ServerInterceptor
    _AioInterceptorBase = grpc.aio.ServerInterceptor

HEALTH_PREFIX = "/grpc.health.v1.Health/"
SERVING: Any = _health_pb2.HealthCheckResponse.SERVING
NOT_SERVING: Any = _health_pb2.HealthCheckResponse.NOT_SERVING


class _SyncActivityInterceptor(_SyncInterceptorBase):
    def __init__(self, activity: Activity) -> None:
        self._activity = activity

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        if not handler_call_details.method.startswith(HEALTH_PREFIX):
            self._activity.touch()
        return continuation(handler_call_details)


class _AioActivityInterceptor(_AioInterceptorBase):
    def __init__(self, activity: Activity) -> None:
        self._activity = activity

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        if not handler_call_details.method.startswith(HEALTH_PREFIX):
            self._activity.touch()
        return await continuation(handler_call_details)


@dataclass(frozen=True)
class ServerKit:
    """What the factories attached to a server: its activity and health servicer."""

    activity: Activity
    health: Any  # grpc_health's HealthServicer, sync or aio flavour


# Keyed weakly so a kit lives exactly as long as its server.
_KITS: weakref.WeakKeyDictionary[object, ServerKit] = weakref.WeakKeyDictionary()


def kit_of(server: object) -> ServerKit:
    try:
        return _KITS[server]
    except (KeyError, TypeError):
        raise ConfigError(
            "this server was not built by etcdisco.grpc.server() / aio_server(); "
            "build it there: grpc accepts interceptors and the health servicer only "
            "before the server starts"
        ) from None


def server(
    thread_pool: futures.ThreadPoolExecutor | None = None,
    *,
    max_workers: int = 16,
    handlers: Sequence[grpc.GenericRpcHandler[Any, Any]] | None = None,
    interceptors: Sequence[grpc.ServerInterceptor[Any, Any]] = (),
    options: Sequence[tuple[str, Any]] | None = None,
    maximum_concurrent_rpcs: int | None = None,
    compression: grpc.Compression | None = None,
) -> grpc.Server:
    """``grpc.server(...)`` with the health service and the drain's activity tracker.

    Same arguments as ``grpc.server``; without ``thread_pool`` one of ``max_workers``
    threads is made. Add servicers and ports, then call ``serve_registered``.
    """
    activity = Activity()
    srv = grpc.server(
        thread_pool or futures.ThreadPoolExecutor(max_workers, thread_name_prefix="grpc-server"),
        handlers=list(handlers) if handlers is not None else None,
        interceptors=[_SyncActivityInterceptor(activity), *interceptors],
        options=options,
        maximum_concurrent_rpcs=maximum_concurrent_rpcs,
        compression=compression,
    )
    health = _health.HealthServicer()
    _health_pb2_grpc.add_HealthServicer_to_server(health, srv)
    _KITS[srv] = ServerKit(activity, health)
    return srv


def aio_server(
    *,
    migration_thread_pool: futures.Executor | None = None,
    handlers: Sequence[grpc.GenericRpcHandler[Any, Any]] | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor[Any, Any]] = (),
    options: Sequence[tuple[str, Any]] | None = None,
    maximum_concurrent_rpcs: int | None = None,
    compression: grpc.Compression | None = None,
) -> grpc.aio.Server:
    """``grpc.aio.server(...)`` with the health service and the drain's activity
    tracker. Call it on the event loop that will run the server. Add servicers and
    ports, then call ``aio_serve_registered``."""
    activity = Activity()
    srv = grpc.aio.server(
        migration_thread_pool,
        handlers=handlers,
        interceptors=[_AioActivityInterceptor(activity), *interceptors],
        options=options,
        maximum_concurrent_rpcs=maximum_concurrent_rpcs,
        compression=compression,
    )
    health = _health_aio.HealthServicer()
    _health_pb2_grpc.add_HealthServicer_to_server(health, srv)
    _KITS[srv] = ServerKit(activity, health)
    return srv
