"""The agent's own readiness, for container probes: a file and a tiny HTTP endpoint.

``/live`` answers 200 while the agent's event loop runs (a wedged loop cannot
answer); ``/ready`` answers 200 when every registration is live in etcd and 503
otherwise, with the per-registration state as JSON. Plain asyncio streams: the
endpoint serves a kubelet or a load balancer probe, nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._address import join_address
from .._errors import ConfigError

log = logging.getLogger("etcdisco.agent")

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class ReadyFile:
    """Exists exactly while the agent is ready (for exec/file-based probes)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._state: bool | None = None

    def update(self, ready: bool) -> None:
        if ready is self._state:
            return
        self._state = ready
        try:
            if ready:
                self.path.write_text("ready\n", encoding="utf-8")
            else:
                self.path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("cannot update the ready file %s: %s", self.path, exc)


class ProbeServer:
    """Serves ``/live`` and ``/ready`` from ``status()`` (which returns the agent's
    status dict with a ``ready`` flag). Owns its listener and its handler tasks."""

    def __init__(self, status: Callable[[], dict[str, Any]], host: str, port: int) -> None:
        self._status = status
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Listen; a port that is taken (or an address that is not this host's) is a
        ConfigError naming the address."""
        try:
            self._server = await asyncio.start_server(self._accept, self._host, self._port)
        except OSError as exc:
            where = join_address(self._host, self._port)
            # asyncio's strerror repeats the address; the errno's text alone does not.
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise ConfigError(f"cannot serve probes on {where}: {reason}") from None

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._handlers):
            task.cancel()
        for task in list(self._handlers):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5.0):
                request = await reader.readline()
                while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    del line
                code, body = self._answer(request)
                payload = json.dumps(body, sort_keys=True).encode("utf-8") + b"\n"
                head = (
                    f"HTTP/1.1 {code} {_REASONS[code]}\r\n"
                    "Content-Type: application/json\r\n"
                    f"Content-Length: {len(payload)}\r\n"
                    "Connection: close\r\n\r\n"
                )
                writer.write(head.encode("ascii") + payload)
                await writer.drain()
        except (TimeoutError, OSError, ValueError):
            pass  # a probe that hangs up or dawdles gets nothing
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def _answer(self, request: bytes) -> tuple[int, dict[str, Any]]:
        parts = request.decode("latin-1").split()
        if len(parts) < 2:
            return 404, {"error": "not an HTTP request"}
        method, target = parts[0], parts[1].split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return 405, {"error": f"{method} not allowed"}
        if target == "/live":
            return 200, {"live": True}
        if target == "/ready":
            status = self._status()
            return (200 if status.get("ready") else 503), status
        return 404, {"error": f"no such path {target}; try /ready or /live"}
