"""``aio_serve_registered``: a ``grpc.aio.Server`` registered in etcd through an
:class:`etcdisco.AsyncClient`, drained before it stops (the steps: ``_drain``)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import grpc.aio

from .._async_client import AsyncClient
from .._errors import ConfigError, EtcdiscoError
from .._signals import StopSignals
from ..registry import Registration
from ._drain import (
    STEP_TIMEOUT,
    DrainPolicy,
    DrainReport,
    drained,
    log,
    on_signal_message,
    prepare,
    quiet_step,
)
from ._server import SERVING, ServerKit

__all__ = ["AioRegisteredServer", "aio_serve_registered"]


class AioRegisteredServer:
    """A started ``grpc.aio.Server`` registered under one or more service names.

    ``await shutdown()`` drains and stops it (see the module docstring);
    ``await wait_for_termination()`` returns once that is done, whoever started it
    (a call, or SIGTERM/SIGINT with ``handle_signals``). ``async with`` shuts down on
    exit.
    """

    def __init__(
        self,
        server: grpc.aio.Server,
        kit: ServerKit,
        registrations: Sequence[Registration],
        address: str,
        policy: DrainPolicy,
    ) -> None:
        self.server = server
        self.address = address
        self.registrations = tuple(registrations)
        self.policy = policy
        self.drain_report: DrainReport | None = None
        self._kit = kit
        self._task: asyncio.Task[DrainReport] | None = None
        self._begun = asyncio.Event()
        self._hurry = asyncio.Event()
        self._signals = StopSignals(self._on_signal, asyncio.get_running_loop())

    @property
    def health(self) -> Any:
        """The server's ``grpc_health`` HealthServicer (aio flavour)."""
        return self._kit.health

    @property
    def draining(self) -> bool:
        return self._task is not None

    def _on_signal(self, sig: int) -> None:
        on_signal_message(sig, self._task is None, self.address)
        if self._task is None:
            self._start()
        else:
            self._hurry.set()

    def _start(self) -> asyncio.Task[DrainReport]:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._shutdown(), name=f"etcdisco-drain-{self.address}"
            )
            self._begun.set()
        return self._task

    async def shutdown(self) -> DrainReport:
        """Drain, deregister and stop (once; later calls wait for the first)."""
        # Shielded: a caller giving up must not leave the server half drained.
        return await asyncio.shield(self._start())

    async def wait_for_termination(self) -> DrainReport:
        """Wait until the server has been drained and stopped."""
        await self._begun.wait()
        assert self._task is not None
        return await asyncio.shield(self._task)

    async def _shutdown(self) -> DrainReport:
        started = time.monotonic()
        arrivals = self._kit.activity.arrivals
        try:
            await self._kit.health.enter_graceful_shutdown()
            await self._each("mark draining", lambda reg: reg.drain())
            quiet = await self._wait_quiet(started)
            waited = time.monotonic() - started
            await self._each("deregister", lambda reg: reg.deregister(STEP_TIMEOUT))
            await self.server.stop(self.policy.grace)
        finally:
            # Only now: until the server has stopped, a second signal means "hurry",
            # not the default action (which would kill the process mid-drain).
            self._signals.remove()
        rpcs = self._kit.activity.arrivals - arrivals
        self.drain_report = report = drained(self.address, quiet, waited, rpcs)
        return report

    async def _each(self, what: str, step: Callable[[Registration], Awaitable[None]]) -> None:
        async def one(reg: Registration) -> None:
            try:
                async with asyncio.timeout(STEP_TIMEOUT):
                    await step(reg)
            except (EtcdiscoError, TimeoutError) as exc:
                # Carry on: the lease expiring withdraws the instance anyway.
                log.warning("%s %s failed: %s", what, reg.key, exc)

        await asyncio.gather(*(one(reg) for reg in self.registrations))

    async def _wait_quiet(self, started: float) -> bool:
        while True:
            step = quiet_step(self._kit.activity, self.policy, started, self._hurry.is_set())
            if isinstance(step, bool):
                return step
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(step):
                    await self._hurry.wait()

    async def __aenter__(self) -> AioRegisteredServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    def __repr__(self) -> str:
        names = ",".join(r.service for r in self.registrations)
        return f"<AioRegisteredServer {names} at {self.address}>"


async def aio_serve_registered(
    client: AsyncClient,
    server: grpc.aio.Server,
    services: str | Sequence[str],
    *,
    port: int | None = None,
    address: str | None = None,
    host: str | None = None,
    instance_id: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    ttl: int = 10,
    health_names: Sequence[str] = (),
    quiet_period: float = 1.0,
    drain_timeout: float = 10.0,
    grace: float = 5.0,
    handle_signals: bool = False,
) -> AioRegisteredServer:
    """Start ``server`` (built by :func:`aio_server`, not started), report it SERVING
    and register it under each of ``services``.

    The advertised address is ``address``, else ``host:port`` where ``port`` is the
    port the server listens on and ``host`` defaults to this host's primary IP
    (127.0.0.1 without one); a wildcard is refused. ``health_names`` are extra names
    the health service reports (fully qualified gRPC service names, for instance).
    With ``handle_signals`` the first SIGTERM/SIGINT drains (see the module
    docstring) and a second one skips the rest of the quiet wait.
    """
    if not isinstance(client, AsyncClient):
        raise ConfigError("aio_serve_registered needs an etcdisco.AsyncClient")
    names, advertised, policy, kit = prepare(
        server, services, port, address, host, (quiet_period, drain_timeout, grace), handle_signals
    )

    await server.start()
    registrations: list[Registration] = []
    try:
        for name in ("", *names, *health_names):
            await kit.health.set(name, SERVING)
        for name in names:
            registrations.append(
                await client.register(
                    name, advertised, instance_id=instance_id, metadata=metadata, ttl=ttl
                )
            )
    except BaseException:
        await kit.health.enter_graceful_shutdown()
        for reg in registrations:
            with contextlib.suppress(EtcdiscoError):
                await reg.deregister(STEP_TIMEOUT)
        await server.stop(0)
        raise
    served = AioRegisteredServer(server, kit, registrations, advertised, policy)
    if handle_signals:
        served._signals.install()
    log.info("serving %s at %s", ",".join(names), advertised)
    return served
