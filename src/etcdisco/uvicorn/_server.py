"""``etcdisco.uvicorn.Server``: a ``uvicorn.Server`` that registers once it listens
and drains before it closes its listeners.

uvicorn's own order on SIGTERM is: close the listening sockets, shut the connections
down, wait for them, then run the lifespan shutdown. This subclass puts the drain in
front, at the start of ``shutdown`` (before uvicorn closes anything):

    startup     lifespan startup -> bind and listen -> register (status up)
    SIGTERM     status "draining" + readiness 503 -> wait until no request arrived
                for ``quiet_period`` (at most ``drain_timeout``; a second signal
                skips the rest) -> uvicorn closes the listeners and the idle
                connections, waits up to ``grace`` for the busy ones -> lifespan
                shutdown -> deregister (if the lifespan did not)

Requests are counted by :class:`etcdisco.asgi.ActivityMiddleware`, put around the app
at startup (with ``health_path``, it also answers readiness there). A third signal
stops waiting for connections (uvicorn's ``force_exit``). Signals are handled like
uvicorn does (on the main thread), except that a signal is not raised again after
the server has stopped: a drained server returns normally.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import Awaitable, Generator, Mapping, Sequence
from typing import Any

import uvicorn

from .._async_client import AsyncClient
from .._drain import DrainPolicy, DrainReport
from .._errors import ConfigError
from .._settings import ClientSettings
from .._signals import StopSignals, signal_name
from ..asgi._activity import ActivityMiddleware, RequestActivity
from ..asgi._lifespan import SERVER_HOOK, STATE_KEY
from ..asgi._registration import Listener, ServerRegistration, ServeSpec
from ..health import Check

__all__ = ["Server", "drain_policy"]

log = logging.getLogger("etcdisco.uvicorn")


def drain_policy(
    config: uvicorn.Config, quiet_period: float, drain_timeout: float, grace: float | None
) -> DrainPolicy:
    """The policy, with ``grace`` (default: the config's ``timeout_graceful_shutdown``,
    else 5 s) written into the config, where uvicorn applies it."""
    if grace is None:
        configured = config.timeout_graceful_shutdown
        grace = 5.0 if configured is None else float(configured)
    policy = DrainPolicy(quiet_period, drain_timeout, grace)
    # uvicorn types it int; asyncio.timeout takes any number of seconds.
    setattr(config, "timeout_graceful_shutdown", policy.grace)  # noqa: B010
    return policy


def bound_address(
    server: uvicorn.Server, sockets: Sequence[socket.socket] | None
) -> tuple[str | None, int]:
    """(host, port) of the first TCP listener; port 0 when there is none (a Unix
    socket), so that only an explicit address can be advertised."""
    listeners = list(sockets or [])
    if not listeners:
        for srv in getattr(server, "servers", []):
            listeners.extend(srv.sockets or ())
    for sock in listeners:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            name = sock.getsockname()
            return str(name[0]), int(name[1])
    return None, 0


def unwrap_app(app: Any) -> Any:
    """The application inside uvicorn's (and our) middleware, for ``app.state``."""
    seen = 0
    while not hasattr(app, "state") and hasattr(app, "app") and seen < 20:
        app = app.app
        seen += 1
    return app


def expose(server: uvicorn.Server, registration: object) -> None:
    """Let the app see ``registration`` (unless its lifespan has put it there):
    ``request.state.etcdisco`` through the lifespan state uvicorn copies into each
    request, and ``request.app.state.etcdisco``."""
    server.lifespan.state.setdefault(STATE_KEY, registration)
    app_state = getattr(unwrap_app(server.config.loaded_app), "state", None)
    if app_state is not None and getattr(app_state, STATE_KEY, None) is None:
        with contextlib.suppress(AttributeError, TypeError):
            setattr(app_state, STATE_KEY, registration)


class Server(uvicorn.Server):
    """A ``uvicorn.Server`` that registers ``services`` once it listens and drains
    before closing its listeners (see the module docstring).

    Without ``services`` the app's :func:`etcdisco.asgi.lifespan` says what to
    register (the server adopts it); with neither, startup fails. The advertised
    address is ``address``, else ``advertise_host`` (default: the bound host when it
    is one address, this host's primary IP for a wildcard) with the bound port.
    ``client``: an :class:`etcdisco.AsyncClient` on the server's loop (only with
    ``await server.serve()`` on your own loop), else one is opened from ``settings``.
    ``grace``: how long requests still running get once the listeners are closed
    (uvicorn's ``timeout_graceful_shutdown``; default: the config's, else 5 s).
    ``health_path``: a readiness endpoint answered by the server (200 while
    registered and serving, 503 before and while draining).

    After ``run()``: ``drain_report`` (None if it never drained) and ``registration``.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        services: str | Sequence[str] | None = None,
        *,
        client: AsyncClient | None = None,
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
        grace: float | None = None,
        health_path: str | None = None,
    ) -> None:
        super().__init__(config)
        if health_path is not None and not health_path.startswith("/"):
            raise ConfigError(f"health_path must start with '/', not {health_path!r}")
        self.policy = drain_policy(config, quiet_period, drain_timeout, grace)
        self.health_path = health_path
        self.activity = RequestActivity()
        self.drain_report: DrainReport | None = None
        self._registration: ServerRegistration | None = None
        if services is not None:
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
            self._registration = ServerRegistration(
                spec, self.activity, client=client, settings=settings
            )
        elif client is not None or settings is not None or address is not None:
            raise ConfigError("client, settings and address go with services=")
        self._listeners: list[Listener] = []
        self._failure: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._hurry = asyncio.Event()
        self._hurried = False
        self._drain_over = False
        self._wrapped = False

    # -- what etcdisco.asgi.lifespan sees (ServerHook) -----------------------------

    @property
    def registration(self) -> ServerRegistration | None:
        return self._registration

    @property
    def registers_elsewhere(self) -> bool:
        return False

    @property
    def exposed(self) -> object:
        return self._registration

    def adopt(self, registration: ServerRegistration) -> None:
        if self._registration is not None:
            raise ConfigError("this server registers already (it was given services=)")
        self._registration = registration
        for listener in self._listeners:
            registration.add_listener(listener)

    def add_listener(self, listener: Listener) -> None:
        """Follow the registration's events (``registered``, ``draining``,
        ``drained``, ``deregistered``), adopted or not."""
        self._listeners.append(listener)
        if self._registration is not None:
            self._registration.add_listener(listener)

    # -- uvicorn's steps, in order -------------------------------------------------

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().serve(sockets=sockets)
        finally:
            if self._registration is not None:
                await self._registration.deregister()
        if self._failure is not None:
            raise self._failure

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        if self._hurried:
            self._hurry.set()
        if not self._wrapped:
            self.config.loaded_app = ActivityMiddleware(
                self.config.loaded_app, self.activity, self.health_path
            )
            self._wrapped = True
        token = SERVER_HOOK.set(self)  # the lifespan task started in here inherits it
        try:
            await super().startup(sockets=sockets)
        finally:
            SERVER_HOOK.reset(token)
        if not self.started or self.should_exit:
            return
        await self._register(sockets)

    async def _register(self, sockets: Sequence[socket.socket] | None) -> None:
        registration = self._registration
        try:
            if registration is None:
                raise ConfigError(
                    "nothing to register: give services= to etcdisco.uvicorn, or use "
                    "etcdisco.asgi.lifespan in the app"
                )
            host, port = bound_address(self, sockets)
            if port == 0 and registration.spec.address is None:
                raise ConfigError("the server listens on no TCP port: give address=")
            await registration.listening(port or 1, host)
        except Exception as exc:
            log.error("not registered: %s; stopping", exc)
            self._failure = exc
            self.should_exit = True
            return
        expose(self, registration)

    async def _drain(self) -> None:
        registration = self._registration
        try:
            if (
                registration is not None
                and registration.registered
                and self._failure is None
                and not self.force_exit
            ):
                drain = registration.drain(self.policy, self._hurry)
                self.drain_report = await self._ticking(drain)
        finally:
            self._drain_over = True

    async def _ticking(self, work: Awaitable[DrainReport]) -> DrainReport:
        """``work``, while uvicorn's tick goes on (its Date header, its notify)."""
        task = asyncio.ensure_future(work)
        counter = 0
        while not task.done():
            await asyncio.wait({task}, timeout=0.1)
            counter += 1
            await self.on_tick(counter)
        return task.result()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # Drain here rather than at the end of main_loop: a signal that comes while
        # registering makes uvicorn skip main_loop, never shutdown.
        await self._drain()
        await super().shutdown(sockets=sockets)  # listeners, connections, lifespan
        if self._registration is not None:
            await self._registration.deregister()  # unless the lifespan did

    # -- signals -------------------------------------------------------------------

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        with StopSignals(self._on_signal):
            yield

    def handle_exit(self, sig: int, frame: Any) -> None:
        self._on_signal(sig)

    def _on_signal(self, sig: int) -> None:
        """Runs on the main thread between bytecodes: flags and thread-safe calls only.
        The first signal drains, the next one skips the rest of the drain's wait (if
        it is not over), any later one stops waiting for connections."""
        where = self._registration.address if self._registration is not None else None
        if not self.should_exit:
            log.info("%s: draining %s", signal_name(sig), where or "the server")
            self.should_exit = True
        elif not self._drain_over and not self._hurried:
            log.info("%s again: skipping the rest of the drain wait", signal_name(sig))
            self._hurried = True
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._hurry.set)
        else:
            log.info("%s again: not waiting for connections", signal_name(sig))
            self.force_exit = True
