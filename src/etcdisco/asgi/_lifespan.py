"""``etcdisco.asgi.lifespan``: registration from an ASGI application's lifespan, for
apps run by any server (``uvicorn app:app``, ``uvicorn --workers N``, gunicorn with
uvicorn workers, hypercorn).

What a lifespan can and cannot do:

- Its startup runs before the server binds its port. So it does not register there:
  it starts a task that waits until the advertised address accepts connections (a
  TCP connect every 50 ms; with an explicit ``address``, which may be a name or a
  NAT's address, to ``127.0.0.1`` and ``port``), then registers. A server bound to
  127.0.0.1 while the advertised host is this host's primary IP is never registered
  (a warning says so): give ``host="127.0.0.1"``. Health checks
  given with the registration run their first round against a server that answers.
- Its teardown runs after the server has closed its listening sockets and finished
  its connections (uvicorn's ``Server.shutdown``, gunicorn's ``on_exit``): all it can
  do is deregister, late. Between the listeners closing and clients seeing the key
  go, new connections to the instance are refused, and requests on kept-alive
  connections that the server closes meet a closed connection (fatal for a POST).
  ``tests/integration/test_asgi_servers.py`` measures it, and
  ``benchmarks/bench_http_server.py`` reports it per restart. The fix is to drain
  before the listeners close: run the app with ``etcdisco.uvicorn`` (``run``,
  ``Server``, or ``etcdisco serve SERVICE --app module:app``).
- Several workers run the lifespan each: an :class:`~._lock.AddressLock` lets one of
  them register the address; the others serve unregistered.

Run by ``etcdisco.uvicorn`` the lifespan adapts (a context variable set by the server
tells it so): with no ``service=`` given to the server, the server adopts this
registration (registers it once listening, drains it before closing the listeners,
and this teardown deregisters it); with ``service=`` given to the server, or in a
worker of ``etcdisco.uvicorn.run(workers=N)`` (whose master registers), this
lifespan registers nothing and exposes the server's registration (in a worker, a
read-only view of the master's: services, address, state).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from .._address import join_address, parse_address
from .._async_client import AsyncClient
from .._backoff import Backoff
from .._errors import ConfigError, EtcdError, EtcdiscoError
from .._model import DEFAULT_PREFIX
from .._settings import ClientSettings
from ..health import Check
from ._activity import RequestActivity
from ._lock import AddressLock
from ._registration import ServerRegistration, ServeSpec

__all__ = ["SERVER_HOOK", "ServerHook", "lifespan"]

log = logging.getLogger("etcdisco.asgi")

AppLifespan = Callable[[Any], AbstractAsyncContextManager[Mapping[str, Any] | None]]

STATE_KEY = "etcdisco"
"""Where the registration goes: lifespan state (``request.state.etcdisco``) and
``app.state.etcdisco``."""

PROBE_INTERVAL = 0.05


class ServerHook(Protocol):
    """What an ``etcdisco.uvicorn`` server offers the lifespan running in it."""

    @property
    def activity(self) -> RequestActivity: ...

    @property
    def registration(self) -> ServerRegistration | None:
        """The server's own registration (it was given ``service=``), or None."""

    @property
    def registers_elsewhere(self) -> bool:
        """True in a worker whose master registers the address."""

    @property
    def exposed(self) -> object:
        """What the app sees when the server registers (its registration, or in a
        worker a view of the master's)."""

    def adopt(self, registration: ServerRegistration) -> None:
        """Register ``registration`` once listening, drain it before closing."""


SERVER_HOOK: contextvars.ContextVar[ServerHook | None] = contextvars.ContextVar(
    "etcdisco_server_hook", default=None
)


def _expose(app: Any, state: dict[str, Any], registration: object) -> None:
    state[STATE_KEY] = registration
    app_state = getattr(app, "state", None)
    if app_state is not None:
        with contextlib.suppress(AttributeError, TypeError):
            setattr(app_state, STATE_KEY, registration)


async def _wait_accepting(host: str, port: int) -> None:
    """Return once ``host:port`` accepts a TCP connection."""
    started = time.monotonic()
    warned = False
    while True:
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            if not warned and time.monotonic() - started > 10:
                warned = True
                log.warning(
                    "%s still refuses connections; not registered yet", join_address(host, port)
                )
            await asyncio.sleep(PROBE_INTERVAL)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return


async def _register_when_listening(
    registration: ServerRegistration, lock: AddressLock | None, probe: tuple[str, int], port: int
) -> None:
    await _wait_accepting(*probe)
    if lock is not None and not lock.try_acquire():
        registration.stand_by(registration.spec.advertised(port, None))
        return
    backoff = Backoff(initial=0.5, maximum=10.0)
    while True:
        try:
            await registration.listening(port, None)
            return
        except EtcdError as exc:
            delay = backoff.next_delay()
            log.warning("registering failed (%s); again in %.1fs", exc, delay)
            await asyncio.sleep(delay)
        except EtcdiscoError as exc:  # not something waiting mends
            log.error("not registered: %s", exc)
            return


def lifespan(
    services: str | Sequence[str],
    *,
    port: int | None = None,
    address: str | None = None,
    host: str | None = None,
    client: AsyncClient | None = None,
    settings: ClientSettings | None = None,
    instance_id: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    ttl: int = 10,
    checks: Sequence[Check] = (),
    on_failing: str = "mark",
    app_lifespan: AppLifespan | None = None,
    lock_dir: str | os.PathLike[str] | None = None,
) -> Callable[[Any], AbstractAsyncContextManager[dict[str, Any]]]:
    """A lifespan (Starlette/FastAPI ``lifespan=``) that registers the app under
    ``services`` once its server accepts connections, and deregisters it on shutdown
    (too late to spare callers errors: see the module docstring).

    ``port``: the port the server listens on (``uvicorn --port``); not needed when run
    by ``etcdisco.uvicorn``. ``address``: the address to advertise, else ``host``
    (the advertised host, and the one the readiness probe connects to; default: this
    host's primary IP) with ``port``. ``client``: an
    :class:`etcdisco.AsyncClient` on the server's loop, or None to open one from
    ``settings`` (default: ``$ETCDISCO_ENDPOINTS``). ``app_lifespan``: the app's own
    lifespan, entered first and left last; its state is passed on. ``lock_dir``:
    where the workers of one server elect the one that registers.

    The registration (:class:`ServerRegistration`) is in the lifespan state
    (``request.state.etcdisco``) and in ``app.state.etcdisco``.
    """
    spec = ServeSpec.of(
        services,
        address=address,
        host=host,
        instance_id=instance_id,
        metadata=metadata,
        ttl=ttl,
        checks=checks,
        on_failing=on_failing,
    )
    if port is not None and (
        isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536
    ):
        raise ConfigError(f"port must be the port the server listens on (1-65535), not {port!r}")
    if client is not None and settings is not None:
        raise ConfigError("give client or settings, not both")
    prefix = (
        client.prefix if client is not None else (settings.prefix if settings else DEFAULT_PREFIX)
    )

    @contextlib.asynccontextmanager
    async def run(app: Any) -> AsyncIterator[dict[str, Any]]:
        hook = SERVER_HOOK.get()
        async with contextlib.AsyncExitStack() as stack:
            state: dict[str, Any] = {}
            if app_lifespan is not None:
                inner = await stack.enter_async_context(app_lifespan(app))
                state.update(inner or {})
            if hook is not None and (hook.registration is not None or hook.registers_elsewhere):
                # The server registers (or its master does): stand down.
                _expose(app, state, hook.exposed)
                yield state
                return
            registration = ServerRegistration(
                spec,
                hook.activity if hook is not None else RequestActivity(),
                client=client,
                settings=settings,
            )
            _expose(app, state, registration)
            if hook is not None:
                hook.adopt(registration)
                try:
                    yield state
                finally:
                    await registration.deregister()
                return
            if port is None:
                raise ConfigError(
                    "etcdisco.asgi.lifespan needs port= (the port the server listens on), "
                    "unless the app runs under etcdisco.uvicorn"
                )
            advertised = spec.advertised(port, None)
            probe = ("127.0.0.1", port) if address is not None else parse_address(advertised)
            lock = AddressLock(prefix, advertised, lock_dir)
            task = asyncio.get_running_loop().create_task(
                _register_when_listening(registration, lock, probe, port),
                name=f"etcdisco-register-{port}",
            )
            try:
                yield state
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                try:
                    await registration.deregister()
                finally:
                    lock.release()

    return run
