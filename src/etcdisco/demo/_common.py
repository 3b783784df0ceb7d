"""What the demos share: the clock that stamps each line they print, the etcd they run
against (the one at the given endpoints if it answers, else a local one started for
the demo and stopped after it), and for the rolling-restart demos (``--grpc``,
``--http``) the tally of one caller's calls and the server processes they restart."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import click

from .._async_client import AsyncClient
from .._errors import EtcdError
from ..testing import LocalEtcd


class Clock:
    def __init__(self) -> None:
        self.start = time.monotonic()

    def say(self, text: str) -> None:
        click.echo(f"[{time.monotonic() - self.start:6.2f}s] {text}")


async def reachable(endpoints: str) -> bool:
    try:
        async with AsyncClient(endpoints, timeout=1.0) as c:
            await c.etcd.get("etcdisco-demo-probe")
        return True
    except EtcdError:
        return False


@contextlib.contextmanager
def local_etcd_if_needed(endpoints: str, reachable: bool, clock: Clock) -> Iterator[str]:
    if reachable:
        clock.say(f"using etcd at {endpoints}")
        yield endpoints
        return
    clock.say(f"no etcd reachable at {endpoints}; starting a local one")
    member = LocalEtcd(name="etcdisco-demo")
    member.start()
    clock.say(f"local etcd {member.version} listening on {member.endpoint}")
    try:
        yield member.endpoint
    finally:
        member.close()
        clock.say("local etcd stopped")


STEP_TIMEOUT = 20.0  # for any one step (a start, a drain); a demo must never hang

# A demo's body: (clock, etcd endpoint, log directory, the server processes it starts
# (appended as they start), instances, ttl) -> the problems it saw.
DemoBody = Callable[[Clock, str, Path, list["ServerProcess"], int, int], Awaitable[list[str]]]


async def run_demo(body: DemoBody, endpoints: str, instances: int, ttl: int) -> None:
    """Run ``body`` against ``endpoints`` (a local etcd when none answers there), stop
    every server process it left running, and fail with the problems it saw."""
    clock = Clock()
    problems: Sequence[str] = ()
    with (
        local_etcd_if_needed(endpoints, await reachable(endpoints), clock) as endpoint,
        tempfile.TemporaryDirectory(prefix="etcdisco-demo-") as logs,
    ):
        servers: list[ServerProcess] = []
        try:
            problems = await body(clock, endpoint, Path(logs), servers, instances, ttl)
        finally:
            # Only after a failure or an interrupt is anything still running here.
            await asyncio.gather(*(s.stop() for s in servers))
            clock.say("every server process has exited; demo done")
    if problems:
        raise click.ClickException("; ".join(problems))


class Tally:
    """Calls of one caller: answered per server, and failed."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.total: Counter[str] = Counter()
        self.failed = 0
        self.errors: list[str] = []
        self._window: Counter[str] = Counter()
        self._window_failed = 0
        self._served: dict[str, asyncio.Event] = {}

    @property
    def calls(self) -> int:
        return self.total.total() + self.failed

    def answered(self, server: str) -> None:
        self.total[server] += 1
        self._window[server] += 1
        self._served_event(server).set()

    def failure(self, error: str) -> None:
        self.failed += 1
        self._window_failed += 1
        if len(self.errors) < 5:
            self.errors.append(error)

    def _served_event(self, server: str) -> asyncio.Event:
        return self._served.setdefault(server, asyncio.Event())

    async def served_by(self, server: str) -> None:
        await self._served_event(server).wait()

    def take_window(self) -> str:
        """Calls since the last take, as a line fragment."""
        window, failed = self._window, self._window_failed
        self._window, self._window_failed = Counter(), 0
        spread = " ".join(f"{name}={n}" for name, n in sorted(window.items())) or "-"
        return f"{self.label} {window.total() + failed:3d} calls [{spread}] {failed} failed"


class ServerProcess:
    """One server process of a demo (``python -m MODULE ARGS``), followed through the
    JSON lines it prints: one once it is registered (``{"address": ...}``), one once it
    has drained and stopped (``{"drained": {...}}``)."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.name = name
        self.proc = proc
        self.log = log
        self.address = ""

    @classmethod
    async def spawn(cls, module: str, args: Sequence[str], name: str, logs: Path) -> ServerProcess:
        log = logs / f"{name}.log"
        with log.open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                module,
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
            )
        return cls(name, proc, log)

    async def _line(self, what: str) -> dict[str, Any]:
        assert self.proc.stdout is not None
        try:
            async with asyncio.timeout(STEP_TIMEOUT):
                line = await self.proc.stdout.readline()
        except TimeoutError:
            raise click.ClickException(
                f"{self.name}: no {what} within {STEP_TIMEOUT:.0f}s{tail(self.log)}"
            ) from None
        if not line:
            code = await self.proc.wait()
            raise click.ClickException(
                f"{self.name} exited ({code}) before its {what}{tail(self.log)}"
            )
        result: dict[str, Any] = json.loads(line)
        return result

    async def ready(self) -> str:
        """Wait until it listens and is registered; its advertised address."""
        self.address = str((await self._line("ready line"))["address"])
        return self.address

    async def terminate(self) -> tuple[dict[str, Any], int]:
        """SIGTERM, then its drain report and exit code."""
        self.proc.send_signal(signal.SIGTERM)
        report: dict[str, Any] = (await self._line("drain report"))["drained"]
        async with asyncio.timeout(STEP_TIMEOUT):
            code = await self.proc.wait()
        return report, code

    async def stop(self) -> None:
        """Whatever state it is in: SIGTERM if it runs, SIGKILL if that hangs."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(STEP_TIMEOUT):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


def tail(log: Path, lines: int = 10) -> str:
    try:
        text = "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
    return f"\n--- {log.name} ---\n{text}" if text else ""


def calls_text(n: int) -> str:
    return f"{n} call" if n == 1 else f"{n} calls"


class Load(Protocol):
    """A demo's client load: tells when a given server has taken its share."""

    async def served_by(self, name: str) -> None: ...


async def rolling_restart(
    clock: Clock,
    servers: list[ServerProcess],
    spawn: Callable[[str], Awaitable[ServerProcess]],
    load: Load,
    *,
    count: Callable[[int], str],
    after_drain: str,
    taking: str,
) -> None:
    """Replace each server in turn: SIGTERM (it drains), then a successor named
    ``v2-...`` that must take ``load`` before the next one goes."""
    olds = list(servers)
    for step, old in enumerate(olds, 1):
        clock.say(f"rolling restart {step}/{len(olds)}: SIGTERM to {old.name} ({old.address})")
        report, code = await old.terminate()
        clock.say(
            f"{old.name} drained in {report['waited']:.2f}s "
            f"({'quiet' if report['quiet'] else 'drain timeout reached'}; "
            f"{count(report['rpcs_while_draining'])} arrived after the drain began), "
            f"{after_drain}, exited with code {code}"
        )
        new = await spawn(old.name.replace("v1-", "v2-"))
        servers.append(new)
        clock.say(f"replacement {new.name} starting")
        await new.ready()
        clock.say(f"{new.name} listening at {new.address} and registered")
        await load.served_by(new.name)
        clock.say(f"{new.name} {taking}")
