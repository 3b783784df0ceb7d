"""The registration of an HTTP server: registered once it listens, drained before it
stops listening, deregistered after.

:class:`ServeSpec` is what to register (names, advertised address, metadata, TTL,
checks), validated before anything starts. :class:`ServerRegistration` carries it
out for one server on its event loop, in three steps that whoever runs the server
calls in order:

    listening(port)   the server accepts connections: register (address known now)
    drain(policy)     status "draining", readiness 503, wait until no request
                      arrived for the quiet period (at most the drain timeout)
    deregister()      key deleted, lease revoked (after the server stopped listening)

``etcdisco.uvicorn`` calls ``drain`` before uvicorn closes its listeners;
``etcdisco.asgi.lifespan`` can only call ``deregister``, from the lifespan's
teardown, which uvicorn runs after its listeners are closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .._address import normalize_address
from .._advertise import advertised_address, advertised_for_bind
from .._async_client import AsyncClient
from .._drain import STEP_TIMEOUT, Arrivals, DrainPolicy, DrainReport, quiet_step, service_names
from .._errors import ConfigError, EtcdiscoError
from .._metadata import check_metadata
from .._model import encode_value, validate_instance_id, validate_service_name
from .._settings import ClientSettings
from ..health import Check
from ..health._guard import validate_checks
from ..registry import Registration, validate_ttl

__all__ = ["Listener", "ServeSpec", "ServerRegistration"]

log = logging.getLogger("etcdisco.asgi")

Listener = Callable[[str, "ServerRegistration"], None]
"""Called with an event name (``registered``, ``draining``, ``drained``,
``deregistered``) and the registration, on the server's loop."""


@dataclass(frozen=True)
class ServeSpec:
    """What an HTTP server registers, validated on creation.

    ``services``: one name or several. The advertised address is ``address``, else
    ``host`` (default: the host the server is bound to when that is one address, this
    host's primary IP when it is a wildcard) with the port the server listens on."""

    services: tuple[str, ...]
    address: str | None = None
    host: str | None = None
    instance_id: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    ttl: int = 10
    checks: tuple[Check, ...] = ()
    on_failing: str = "mark"

    @classmethod
    def of(
        cls,
        services: str | Sequence[str],
        *,
        address: str | None = None,
        host: str | None = None,
        instance_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        ttl: int = 10,
        checks: Sequence[Check] = (),
        on_failing: str = "mark",
    ) -> ServeSpec:
        return cls(
            service_names(services),
            address,
            host,
            instance_id,
            dict(metadata or {}),
            ttl,
            tuple(checks),
            on_failing,
        )

    def __post_init__(self) -> None:
        for name in self.services:
            validate_service_name(name)
        if self.address is not None:
            if self.host is not None:
                raise ConfigError("give address or host, not both")
            object.__setattr__(self, "address", normalize_address(self.address))
        elif self.host is not None:
            advertised_address(1, self.host)  # a wildcard or malformed host fails here
        if self.instance_id is not None:
            validate_instance_id(self.instance_id)
        validate_ttl(self.ttl)
        check_metadata(self.metadata)
        encode_value("127.0.0.1:1", self.metadata)
        validate_checks(self.checks, self.on_failing)

    def advertised(self, port: int, bind_host: str | None) -> str:
        if self.address is not None:
            return self.address
        return advertised_for_bind(bind_host, port, self.host)


class ServerRegistration:
    """The registration of one HTTP server (see the module docstring), also what the
    application sees as ``request.app.state.etcdisco`` / ``request.state.etcdisco``.

    ``state``: ``starting`` (not registered yet), ``serving``, ``draining``,
    ``stopped``; ``standby`` in a worker that leaves the registering to another
    worker of the same server. ``registrations``: one :class:`etcdisco.Registration` per service
    name once registered. ``activity``: the request counters the drain reads.
    ``client``: an :class:`etcdisco.AsyncClient` to register through (kept open), or
    None to open one from ``settings`` (default: ``$ETCDISCO_ENDPOINTS``) on the
    server's loop when the server listens, closed after ``deregister``.
    """

    def __init__(
        self,
        spec: ServeSpec,
        activity: Any,
        *,
        client: AsyncClient | None = None,
        settings: ClientSettings | None = None,
    ) -> None:
        if client is not None and not isinstance(client, AsyncClient):
            raise ConfigError(
                "client must be an etcdisco.AsyncClient on the server's loop (or None to "
                "open one from settings)"
            )
        self.spec = spec
        self.activity = activity
        self.address: str | None = None
        self.registrations: tuple[Registration, ...] = ()
        self.drain_report: DrainReport | None = None
        self._client = client
        self._own_client = client is None
        self._settings = settings
        self._listeners: list[Listener] = []
        self._registered = asyncio.Event()
        self._state = "starting"
        self._set_state("starting")

    # -- views ---------------------------------------------------------------------

    @property
    def state(self) -> str:
        return self._state

    @property
    def services(self) -> tuple[str, ...]:
        return self.spec.services

    @property
    def client(self) -> AsyncClient | None:
        return self._client

    @property
    def registered(self) -> bool:
        return self._registered.is_set()

    async def wait_registered(self, timeout: float | None = None) -> None:
        """Wait until registered (raises TimeoutError after ``timeout``)."""
        async with asyncio.timeout(timeout):
            await self._registered.wait()

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def _set_state(self, state: str) -> None:
        self._state = state
        with contextlib.suppress(AttributeError):
            self.activity.state = state  # what the health path answers

    def _emit(self, event: str) -> None:
        for listener in list(self._listeners):
            try:
                listener(event, self)
            except Exception:
                log.exception("listener %r failed on %s", listener, event)

    # -- the steps -----------------------------------------------------------------

    def stand_by(self, address: str) -> None:
        """Another process (a worker of the same server) registers ``address``."""
        self.address = address
        self._set_state("standby")
        log.info("another worker of this server registers %s; this one does not", address)

    async def listening(self, port: int, bind_host: str | None = None) -> None:
        """The server accepts connections on ``port`` (bound to ``bind_host``):
        register each service name. Raises what registering raises (nothing is left
        registered then)."""
        if self._state != "starting":
            raise ConfigError(f"listening() called when {self._state}")
        self.address = self.spec.advertised(port, bind_host)
        if self._client is None:
            self._client = AsyncClient(settings=self._settings)
        done: list[Registration] = []
        try:
            for name in self.spec.services:
                done.append(
                    await self._client.register(
                        name,
                        self.address,
                        instance_id=self.spec.instance_id,
                        metadata=self.spec.metadata,
                        ttl=self.spec.ttl,
                        checks=self.spec.checks,
                        on_failing=self.spec.on_failing,
                    )
                )
        except BaseException:
            for reg in done:
                with contextlib.suppress(EtcdiscoError):
                    await reg.deregister(STEP_TIMEOUT)
            await self._close_client()
            raise
        self.registrations = tuple(done)
        self._set_state("serving")
        self._registered.set()
        log.info("registered %s at %s", ",".join(self.spec.services), self.address)
        self._emit("registered")

    async def drain(self, policy: DrainPolicy, hurry: asyncio.Event | None = None) -> DrainReport:
        """Mark every registration ``draining`` (readiness answers 503 from now on),
        then wait until no request has arrived for ``policy.quiet_period`` (counted from
        now too), at most ``policy.drain_timeout``, or until ``hurry`` is set."""
        if self.drain_report is not None:
            return self.drain_report
        started = time.monotonic()
        activity: Arrivals = self.activity
        arrivals = activity.arrivals
        self._set_state("draining")
        self._emit("draining")
        await self._each("mark draining", lambda reg: reg.drain())
        hurry = hurry or asyncio.Event()
        while True:
            step = quiet_step(activity, policy, started, hurry.is_set())
            if isinstance(step, bool):
                quiet = step
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(step):
                    await hurry.wait()
        waited = time.monotonic() - started
        self.drain_report = DrainReport(quiet, waited, activity.arrivals - arrivals)
        log.info(
            "%s drained in %.2fs (%s, %d requests while draining)",
            self.address,
            waited,
            "quiet" if quiet else "timed out",
            self.drain_report.rpcs_while_draining,
        )
        self._emit("drained")
        return self.drain_report

    async def deregister(self) -> None:
        """Delete every key and revoke the lease (each step bounded; the lease
        expiring withdraws the instance anyway); close the client if it is ours.
        Later calls do nothing."""
        if self._state == "stopped":
            return
        was_registered = bool(self.registrations)
        self._set_state("stopped")
        try:
            await self._each("deregister", lambda reg: reg.deregister(STEP_TIMEOUT))
        finally:
            await self._close_client()
        if was_registered:
            log.info("deregistered %s at %s", ",".join(self.spec.services), self.address)
            self._emit("deregistered")

    async def _each(self, what: str, step: Callable[[Registration], Awaitable[None]]) -> None:
        async def one(reg: Registration) -> None:
            try:
                async with asyncio.timeout(STEP_TIMEOUT):
                    await step(reg)
            except (EtcdiscoError, TimeoutError) as exc:
                # Carry on: the lease expiring withdraws the instance anyway.
                log.warning("%s %s failed: %s", what, reg.key, exc)

        await asyncio.gather(*(one(reg) for reg in self.registrations))

    async def _close_client(self) -> None:
        if self._own_client and self._client is not None:
            client, self._client = self._client, None
            try:
                await client.close(STEP_TIMEOUT)
            except EtcdiscoError as exc:
                log.warning("closing the etcd client failed: %s", exc)

    def __repr__(self) -> str:
        names = ",".join(self.spec.services)
        return f"<ServerRegistration {names} at {self.address or '?'} {self._state}>"
