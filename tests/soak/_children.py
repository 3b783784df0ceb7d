"""The supervisor's handle on one child process (see ``_workers`` for the protocol)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parents[2]


class ChildError(Exception):
    """A child died, closed its output or did not answer in time."""


class ChildPaused(ChildError):
    """The child is stopped with SIGSTOP on purpose: it cannot answer now."""


class Child:
    """One worker process: started, asked, paused, killed and stopped by the supervisor.

    Requests hold a lock, so a pause or a kill never lands while a request is in
    flight, and a reply that arrives after its request timed out is skipped by id.
    """

    def __init__(
        self,
        name: str,
        kind: str,
        args: list[str],
        log_dir: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.kind = kind
        self._args = args
        self._env = {**os.environ, **env} if env else None
        self.log_path = log_dir / f"{name}.log"
        self.proc: asyncio.subprocess.Process | None = None
        self.paused = False
        self.ready = False  # started and answered its first line
        # True from the moment we kill or stop it: its exit is then no finding.
        self.expected_exit = False
        self.starts = 0
        self.ready_reply: dict[str, Any] = {}
        self._lock = asyncio.Lock()
        self._next_id = 0

    def __repr__(self) -> str:
        return f"<Child {self.name} pid={self.pid}>"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    @property
    def live(self) -> bool:
        """Running and not stopped: it must be registered / following etcd."""
        return self.running and self.ready and not self.paused

    def died_unexpectedly(self) -> int | None:
        """The exit status when the child exited without being told to, else None."""
        if self.proc is None or self.expected_exit:
            return None
        return self.proc.returncode

    async def start(self, timeout: float) -> None:
        async with self._lock:
            await self._start(timeout)

    async def _start(self, timeout: float) -> None:
        self.ready = False
        with self.log_path.open("ab") as log:
            log.write(f"==== start {self.starts + 1}\n".encode())
            log.flush()
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tests.soak._workers",
                self.kind,
                *self._args,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                cwd=_REPO,
                env=self._env,
                limit=1 << 20,
            )
        self.paused = False
        self.expected_exit = False
        self._next_id = 0
        self.ready_reply = await self._reply(0, "ready", timeout)
        self.ready = True
        self.starts += 1

    async def request(
        self, cmd: str, timeout: float, args: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        async with self._lock:
            if self.paused:
                raise ChildPaused(f"{self.name} is paused")
            proc = self._proc_or_fail()
            assert proc.stdin is not None
            self._next_id += 1
            request_id = self._next_id
            message = {"id": request_id, "cmd": cmd, "args": args or {}}
            proc.stdin.write(json.dumps(message).encode() + b"\n")
            try:
                await proc.stdin.drain()
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise ChildError(f"{self.name}: cannot write to its stdin ({exc})") from None
            reply = await self._reply(request_id, cmd, timeout)
        if "error" in reply:
            raise ChildError(f"{self.name} failed {cmd!r}: {reply['error']}")
        return reply

    async def _reply(self, request_id: int, what: str, timeout: float) -> dict[str, Any]:
        proc = self._proc_or_fail()
        assert proc.stdout is not None
        try:
            async with asyncio.timeout(timeout):
                while True:
                    line = await proc.stdout.readline()
                    if not line:
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(2.0):
                                await proc.wait()
                        raise ChildError(
                            f"{self.name} closed its output before answering {what!r} "
                            f"(exit status {proc.returncode}); log tail:\n{self.log_tail()}"
                        )
                    message: dict[str, Any] = json.loads(line)
                    if message.get("id") == request_id:
                        return message
        except TimeoutError:
            raise ChildError(
                f"{self.name} did not answer {what!r} within {timeout:.0f}s; "
                f"log tail:\n{self.log_tail()}"
            ) from None

    def _proc_or_fail(self) -> asyncio.subprocess.Process:
        if self.proc is None:
            raise ChildError(f"{self.name} was never started")
        if self.proc.returncode is not None:
            raise ChildError(
                f"{self.name} exited with status {self.proc.returncode}; "
                f"log tail:\n{self.log_tail()}"
            )
        return self.proc

    async def pause(self) -> None:
        async with self._lock:
            self._proc_or_fail().send_signal(signal.SIGSTOP)
            self.paused = True

    async def resume(self) -> None:
        async with self._lock:
            self._proc_or_fail().send_signal(signal.SIGCONT)
            self.paused = False

    async def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL: a crash, no deregistration."""
        async with self._lock:
            proc = self._proc_or_fail()
            self.expected_exit = True
            self.ready = False
            proc.kill()
            self.paused = False
            try:
                async with asyncio.timeout(timeout):
                    await proc.wait()
            except TimeoutError:
                raise ChildError(f"{self.name} still exists {timeout:.0f}s after SIGKILL") from None

    async def terminate(self, timeout: float) -> dict[str, Any]:
        """SIGTERM and wait for the goodbye line and the exit; SIGKILL if it hangs."""
        async with self._lock:
            proc = self._proc_or_fail()
            self.expected_exit = True
            self.ready = False
            proc.send_signal(signal.SIGTERM)
            if self.paused:
                proc.send_signal(signal.SIGCONT)
                self.paused = False
            try:
                bye = await self._reply(-1, "SIGTERM", timeout)
                async with asyncio.timeout(timeout):
                    await proc.wait()
            except (ChildError, TimeoutError) as exc:
                self.abort()
                raise ChildError(f"{self.name} did not stop cleanly: {exc}") from None
            if proc.returncode != 0:
                raise ChildError(
                    f"{self.name} exited with status {proc.returncode} after SIGTERM; "
                    f"log tail:\n{self.log_tail()}"
                )
            return bye

    def abort(self) -> None:
        """Last-resort cleanup: SIGKILL without waiting (the event loop reaps it)."""
        if self.proc is not None and self.proc.returncode is None:
            self.expected_exit = True
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()

    # -- figures seen from outside --------------------------------------------------

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def os_thread_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/task"))

    def connected_ports(self) -> set[int]:
        """Remote TCP ports of this process's established connections."""
        inodes: set[str] = set()
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{self.pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        ports: set[int] = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with contextlib.suppress(OSError), open(table) as f:
                for line in f.readlines()[1:]:
                    fields = line.split()
                    # fields: sl local remote state ... inode (index 9); 01 = ESTABLISHED
                    if fields[3] == "01" and fields[9] in inodes:
                        ports.add(int(fields[2].rsplit(":", 1)[1], 16))
        return ports

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(cannot read {self.log_path}: {exc})"
        return "\n".join("    " + line for line in text.splitlines()[-lines:])
