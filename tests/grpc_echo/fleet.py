"""Echo servers (tests/grpc_echo/server.py) as subprocesses, for the gRPC tests."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


class EchoProcess:
    """One echo server process; ``address`` is what it registered."""

    def __init__(self, name: str, proc: subprocess.Popen[str], log_path: Path) -> None:
        self.name = name
        self.proc = proc
        self.log_path = log_path
        self.address = ""
        self.port = 0

    def _line(self, timeout: float, what: str) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(left, 0))
            if not ready:
                raise AssertionError(f"{self.name}: no {what} within {timeout}s\n{self.log_tail()}")
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(
                    f"{self.name} exited ({self.proc.poll()}) before {what}\n{self.log_tail()}"
                )
            return dict(json.loads(line))

    def wait_ready(self, timeout: float = 15.0) -> EchoProcess:
        info = self._line(timeout, "ready line")
        self.address, self.port = info["address"], info["port"]
        return self

    def terminate(self, timeout: float = 15.0) -> dict[str, Any]:
        """SIGTERM, then wait for the drain report and a clean exit."""
        self.proc.send_signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def wait_exit(self, timeout: float = 15.0) -> dict[str, Any]:
        """Wait for the drain report and a clean exit (after a signal sent already)."""
        report = self._line(timeout, "drain report")["drained"]
        code = self.proc.wait(timeout)
        assert code == 0, f"{self.name} exited with {code}\n{self.log_tail()}"
        return dict(report)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except OSError:
            return "(no log)"


class Fleet:
    """Starts echo servers registered in one etcd; ``close()`` kills what is left."""

    def __init__(self, endpoint: str, log_dir: Path) -> None:
        self.endpoint = endpoint
        self.log_dir = log_dir
        self.procs: list[EchoProcess] = []

    def spawn(self, name: str, *extra: str, service: str = "echo") -> EchoProcess:
        """Start a server without waiting for it (see ``start``)."""
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("w") as log:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.grpc_echo.server",
                    "--endpoints",
                    self.endpoint,
                    "--service",
                    service,
                    "--name",
                    name,
                    *extra,
                ],
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        echo = EchoProcess(name, proc, log_path)
        self.procs.append(echo)
        return echo

    def start(self, *names: str, extra: tuple[str, ...] = ()) -> list[EchoProcess]:
        """Start servers in parallel and wait until each is registered."""
        spawned = [self.spawn(name, *extra) for name in names]
        return [p.wait_ready() for p in spawned]

    def close(self) -> None:
        for echo in self.procs:
            if echo.proc.poll() is None:
                echo.proc.kill()
        for echo in self.procs:
            echo.proc.wait(10)
            if echo.proc.stdout is not None:
                echo.proc.stdout.close()
