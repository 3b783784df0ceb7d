"""Failing health check -> the instance is no longer pickable by a client, per setting.

    .venv/bin/python benchmarks/bench_health.py [--quick] [--out PATH]

A real gRPC server (grpc.aio, with the standard health service) is registered with a
gRPC health check; a second client follows the service with a cache. Each sample
waits a random part of one interval (so the flip falls anywhere in the probe
schedule), sets the server NOT_SERVING, and times until the client's cache holds the
instance as unhealthy (what every picker skips). Expect about (fall - 1 + phase) x
interval, plus the write and the watch. Not a test: numbers only.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from pathlib import Path

import grpc.aio
from _common import command_line, load_average, write_section
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from etcdisco import AsyncClient, EventType, Status
from etcdisco.health import GrpcCheck
from etcdisco.testing import LocalEtcd

# (interval s, fall, samples in a full run); the last is the library's default.
SETTINGS = [(0.1, 2, 10), (1.0, 3, 5), (5.0, 3, 3)]
QUICK = [(0.1, 2, 3)]


async def detection(endpoint: str, interval: float, fall: int, samples: int) -> list[float]:
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    address = f"127.0.0.1:{port}"
    check = GrpcCheck(interval=interval, timeout=min(interval, 1.0), fall=fall, rise=1, jitter=0)
    out = []
    try:
        async with (
            AsyncClient(endpoint) as registrant,
            AsyncClient(endpoint) as follower,
            follower.discover("health-bench") as cache,
        ):
            await cache.wait_ready(5)
            for n in range(samples):
                await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
                events = cache.events()
                reg = await registrant.register(
                    "health-bench", address, instance_id=f"i{n}", ttl=10, checks=[check]
                )
                while not any(i.key == reg.key and i.healthy for i in cache.instances()):
                    await anext(events)
                # Anywhere in the probe schedule, as a real failure would be.
                await asyncio.sleep(random.uniform(0, interval))
                t0 = time.perf_counter()
                await servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
                while True:
                    ev = await anext(events)
                    if (
                        ev.type is EventType.UPDATED
                        and ev.instance.key == reg.key
                        and ev.instance.status is Status.UNHEALTHY
                    ):
                        break
                out.append(time.perf_counter() - t0)
                await reg.deregister()
    finally:
        await server.stop(None)
    return out


async def run(args: argparse.Namespace) -> str:
    load = load_average()
    rows = []
    with LocalEtcd() as member:
        for interval, fall, samples in QUICK if args.quick else SETTINGS:
            values = await detection(member.endpoint, interval, fall, samples)
            rows.append(
                f"| {interval:g} s | {fall} | {len(values)} | {statistics.median(values):.2f} s "
                f"| {max(values):.2f} s | {(fall - 1) * interval:.2f}-{fall * interval:.2f} s |"
            )
        version = member.version
    smoke = " (smoke run)" if args.quick else ""
    return (
        "\n".join(
            [
                "## Health check -> unpickable",
                "",
                f"Command: `{command_line('bench_health.py')}`{smoke}; etcd {version}, 1-min load "
                f"{load:.2f} before. A gRPC health check with rise 1; the server turns NOT_SERVING "
                "at a random point of the probe schedule; measured until another client's cache "
                "holds the instance as unhealthy (pickers skip it).",
                "",
                "| interval | fall | samples | median | max | expected (fall-1..fall) x interval |",
                "|---|---|---|---|---|---|",
                *rows,
            ]
        )
        + "\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one fast setting, 3 samples")
    parser.add_argument("--out", type=Path, help="write the markdown section here")
    args = parser.parse_args()
    write_section(asyncio.run(run(args)), args.out)


if __name__ == "__main__":
    main()
