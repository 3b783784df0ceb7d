"""The process that holds a gunicorn server's registration.

The master cannot hold it itself: registering needs an etcd client (gRPC, with its
own threads), and gunicorn forks every worker from the master, at start and whenever
one dies. gRPC does not survive a fork (a worker that opened a channel of its own,
say an ``etcdisco.http`` client calling other services, could hang), so the master
stays free of it and a separate process, started with ``spawn`` (a fresh
interpreter, not a fork), registers, drains and deregisters on the master's orders:

    from the workers   one message each once its app has started (lifespan startup
                       complete): the first one registers every TCP listener
    from the master    "drain" (answered with the report), "hurry" (end the quiet
                       wait), "stop" (deregister and exit)
    master gone        (its end of the pipe closes: SIGKILL, a crash) deregister
                       and exit; if this process dies too, the lease expires within
                       its TTL

It ignores SIGINT and SIGTERM: a Ctrl-C reaches the whole process group, and
systemd's default ``KillMode=control-group`` signals every process; the master decides.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing.connection
import signal
import sys
from typing import Any

from .._backoff import Backoff
from .._drain import DrainPolicy
from .._errors import EtcdError, EtcdiscoError
from .._settings import ClientSettings
from ..asgi._registration import ServerRegistration, ServeSpec
from ..uvicorn import SharedActivity

__all__ = ["registrar_main"]

log = logging.getLogger("etcdisco.gunicorn")


async def _register(registration: ServerRegistration, port: int, host: str) -> None:
    backoff = Backoff(initial=0.5, maximum=10.0)
    while True:
        try:
            await registration.listening(port, host)
            return
        except EtcdError as exc:
            delay = backoff.next_delay()
            log.warning("registering failed (%s); again in %.1fs", exc, delay)
            await asyncio.sleep(delay)
        except EtcdiscoError as exc:  # not something waiting mends
            log.error("not registered: %s", exc)
            return


async def _serve(
    spec: ServeSpec,
    settings: ClientSettings | None,
    policy: DrainPolicy,
    listeners: list[tuple[str, int]],
    shared: SharedActivity,
    master: multiprocessing.connection.Connection,
    ready: multiprocessing.connection.Connection,
) -> None:
    loop = asyncio.get_running_loop()
    registrations = [ServerRegistration(spec, shared, settings=settings) for _ in listeners]
    orders: asyncio.Queue[str] = asyncio.Queue()
    hurry = asyncio.Event()
    started = asyncio.Event()

    def on_order() -> None:
        try:
            order = master.recv()
        except (EOFError, OSError):
            loop.remove_reader(master.fileno())
            order = "stop"  # the master is gone
        if order == "hurry":
            hurry.set()
        else:
            orders.put_nowait(order)

    def on_ready() -> None:
        # Keep reading (one message per worker started), so the pipe never fills.
        try:
            ready.recv_bytes()
        except (EOFError, OSError):
            loop.remove_reader(ready.fileno())
            return
        started.set()

    async def register_all() -> None:
        await started.wait()
        await asyncio.gather(
            *(
                _register(reg, port, host)
                for reg, (host, port) in zip(registrations, listeners, strict=True)
            )
        )

    loop.add_reader(master.fileno(), on_order)
    loop.add_reader(ready.fileno(), on_ready)
    registering = loop.create_task(register_all())
    try:
        while (order := await orders.get()) != "stop":
            if order != "drain":
                continue
            registering.cancel()
            registered = [reg for reg in registrations if reg.registered]
            reports = await asyncio.gather(*(reg.drain(policy, hurry) for reg in registered))
            summary = (
                all(r.quiet for r in reports),
                max((r.waited for r in reports), default=0.0),
                max((r.requests_while_draining for r in reports), default=0),
            )
            with contextlib.suppress(OSError):
                master.send(("drained", *summary))
    finally:
        registering.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await registering
        await asyncio.gather(*(reg.deregister() for reg in registrations))


def registrar_main(
    spec: ServeSpec,
    settings: ClientSettings | None,
    policy: DrainPolicy,
    listeners: list[tuple[str, int]],
    raw: Any,
    slots: int,
    master: multiprocessing.connection.Connection,
    ready: multiprocessing.connection.Connection,
    level: int,
) -> None:
    """The registrar's entry point (run by ``multiprocessing`` with ``spawn``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s")
    )
    for name in ("etcdisco.gunicorn", "etcdisco.asgi"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(level)
    shared = SharedActivity(raw, slots)
    asyncio.run(_serve(spec, settings, policy, listeners, shared, master, ready))
