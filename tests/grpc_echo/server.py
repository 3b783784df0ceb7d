"""An echo server registered through etcdisco's server helper, run as a subprocess.

    python -m tests.grpc_echo.server --endpoints EP --service echo --port 0 --name s1

Every reply carries ``--name``, so a test sees which instance answered. It prints one
JSON line when it is registered ({"address": ...}) and one when it has drained
({"drained": {...}}); SIGTERM/SIGINT drain it through the helper. ``--sync`` runs the
thread-based flavour (grpc.Server + etcdisco.Client) instead of grpc.aio.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import etcdisco
import etcdisco.grpc

from . import echo_pb2, echo_pb2_grpc


class AioEcho(echo_pb2_grpc.EchoServicer):
    def __init__(self, name: str) -> None:
        self.name = name

    async def Say(self, request: Any, context: Any) -> Any:
        if request.delay:
            await asyncio.sleep(request.delay)
        return echo_pb2.SayReply(text=request.text, server=self.name)

    async def Count(self, request: Any, context: Any) -> AsyncIterator[Any]:
        for i in range(request.n):
            if i and request.interval:
                await asyncio.sleep(request.interval)
            yield echo_pb2.CountReply(i=i, server=self.name)

    async def Collect(self, request_iterator: Any, context: Any) -> Any:
        texts = [req.text async for req in request_iterator]
        return echo_pb2.SayReply(text=",".join(texts), server=self.name)

    async def Chat(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:
        async for req in request_iterator:
            yield echo_pb2.SayReply(text=req.text, server=self.name)


class SyncEcho(echo_pb2_grpc.EchoServicer):
    def __init__(self, name: str) -> None:
        self.name = name

    def Say(self, request: Any, context: Any) -> Any:
        if request.delay:
            time.sleep(request.delay)
        return echo_pb2.SayReply(text=request.text, server=self.name)

    def Count(self, request: Any, context: Any) -> Iterator[Any]:
        for i in range(request.n):
            if i and request.interval:
                time.sleep(request.interval)
            yield echo_pb2.CountReply(i=i, server=self.name)

    def Collect(self, request_iterator: Any, context: Any) -> Any:
        texts = [req.text for req in request_iterator]
        return echo_pb2.SayReply(text=",".join(texts), server=self.name)

    def Chat(self, request_iterator: Any, context: Any) -> Iterator[Any]:
        for req in request_iterator:
            yield echo_pb2.SayReply(text=req.text, server=self.name)


def _say(payload: dict[str, Any]) -> None:
    print(json.dumps(payload), flush=True)


def _serve_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "host": args.host,
        "metadata": {"name": args.name},
        "ttl": args.ttl,
        "health_names": ["etcdisco.test.Echo"],
        "quiet_period": args.quiet_period,
        "drain_timeout": args.drain_timeout,
        "grace": args.grace,
        "handle_signals": True,
    }


async def _run_aio(args: argparse.Namespace) -> None:
    async with etcdisco.AsyncClient(args.endpoints) as client:
        server = etcdisco.grpc.aio_server()
        echo_pb2_grpc.add_EchoServicer_to_server(AioEcho(args.name), server)
        port = server.add_insecure_port(f"{args.bind}:{args.port}")
        served = await etcdisco.grpc.aio_serve_registered(
            client, server, args.service, port=port, **_serve_options(args)
        )
        _say({"address": served.address, "port": port})
        report = await served.wait_for_termination()
        _say({"drained": dataclasses.asdict(report)})


def _run_sync(args: argparse.Namespace) -> None:
    with etcdisco.Client(args.endpoints) as client:
        server = etcdisco.grpc.server()
        echo_pb2_grpc.add_EchoServicer_to_server(SyncEcho(args.name), server)
        port = server.add_insecure_port(f"{args.bind}:{args.port}")
        served = etcdisco.grpc.serve_registered(
            client, server, args.service, port=port, **_serve_options(args)
        )
        _say({"address": served.address, "port": port})
        report = served.wait_for_termination()
        _say({"drained": dataclasses.asdict(report) if report else None})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoints", required=True)
    parser.add_argument("--service", default="echo")
    parser.add_argument("--name", required=True)
    parser.add_argument("--bind", default="[::]", help="host part of the listening address")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--host", default="127.0.0.1", help="advertised host; 'auto': primary IP")
    parser.add_argument("--ttl", type=int, default=5)
    parser.add_argument("--quiet-period", type=float, default=0.3)
    parser.add_argument("--drain-timeout", type=float, default=5.0)
    parser.add_argument("--grace", type=float, default=2.0)
    parser.add_argument("--sync", action="store_true", help="grpc.Server + etcdisco.Client")
    args = parser.parse_args()
    if args.host == "auto":
        args.host = None
    logging.basicConfig(level=logging.INFO, format=f"{args.name} %(name)s: %(message)s")
    grpc_logger = logging.getLogger("grpc")
    grpc_logger.setLevel(logging.WARNING)
    if args.sync:
        _run_sync(args)
    else:
        asyncio.run(_run_aio(args))


if __name__ == "__main__":
    main()
