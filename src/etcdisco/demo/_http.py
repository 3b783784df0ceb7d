"""``etcdisco demo --http``: a rolling restart of uvicorn servers under load, no request
lost.

HTTP servers (:mod:`.http_server`, each ``etcdisco.uvicorn.run``) start as processes
of their own and register once they listen. Two callers in this process call
``http://hello/`` at a steady pace through ``etcdisco.http.AsyncClient`` (an httpx
client whose transport picks a live instance per request): one sends GETs, one sends
POSTs, which are not idempotent, so a POST that reached an instance is never sent
again. A line a second shows how the requests spread. Then each server in turn gets
SIGTERM and drains before it closes its listeners (clients see "draining" and stop
picking it; it stops listening once no request has arrived for the quiet period),
deregisters and exits, and a replacement starts and registers, while the requests go
on. The summary counts requests per instance and failures; a failed request makes the
demo fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import string
from pathlib import Path

import click
import httpx

from .._async_client import AsyncClient
from .._model import ChangeEvent, EventType, Instance
from ..http import AsyncClient as HttpClient
from ._common import (
    STEP_TIMEOUT,
    Clock,
    ServerProcess,
    Tally,
    rolling_restart,
    run_demo,
)

SERVICE = "hello"
PACE = 0.02  # seconds between two requests of one caller
SHOW_STEADY = 2.0  # seconds of requests shown before and after the rolling restart


async def _spawn(endpoint: str, name: str, ttl: int, logs: Path) -> ServerProcess:
    args = ["--endpoints", endpoint, "--service", SERVICE, "--name", name, "--ttl", str(ttl)]
    return await ServerProcess.spawn("etcdisco.demo.http_server", args, name, logs)


class _Load:
    """Owns the callers (a GET one and a POST one) and the ticker."""

    def __init__(self, clock: Clock, http: httpx.AsyncClient) -> None:
        self.clock = clock
        self.http = http
        self.tallies = {"GET": Tally("GET"), "POST": Tally("POST")}
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        for method in self.tallies:
            self._tasks.append(loop.create_task(self._call(method), name=f"demo-{method}"))
        self._tasks.append(loop.create_task(self._tick(), name="demo-ticker"))

    async def _call(self, method: str) -> None:
        tally = self.tallies[method]
        url = f"http://{SERVICE}/" if method == "GET" else f"http://{SERVICE}/orders"
        while True:
            try:
                response = await self.http.request(method, url, content=b"{}", timeout=5)
            except httpx.HTTPError as exc:
                tally.failure(f"{type(exc).__name__}: {exc}")
            else:
                if response.status_code == 200:
                    tally.answered(response.text)
                else:
                    tally.failure(f"HTTP {response.status_code}")
            await asyncio.sleep(PACE)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self._say_window()

    def _say_window(self) -> None:
        self.clock.say(" | ".join(t.take_window() for t in self.tallies.values()))

    async def served_by(self, name: str) -> None:
        """Wait until both callers had an answer from ``name``."""
        for tally in self.tallies.values():
            try:
                async with asyncio.timeout(STEP_TIMEOUT):
                    await tally.served_by(name)
            except TimeoutError:
                raise click.ClickException(
                    f"no {tally.label} reached {name} within {STEP_TIMEOUT:.0f}s"
                ) from None

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        self._say_window()


def _requests(n: int) -> str:
    return f"{n} request" if n == 1 else f"{n} requests"


def _name(instance: Instance) -> str:
    return str(instance.metadata.get("name", instance.id))


def _show_events(clock: Clock, events: list[ChangeEvent]) -> None:
    for ev in events:
        name = _name(ev.instance)
        if ev.type is EventType.ADDED:
            clock.say(f"registry: {name} added at {ev.instance.address}")
        elif ev.type is EventType.REMOVED:
            clock.say(f"registry: {name} removed")
        elif ev.previous is None or ev.previous.status is not ev.instance.status:
            clock.say(f"registry: {name} is {ev.instance.status.value}")


def _summary(clock: Clock, load: _Load) -> list[str]:
    """Print the summary; what went wrong, if anything."""
    problems: list[str] = []
    clock.say("summary")
    for method, tally in load.tallies.items():
        click.echo(f"            {method}: {tally.calls} requests, {tally.failed} failed")
        if tally.failed:
            problems.append(f"{tally.failed} {method} requests failed: {tally.errors}")
    get, post = load.tallies["GET"], load.tallies["POST"]
    click.echo(f"            {'server':<8}{'GET':>7}{'POST':>7}")
    for name in sorted(get.total.keys() | post.total.keys()):
        click.echo(f"            {name:<8}{get.total[name]:>7}{post.total[name]:>7}")
    return problems


async def _run(
    clock: Clock, endpoint: str, logs: Path, servers: list[ServerProcess], count: int, ttl: int
) -> list[str]:
    async with AsyncClient(endpoint) as client, client.discover(SERVICE) as cache:
        await cache.wait_ready(10)
        cache.add_listener(lambda events: _show_events(clock, events))
        clock.say(
            f"starting {count} uvicorn servers of '{SERVICE}' as separate processes "
            f"(etcdisco.uvicorn); each registers once it listens and drains before it "
            f"stops listening (ttl {ttl}s)"
        )
        for letter in string.ascii_lowercase[:count]:
            servers.append(await _spawn(endpoint, f"v1-{letter}", ttl, logs))
        await asyncio.gather(*(s.ready() for s in servers))
        async with HttpClient(client, services=[SERVICE]) as http:
            load = _Load(clock, http)
            try:
                clock.say(
                    f"calling http://{SERVICE}/ every {PACE * 1000:.0f} ms through "
                    f"etcdisco.http.AsyncClient: one caller sends GETs, one POSTs (not "
                    f"idempotent: never sent twice)"
                )
                load.start()
                for server in servers:
                    await load.served_by(server.name)
                clock.say("both callers reach every server; a line a second shows the spread")
                await asyncio.sleep(SHOW_STEADY)
                await rolling_restart(
                    clock,
                    servers,
                    lambda name: _spawn(endpoint, name, ttl, logs),
                    load,
                    count=_requests,
                    after_drain="stopped listening, deregistered",
                    taking="is taking GETs and POSTs",
                )
                clock.say("rolling restart done; the requests go on")
                await asyncio.sleep(SHOW_STEADY)
            finally:
                await load.stop()
        problems = _summary(clock, load)
        running = [s for s in servers if s.proc.returncode is None]
        clock.say(f"stopping {', '.join(s.name for s in running)} (SIGTERM: each drains)")
        await asyncio.gather(*(s.stop() for s in running))
    return problems


async def run_http_demo(endpoints: str, instances: int = 3, ttl: int = 3) -> None:
    await run_demo(_run, endpoints, instances, ttl)
