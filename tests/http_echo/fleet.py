"""Echo servers (tests/http_echo/server.py) as subprocesses that register themselves."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class EchoProcess:
    def __init__(self, name: str, proc: subprocess.Popen[str], log: Path) -> None:
        self.name = name
        self.proc = proc
        self.log = log
        self.address = ""

    def wait_ready(self, timeout: float = 20.0) -> EchoProcess:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise AssertionError(
                f"{self.name}: not registered within {timeout}s (exit {self.proc.poll()})\n"
                + self.log.read_text()[-2000:]
            )
        self.address = json.loads(line)["address"]
        return self

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


class HttpFleet:
    """Starts registered echo servers; ``close()`` kills what is left."""

    def __init__(self, endpoint: str, log_dir: Path) -> None:
        self.endpoint = endpoint
        self.log_dir = log_dir
        self.procs: list[EchoProcess] = []

    def start(self, *names: str, service: str = "users", ttl: int = 10) -> list[EchoProcess]:
        spawned = []
        path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
        for name in names:
            log = self.log_dir / f"{name}.log"
            with log.open("w") as err:
                proc = subprocess.Popen(
                    [
                        sys.executable, "-m", "tests.http_echo.server", "--endpoints",
                        self.endpoint, "--service", service, "--name", name, "--ttl", str(ttl),
                    ],
                    cwd=ROOT,
                    env={**os.environ, "PYTHONPATH": path},
                    stdout=subprocess.PIPE,
                    stderr=err,
                    text=True,
                )  # fmt: skip
            echo = EchoProcess(name, proc, log)
            self.procs.append(echo)
            spawned.append(echo)
        deadline = time.monotonic() + 20
        return [p.wait_ready(max(deadline - time.monotonic(), 0.1)) for p in spawned]

    def close(self) -> None:
        for echo in self.procs:
            if echo.proc.poll() is None:
                echo.proc.terminate()
        for echo in self.procs:
            try:
                echo.proc.wait(10)
            except subprocess.TimeoutExpired:
                echo.proc.kill()
                echo.proc.wait(10)
            if echo.proc.stdout is not None:
                echo.proc.stdout.close()
