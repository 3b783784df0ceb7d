"""Run a gRPC server registered in etcd, and drain it before it stops.

Both flavours (``serve_registered`` for ``grpc.Server`` with :class:`etcdisco.Client`,
``aio_serve_registered`` for ``grpc.aio.Server`` with :class:`etcdisco.AsyncClient`)
follow one order:

    start      server.start() -> health SERVING ("" and every name) -> register
    shutdown   health NOT_SERVING + registry status "draining"
               -> wait until no new RPC arrived for ``quiet_period`` seconds
                  (never longer than ``drain_timeout``)
               -> deregister (key deleted, lease revoked)
               -> server.stop(grace): RPCs still running get ``grace`` seconds

Registering only once the server listens means no client is sent to a port that
refuses it. The quiet period counts from the drain's start as well as from the last
arrival, so clients always get that long to see "draining" before the key goes; a
client that never stops sending is cut off by ``drain_timeout``. A second signal
during the wait skips the rest of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

import grpc
import grpc.aio

from .._async_client import AsyncClient
from .._errors import ConfigError, EtcdiscoError
from .._model import normalize_address
from ..registry import Registration
from ..sync import Client, SyncRegistration
from ._advertise import advertised_address
from ._server import SERVING, Activity, ServerKit, kit_of

log = logging.getLogger("etcdisco.grpc")

_ETCD_STEP_TIMEOUT = 5.0
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass(frozen=True)
class DrainPolicy:
    """How a registered server drains; validated on creation."""

    quiet_period: float = 1.0
    drain_timeout: float = 10.0
    grace: float = 5.0

    def __post_init__(self) -> None:
        for name in ("quiet_period", "drain_timeout", "grace"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value < 0:
                raise ConfigError(f"{name} must be a number >= 0, not {value!r}")


@dataclass(frozen=True)
class DrainReport:
    """What a drain did: ``quiet`` is False when ``drain_timeout`` (or a second signal)
    ended the wait while clients were still sending."""

    quiet: bool
    waited: float
    rpcs_while_draining: int


def _names(services: str | Sequence[str]) -> tuple[str, ...]:
    names = (services,) if isinstance(services, str) else tuple(services)
    if not names:
        raise ConfigError("services is empty: name at least one service to register")
    return names


def _address(port: int | None, address: str | None, host: str | None) -> str:
    if address is not None:
        if host is not None:
            raise ConfigError("give address or host, not both")
        return normalize_address(address)
    if port is None or isinstance(port, bool) or not isinstance(port, int) or port <= 0:
        raise ConfigError(
            f"port must be the port the server listens on (what add_insecure_port "
            f"returned), not {port!r}; or give address"
        )
    return advertised_address(port, host)


def _prepared(
    server: object,
    services: str | Sequence[str],
    port: int | None,
    address: str | None,
    host: str | None,
    timings: tuple[float, float, float],
    handle_signals: bool,
) -> tuple[tuple[str, ...], str, DrainPolicy, ServerKit]:
    """Both flavours' checks, made before anything starts; ``timings`` are the
    quiet period, drain timeout and grace."""
    names = _names(services)
    advertised = _address(port, address, host)
    policy = DrainPolicy(*timings)
    kit = kit_of(server)
    if handle_signals and threading.current_thread() is not threading.main_thread():
        raise ConfigError(
            "handle_signals=True needs the main thread (Python delivers signals there)"
        )
    return names, advertised, policy, kit


def _quiet_step(
    activity: Activity, policy: DrainPolicy, started: float, hurried: bool
) -> bool | float:
    """The next step of a drain's wait for quiet (the flavours sleep, a second signal
    wakes them): True once no RPC has arrived for the quiet period, counted from the
    drain's start too; False when ``drain_timeout`` or a second signal ends the wait
    first; else the seconds to sleep before looking again."""
    now = time.monotonic()
    left = max(started, activity.last_arrival) + policy.quiet_period - now
    if left <= 0:
        return True
    deadline = started + policy.drain_timeout
    if now >= deadline or hurried:
        return False
    return min(left, deadline - now)


def _drained(address: str, quiet: bool, waited: float, rpcs: int) -> DrainReport:
    report = DrainReport(quiet, waited, rpcs)
    log.info(
        "%s drained in %.2fs (%s, %d RPCs while draining) and stopped",
        address,
        waited,
        "quiet" if quiet else "timed out",
        rpcs,
    )
    return report


# -- asyncio -----------------------------------------------------------------------


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
        self._signals: list[int] = []

    @property
    def health(self) -> Any:
        """The server's ``grpc_health`` HealthServicer (aio flavour)."""
        return self._kit.health

    @property
    def draining(self) -> bool:
        return self._task is not None

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in _SIGNALS:
            loop.add_signal_handler(sig, self._on_signal, sig)
            self._signals.append(sig)

    def _remove_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        while self._signals:
            loop.remove_signal_handler(self._signals.pop())

    def _on_signal(self, sig: int) -> None:
        if self._task is None:
            log.info("%s: draining %s", signal.Signals(sig).name, self.address)
            self._start()
        else:
            log.info("%s again: skipping the rest of the drain wait", signal.Signals(sig).name)
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
            await self._each("deregister", lambda reg: reg.deregister(_ETCD_STEP_TIMEOUT))
            await self.server.stop(self.policy.grace)
        finally:
            # Only now: until the server has stopped, a second signal means "hurry",
            # not the default action (which would kill the process mid-drain).
            self._remove_signal_handlers()
        rpcs = self._kit.activity.arrivals - arrivals
        self.drain_report = report = _drained(self.address, quiet, waited, rpcs)
        return report

    async def _each(self, what: str, step: Callable[[Registration], Awaitable[None]]) -> None:
        async def one(reg: Registration) -> None:
            try:
                async with asyncio.timeout(_ETCD_STEP_TIMEOUT):
                    await step(reg)
            except (EtcdiscoError, TimeoutError) as exc:
                # Carry on: the lease expiring withdraws the instance anyway.
                log.warning("%s %s failed: %s", what, reg.key, exc)

        await asyncio.gather(*(one(reg) for reg in self.registrations))

    async def _wait_quiet(self, started: float) -> bool:
        while True:
            step = _quiet_step(self._kit.activity, self.policy, started, self._hurry.is_set())
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
    names, advertised, policy, kit = _prepared(
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
                await reg.deregister(_ETCD_STEP_TIMEOUT)
        await server.stop(0)
        raise
    served = AioRegisteredServer(server, kit, registrations, advertised, policy)
    if handle_signals:
        served._install_signal_handlers()
    log.info("serving %s at %s", ",".join(names), advertised)
    return served


# -- threads -----------------------------------------------------------------------


class RegisteredServer:
    """A started ``grpc.Server`` registered under one or more service names.

    ``shutdown()`` drains and stops it (see the module docstring) on a thread of its
    own, and waits; ``wait_for_termination()`` returns once that is done, whoever
    started it (a call, or SIGTERM/SIGINT with ``handle_signals``). ``with`` shuts
    down on exit.
    """

    def __init__(
        self,
        server: grpc.Server,
        kit: ServerKit,
        registrations: Sequence[SyncRegistration],
        address: str,
        policy: DrainPolicy,
    ) -> None:
        self.server = server
        self.address = address
        self.registrations = tuple(registrations)
        self.policy = policy
        self.drain_report: DrainReport | None = None
        self._kit = kit
        # Never released: the first acquire wins. Non-blocking, so a signal handler
        # interrupting a shutdown() call on the same thread cannot deadlock on it.
        self._once = threading.Lock()
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._done = threading.Event()
        self._hurry = threading.Event()
        self._previous: dict[int, Any] = {}

    @property
    def health(self) -> Any:
        """The server's ``grpc_health`` HealthServicer."""
        return self._kit.health

    @property
    def draining(self) -> bool:
        return self._started.is_set()

    def _install_signal_handlers(self) -> None:
        for sig in _SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _restore_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may; the handler is harmless once drained
        while self._previous:
            sig, handler = self._previous.popitem()
            signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._start():
            log.info("%s: draining %s", signal.Signals(signum).name, self.address)
        else:
            log.info("%s again: skipping the rest of the drain wait", signal.Signals(signum).name)
            self._hurry.set()

    def _start(self) -> bool:
        if not self._once.acquire(blocking=False):
            return False
        self._thread = threading.Thread(
            target=self._shutdown, name=f"etcdisco-drain-{self.address}", daemon=True
        )
        self._thread.start()
        self._started.set()
        return True

    def shutdown(self) -> DrainReport | None:
        """Drain, deregister and stop (once; later calls wait for the first).
        Returns the drain's report (None if the drain itself failed)."""
        self._start()
        return self.wait_for_termination()

    def wait_for_termination(self, timeout: float | None = None) -> DrainReport | None:
        """Wait until the server has been drained and stopped (at most ``timeout``)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._started.wait(timeout):
            return None
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not self._done.wait(left):
            return None
        assert self._thread is not None
        self._thread.join()
        self._restore_signal_handlers()
        return self.drain_report

    def _shutdown(self) -> None:
        try:
            started = time.monotonic()
            arrivals = self._kit.activity.arrivals
            self._kit.health.enter_graceful_shutdown()
            self._each("mark draining", lambda reg: reg.drain())
            quiet = self._wait_quiet(started)
            waited = time.monotonic() - started
            self._each("deregister", lambda reg: reg.deregister(_ETCD_STEP_TIMEOUT))
            self.server.stop(self.policy.grace).wait()
            rpcs = self._kit.activity.arrivals - arrivals
            self.drain_report = _drained(self.address, quiet, waited, rpcs)
        except Exception:
            log.exception("draining %s failed; stopping the server", self.address)
            self.server.stop(0)
        finally:
            self._done.set()

    def _each(self, what: str, step: Callable[[SyncRegistration], None]) -> None:
        for reg in self.registrations:
            try:
                step(reg)
            except EtcdiscoError as exc:
                log.warning("%s %s failed: %s", what, reg.key, exc)

    def _wait_quiet(self, started: float) -> bool:
        while True:
            step = _quiet_step(self._kit.activity, self.policy, started, self._hurry.is_set())
            if isinstance(step, bool):
                return step
            self._hurry.wait(step)

    def __enter__(self) -> RegisteredServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        names = ",".join(r.service for r in self.registrations)
        return f"<RegisteredServer {names} at {self.address}>"


def serve_registered(
    client: Client,
    server: grpc.Server,
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
) -> RegisteredServer:
    """The blocking twin of :func:`aio_serve_registered`, for a ``grpc.Server`` built
    by :func:`etcdisco.grpc.server` (not started) and an :class:`etcdisco.Client`.
    ``handle_signals`` needs the main thread."""
    if not isinstance(client, Client):
        raise ConfigError(
            "serve_registered needs an etcdisco.Client (AsyncClient: aio_serve_registered)"
        )
    names, advertised, policy, kit = _prepared(
        server, services, port, address, host, (quiet_period, drain_timeout, grace), handle_signals
    )

    server.start()
    registrations: list[SyncRegistration] = []
    try:
        for name in ("", *names, *health_names):
            kit.health.set(name, SERVING)
        for name in names:
            registrations.append(
                client.register(
                    name, advertised, instance_id=instance_id, metadata=metadata, ttl=ttl
                )
            )
    except BaseException:
        kit.health.enter_graceful_shutdown()
        for reg in registrations:
            with contextlib.suppress(EtcdiscoError):
                reg.deregister(_ETCD_STEP_TIMEOUT)
        server.stop(0)
        raise
    served = RegisteredServer(server, kit, registrations, advertised, policy)
    if handle_signals:
        served._install_signal_handlers()
    log.info("serving %s at %s", ",".join(names), advertised)
    return served
