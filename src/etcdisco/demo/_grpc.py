"""``etcdisco demo --grpc``: a rolling restart of gRPC servers under load, no call lost.

gRPC servers (:mod:`.grpc_server`) start as processes of their own and register
through etcdisco.grpc's server helper. Two callers call them at a steady pace: a
balancing channel in this process (``etcdisco.grpc.aio_channel``) and a plain grpcio
client on ``xds:///demo-echo`` in a process of its own (:mod:`.grpc_xds_client`, with an
embedded control plane: gRPC reads its xDS bootstrap once per process). A line a
second shows how the calls spread. Then each server in turn gets SIGTERM and drains
(clients see "draining" and stop picking it), deregisters and exits, and a
replacement starts and registers, while the calls go on. The summary counts calls
and failures; a failed call makes the demo fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import string
import sys
from pathlib import Path
from typing import Any

import click
import grpc
import grpc.aio

from .._async_client import AsyncClient
from .._model import ChangeEvent, EventType, Instance
from ..grpc import AioBalancingChannel, aio_channel
from ._common import (
    STEP_TIMEOUT,
    Clock,
    ServerProcess,
    Tally,
    calls_text,
    rolling_restart,
    run_demo,
    tail,
)
from .grpc_server import METHOD

SERVICE = "demo-echo"
PACE = 0.02  # seconds between two calls of one caller
CHANNEL_CALLERS = 2
SHOW_STEADY = 2.0  # seconds of calls shown before and after the rolling restart


async def _spawn(endpoint: str, name: str, ttl: int, logs: Path) -> ServerProcess:
    args = ["--endpoints", endpoint, "--service", SERVICE, "--name", name, "--ttl", str(ttl)]
    return await ServerProcess.spawn("etcdisco.demo.grpc_server", args, name, logs)


class _XdsCaller:
    """The :mod:`.grpc_xds_client` process and the task counting its calls."""

    def __init__(self, proc: asyncio.subprocess.Process, tally: Tally, log: Path) -> None:
        self.proc = proc
        self.tally = tally
        self.log = log
        self._reader = asyncio.get_running_loop().create_task(self._read(), name="demo-xds-reader")

    @classmethod
    async def start(cls, endpoint: str, tally: Tally, logs: Path) -> _XdsCaller:
        log = logs / "xds-caller.log"
        # Our bootstrap goes to the child; one inherited from this shell would win.
        env = {k: v for k, v in os.environ.items() if not k.startswith("GRPC_XDS_BOOTSTRAP")}
        with log.open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "etcdisco.demo.grpc_xds_client",
                "--endpoints",
                endpoint,
                "--service",
                SERVICE,
                "--pace",
                str(PACE),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                env=env,
            )
        return cls(proc, tally, log)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            result = json.loads(line)
            if "server" in result:
                self.tally.answered(result["server"])
            else:
                self.tally.failure(result["error"])

    async def stop(self) -> int:
        """Close its stdin (it ends its call and exits); every call it made is counted
        once this returns. Its exit code."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            async with asyncio.timeout(STEP_TIMEOUT):
                await self._reader
                return await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            return await self.proc.wait()


class _Load:
    """Owns every caller: the channel's caller tasks, the xDS process, the ticker."""

    def __init__(self, clock: Clock, channel: AioBalancingChannel) -> None:
        self.clock = clock
        self.channel = channel
        self.via_channel = Tally("channel")
        self.via_xds = Tally("xds")
        self._tasks: list[asyncio.Task[None]] = []
        self._xds: _XdsCaller | None = None

    async def start(self, endpoint: str, logs: Path) -> None:
        loop = asyncio.get_running_loop()
        who = self.channel.unary_unary(METHOD)
        for i in range(CHANNEL_CALLERS):
            self._tasks.append(loop.create_task(self._call(who), name=f"demo-caller-{i}"))
        self._xds = await _XdsCaller.start(endpoint, self.via_xds, logs)
        self._tasks.append(loop.create_task(self._tick(), name="demo-ticker"))

    async def _call(self, who: Any) -> None:
        while True:
            try:
                reply: bytes = await who(b"", timeout=5)
            except grpc.aio.AioRpcError as exc:
                self.via_channel.failure(f"{exc.code().name}: {exc.details()}")
            else:
                self.via_channel.answered(reply.decode())
            await asyncio.sleep(PACE)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self._say_window()

    def _say_window(self) -> None:
        self.clock.say(f"{self.via_channel.take_window()} | {self.via_xds.take_window()}")

    async def served_by(self, name: str) -> None:
        """Wait until both callers had an answer from ``name``."""
        for tally in (self.via_channel, self.via_xds):
            try:
                async with asyncio.timeout(STEP_TIMEOUT):
                    await tally.served_by(name)
            except TimeoutError:
                log = tail(self._xds.log) if self._xds and tally is self.via_xds else ""
                raise click.ClickException(
                    f"no call through {tally.label} reached {name} within {STEP_TIMEOUT:.0f}s{log}"
                ) from None

    async def stop(self) -> int | None:
        """Stop every caller; the xDS process's exit code (None if never started)."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        code = await self._xds.stop() if self._xds is not None else None
        self._say_window()
        return code


def _show_events(clock: Clock, events: list[ChangeEvent]) -> None:
    for ev in events:
        name = _name(ev.instance)
        if ev.type is EventType.ADDED:
            clock.say(f"registry: {name} added at {ev.instance.address}")
        elif ev.type is EventType.REMOVED:
            clock.say(f"registry: {name} removed")
        elif ev.previous is None or ev.previous.status is not ev.instance.status:
            clock.say(f"registry: {name} is {ev.instance.status.value}")


def _name(instance: Instance) -> str:
    return str(instance.metadata.get("name", instance.id))


def _summary(clock: Clock, load: _Load, xds_code: int | None) -> list[str]:
    """Print the summary; what went wrong, if anything."""
    problems: list[str] = []
    clock.say("summary")
    for label, tally in (("the balancing channel", load.via_channel), ("xDS", load.via_xds)):
        click.echo(f"            through {label}: {tally.calls} calls, {tally.failed} failed")
        if tally.failed:
            problems.append(f"{tally.failed} calls through {label} failed: {tally.errors}")
    names = sorted(load.via_channel.total.keys() | load.via_xds.total.keys())
    click.echo(f"            {'server':<8}{'channel':>9}{'xDS':>7}")
    for name in names:
        click.echo(
            f"            {name:<8}{load.via_channel.total[name]:>9}{load.via_xds.total[name]:>7}"
        )
    if xds_code != 0:
        problems.append(f"the xDS caller exited with code {xds_code}")
    return problems


async def _run(
    clock: Clock, endpoint: str, logs: Path, servers: list[ServerProcess], count: int, ttl: int
) -> list[str]:
    async with AsyncClient(endpoint) as client, client.discover(SERVICE) as cache:
        await cache.wait_ready(10)
        cache.add_listener(lambda events: _show_events(clock, events))
        clock.say(
            f"starting {count} gRPC servers of '{SERVICE}' as separate processes; each "
            f"registers once it listens and drains on SIGTERM (ttl {ttl}s)"
        )
        for letter in string.ascii_lowercase[:count]:
            servers.append(await _spawn(endpoint, f"v1-{letter}", ttl, logs))
        await asyncio.gather(*(s.ready() for s in servers))
        async with aio_channel(client, SERVICE) as channel:
            load = _Load(clock, channel)
            xds_code: int | None = None
            try:
                clock.say(
                    f"calling every {PACE * 1000:.0f} ms: {CHANNEL_CALLERS} callers on a "
                    f"balancing channel here (etcdisco.grpc.aio_channel), one plain grpcio "
                    f"client on xds:///{SERVICE} in another process (embedded control plane)"
                )
                await load.start(endpoint, logs)
                for server in servers:
                    await load.served_by(server.name)
                clock.say("both callers reach every server; a line a second shows the spread")
                await asyncio.sleep(SHOW_STEADY)
                await rolling_restart(
                    clock,
                    servers,
                    lambda name: _spawn(endpoint, name, ttl, logs),
                    load,
                    count=calls_text,
                    after_drain="deregistered",
                    taking="is taking calls through the channel and through xDS",
                )
                clock.say("rolling restart done; the calls go on")
                await asyncio.sleep(SHOW_STEADY)
            finally:
                xds_code = await load.stop()
        problems = _summary(clock, load, xds_code)
        running = [s for s in servers if s.proc.returncode is None]
        clock.say(f"stopping {', '.join(s.name for s in running)} (SIGTERM: each drains)")
        await asyncio.gather(*(s.stop() for s in running))
    return problems


async def run_grpc_demo(endpoints: str, instances: int = 3, ttl: int = 3) -> None:
    await run_demo(_run, endpoints, instances, ttl)
