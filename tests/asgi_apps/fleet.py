"""HTTP servers of one service as real processes, the registry as a client sees it, and
a steady load through ``etcdisco.http``: what the server tests and
``benchmarks/bench_http_server.py`` share.

Two ways to run a server (``Fleet(mode=...)``):

- ``drain-first``: ``etcdisco serve SERVICE --app tests.asgi_apps.app:app`` (the
  drain before uvicorn closes its listeners);
- ``lifespan``: ``uvicorn tests.asgi_apps.app:app`` with ``etcdisco.asgi.lifespan``
  in the app (registered from the lifespan, deregistered in its teardown: after the
  listeners have closed).

Every wait is on an event (a line from the process, a registry change, an answer),
bounded, and says what it waited for when it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import socket
import string
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import requests

import etcdisco
import etcdisco.http
from etcdisco import ChangeEvent, EventType, Status
from etcdisco.http import _caches

from ..integration._cli_process import CliProcess

ROOT = Path(__file__).resolve().parents[2]
APP = "tests.asgi_apps.app:app"
STEP = 30.0  # the longest any one step may take (a start, a stop)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Registry:
    """What a client's cache saw of a service: per instance name, when it was added,
    marked draining and removed (``time.monotonic()``), and an event for each."""

    def __init__(self, cache: etcdisco.ServiceCache) -> None:
        self.cache = cache
        self.times: dict[tuple[str, str], float] = {}
        self.counts: Counter[tuple[str, str]] = Counter()
        self.addresses: dict[str, str] = {}
        self._events: dict[tuple[str, str], asyncio.Event] = {}
        cache.add_listener(self._on_events)

    def _event(self, name: str, what: str) -> asyncio.Event:
        return self._events.setdefault((name, what), asyncio.Event())

    def _on_events(self, events: list[ChangeEvent]) -> None:
        now = time.monotonic()
        for ev in events:
            name = str(ev.instance.metadata.get("name", ev.instance.id))
            if ev.type is EventType.ADDED:
                what = "added"
                self.addresses[name] = ev.instance.address
            elif ev.type is EventType.REMOVED:
                what = "removed"
            elif ev.instance.status is Status.DRAINING and (
                ev.previous is None or ev.previous.status is not Status.DRAINING
            ):
                what = "draining"
            else:
                continue
            self.counts[(name, what)] += 1
            self.times.setdefault((name, what), now)
            self._event(name, what).set()

    @property
    def draining(self) -> dict[str, float]:
        """When each instance was first seen draining."""
        return {name: t for (name, what), t in self.times.items() if what == "draining"}

    async def wait(self, name: str, what: str, timeout: float = STEP) -> float:
        """When ``name`` was first seen ``what`` (added, draining, removed)."""
        try:
            async with asyncio.timeout(timeout):
                await self._event(name, what).wait()
        except TimeoutError:
            raise AssertionError(
                f"the registry never showed {name} {what} within {timeout}s"
            ) from None
        return self.times[(name, what)]


@dataclass
class Server:
    name: str
    proc: CliProcess
    mode: str
    address: str = ""
    exit_code: int | None = None
    drained: dict[str, Any] | None = None


class Fleet:
    """Server processes of ``service``, started by ``mode`` (see the module docstring)."""

    def __init__(
        self,
        endpoint: str,
        service: str,
        registry: Registry,
        mode: str,
        *,
        quiet_period: float = 0.5,
        ttl: int = 5,
        workers: int = 1,
    ) -> None:
        assert mode in ("drain-first", "lifespan"), mode
        self.endpoint = endpoint
        self.service = service
        self.registry = registry
        self.mode = mode
        self.quiet_period = quiet_period
        self.ttl = ttl
        self.workers = workers
        self.servers: list[Server] = []

    async def start(self, name: str, *, env: dict[str, str] | None = None) -> Server:
        """Start ``name`` and return once the registry shows it."""
        app_env = {"APP_NAME": name, **(env or {})}
        if self.mode == "drain-first":
            proc = await CliProcess.start(
                "serve",
                self.service,
                "--app",
                APP,
                "--app-dir",
                str(ROOT),
                "--port",
                "0",
                "--json",
                "--endpoints",
                self.endpoint,
                "--meta",
                f"name={name}",
                "--ttl",
                str(self.ttl),
                "--quiet-period",
                str(self.quiet_period),
                "--workers",
                str(self.workers),
                "--no-access-log",
                env=app_env,
            )
        else:
            port = free_port()
            proc = await start_uvicorn(
                self.endpoint,
                port,
                workers=self.workers,
                env={
                    **app_env,
                    "APP_LIFESPAN": "1",
                    "APP_PORT": str(port),
                    "APP_SERVICE": self.service,
                    "APP_TTL": str(self.ttl),
                },
            )
        server = Server(name, proc, self.mode)
        self.servers.append(server)
        await self.registry.wait(name, "added")
        server.address = self.registry.addresses[name]
        return server

    async def stop(self, server: Server) -> Server:
        """SIGTERM, then its exit (and its drain report, drain-first)."""
        server.exit_code = await server.proc.stop(signal.SIGTERM, timeout=STEP)
        drained = server.proc.json_events("drained")
        server.drained = drained[0] if drained else None
        return server

    async def close(self) -> None:
        for server in self.servers:
            if server.proc.proc.returncode is None:
                # Workers first: killed alone, a master leaves them running, holding
                # the output pipes whose end kill() waits for.
                for pid in descendants(server.proc.proc.pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                await server.proc.kill()


def descendants(pid: int) -> list[int]:
    """The processes under ``pid`` (children, theirs, ...), from /proc."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


async def start_uvicorn(
    endpoint: str, port: int, *, workers: int = 1, env: dict[str, str] | None = None
) -> CliProcess:
    """``python -m uvicorn tests.asgi_apps.app:app --port PORT`` (plain uvicorn)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ETCDISCO_", "APP_"))}
    args = [sys.executable, "-m", "uvicorn", APP, "--app-dir", str(ROOT), "--port", str(port)]
    if workers > 1:
        args += ["--workers", str(workers)]
    proc = await asyncio.create_subprocess_exec(
        *args,
        "--no-access-log",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**base, "ETCDISCO_ENDPOINTS": endpoint, **(env or {})},
    )
    return CliProcess(proc)


@dataclass
class Record:
    method: str
    started: float
    name: str | None = None
    error: str | None = None
    state_at_arrival: str | None = None


@dataclass
class Load:
    """``callers`` tasks calling ``http://SERVICE/`` through ``etcdisco.http``, each a
    GET then a POST /orders (not idempotent: never retried once it reached an
    instance) and so on (``methods``), ``pace`` seconds apart. ``http`` is an
    ``etcdisco.http.AsyncClient``, or an ``etcdisco.http.Session`` (requests), whose
    blocking calls run in threads."""

    http: httpx.AsyncClient | requests.Session
    service: str
    callers: int = 4
    pace: float = 0.01
    methods: tuple[str, ...] = ("GET", "POST")
    records: list[Record] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _served: dict[str, asyncio.Event] = field(default_factory=dict)

    def start(self) -> None:
        for i in range(self.callers):
            self._tasks.append(asyncio.ensure_future(self._call(i)))

    async def _send(self, method: str, index: int) -> tuple[int, Any, str]:
        """(status, JSON answer or None, text) of one request."""
        path = "/orders" if method == "POST" else "/"
        body = {"caller": index} if method == "POST" else None
        url = f"http://{self.service}{path}"
        if isinstance(self.http, httpx.AsyncClient):
            reply = await self.http.request(method, url, json=body, timeout=10)
            ok = reply.status_code == 200
            return reply.status_code, reply.json() if ok else None, reply.text
        session = self.http
        answer = await asyncio.to_thread(session.request, method, url, json=body, timeout=10)
        ok = answer.status_code == 200
        return answer.status_code, answer.json() if ok else None, answer.text

    async def _call(self, index: int) -> None:
        n = index
        while True:
            method = self.methods[n % len(self.methods)]
            n += 1
            record = Record(method, time.monotonic())
            self.records.append(record)
            try:
                status, answer, text = await self._send(method, index)
            except (httpx.HTTPError, requests.RequestException) as exc:
                record.error = f"{type(exc).__name__}: {exc}"
            else:
                if answer is not None:
                    record.name = answer["name"]
                    record.state_at_arrival = answer["state"]
                    self._served_event(answer["name"]).set()
                else:
                    record.error = f"HTTP {status}: {text[:100]}"
            await asyncio.sleep(self.pace)

    def _served_event(self, name: str) -> asyncio.Event:
        return self._served.setdefault(name, asyncio.Event())

    async def served_by(self, name: str, timeout: float = STEP) -> None:
        try:
            async with asyncio.timeout(timeout):
                await self._served_event(name).wait()
        except TimeoutError:
            raise AssertionError(f"no request reached {name} within {timeout}s") from None

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    def failures(self, since: int = 0, until: int | None = None) -> list[Record]:
        return [r for r in self.records[since:until] if r.error is not None]

    def per_server(self) -> Counter[str]:
        return Counter(r.name for r in self.records if r.name is not None)


@dataclass
class RollingRestart:
    """What a rolling restart did: failed requests per restart (those started between
    one SIGTERM and the next), and the stopped servers."""

    failed_per_restart: list[int]
    stopped: list[Server]


async def rolling_restart(fleet: Fleet, load: Load, servers: Sequence[Server]) -> RollingRestart:
    """SIGTERM each server in turn; once it has exited, start a replacement and wait
    until the load reaches it."""
    marks: list[int] = []
    stopped: list[Server] = []
    for old in list(servers):
        marks.append(len(load.records))
        stopped.append(await fleet.stop(old))
        new = await fleet.start(old.name.replace("v1-", "v2-"))
        await load.served_by(new.name)
    marks.append(len(load.records))
    failed = [len(load.failures(a, b)) for a, b in itertools.pairwise(marks)]
    return RollingRestart(failed, stopped)


def names(count: int) -> list[str]:
    return [f"v1-{letter}" for letter in string.ascii_lowercase[:count]]


def posts_after_draining(load: Load, draining: Mapping[str, float]) -> list[Record]:
    """POSTs started after the client that sent them showed the instance that answered
    them draining (``draining``: name -> when first seen so, in ``time.monotonic()``):
    the picker must never send one there."""
    found = []
    for r in load.records:
        if r.method == "POST" and r.name is not None:
            seen = draining.get(r.name)
            if seen is not None and r.started > seen:
                found.append(r)
    return found


class SessionView:
    """When the cache under a sync client's HTTP routes (``etcdisco.http.Session``)
    first showed each instance draining.

    A sync client has its own watch, so its view may lag another client's by the
    time a change takes to reach both. Follow the routes' own cache, once the routes
    exist: the callback thread runs callbacks in order, so each time is recorded
    after the routes have applied the same change."""

    def __init__(self, client: etcdisco.Client, service: str) -> None:
        self._client = client
        self._service = service
        self.draining: dict[str, float] = {}
        self._cache = _caches.acquire_sync(client, service)
        self._cache.follow(self._on_snapshot)

    def _on_snapshot(self, instances: tuple[etcdisco.Instance, ...]) -> None:
        now = time.monotonic()
        for inst in instances:
            if inst.status is Status.DRAINING:
                self.draining.setdefault(str(inst.metadata.get("name", inst.id)), now)

    def close(self) -> None:
        self._cache.remove_listener(self._on_snapshot)
        _caches.release_sync(self._client, self._service)


@contextlib.asynccontextmanager
async def http_client(registry: etcdisco.AsyncClient, service: str, **options: Any) -> Any:
    async with etcdisco.http.AsyncClient(registry, services=[service], **options) as http:
        yield http
