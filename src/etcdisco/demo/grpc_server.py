"""One gRPC server of ``etcdisco demo --grpc``, run as a process of its own.

    python -m etcdisco.demo.grpc_server --endpoints EP --service demo-echo --name v1-a

It answers every unary call (whatever the method) with its own name as raw bytes, so
a caller sees which instance served it without generated code, and it registers
through :func:`etcdisco.grpc.aio_serve_registered` (health service included).
SIGTERM/SIGINT drain it: NOT_SERVING and "draining", a quiet period, deregister,
stop. Its stdout carries two JSON lines, which is how the demo follows it: one once it
is registered (``{"address": ..., "port": ...}``) and one once it has drained and
stopped (``{"drained": {"quiet": ..., "waited": ..., "rpcs_while_draining": ...}}``).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
from typing import Any

import grpc
import grpc.aio

from .._async_client import AsyncClient
from ..grpc import aio_serve_registered, aio_server

# What the demo's callers call; the server would answer any other name the same way.
METHOD = "/etcdisco.demo.Demo/Who"


class _AnswerName(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """Any method: a unary handler replying with the name (requests are ignored)."""

    def __init__(self, name: str, delay: float = 0.0) -> None:
        answer = name.encode()

        async def who(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            if delay:
                await asyncio.sleep(delay)
            return answer

        # No (de)serializers: requests and replies stay raw bytes.
        self._handler = grpc.unary_unary_rpc_method_handler(who)

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        return self._handler


def _say(payload: dict[str, Any]) -> None:
    print(json.dumps(payload), flush=True)


async def serve(args: argparse.Namespace) -> None:
    async with AsyncClient(args.endpoints) as client:
        # The health service is registered first, so it still answers its own methods.
        server = aio_server(handlers=[_AnswerName(args.name, args.delay)])
        port = server.add_insecure_port(f"{args.bind}:{args.port}")
        served = await aio_serve_registered(
            client,
            server,
            args.service,
            port=port,
            host=args.host,
            metadata={"name": args.name},
            ttl=args.ttl,
            quiet_period=args.quiet_period,
            drain_timeout=args.drain_timeout,
            grace=args.grace,
            handle_signals=True,
        )
        _say({"address": served.address, "port": port})
        report = await served.wait_for_termination()
        _say({"drained": dataclasses.asdict(report)})


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--endpoints", required=True)
    parser.add_argument("--service", default="demo-echo")
    parser.add_argument("--name", required=True, help="what every reply says")
    parser.add_argument("--bind", default="127.0.0.1", help="host part of the listening address")
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    parser.add_argument("--host", default="127.0.0.1", help="advertised host")
    parser.add_argument("--ttl", type=int, default=5)
    parser.add_argument("--quiet-period", type=float, default=0.5)
    parser.add_argument("--drain-timeout", type=float, default=5.0)
    parser.add_argument("--grace", type=float, default=2.0)
    parser.add_argument(
        "--delay", type=float, default=0.0, help="seconds before each reply (calls in flight)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format=f"{args.name} %(name)s: %(message)s")
    logging.getLogger("grpc").setLevel(logging.WARNING)
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
