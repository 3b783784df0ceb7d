"""A Starlette app for the HTTP server tests, configured by environment variables so
that ``uvicorn``, ``etcdisco serve`` and ``uvicorn --workers`` can all import it as
``tests.asgi_apps.app:app``.

- ``APP_NAME``: what every answer says as ``name`` (default: ``app``);
- ``APP_LIFESPAN=1``: register from the app's lifespan (``etcdisco.asgi.lifespan``)
  as ``APP_SERVICE`` on ``127.0.0.1:APP_PORT``, with an HTTP health check on ``/``
  when ``APP_CHECK=1``;
- ``APP_STARTUP_DELAY``: seconds the app's own lifespan startup takes.

Answers are JSON: ``name``, ``pid``, ``state`` (the registration's state when the
request arrived: ``serving``, ``draining``, ... or null), plus ``order`` (a counter)
for ``POST /orders``. ``GET /slow?s=S`` answers after S seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import etcdisco.asgi
from etcdisco.health import HttpCheck

NAME = os.environ.get("APP_NAME", "app")
_orders = itertools.count(1)


def _state(request: Request) -> str | None:
    registration = getattr(request.app.state, "etcdisco", None)
    return None if registration is None else str(registration.state)


def _answer(request: Request, **extra: Any) -> JSONResponse:
    return JSONResponse({"name": NAME, "pid": os.getpid(), "state": _state(request), **extra})


async def hello(request: Request) -> JSONResponse:
    return _answer(request)


async def order(request: Request) -> JSONResponse:
    state = _state(request)  # at arrival, before the body is read
    body = await request.body()
    response = _answer(request, order=next(_orders), size=len(body))
    response.headers["x-state-at-arrival"] = str(state)
    return response


async def slow(request: Request) -> JSONResponse:
    await asyncio.sleep(float(request.query_params.get("s", "1")))
    return _answer(request)


@contextlib.asynccontextmanager
async def own_lifespan(app: Any) -> AsyncIterator[dict[str, Any]]:
    await asyncio.sleep(float(os.environ.get("APP_STARTUP_DELAY", "0")))
    yield {"started_by": NAME}


def _lifespan() -> Any:
    if os.environ.get("APP_LIFESPAN") != "1":
        return own_lifespan
    port = int(os.environ["APP_PORT"])
    checks = (
        [HttpCheck(f"http://127.0.0.1:{port}/", interval=0.5)]
        if os.environ.get("APP_CHECK") == "1"
        else []
    )
    return etcdisco.asgi.lifespan(
        os.environ.get("APP_SERVICE", "hello"),
        port=port,
        host="127.0.0.1",
        metadata={"name": NAME},
        ttl=int(os.environ.get("APP_TTL", "5")),
        checks=checks,
        app_lifespan=own_lifespan,
        lock_dir=os.environ.get("APP_LOCK_DIR"),
    )


app = Starlette(
    routes=[Route("/", hello), Route("/orders", order, methods=["POST"]), Route("/slow", slow)],
    lifespan=_lifespan(),
)
