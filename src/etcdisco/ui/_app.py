"""The dashboard's web application (Starlette): the page, its JSON API, its live feed
(server-sent events), the admin actions and Prometheus HTTP service discovery.

Routes:

- ``GET /``: the page (Jinja2 template; its script and style are served from
  ``/static``, nothing comes from elsewhere: the Content-Security-Policy says so);
- ``GET /api/status``, ``/api/services``, ``/api/instances?service=&status=&q=&offset=
  &limit=``, ``/api/events?service=``, ``/api/leases?ids=HEX,HEX``: what the page
  shows, one page of rows at a time;
- ``GET /api/stream``: ``text/event-stream`` of ``state`` (the cache's state: ``stale``
  while etcd is unreachable), ``change`` (a batch of changes) and ``resync`` (refetch
  the view) messages;
- ``POST /api/admin/{disable,enable,weight,deregister}``: JSON body; refused with 403
  unless the app was given an admin token, with 401 without the token in the
  ``X-Etcdisco-Token`` header (or ``Authorization: Bearer``), 403 with a wrong one.
  A header, never a cookie: another site's form or script cannot send it (a
  cross-origin request with it needs a CORS preflight, which this app never grants);
- ``GET /prometheus/targets?service=S``: Prometheus ``http_sd_configs`` targets
  (``_targets``), 503 before the first listing (Prometheus keeps its last list).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import importlib.resources
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import jinja2
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from .._async_client import AsyncClient
from .._errors import ConfigError, EtcdError
from .._operator import deregister, parse_duration
from ._state import STATUSES, Dashboard
from ._targets import prometheus_targets

__all__ = ["TOKEN_HEADER", "create_app"]

TOKEN_HEADER = "X-Etcdisco-Token"
_MAX_LIMIT = 500
_PING_EVERY = 15.0

_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


class _SecurityHeaders:
    """Every response says: nothing from elsewhere, not in a frame, no sniffing."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [
                    (b"content-security-policy", _CSP.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"no-referrer"),
                ]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, sending)


_MEDIA_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}


def _load_assets() -> dict[str, tuple[bytes, str, str]]:
    """The page's script and style sheet (name -> body, media type, short hash), read
    from the package once: served from memory, with no file lookup per request."""
    found = {}
    for item in importlib.resources.files("etcdisco.ui").joinpath("static").iterdir():
        media_type = _MEDIA_TYPES.get(item.name[item.name.rfind(".") :])
        if media_type is not None:
            body = item.read_bytes()
            found[item.name] = (body, media_type, hashlib.sha256(body).hexdigest()[:12])
    return found


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _int_arg(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, not {raw!r}") from None
    return min(max(value, low), high)


def create_app(client: AsyncClient, *, admin_token: str | None = None) -> Starlette:
    """The dashboard of ``client``'s registry as an ASGI app. Its lifespan starts one
    ``discover_all()`` cache on ``client`` and closes it; the client stays yours.

    ``admin_token``: allow the admin actions to requests that carry it (header
    ``X-Etcdisco-Token``); None: read-only. ``app.state.dashboard`` is the
    :class:`Dashboard` behind it."""
    if admin_token is not None and len(admin_token) < 16:
        raise ConfigError("the admin token must be at least 16 characters long")
    dashboard = Dashboard(client)
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("etcdisco.ui", "templates"),
        autoescape=jinja2.select_autoescape(default=True),
    )
    page = env.get_template("index.html")
    assets = _load_assets()
    # The URLs carry a hash of the content: a browser may keep them for a day and still
    # never run an old script against a newer server.
    versions = {name: digest for name, (_, _, digest) in assets.items()}

    async def index(request: Request) -> Response:
        html = page.render(
            admin=admin_token is not None,
            prefix=client.prefix,
            endpoints=", ".join(client.settings.endpoints),
            version=__version__,
            statuses=STATUSES,
            assets=versions,
        )
        return HTMLResponse(html, headers={"cache-control": "no-store"})

    async def static(request: Request) -> Response:
        found = assets.get(request.path_params["name"])
        if found is None:
            return _error(404, "no such file")
        body, media_type, _ = found
        return Response(
            body, media_type=media_type, headers={"cache-control": "public, max-age=86400"}
        )

    async def status(request: Request) -> Response:
        return JSONResponse({**dashboard.status(), "admin": admin_token is not None})

    async def services(request: Request) -> Response:
        return JSONResponse({"services": dashboard.services(), **dashboard.status()})

    async def instances(request: Request) -> Response:
        try:
            offset = _int_arg(request, "offset", 0, 0, 10**9)
            limit = _int_arg(request, "limit", 100, 1, _MAX_LIMIT)
        except ConfigError as exc:
            return _error(400, str(exc))
        wanted = request.query_params.get("status") or None
        if wanted is not None and wanted not in STATUSES:
            return _error(400, f"status must be one of {', '.join(STATUSES)}")
        return JSONResponse(
            dashboard.query(
                service=request.query_params.get("service") or None,
                status=wanted,
                q=request.query_params.get("q"),
                offset=offset,
                limit=limit,
            )
        )

    async def events(request: Request) -> Response:
        service = request.query_params.get("service") or None
        return JSONResponse({"events": dashboard.events(service)})

    async def leases(request: Request) -> Response:
        ids = []
        for part in request.query_params.get("ids", "").split(","):
            with contextlib.suppress(ValueError):
                if part:
                    ids.append(int(part, 16))
        return JSONResponse({"leases": await dashboard.leases(ids[:_MAX_LIMIT])})

    async def stream(request: Request) -> Response:
        feed = dashboard.subscribe()

        async def messages() -> AsyncIterator[str]:
            try:
                yield "retry: 2000\n\n"
                while True:
                    item = await feed.next(_PING_EVERY)
                    if item is None:
                        return
                    event, data = item
                    if event == "ping":
                        yield ": ping\n\n"
                    else:
                        yield f"event: {event}\ndata: {json.dumps(data)}\n\n"
            finally:
                feed.close()

        return StreamingResponse(
            messages(),
            media_type="text/event-stream",
            headers={"cache-control": "no-store", "x-accel-buffering": "no"},
        )

    def refused(request: Request) -> Response | None:
        if admin_token is None:
            return _error(
                403,
                "this dashboard is read-only: start it with --admin-token-file or "
                "$ETCDISCO_UI_TOKEN to allow actions",
            )
        given = request.headers.get(TOKEN_HEADER)
        if given is None:
            auth = request.headers.get("authorization", "")
            if auth.lower().startswith("bearer "):
                given = auth[7:].strip()
        if not given:
            return _error(401, f"admin token required (header {TOKEN_HEADER})")
        if not hmac.compare_digest(given.encode(), admin_token.encode()):
            return _error(403, "wrong admin token")
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return _error(415, "send the action as application/json")
        return None

    async def admin(request: Request) -> Response:
        refusal = refused(request)
        if refusal is not None:
            return refusal
        action = request.path_params["action"]
        handler = _ACTIONS.get(action)
        if handler is None:
            return _error(404, f"no action {action!r}")
        try:
            body = json.loads(await request.body() or b"{}")
        except ValueError:
            return _error(400, "the body is not JSON")
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object")
        who = str(body.get("by") or "").strip()[:100]
        host = request.client.host if request.client is not None else "?"
        by = f"{who} (dashboard, {host})" if who else f"dashboard@{host}"
        try:
            result = await handler(client, body, by)
        except ConfigError as exc:
            return _error(400, str(exc))
        except EtcdError as exc:
            return _error(503, f"etcd: {exc}")
        return JSONResponse({"ok": True, **result})

    async def targets(request: Request) -> Response:
        if dashboard.cache is None or dashboard.state == "connecting":
            return _error(503, "not listed from etcd yet")
        wanted = request.query_params.getlist("service")
        return JSONResponse(prometheus_targets(dashboard.instances(), wanted))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await dashboard.start()
        try:
            yield
        finally:
            await dashboard.close()

    app = Starlette(
        routes=[
            Route("/", index),
            Route("/api/status", status),
            Route("/api/services", services),
            Route("/api/instances", instances),
            Route("/api/events", events),
            Route("/api/leases", leases),
            Route("/api/stream", stream),
            Route("/api/admin/{action}", admin, methods=["POST"]),
            Route("/prometheus/targets", targets),
            Route("/static/{name}", static),
        ],
        middleware=[],
        lifespan=lifespan,
    )
    app.state.dashboard = dashboard
    app.add_middleware(_SecurityHeaders)
    return app


# -- the admin actions: the AsyncClient methods the command line calls too ----------

_Action = Callable[[AsyncClient, Mapping[str, Any], str], Awaitable[dict[str, Any]]]


def _str(body: Mapping[str, Any], name: str, *, required: bool = True) -> str | None:
    value = body.get(name)
    if value is None or value == "":
        if required:
            raise ConfigError(f"{name} is required")
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be a string")
    return value


def _expiry(body: Mapping[str, Any]) -> float | None:
    text = _str(body, "for", required=False)
    return parse_duration(text) if text is not None else None


async def _disable(client: AsyncClient, body: Mapping[str, Any], by: str) -> dict[str, Any]:
    service = _str(body, "service")
    assert service is not None
    instance_id = _str(body, "id", required=False)
    reason = _str(body, "reason")
    o = await client.set_override(
        service, instance_id, disabled=True, reason=reason, by=by, expires_in=_expiry(body)
    )
    target = f"{service}/{instance_id}" if instance_id else f"every instance of {service}"
    return {"message": f"disabled {target}", "override": o.to_dict() if o else None}


async def _enable(client: AsyncClient, body: Mapping[str, Any], by: str) -> dict[str, Any]:
    service = _str(body, "service")
    assert service is not None
    instance_id = _str(body, "id", required=False)
    o = await client.set_override(service, instance_id, disabled=False, by=by)
    target = f"{service}/{instance_id}" if instance_id else service
    return {"message": f"enabled {target}", "override": o.to_dict() if o else None}


async def _weight(client: AsyncClient, body: Mapping[str, Any], by: str) -> dict[str, Any]:
    service = _str(body, "service")
    instance_id = _str(body, "id")
    assert service is not None and instance_id is not None
    weight = body.get("weight")
    if isinstance(weight, str) and weight.strip().isdigit():
        weight = int(weight)
    if isinstance(weight, bool) or not isinstance(weight, int):
        raise ConfigError("weight must be an integer >= 0")
    o = await client.set_override(
        service,
        instance_id,
        weight=weight,
        reason=_str(body, "reason", required=False),
        by=by,
        expires_in=_expiry(body),
    )
    return {
        "message": f"weight of {service}/{instance_id} set to {weight}",
        "override": o.to_dict() if o else None,
    }


async def _deregister(client: AsyncClient, body: Mapping[str, Any], by: str) -> dict[str, Any]:
    service = _str(body, "service")
    instance_id = _str(body, "id")
    assert service is not None and instance_id is not None
    removal = await deregister(client, service, instance_id)
    if removal is None:
        raise ConfigError(f"no instance {service}/{instance_id} in etcd")
    return {
        "message": f"deregistered {removal.instance.key}; {removal.advice()}",
        "lease": f"{removal.lease:x}" if removal.lease else "",
        "lease_ttl_left": removal.ttl_left,
        "lease_alive": removal.lease_alive,
        "at": time.time(),
    }


_ACTIONS: dict[str, _Action] = {
    "disable": _disable,
    "enable": _enable,
    "weight": _weight,
    "deregister": _deregister,
}
