"""XdsServer: the registry (a ``discover_all`` cache) served as xDS resources over ADS.

Data flow: cache events -> per-service index -> dirty set -> the publisher task rebuilds
only the services that changed -> ResourceStore -> each ADS stream sends what its client
subscribed to, if that changed.

Tasks and owners: the publisher task is started by :meth:`XdsServer.start` and stopped
by :meth:`XdsServer.close`; each ADS stream's reader task belongs to its stream; the
handler tasks belong to the gRPC server, which ``close()`` stops after ending every
stream with status OK.

The ADS port is plaintext unless the server is given an :class:`XdsTls` (TLS, or
mutual TLS with ``client_ca``): the registry it serves names every instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from ..._address import join_address, parse_listen
from ..._async_client import AsyncClient
from ..._errors import ConfigError, EtcdTimeoutError
from ..._model import ChangeEvent, EventType, Instance
from ...discovery import ServiceCache
from . import _protos as p
from ._ads import SERVICE_NAME, AdsStats, AdsStream
from ._bootstrap import bootstrap_config
from ._resources import (
    DEFAULT_RETRIES,
    ServicePolicy,
    endpoint_specs,
    host_names,
    resolve_policy,
    service_resources,
    validate_retries,
)
from ._store import ResourceStore

log = logging.getLogger("etcdisco.xds")

# A name that does not resolve in this long is skipped for this rebuild.
_RESOLVE_TIMEOUT = 2.0
# Streams get this long to end with status OK before the server cancels them.
_CLOSE_GRACE = 2.0


@dataclass(frozen=True)
class XdsTls:
    """TLS on the control plane's own port (PEM files).

    ``cert`` and ``key``: the server's certificate chain and key; the certificate must
    name the host clients dial (gRPC checks it). ``client_ca``: when set, only clients
    presenting a certificate signed by it are served (mutual TLS).

    ``client_cacert``, ``client_cert`` and ``client_key`` are what
    :meth:`XdsServer.bootstrap` (and the embedded control plane) tell clients to load:
    the CA that verifies this server (without it: the system's roots) and, for mutual
    TLS, a client certificate and key.
    """

    cert: str
    key: str
    client_ca: str | None = None
    client_cacert: str | None = None
    client_cert: str | None = None
    client_key: str | None = None

    def __post_init__(self) -> None:
        if not self.cert or not self.key:
            raise ConfigError("xDS TLS needs both a certificate and its key")
        if (self.client_cert is None) != (self.client_key is None):
            raise ConfigError("xDS TLS: client_cert and client_key go together")

    def server_credentials(self) -> grpc.ServerCredentials:
        """Read and check the files: a bad one is named now, not at each handshake."""
        # ssl does the checking gRPC would only log per failed handshake: the PEM
        # parses, the key matches the certificate, the CA file holds certificates.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            # A password callback keeps an encrypted key from prompting on a terminal.
            context.load_cert_chain(self.cert, self.key, password=lambda: b"")
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"xDS TLS: cannot use certificate {self.cert} with key {self.key}: {exc}"
            ) from None
        root: bytes | None = None
        if self.client_ca is not None:
            try:
                context.load_verify_locations(cafile=self.client_ca)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"xDS TLS: cannot use client CA {self.client_ca}: {exc}"
                ) from None
            root = _read(self.client_ca)
        return grpc.ssl_server_credentials(
            [(_read(self.key), _read(self.cert))],
            root_certificates=root,
            require_client_auth=root is not None,
        )

    def bootstrap_options(self) -> dict[str, Any]:
        """``bootstrap_config`` arguments for clients of this server (absolute paths:
        the bootstrap is read by processes with working directories of their own)."""
        if self.client_ca is not None and self.client_cert is None:
            raise ConfigError(
                "the xDS control plane requires client certificates (client_ca): "
                "give client_cert and client_key for the bootstrap"
            )
        return {
            "tls": True,
            "cacert": _absolute(self.client_cacert),
            "cert": _absolute(self.client_cert),
            "key": _absolute(self.client_key),
        }


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(f"xDS TLS: cannot read {path}: {exc.strerror}") from None


def _absolute(path: str | None) -> str | None:
    return os.path.abspath(path) if path else None


class XdsServer:
    """An ADS control plane fed by the registry that ``client`` reads.

    >>> async with XdsServer(client, listen="127.0.0.1:0") as xds:   # doctest: +SKIP
    ...     await xds.wait_ready(5)
    ...     print(json.dumps(xds.bootstrap()))

    ``policies`` maps service names to :class:`ServicePolicy` (load balancing, hash
    header, retries); services without one follow their instances' metadata ``lb`` /
    ``hash_header`` and ``retries`` (UNAVAILABLE retries per call, 0-4). ``tls``
    serves ADS over TLS (see :class:`XdsTls`) instead of plaintext.
    """

    def __init__(
        self,
        client: AsyncClient,
        *,
        listen: str = "127.0.0.1:0",
        policies: Mapping[str, ServicePolicy] | None = None,
        retries: int = DEFAULT_RETRIES,
        tls: XdsTls | None = None,
    ) -> None:
        host, port = parse_listen(listen)
        self._client = client
        self.tls = tls
        self._listen = (host, port)
        self._policies = dict(policies or {})
        self._retries = validate_retries(retries)
        self.store = ResourceStore()
        self.stats = AdsStats()
        self._index: dict[str, dict[str, Instance]] = {}
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self._problems: dict[str, list[str]] = {}
        self._streams: set[AdsStream] = set()
        self._cache: ServiceCache | None = None
        self._server: grpc.aio.Server | None = None
        self._publisher: asyncio.Task[None] | None = None
        self._seeded = False
        self._ready = asyncio.Event()
        self.port = 0

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Listen and start following the registry. Streams are accepted at once but
        answered only after the registry has been read (see :meth:`wait_ready`)."""
        if self._server is not None:
            raise RuntimeError("XdsServer already started")
        credentials = self.tls.server_credentials() if self.tls is not None else None
        self._cache = await self._client.discover_all()
        self._cache.add_listener(self._on_events)
        # Without SO_REUSEPORT (grpc's default is on): a second control plane on a port
        # already served must fail, not split the clients between the two.
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        handler = grpc.stream_stream_rpc_method_handler(
            self._handle,
            request_deserializer=p.discovery_pb2.DiscoveryRequest.FromString,
            # AdsStream writes DiscoveryResponse bytes (the resources encoded once per
            # change for every stream): no serializer.
            response_serializer=None,
        )
        server.add_generic_rpc_handlers(
            [
                grpc.method_handlers_generic_handler(
                    SERVICE_NAME, {"StreamAggregatedResources": handler}
                )
            ]
        )
        where = join_address(*self._listen)
        try:
            if credentials is None:
                self.port = server.add_insecure_port(where)
            else:
                self.port = server.add_secure_port(where, credentials)
        except RuntimeError as exc:
            await self._cache.close()
            raise ConfigError(f"xDS server cannot listen on {where}: {exc}") from None
        await server.start()
        self._server = server
        self._publisher = asyncio.get_running_loop().create_task(
            self._publish(), name="etcdisco-xds-publisher"
        )
        log.info(
            "xDS control plane listening on %s (%s)",
            self.address,
            "plaintext" if self.tls is None else "mutual TLS" if self.tls.client_ca else "TLS",
        )

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the registry has been read once and the resources are built."""
        if self._cache is None:
            raise RuntimeError("XdsServer not started")
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        # The cache's own timeout error says why etcd did not answer.
        await self._cache.wait_ready(timeout)
        try:
            async with asyncio.timeout_at(deadline):
                await self._ready.wait()
        except TimeoutError:
            raise EtcdTimeoutError(f"xDS resources not built after {timeout}s") from None

    async def close(self) -> None:
        """End every stream with status OK, stop listening, stop following etcd."""
        server, self._server = self._server, None
        publisher, self._publisher = self._publisher, None
        if server is not None:
            for stream in list(self._streams):
                stream.close()
            # stop() refuses new streams at once and waits (up to the grace) for these
            # to end with OK; a stream stuck writing to a client that does not read is
            # cancelled then.
            await server.stop(grace=_CLOSE_GRACE)
        if publisher is not None:
            publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await publisher
        if self._cache is not None:
            self._cache.remove_listener(self._on_events)
            await self._cache.close()
            self._cache = None

    async def __aenter__(self) -> XdsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- what it serves ----------------------------------------------------------------

    @property
    def address(self) -> str:
        """``host:port`` as bound (the port is known after :meth:`start`)."""
        return join_address(self._listen[0], self.port)

    def services(self) -> list[str]:
        """The services currently served (those with at least one instance)."""
        return sorted(self.store.resources(p.CLUSTER))

    def bootstrap(
        self,
        *,
        server_uri: str | None = None,
        node_id: str | None = None,
        cluster: str = "etcdisco",
        zone: str = "",
    ) -> dict[str, Any]:
        """A gRPC xDS bootstrap that points at this server (see :func:`bootstrap_config`),
        with ``tls`` channel credentials when the server has :class:`XdsTls`."""
        uri = server_uri or _dialable(self._listen[0], self.port)
        creds = self.tls.bootstrap_options() if self.tls is not None else {}
        return bootstrap_config(uri, node_id=node_id, cluster=cluster, zone=zone, **creds)

    def bootstrap_json(self, **options: Any) -> str:
        return json.dumps(self.bootstrap(**options))

    # -- streams -----------------------------------------------------------------------

    async def _handle(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        stream = AdsStream(self.store, requests, context, self.stats)
        self._streams.add(stream)
        self.stats.streams += 1
        try:
            await stream.run()
        finally:
            self._streams.discard(stream)
            log.debug("ADS stream from %s (%s) ended", stream.node, stream.peer)

    @property
    def stream_count(self) -> int:
        return len(self._streams)

    # -- registry -> resources -----------------------------------------------------------

    def _on_events(self, events: list[ChangeEvent]) -> None:
        if not self._seeded:
            # The snapshot taken when seeding already holds these.
            return
        for ev in events:
            inst = ev.instance
            table = self._index.setdefault(inst.service, {})
            if ev.type is EventType.REMOVED:
                table.pop(inst.key, None)
            else:
                table[inst.key] = inst
            self._dirty.add(inst.service)
        self._wake.set()

    async def _publish(self) -> None:
        assert self._cache is not None
        await self._cache.wait_ready()
        for inst in self._cache.instances():
            self._index.setdefault(inst.service, {})[inst.key] = inst
        self._seeded = True
        self._dirty.update(self._index)
        while True:
            dirty, self._dirty = self._dirty, set()
            for service in sorted(dirty):
                try:
                    await self._rebuild(service)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    # One service's bad data must not stop the others from updating.
                    log.exception("building xDS resources for %s failed", service)
            self.store.mark_ready()
            self._ready.set()
            if not self._dirty:
                self._wake.clear()
                await self._wake.wait()

    async def _rebuild(self, service: str) -> None:
        instances = list(self._index.get(service, {}).values())
        if not instances:
            self._index.pop(service, None)
            self._problems.pop(service, None)
            if self.store.put(service, None):
                log.info("xDS: %s has no instances left; its resources are withdrawn", service)
            return
        policy, problems = resolve_policy(instances, self._policies.get(service), self._retries)
        resolved = await _resolve(host_names(instances))
        endpoints, endpoint_problems = endpoint_specs(instances, resolved)
        problems += endpoint_problems
        if problems != self._problems.get(service, []):
            for problem in problems:
                log.warning("xDS %s: %s", service, problem)
        self._problems[service] = problems
        changed = self.store.put(service, service_resources(service, policy, endpoints))
        if changed:
            log.debug(
                "xDS %s: %d endpoints, %s; changed %s",
                service,
                len(endpoints),
                policy.lb,
                sorted(p.TYPE_NAMES[t] for t in changed),
            )


async def _resolve(names: set[str]) -> dict[str, str]:
    """Host name -> first IP address; unresolvable names are left out."""
    if not names:
        return {}
    loop = asyncio.get_running_loop()

    async def one(name: str) -> tuple[str, str | None]:
        try:
            async with asyncio.timeout(_RESOLVE_TIMEOUT):
                infos = await loop.getaddrinfo(name, None, type=socket.SOCK_STREAM)
        except (OSError, TimeoutError):
            return name, None
        return name, str(infos[0][4][0]) if infos else None

    results = await asyncio.gather(*(one(n) for n in sorted(names)))
    return {name: ip for name, ip in results if ip is not None}


def _dialable(host: str, port: int) -> str:
    if host in ("0.0.0.0", "::"):
        raise ConfigError(
            f"the server listens on {host}, which clients cannot dial; "
            "give the address they should use (server_uri / --server-uri)"
        )
    return join_address(host, port)
