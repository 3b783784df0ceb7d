"""``serve_registered``: a ``grpc.Server`` registered in etcd through an
:class:`etcdisco.Client`, drained before it stops (the steps: ``_drain``). The drain
runs on a thread of its own, so a signal handler only has to start it."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grpc

from .._errors import ConfigError, EtcdiscoError
from .._signals import StopSignals
from ..sync import Client, SyncRegistration
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

__all__ = ["RegisteredServer", "serve_registered"]


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
        self._signals = StopSignals(self._on_signal)

    @property
    def health(self) -> Any:
        """The server's ``grpc_health`` HealthServicer."""
        return self._kit.health

    @property
    def draining(self) -> bool:
        return self._started.is_set()

    def _on_signal(self, signum: int) -> None:
        first = self._start()
        on_signal_message(signum, first, self.address)
        if not first:
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
        self._signals.remove()  # from the main thread only; harmless once drained
        return self.drain_report

    def _shutdown(self) -> None:
        try:
            started = time.monotonic()
            arrivals = self._kit.activity.arrivals
            self._kit.health.enter_graceful_shutdown()
            self._each("mark draining", lambda reg: reg.drain())
            quiet = self._wait_quiet(started)
            waited = time.monotonic() - started
            self._each("deregister", lambda reg: reg.deregister(STEP_TIMEOUT))
            self.server.stop(self.policy.grace).wait()
            rpcs = self._kit.activity.arrivals - arrivals
            self.drain_report = drained(self.address, quiet, waited, rpcs)
        except Exception:
            log.exception("draining %s failed; stopping the server", self.address)
            self.server.stop(0)
        finally:
            self._done.set()

    def _each(self, what: str, step: Callable[[SyncRegistration], None]) -> None:
        for reg in self.registrations:
            try:
                step(reg)
            except (EtcdiscoError, TimeoutError) as exc:
                # Carry on: the lease expiring withdraws the instance anyway.
                log.warning("%s %s failed: %s", what, reg.key, exc)

    def _wait_quiet(self, started: float) -> bool:
        while True:
            step = quiet_step(self._kit.activity, self.policy, started, self._hurry.is_set())
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
    names, advertised, policy, kit = prepare(
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
                reg.deregister(STEP_TIMEOUT)
        server.stop(0)
        raise
    served = RegisteredServer(server, kit, registrations, advertised, policy)
    if handle_signals:
        served._signals.install()
    log.info("serving %s at %s", ",".join(names), advertised)
    return served
