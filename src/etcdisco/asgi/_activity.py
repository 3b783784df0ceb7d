"""What a drain needs to see in an ASGI server: requests as they arrive, and a
readiness answer.

:class:`ActivityMiddleware` wraps the application (the server integration puts it
there; the app does not change): each HTTP request or WebSocket counts as an arrival
and is in flight until the application returns, as the gRPC servers' interceptor
counts RPCs. With a ``health_path``, requests for that path never reach the
application and are not counted (probes never stop, so counting them would keep a
drain waiting): they are answered 200 while the instance is registered and serving,
503 before that and from the drain on, so a load balancer or a Kubernetes readiness
probe stops sending at the same moment as the registry's clients.

The counters live in an :class:`Tracker`: :class:`RequestActivity` in one process,
a shared-memory slot per worker when one master runs several (``etcdisco.uvicorn``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Protocol

from .._drain import Activity

__all__ = ["ActivityMiddleware", "RequestActivity", "Tracker"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class Tracker(Protocol):
    """Where the middleware counts requests, and what it answers on the health path."""

    def enter(self) -> None: ...

    def leave(self) -> None: ...

    @property
    def ready(self) -> bool: ...

    @property
    def state(self) -> str: ...


class RequestActivity(Activity):
    """Requests of one process: arrivals (with the time of the last one), requests in
    flight, and readiness (``state``: ``starting``, ``serving``, ``draining``,
    ``stopped``; ready while ``serving``). Changed on the event loop's thread only."""

    def __init__(self) -> None:
        super().__init__()
        self.in_flight = 0
        self.state = "starting"

    @property
    def ready(self) -> bool:
        return self.state == "serving"

    def enter(self) -> None:
        # No lock needed: the middleware runs on the loop's thread.
        self.arrivals += 1
        self.last_arrival = time.monotonic()
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1


class ActivityMiddleware:
    """ASGI middleware: count requests in ``tracker``; answer ``health_path``."""

    def __init__(self, app: ASGIApp, tracker: Tracker, health_path: str | None = None) -> None:
        if health_path is not None and not health_path.startswith("/"):
            raise ValueError(f"health_path must start with '/', not {health_path!r}")
        self.app = app
        self.tracker = tracker
        self.health_path = health_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)  # lifespan
            return
        if kind == "http" and self.health_path is not None and scope["path"] == self.health_path:
            await self._health(scope, send)
            return
        self.tracker.enter()
        try:
            await self.app(scope, receive, send)
        finally:
            self.tracker.leave()

    async def _health(self, scope: Scope, send: Send) -> None:
        ready = self.tracker.ready
        body = json.dumps({"status": self.tracker.state}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200 if ready else 503,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"cache-control", b"no-store"),
                ],
            }
        )
        await send(
            {"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body}
        )
