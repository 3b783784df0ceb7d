"""One HTTP server of ``etcdisco demo --http``, run as a process of its own.

    python -m etcdisco.demo.http_server --endpoints EP --service hello --name v1-a

A bare ASGI app answering every request with its own name (so a caller sees which
instance served it), served by :func:`etcdisco.uvicorn.run`: registered once uvicorn
listens, drained before uvicorn closes its listeners (SIGTERM/SIGINT: "draining",
no request for the quiet period, stop listening, deregister). Its stdout carries two
JSON lines, which is how the demo follows it: one once it is registered
(``{"address": ...}``) and one once it has drained (``{"drained": {"quiet": ...,
"waited": ..., "rpcs_while_draining": ...}}``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .._settings import ClientSettings
from ..asgi import ServerRegistration
from ..etcd import parse_endpoints
from ..uvicorn import run

Message = MutableMapping[str, Any]


def app_answering(name: str) -> Callable[..., Awaitable[None]]:
    """An ASGI app answering any HTTP request with ``name`` (text/plain)."""
    body = name.encode()

    async def app(
        scope: Message,
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        if scope["type"] != "http":
            return  # lifespan: nothing to set up
        while (await receive()).get("more_body"):
            pass  # read the request body, if any
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/plain"),
                    (b"content-length", b"%d" % len(body)),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return app


def _say(payload: dict[str, Any]) -> None:
    print(json.dumps(payload), flush=True)


def _on_event(event: str, registration: ServerRegistration) -> None:
    if event == "registered":
        _say({"address": registration.address})
    elif event == "drained" and registration.drain_report is not None:
        _say({"drained": dataclasses.asdict(registration.drain_report)})


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--endpoints", required=True)
    parser.add_argument("--service", default="hello")
    parser.add_argument("--name", required=True, help="what every answer says")
    parser.add_argument("--bind", default="127.0.0.1", help="host to listen on")
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    parser.add_argument("--ttl", type=int, default=5)
    parser.add_argument("--quiet-period", type=float, default=0.5)
    parser.add_argument("--drain-timeout", type=float, default=5.0)
    parser.add_argument("--grace", type=float, default=2.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format=f"{args.name} %(name)s: %(message)s")
    run(
        app_answering(args.name),
        args.service,
        host=args.bind,
        port=args.port,
        settings=ClientSettings(endpoints=parse_endpoints(args.endpoints)),
        metadata={"name": args.name},
        ttl=args.ttl,
        quiet_period=args.quiet_period,
        drain_timeout=args.drain_timeout,
        grace=args.grace,
        health_path="/healthz",
        listeners=[_on_event],
        log_level="warning",
        lifespan="off",
    )


if __name__ == "__main__":
    main()
