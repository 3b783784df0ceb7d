"""An ``etcdisco`` command run as a user runs it, with its output read as it comes.

Long-running commands (``agent``, ``xds``) announce readiness on stdout and explain
trouble on stderr; tests wait for a line on either stream (never a fixed sleep) and
get everything the process said when the wait fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from typing import Any


class CliProcess:
    """``python -m etcdisco ARGS`` with its stdout and stderr lines collected by two
    reader tasks that this object owns (stopped by :meth:`stop` / :meth:`kill`)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.out: list[str] = []
        self.err: list[str] = []
        self._changed = asyncio.Condition()
        self._ended = 0  # streams at end of file
        assert proc.stdout is not None and proc.stderr is not None
        self._readers = [
            asyncio.ensure_future(self._read(proc.stdout, self.out)),
            asyncio.ensure_future(self._read(proc.stderr, self.err)),
        ]

    @classmethod
    async def start(cls, *args: str, env: Mapping[str, str] | None = None) -> CliProcess:
        # Only what the test gives: no endpoints, password or bootstrap leak in from
        # the environment the tests run in.
        base = {k: v for k, v in os.environ.items() if not k.startswith(("ETCDISCO_", "GRPC_XDS"))}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "etcdisco",
            *args,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**base, **(env or {})},
        )
        return cls(proc)

    async def _read(self, stream: asyncio.StreamReader, into: list[str]) -> None:
        while line := await stream.readline():
            into.append(line.decode(errors="replace").rstrip("\n"))
            async with self._changed:
                self._changed.notify_all()
        async with self._changed:
            self._ended += 1
            self._changed.notify_all()

    def said(self) -> str:
        """What it said, for a failure message (the end of stderr only)."""
        return "stdout:\n" + "\n".join(self.out) + "\nstderr:\n" + "\n".join(self.err[-40:])

    def everything(self) -> str:
        """Every line it wrote, on either stream (for "never shows X" checks)."""
        return "\n".join(self.out + self.err)

    def json_events(self, name: str) -> list[dict[str, Any]]:
        found = []
        for line in self.out:
            if line.startswith("{"):
                event = json.loads(line)
                if event.get("event") == name:
                    found.append(event)
        return found

    async def wait_for(self, found: Callable[[], Any], timeout: float, what: str) -> Any:
        """Wait until ``found()`` returns something truthy (checked after every line)."""
        try:
            async with asyncio.timeout(timeout):
                async with self._changed:
                    while not (result := found()):
                        if self._ended == len(self._readers):
                            await self.proc.wait()
                            raise AssertionError(
                                f"etcdisco exited ({self.proc.returncode}) before {what}\n"
                                f"{self.said()}"
                            )
                        await self._changed.wait()
                    return result
        except TimeoutError:
            raise AssertionError(f"no {what} within {timeout}s\n{self.said()}") from None

    async def line(self, text: str, timeout: float = 15, *, stderr: bool = False) -> str:
        """The first line of stdout (or stderr) containing ``text``."""
        lines = self.err if stderr else self.out

        def first() -> str | None:
            return next((line for line in lines if text in line), None)

        where = "stderr" if stderr else "stdout"
        result: str = await self.wait_for(first, timeout, f"{text!r} on {where}")
        return result

    async def event(self, name: str, timeout: float = 15, *, count: int = 1) -> dict[str, Any]:
        """The ``count``-th ``--json`` line ``{"event": name, ...}``."""

        def seen() -> list[dict[str, Any]] | None:
            events = self.json_events(name)
            return events if len(events) >= count else None

        events = await self.wait_for(seen, timeout, f"event {name!r} (#{count})")
        found: dict[str, Any] = events[count - 1]
        return found

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        """Signal the process and wait for its exit status (kill after ``timeout``)."""
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        try:
            async with asyncio.timeout(timeout):
                code = await self.proc.wait()
        except TimeoutError:
            await self.kill()
            raise AssertionError(f"etcdisco did not exit on {sig!r}\n{self.said()}") from None
        await self._join()
        return code

    async def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        await self.proc.wait()
        await self._join()

    async def _join(self) -> None:
        for reader in self._readers:
            if not reader.done():
                reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


def etcd_tls_options(files: Any, *, client_cert: bool = True) -> list[str]:
    """The global options for an etcd that serves TLS (``etcd_tls`` fixture files)."""
    options = ["--cacert", str(files.ca)]
    if client_cert:
        options += ["--cert", str(files.client_cert), "--key", str(files.client_key)]
    return options
