"""Several uvicorn workers on one address, registered once, by the master.

``uvicorn --workers N`` runs the app's lifespan in every worker: N registrations of one
``host:port`` (N leases fighting over one key), and the first worker to exit deletes
the key while the others still serve. Here the master process registers the address,
once, and drains it for all of them:

    master      bind the socket -> start N workers (spawned, as uvicorn does) ->
                register once the first worker accepts connections
    SIGTERM     status "draining", readiness 503 in every worker -> wait until no
                request arrived in any worker for the quiet period -> tell the
                workers to close (each closes its listener, finishes its requests
                within ``grace``) -> deregister once they have exited
    a worker dies   the master starts another in its place; the registration stays,
                since the address still serves (the other workers, and the
                listening socket the master holds). One that fails before serving
                (uvicorn's exit code 3: the app cannot be imported, say) stops all.

Workers count requests into shared memory (a slot each: arrivals, the time of the
last one, requests in flight; one word for the registration's state, one for "close
now"). They ignore SIGINT and SIGTERM: a Ctrl-C reaches the whole process group, and
systemd's default ``KillMode=control-group`` signals every process, and a worker that
obeyed would close its listener before the drain. They stop when the master says so,
or when the master is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import time
from collections.abc import Sequence
from multiprocessing.context import SpawnContext, SpawnProcess
from typing import Any

import uvicorn

from .._drain import DrainPolicy, DrainReport
from .._errors import ConfigError
from .._settings import ClientSettings
from .._signals import StopSignals, signal_name
from ..asgi._activity import ActivityMiddleware, RequestActivity
from ..asgi._lifespan import SERVER_HOOK
from ..asgi._registration import Listener, ServerRegistration, ServeSpec
from ._server import expose

__all__ = ["SharedActivity", "WorkerView", "run_workers"]

log = logging.getLogger("etcdisco.uvicorn")

STARTUP_FAILURE = 3  # uvicorn's exit code for a worker that could not start
_STATES = ("starting", "serving", "draining", "stopped")
_HEADER = 2  # state, close-now
_SLOT = 3  # arrivals, last arrival, in flight


class SharedActivity:
    """The workers' request counters and the registration's state, in shared memory.

    The master reads the sums (``arrivals``, ``last_arrival``, ``in_flight``) and
    writes ``state``; worker ``i`` writes only through ``slot(i)``, on its loop's
    thread, so no lock is needed (one writer per word). ``time.monotonic()`` is one
    clock for every process of the machine (CLOCK_MONOTONIC)."""

    def __init__(self, raw: Any, slots: int) -> None:
        self.raw = raw
        self.slots = slots

    @classmethod
    def create(cls, ctx: SpawnContext, slots: int) -> SharedActivity:
        raw = ctx.RawArray("d", _HEADER + _SLOT * slots)
        raw[0] = 0.0
        raw[1] = 0.0
        for i in range(slots):
            raw[_HEADER + _SLOT * i + 1] = float("-inf")
        return cls(raw, slots)

    def _column(self, offset: int) -> list[float]:
        return [self.raw[_HEADER + _SLOT * i + offset] for i in range(self.slots)]

    @property
    def arrivals(self) -> int:
        return int(sum(self._column(0)))

    @property
    def last_arrival(self) -> float:
        return max(self._column(1))

    @property
    def in_flight(self) -> int:
        return int(sum(self._column(2)))

    @property
    def state(self) -> str:
        return _STATES[int(self.raw[0])]

    @state.setter
    def state(self, value: str) -> None:
        self.raw[0] = float(_STATES.index(value))

    @property
    def ready(self) -> bool:
        return self.state == "serving"

    @property
    def closing(self) -> bool:
        return bool(self.raw[1] != 0.0)

    def close_now(self) -> None:
        self.raw[1] = 1.0

    def forget_in_flight(self, index: int) -> None:
        """A dead worker's requests are not in flight any more."""
        self.raw[_HEADER + _SLOT * index + 2] = 0.0

    def slot(self, index: int) -> _Slot:
        return _Slot(self, _HEADER + _SLOT * index)


class _Slot:
    """One worker's counters (a :class:`etcdisco.asgi.Tracker`)."""

    def __init__(self, shared: SharedActivity, base: int) -> None:
        self._shared = shared
        self._raw = shared.raw
        self._base = base

    def enter(self) -> None:
        raw, base = self._raw, self._base
        raw[base] += 1.0
        raw[base + 1] = time.monotonic()
        raw[base + 2] += 1.0

    def leave(self) -> None:
        self._raw[self._base + 2] -= 1.0

    @property
    def ready(self) -> bool:
        return self._shared.ready

    @property
    def state(self) -> str:
        return self._shared.state


class WorkerView:
    """What the app sees in a worker as ``request.app.state.etcdisco`` (and
    ``request.state.etcdisco``): the master registers, so only a read-only view of
    its registration: the service names, the advertised address and the state
    (``starting``, ``serving``, ``draining``, ``stopped``)."""

    def __init__(self, services: tuple[str, ...], address: str, shared: SharedActivity) -> None:
        self.services = services
        self.address = address
        self._shared = shared

    @property
    def state(self) -> str:
        return self._shared.state

    @property
    def registered(self) -> bool:
        return self._shared.state in ("serving", "draining")

    def __repr__(self) -> str:
        return f"<WorkerView {','.join(self.services)} at {self.address} {self.state}>"


class _WorkerServer(uvicorn.Server):
    """A worker: counts into its slot, says when it listens, stops when told."""

    def __init__(
        self,
        config: uvicorn.Config,
        shared: SharedActivity,
        index: int,
        ready: multiprocessing.connection.Connection,
        master: int,
        health_path: str | None,
        view: WorkerView,
    ) -> None:
        super().__init__(config)
        self._view = view
        self._shared = shared
        self._slot = shared.slot(index)
        self._ready = ready
        self._master = master
        self._health_path = health_path
        self._activity = RequestActivity()  # unused: the lifespan stands down here

    # ServerHook: the master registers; an etcdisco.asgi.lifespan here stands down.
    @property
    def activity(self) -> RequestActivity:
        return self._activity

    @property
    def registration(self) -> ServerRegistration | None:
        return None

    @property
    def registers_elsewhere(self) -> bool:
        return True

    @property
    def exposed(self) -> object:
        return self._view

    def adopt(self, registration: ServerRegistration) -> None:
        raise ConfigError("a worker does not register: its master does")

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self.config.loaded_app = ActivityMiddleware(
            self.config.loaded_app, self._slot, self._health_path
        )
        token = SERVER_HOOK.set(self)
        try:
            await super().startup(sockets=sockets)
        finally:
            SERVER_HOOK.reset(token)
        if self.started:
            expose(self, self._view)
            with contextlib.suppress(OSError):
                self._ready.send_bytes(b"ready")

    async def on_tick(self, counter: int) -> bool:
        if self._shared.closing or os.getppid() != self._master:
            return True
        return await super().on_tick(counter)

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield  # SIGINT and SIGTERM are ignored in workers: the master decides


def _worker_main(
    config: uvicorn.Config,
    sock: socket.socket,
    raw: Any,
    slots: int,
    index: int,
    ready: multiprocessing.connection.Connection,
    master: int,
    health_path: str | None,
    services: tuple[str, ...],
    address: str,
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    config.configure_logging()
    shared = SharedActivity(raw, slots)
    view = WorkerView(services, address, shared)
    server = _WorkerServer(config, shared, index, ready, master, health_path, view)
    server.run(sockets=[sock])


class _Worker:
    def __init__(
        self, index: int, proc: SpawnProcess, conn: multiprocessing.connection.Connection
    ) -> None:
        self.index = index
        self.proc = proc
        self.conn = conn
        self.ready = False
        self.exited = asyncio.Event()


class _Master:
    def __init__(
        self,
        config: uvicorn.Config,
        sock: socket.socket,
        workers: int,
        registration: ServerRegistration,
        shared: SharedActivity,
        policy: DrainPolicy,
        health_path: str | None,
        ctx: SpawnContext,
    ) -> None:
        self.config = config
        self.sock = sock
        self.count = workers
        self.registration = registration
        self.shared = shared
        self.policy = policy
        self.health_path = health_path
        self.ctx = ctx
        host, port = sock.getsockname()[:2]
        self.bound = (str(host), int(port))
        self.advertised = registration.spec.advertised(int(port), str(host))
        self.workers: dict[int, _Worker] = {}
        self.stopping = False
        self.exit_code = 0
        self.failure: BaseException | None = None
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._hurry = asyncio.Event()
        self._first_ready = asyncio.Event()
        self._signals = 0
        self._drain_over = False

    # -- workers -------------------------------------------------------------------

    def spawn(self, index: int) -> None:
        theirs, ours = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(
            target=_worker_main,
            args=(
                self.config,
                self.sock,
                self.shared.raw,
                self.shared.slots,
                index,
                ours,
                os.getpid(),
                self.health_path,
                self.registration.services,
                self.advertised,
            ),
            name=f"etcdisco-uvicorn-worker-{index}",
        )
        proc.start()
        ours.close()
        worker = _Worker(index, proc, theirs)
        self.workers[index] = worker
        self._loop.add_reader(theirs.fileno(), self._on_message, worker)
        self._loop.add_reader(proc.sentinel, self._on_exit, worker)
        log.info("started worker process [%s]", proc.pid)

    def _on_message(self, worker: _Worker) -> None:
        try:
            worker.conn.recv_bytes()
        except (EOFError, OSError):
            self._loop.remove_reader(worker.conn.fileno())
            return
        worker.ready = True
        self._first_ready.set()

    def _on_exit(self, worker: _Worker) -> None:
        self._loop.remove_reader(worker.proc.sentinel)
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(worker.conn.fileno())
        worker.proc.join(0)
        worker.conn.close()
        worker.exited.set()
        self.shared.forget_in_flight(worker.index)
        code = worker.proc.exitcode
        if self.stopping:
            return
        if not worker.ready and code == STARTUP_FAILURE:
            log.error("worker process [%s] failed to start; stopping", worker.proc.pid)
            self.exit_code = STARTUP_FAILURE
            self._stop.set()
            return
        log.warning(
            "worker process [%s] died (exit code %s); starting another (the address stays "
            "registered: the other workers still serve it)",
            worker.proc.pid,
            code,
        )
        self.spawn(worker.index)

    async def _stop_workers(self) -> None:
        self.stopping = True
        self.shared.close_now()
        # Each worker closes its listener within a tick, then gets ``grace`` for its
        # requests; after that (and a margin) it is killed.
        deadline = self.policy.grace + 5.0
        waiting = [w.exited.wait() for w in self.workers.values()]
        try:
            async with asyncio.timeout(deadline):
                await asyncio.gather(*waiting)
        except TimeoutError:
            for worker in self.workers.values():
                if worker.proc.exitcode is None:
                    log.warning("worker process [%s] did not stop; killing it", worker.proc.pid)
                    worker.proc.kill()
            await asyncio.gather(*(w.exited.wait() for w in self.workers.values()))

    # -- signals -------------------------------------------------------------------

    def on_signal(self, sig: int) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("%s: draining %s", signal_name(sig), self.registration.address or "the server")
            self._stop.set()
        elif not self._drain_over and not self._hurry.is_set():
            log.info("%s again: skipping the rest of the drain wait", signal_name(sig))
            self._hurry.set()
        else:
            log.info("%s again: killing the workers", signal_name(sig))
            for worker in self.workers.values():
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.kill()

    # -- the whole run -------------------------------------------------------------

    async def run(self) -> DrainReport | None:
        report: DrainReport | None = None
        with StopSignals(self.on_signal, self._loop):
            try:
                for index in range(self.count):
                    self.spawn(index)
                await _first(self._first_ready, self._stop)
                if not self._stop.is_set():
                    try:
                        await self.registration.listening(self.bound[1], self.bound[0])
                    except Exception as exc:
                        log.error("not registered: %s; stopping", exc)
                        self.failure = exc
                        self._stop.set()
                await self._stop.wait()
                if self.registration.registered and self.failure is None:
                    report = await self.registration.drain(self.policy, self._hurry)
            finally:
                self._drain_over = True
                try:
                    await self._stop_workers()
                finally:
                    await self.registration.deregister()
        return report


async def _first(*events: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


def run_workers(
    config: uvicorn.Config,
    workers: int,
    spec: ServeSpec,
    policy: DrainPolicy,
    *,
    settings: ClientSettings | None,
    health_path: str | None,
    listeners: Sequence[Listener] = (),
) -> DrainReport | None:
    """Serve ``config.app`` (an import string) from ``workers`` processes; the
    master registers ``spec`` and drains (see the module docstring)."""
    if not isinstance(config.app, str):
        raise ConfigError(
            "with workers, give the app as an import string ('module:app'): each "
            "worker process imports it"
        )
    ctx = multiprocessing.get_context("spawn")
    sock = config.bind_socket()
    try:
        shared = SharedActivity.create(ctx, workers)

        async def main() -> DrainReport | None:
            registration = ServerRegistration(spec, shared, settings=settings)
            for listener in listeners:
                registration.add_listener(listener)
            master = _Master(config, sock, workers, registration, shared, policy, health_path, ctx)
            report = await master.run()
            if master.failure is not None:
                raise master.failure
            if master.exit_code:
                raise SystemExit(master.exit_code)
            return report

        return asyncio.run(main())
    finally:
        sock.close()
