"""The gunicorn server hooks: the master registers each listening address once and
drains it before gunicorn closes the listeners.

How gunicorn (27) stops, read in ``gunicorn/arbiter.py``: a signal handler only
queues the signal; the master's loop takes it off the queue and calls
``self.handle_<name>()`` (looked up with ``getattr`` on the arbiter, so an attribute
set on the instance wins). ``handle_term`` raises ``StopIteration``; ``run`` turns that
into ``halt()``, which calls ``stop()`` (close the listening sockets, SIGTERM the
workers, wait ``graceful_timeout``, SIGKILL the rest) and only then the ``on_exit``
hook. No hook runs between the signal and the sockets closing, so a drain in
``on_exit`` (or ``worker_int``/``worker_exit``) would come after the port has closed.
Hence :meth:`when_ready` replaces the arbiter's ``handle_term`` with one that drains
first (status ``draining``, readiness 503, the quiet wait), still in the master's
loop, and then calls gunicorn's own. ``handle_int`` / ``handle_quit`` (gunicorn's quick
shutdown) deregister at once, without the quiet wait, then call gunicorn's.

While it drains the master's loop is inside ``handle_term``; it still takes signals:
it lets ``signal.set_wakeup_fd`` wake it, takes them off gunicorn's queue, reaps
workers on SIGCHLD, and a second SIGTERM (or SIGINT/SIGQUIT) ends the quiet wait
(SIGINT/SIGQUIT then stop quickly, as gunicorn would).

Requests are counted in shared memory (:class:`etcdisco.uvicorn.SharedActivity`, as
``etcdisco.uvicorn.run(workers=N)`` does): each worker gets a slot (assigned by the
master in ``pre_fork``, freed in ``child_exit``) and ``post_worker_init`` wraps the
worker's ASGI app in :class:`etcdisco.asgi.ActivityMiddleware` counting into it and
answering ``health_path`` from the registration's state. The registration itself is
held by a separate process (see ``_registrar``): the master forks workers, and the
etcd client's gRPC does not survive a fork.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from multiprocessing.context import SpawnProcess
from typing import Any

from .._drain import STEP_TIMEOUT, DrainPolicy
from .._errors import ConfigError
from .._settings import ClientSettings
from ..asgi import ActivityMiddleware, RequestActivity, ServerRegistration, ServeSpec
from ..asgi._activity import ASGIApp, Message, Receive, Scope, Send
from ..asgi._lifespan import SERVER_HOOK, STATE_KEY
from ..uvicorn import SharedActivity, WorkerView
from ._registrar import registrar_main

__all__ = ["Hooks"]

SLOTS = 256  # workers alive at once (gunicorn --workers, raised by TTIN)
_SLOT_ATTR = "_etcdisco_slot"
_QUICK = (signal.SIGINT, signal.SIGQUIT)


class _StandDown:
    """What an ``etcdisco.asgi.lifespan`` in the app sees in a worker: the master
    registers, so the lifespan registers nothing and exposes the master's view."""

    def __init__(self, view: WorkerView) -> None:
        self._view = view
        self._activity = RequestActivity()

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
        raise ConfigError("a gunicorn worker does not register: its master does")


class _Started:
    """ASGI wrapper in a worker: tells the registrar once the app's lifespan startup
    has completed (the worker serves right after), or once an app without a lifespan
    has said so."""

    def __init__(self, app: ASGIApp, notify: Callable[[], None]) -> None:
        self.app = app
        self._notify = notify

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def watched(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                self._notify()
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except BaseException:
            self._notify()  # no lifespan support: uvicorn serves anyway ("auto")
            raise


class Hooks(Mapping[str, Callable[..., None]]):
    """gunicorn server hooks (``when_ready``, ``pre_fork``, ``post_worker_init``,
    ``child_exit``, ``on_exit``), a mapping from hook name to function, so that a
    gunicorn config file can take them all with ``globals().update(hooks(...))``, or
    call them from hooks of its own (``hooks["when_ready"](server)``)."""

    def __init__(
        self,
        spec: ServeSpec,
        policy: DrainPolicy,
        *,
        settings: ClientSettings | None,
        health_path: str | None,
    ) -> None:
        if health_path is not None and not health_path.startswith("/"):
            raise ConfigError(f"health_path must start with '/', not {health_path!r}")
        self.spec = spec
        self.policy = policy
        self.settings = settings
        self.health_path = health_path
        self._ctx = multiprocessing.get_context("spawn")
        self._shared: SharedActivity | None = None
        self._orders: multiprocessing.connection.Connection | None = None
        self._ready: multiprocessing.connection.Connection | None = None
        self._registrar: SpawnProcess | None = None
        self._addresses: list[str] = []
        self._free = list(range(SLOTS - 1, -1, -1))
        self._draining = False
        self._hooks: dict[str, Callable[..., None]] = {
            "when_ready": self.when_ready,
            "pre_fork": self.pre_fork,
            "post_worker_init": self.post_worker_init,
            "child_exit": self.child_exit,
            "on_exit": self.on_exit,
        }

    # -- the mapping ---------------------------------------------------------------

    def __getitem__(self, name: str) -> Callable[..., None]:
        return self._hooks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._hooks)

    def __len__(self) -> int:
        return len(self._hooks)

    # -- master --------------------------------------------------------------------

    def when_ready(self, arbiter: Any) -> None:
        """(master) The listeners are bound, no worker runs yet: start the registrar
        (it registers once the first worker has started its app) and put the drain
        in front of gunicorn's SIGTERM handling."""
        listeners: list[tuple[str, int]] = []
        for listener in arbiter.LISTENERS:
            sock = getattr(listener, "sock", None)
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                host, port = sock.getsockname()[:2]
                listeners.append((str(host), int(port)))
            else:
                arbiter.log.warning("etcdisco: %s is not a TCP listener; not registered", listener)
        if not listeners:
            raise ConfigError(
                "etcdisco.gunicorn: no TCP listener to register (reuse_port, or only "
                "unix sockets?); bind gunicorn to host:port"
            )
        self._addresses = [self.spec.advertised(port, host) for host, port in listeners]
        self._shared = SharedActivity.create(self._ctx, SLOTS)
        ready_reader, self._ready = self._ctx.Pipe(duplex=False)
        self._orders, theirs = self._ctx.Pipe()
        self._registrar = self._ctx.Process(
            target=registrar_main,
            args=(
                self.spec,
                self.settings,
                self.policy,
                listeners,
                self._shared.raw,
                SLOTS,
                theirs,
                ready_reader,
                logging.getLogger("gunicorn.error").getEffectiveLevel(),
            ),
            name="etcdisco-registrar",
            daemon=True,
        )
        self._registrar.start()
        theirs.close()
        ready_reader.close()
        arbiter.log.info(
            "etcdisco: registrar [%s] registers %s at %s once a worker serves",
            self._registrar.pid,
            ",".join(self.spec.services),
            ", ".join(self._addresses),
        )
        term, quick_int, quick_quit = arbiter.handle_term, arbiter.handle_int, arbiter.handle_quit
        arbiter.handle_term = lambda: self._on_term(arbiter, term)
        arbiter.handle_int = lambda: self._on_quick(arbiter, quick_int)
        arbiter.handle_quit = lambda: self._on_quick(arbiter, quick_quit)

    def pre_fork(self, arbiter: Any, worker: Any) -> None:
        """(master) Give the worker about to start a counter slot of its own."""
        if not self._free:
            raise ConfigError(f"etcdisco.gunicorn counts at most {SLOTS} workers at once")
        setattr(worker, _SLOT_ATTR, self._free.pop())

    def child_exit(self, arbiter: Any, worker: Any) -> None:
        """(master) A worker has exited (gunicorn starts another unless stopping): its
        requests are not in flight any more; its slot is free. The registration stays."""
        slot = getattr(worker, _SLOT_ATTR, None)
        if slot is not None and self._shared is not None:
            self._shared.forget_in_flight(slot)
            self._free.append(slot)

    def on_exit(self, arbiter: Any) -> None:
        """(master) gunicorn has closed the listeners and stopped the workers:
        deregister (the registrar deletes the keys, revokes the lease and exits)."""
        self._stop_registrar(arbiter, wait=True)

    # -- worker --------------------------------------------------------------------

    def post_worker_init(self, worker: Any) -> None:
        """(worker) Count the worker's requests, answer ``health_path``, tell the
        registrar when the app has started, and let the app see the registration
        (``request.app.state.etcdisco``: services, address, state)."""
        if self._shared is None or self._ready is None:
            raise ConfigError("etcdisco.gunicorn: when_ready did not run in the master")
        if self._orders is not None:
            self._orders.close()  # the master's end: its closing tells the registrar
        ready = self._ready
        sent = False

        def notify() -> None:
            nonlocal sent
            if not sent:
                sent = True
                with contextlib.suppress(OSError):
                    ready.send_bytes(b"started")

        view = WorkerView(self.spec.services, ", ".join(self._addresses), self._shared)
        app = worker.wsgi
        state = getattr(app, "state", None)
        if state is not None and getattr(state, STATE_KEY, None) is None:
            with contextlib.suppress(AttributeError, TypeError):
                setattr(state, STATE_KEY, view)
        SERVER_HOOK.set(_StandDown(view))  # copied into the worker's event loop
        slot = self._shared.slot(getattr(worker, _SLOT_ATTR))
        worker.wsgi = _Started(ActivityMiddleware(app, slot, self.health_path), notify)

    # -- signals in the master ----------------------------------------------------

    def _on_term(self, arbiter: Any, gunicorns: Callable[[], None]) -> None:
        quick = self._drain(arbiter) if not self._draining else None
        if quick is not None:
            arbiter.stop(False)  # what gunicorn's handle_int / handle_quit do
        gunicorns()

    def _on_quick(self, arbiter: Any, gunicorns: Callable[[], None]) -> None:
        # gunicorn's quick shutdown: no quiet wait, but the keys go before the port.
        self._stop_registrar(arbiter, wait=True)
        gunicorns()

    def _drain(self, arbiter: Any) -> int | None:
        """Drain, while the listeners still accept; returns SIGINT/SIGQUIT if one
        asked for a quick stop meanwhile."""
        self._draining = True
        orders = self._orders
        if orders is None or self._registrar is None or not self._registrar.is_alive():
            return None
        arbiter.log.info("etcdisco: draining %s", ", ".join(self._addresses))
        try:
            orders.send("drain")
        except OSError:
            return None
        quick: int | None = None
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        previous = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        # Marking draining and deregistering take at most STEP_TIMEOUT each.
        deadline = time.monotonic() + self.policy.drain_timeout + 2 * STEP_TIMEOUT
        try:
            while (left := deadline - time.monotonic()) > 0:
                woken = multiprocessing.connection.wait([orders, wake_r], timeout=left)
                if orders in woken:
                    try:
                        _, quiet, waited, requests = orders.recv()
                    except (EOFError, OSError):
                        arbiter.log.warning("etcdisco: the registrar is gone")
                        return quick
                    arbiter.log.info(
                        "etcdisco: drained in %.2fs (%s, %d requests while draining)",
                        waited,
                        "quiet" if quiet else "timed out",
                        requests,
                    )
                    return quick
                if wake_r in woken:
                    with contextlib.suppress(BlockingIOError):
                        wake_r.recv(4096)
                    quick = self._signals_while_draining(arbiter, orders, quick)
            arbiter.log.warning("etcdisco: no answer from the registrar; stopping anyway")
            return quick
        finally:
            signal.set_wakeup_fd(previous)
            wake_r.close()
            wake_w.close()

    def _signals_while_draining(
        self, arbiter: Any, orders: multiprocessing.connection.Connection, quick: int | None
    ) -> int | None:
        while True:
            try:
                sig = arbiter.SIG_QUEUE.get_nowait()
            except Exception:  # queue.Empty
                return quick
            if sig == signal.SIGCHLD:
                arbiter.reap_workers()  # a dead worker is replaced after the drain
            elif sig in (signal.SIGTERM, *_QUICK):
                arbiter.log.info(
                    "etcdisco: %s again: ending the drain's wait", signal.Signals(sig).name
                )
                if sig in _QUICK:
                    quick = sig
                with contextlib.suppress(OSError):
                    orders.send("hurry")
            else:
                arbiter.log.info("etcdisco: %s ignored while draining", signal.Signals(sig).name)

    def _stop_registrar(self, arbiter: Any, *, wait: bool) -> None:
        registrar, orders = self._registrar, self._orders
        if registrar is None or orders is None:
            return
        with contextlib.suppress(OSError):
            orders.send("stop")
        if wait:
            # gunicorn may have reaped it already (waitpid(-1)): wait on its sentinel.
            deadline = 2 * STEP_TIMEOUT + 5
            if not multiprocessing.connection.wait([registrar.sentinel], timeout=deadline):
                arbiter.log.warning("etcdisco: the registrar did not exit; killing it")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(registrar.pid or 0, signal.SIGKILL)
            self._registrar = None
            orders.close()
            self._orders = None
