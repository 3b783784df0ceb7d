"""Command check: passing when a program exits with status 0 (Nagios/Consul style)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from dataclasses import dataclass

from .._errors import ConfigError
from ._check import Check
from ._result import Outcome


@dataclass(frozen=True)
class CommandCheck(Check):
    """Runs ``argv`` (no shell); exit 0 passes, anything else fails. A command that
    outlives the timeout is killed together with its children."""

    argv: tuple[str, ...]

    def __post_init__(self) -> None:
        super().__post_init__()
        argv = self.argv
        if isinstance(argv, str) or not isinstance(argv, tuple | list) or not argv:
            raise ConfigError(f"command must be a non-empty list of arguments, not {argv!r}")
        if not all(isinstance(a, str) for a in argv):
            raise ConfigError(f"command arguments must be strings, not {argv!r}")
        object.__setattr__(self, "argv", tuple(argv))

    def describe(self) -> str:
        return "exec:" + " ".join(self.argv)

    async def probe(self) -> Outcome:
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                # Its own process group, so a timeout kills a shell script's children too.
                start_new_session=True,
            )
        except OSError as exc:
            return Outcome.failing(f"cannot run {self.argv[0]!r}: {exc.strerror or exc}")
        try:
            output, _ = await proc.communicate()
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        lines = output.decode("utf-8", "replace").strip().splitlines()
        last = lines[-1][:200] if lines else ""
        if proc.returncode == 0:
            return Outcome.passing(last)
        return Outcome.failing(f"exit {proc.returncode}" + (f": {last}" if last else ""))
