"""The control plane inside a client process: one call, then ``xds:///service`` works.

The rule: the bootstrap must be in the environment before the process creates its
first ``xds:///`` channel. gRPC reads it when it creates an xDS client and keeps that
client while channels use it (grpcio 1.85 measured: one xDS client per target, built
when a channel to a target is created while none to it is alive; older releases keep
one for the whole process). A channel created before the bootstrap fails (no
bootstrap) or follows another control plane, and keeps doing so while it lives.

``GRPC_XDS_BOOTSTRAP`` (a file) wins over ``GRPC_XDS_BOOTSTRAP_CONFIG`` in gRPC, so an
embedded control plane refuses to start while the former is set.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

from ..._async_client import AsyncClient
from ..._errors import ConfigError
from ..._model import DEFAULT_PREFIX
from ..._settings import ClientSettings
from ...sync import Client
from ._resources import DEFAULT_RETRIES, ServicePolicy
from ._server import XdsServer, XdsTls

log = logging.getLogger("etcdisco.xds")

BOOTSTRAP_ENV = "GRPC_XDS_BOOTSTRAP"
BOOTSTRAP_CONFIG_ENV = "GRPC_XDS_BOOTSTRAP_CONFIG"

# Bootstraps this module put in the environment: replacing one of them is expected.
_ours: set[str] = set()


def _check_environment() -> None:
    if os.environ.get(BOOTSTRAP_ENV):
        # gRPC looks at the file first and would never see the embedded server.
        raise ConfigError(
            f"{BOOTSTRAP_ENV} is set ({os.environ[BOOTSTRAP_ENV]}); gRPC reads that file "
            f"before {BOOTSTRAP_CONFIG_ENV}, so an embedded control plane would be ignored. "
            f"Unset {BOOTSTRAP_ENV}, or run `etcdisco xds` and point the file at it."
        )
    current = os.environ.get(BOOTSTRAP_CONFIG_ENV)
    if current and current not in _ours:
        log.warning("replacing the %s already set in this process", BOOTSTRAP_CONFIG_ENV)


async def start_embedded(
    client: AsyncClient,
    *,
    policies: Mapping[str, ServicePolicy] | None = None,
    retries: int = DEFAULT_RETRIES,
    zone: str = "",
    node_id: str | None = None,
    timeout: float = 10.0,
    tls: XdsTls | None = None,
) -> XdsServer:
    """Start a control plane on a loopback ephemeral port, fed by ``client``'s registry,
    and point this process's gRPC at it (``GRPC_XDS_BOOTSTRAP_CONFIG``).

    Call it before the process creates its first ``xds:///`` channel: gRPC reads the
    bootstrap when it creates its xDS client, and a channel created earlier keeps
    failing (or following another control plane) while it lives. Afterwards
    ``grpc.aio.insecure_channel("xds:///echo")`` (and sync channels from other threads)
    reach the instances of ``echo``. Returns once the registry has been read
    (``EtcdTimeoutError`` after ``timeout``); ``await server.close()`` stops it and
    removes the variable.

    The server runs on the caller's event loop: a *blocking* gRPC call made on that
    loop's thread would starve it, so use ``grpc.aio`` channels there, or sync
    channels from other threads (or :func:`install`, which has its own thread).

    ``tls`` (:class:`XdsTls`) serves the loopback port over TLS, or mutual TLS with
    ``client_ca``, so that other local users cannot read the registry through it; the
    bootstrap then names its ``client_*`` files, and the server certificate must name
    127.0.0.1.
    """
    return await _start(
        client,
        policies=policies,
        retries=retries,
        zone=zone,
        node_id=node_id,
        timeout=timeout,
        tls=tls,
    )


async def _start(
    client: AsyncClient,
    *,
    policies: Mapping[str, ServicePolicy] | None,
    retries: int,
    zone: str,
    node_id: str | None,
    timeout: float,
    tls: XdsTls | None,
) -> _EmbeddedServer:
    _check_environment()
    server = _EmbeddedServer(
        client, listen="127.0.0.1:0", policies=policies, retries=retries, tls=tls
    )
    if tls is not None:
        # Fails (before listening) when this process could not be a client of it.
        tls.bootstrap_options()
    await server.start()
    try:
        await server.wait_ready(timeout)
    except BaseException:
        await server.close()
        raise
    server.bootstrap_text = json.dumps(server.bootstrap(node_id=node_id, zone=zone))
    _ours.add(server.bootstrap_text)
    os.environ[BOOTSTRAP_CONFIG_ENV] = server.bootstrap_text
    return server


class _EmbeddedServer(XdsServer):
    """An XdsServer that takes its bootstrap out of the environment when it closes."""

    bootstrap_text = ""

    async def close(self) -> None:
        if self.bootstrap_text and os.environ.get(BOOTSTRAP_CONFIG_ENV) == self.bootstrap_text:
            # A later xds channel then fails with "no bootstrap" instead of dialling a
            # port nobody listens on any more.
            del os.environ[BOOTSTRAP_CONFIG_ENV]
        await super().close()


class EmbeddedXds:
    """What :func:`install` returns: the running control plane; ``close()`` stops it."""

    def __init__(
        self,
        server: _EmbeddedServer,
        run: Callable[[Coroutine[Any, Any, None]], None],
        after_close: Callable[[], None] | None = None,
    ) -> None:
        self.server = server
        self._run = run
        self._after_close = after_close
        self._closed = False

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT`` of the control plane."""
        return self.server.address

    def bootstrap(self) -> dict[str, Any]:
        """The bootstrap this process's gRPC was given."""
        result: dict[str, Any] = json.loads(self.server.bootstrap_text)
        return result

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._run(self.server.close())
        finally:
            if self._after_close is not None:
                self._after_close()

    def __enter__(self) -> EmbeddedXds:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def install(
    endpoints: str | Sequence[str] | None = None,
    *,
    client: Client | None = None,
    prefix: str = DEFAULT_PREFIX,
    policies: Mapping[str, ServicePolicy] | None = None,
    retries: int = DEFAULT_RETRIES,
    zone: str = "",
    node_id: str | None = None,
    timeout: float = 10.0,
    cacert: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    username: str | None = None,
    password: str | None = None,
    xds_tls: XdsTls | None = None,
    settings: ClientSettings | None = None,
) -> EmbeddedXds:
    """The blocking twin of :func:`start_embedded`: call it once, early (before the
    process creates its first ``xds:///`` channel), then use plain
    ``grpc.insecure_channel("xds:///echo")``.

    The control plane runs on a private event-loop thread: on ``client``'s (an
    :class:`etcdisco.Client`), else on a new one with a client of its own built from
    ``endpoints`` (default ``$ETCDISCO_ENDPOINTS``) and the TLS/auth arguments
    (``cacert``, ``cert``, ``key``, ``username``, ``password``: those are for etcd;
    ``xds_tls`` is the control plane's own port, as ``tls`` of :func:`start_embedded`),
    or from ``settings`` (an :class:`etcdisco.ClientSettings`) instead.
    """
    options: dict[str, Any] = {
        "policies": policies,
        "retries": retries,
        "zone": zone,
        "node_id": node_id,
        "timeout": timeout,
        "tls": xds_tls,
    }
    owned = client is None
    given = client or Client(
        endpoints,
        prefix=prefix,
        cacert=cacert,
        cert=cert,
        key=key,
        username=username,
        password=password,
        settings=settings,
    )
    try:
        server = given._run(_start(given.async_client, **options), timeout=timeout + 5)
    except BaseException:
        if owned:
            given.close()
        raise
    # A client made here is the control plane's own: it closes with it.
    after_close = given.close if owned else None
    return EmbeddedXds(server, lambda coro: given._run(coro, timeout=10), after_close)
