"""uvicorn servers that register once they listen and drain before they stop listening.

Needs the ``http`` extra (``pip install 'etcdisco[http]'``).

uvicorn stops in this order: close the listening sockets, finish the connections, run
the lifespan shutdown. A registration removed from the lifespan is removed after the
port has closed, and callers that still pick the instance meet refused connections.
:func:`run` and :class:`Server` drain first: on SIGTERM/SIGINT the instance turns
``draining`` in etcd (clients stop picking it) and 503 on ``health_path``; once no
request has arrived for ``quiet_period`` (at most ``drain_timeout``) uvicorn closes its
listeners and gives requests still running ``grace`` seconds; then the key is deleted
and the lease revoked. A second signal skips the rest of the quiet wait.

With ``workers=N`` the master process registers the address once and drains it for
every worker (see ``_workers``); a worker that dies is replaced and the registration
stays.

    etcdisco.uvicorn.run("app:app", "hello", host="0.0.0.0", port=8000)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import uvicorn

from .._drain import DrainPolicy, DrainReport
from .._errors import ConfigError
from .._settings import ClientSettings
from ..asgi._registration import Listener, ServerRegistration, ServeSpec
from ..health import Check
from ._server import Server, drain_policy
from ._workers import SharedActivity, WorkerView, run_workers

__all__ = [
    "DrainPolicy",
    "DrainReport",
    "Server",
    "ServerRegistration",
    "SharedActivity",
    "WorkerView",
    "run",
]


def run(
    app: Any,
    services: str | Sequence[str] | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    settings: ClientSettings | None = None,
    address: str | None = None,
    advertise_host: str | None = None,
    instance_id: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    ttl: int = 10,
    checks: Sequence[Check] = (),
    on_failing: str = "mark",
    quiet_period: float = 1.0,
    drain_timeout: float = 10.0,
    grace: float = 5.0,
    health_path: str | None = None,
    listeners: Sequence[Listener] = (),
    **config: Any,
) -> DrainReport | None:
    """Serve ``app`` with uvicorn on ``host:port``, registered under ``services``,
    until SIGTERM/SIGINT, draining first (see the module docstring). Returns the
    drain's report (None when it stopped before registering).

    ``app``: an ASGI app or an import string (required with ``workers`` > 1).
    ``services``: the names to register; without them, the app's
    :func:`etcdisco.asgi.lifespan` says what to register (one process only). The
    advertised address is ``address``, else ``advertise_host`` (default: ``host``
    when it is one address, this host's primary IP for a wildcard) with the bound
    port (``port=0`` picks a free one). ``settings``: how to reach etcd (default:
    ``$ETCDISCO_ENDPOINTS``). ``health_path``: a readiness endpoint (200 while
    serving, 503 before and while draining). ``listeners``: called on the server's
    events (``registered``, ``draining``, ``drained``, ``deregistered``). Any other
    keyword goes to ``uvicorn.Config`` (``log_level``, ``proxy_headers``, ...).

    Raises what registering raises (:class:`etcdisco.EtcdiscoError`), after stopping
    the server; exits like uvicorn (``SystemExit(3)``) when the server cannot start.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be an integer >= 1, not {workers!r}")
    for name in ("uds", "fd", "reload", "timeout_graceful_shutdown"):
        if config.get(name):
            raise ConfigError(f"{name}= is not supported here (grace= is the shutdown timeout)")
    uv_config = uvicorn.Config(app, host=host, port=port, workers=workers, **config)
    if workers > 1:
        if services is None:
            raise ConfigError(
                "with workers, give services=: the master registers, and it does not run "
                "the app's lifespan"
            )
        spec = ServeSpec.of(
            services,
            address=address,
            host=advertise_host,
            instance_id=instance_id,
            metadata=metadata,
            ttl=ttl,
            checks=checks,
            on_failing=on_failing,
        )
        policy = drain_policy(uv_config, quiet_period, drain_timeout, grace)
        if health_path is not None and not health_path.startswith("/"):
            raise ConfigError(f"health_path must start with '/', not {health_path!r}")
        return run_workers(
            uv_config,
            workers,
            spec,
            policy,
            settings=settings,
            health_path=health_path,
            listeners=listeners,
        )
    server = Server(
        uv_config,
        services,
        settings=settings,
        address=address,
        advertise_host=advertise_host,
        instance_id=instance_id,
        metadata=metadata,
        ttl=ttl,
        checks=checks,
        on_failing=on_failing,
        quiet_period=quiet_period,
        drain_timeout=drain_timeout,
        grace=grace,
        health_path=health_path,
    )
    for listener in listeners:
        server.add_listener(listener)
    server.run()
    return server.drain_report
