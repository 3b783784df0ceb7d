"""Stalled etcd members: how long until registrations and caches are served again.

    .venv/bin/python benchmarks/bench_stalls.py [--quick] [--out PATH]

A stalled member (SIGSTOP: alive, TCP open, answering nothing) fails nothing by itself;
only deadlines notice it. Three measurements, each on real etcd processes:

- keepalive failover: a 3-member cluster, the client's first endpoint (a follower,
  which carries its keepalive stream) stalled; from SIGSTOP to the next keepalive
  answered through another member. The lease must survive, which needs this to stay
  well under the TTL (6 s here).
- watch failover: same cluster, a cache whose watch runs on the stalled follower; an
  instance is registered through the other members right after SIGSTOP; time until
  the cache has it (the progress probe's 5 + 3 s, then a new watch elsewhere).
- frozen single member: one etcd stalled for 10 s; from SIGCONT until a cache follows
  again (an instance registered at SIGCONT shows up in it).

Not a test: numbers only.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from _common import command_line, load_average, write_section

from etcdisco import AsyncClient, EventType
from etcdisco.testing import LocalEtcd, LocalEtcdCluster

TTL = 6


async def _until(done: Callable[[], bool], timeout: float = 30.0) -> None:
    """Poll ``done``: a keepalive answer raises no event to wait for."""
    async with asyncio.timeout(timeout):
        while True:
            if done():
                return
            await asyncio.sleep(0.01)


async def _wait_added(events: object, key: str, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        async for ev in events:  # type: ignore[attr-defined]
            if ev.type is EventType.ADDED and ev.instance.key == key:
                return


async def keepalive_failover(cluster: LocalEtcdCluster, n: int) -> tuple[float, bool]:
    leader = cluster.leader()
    stalled = next(m for m in cluster.members if m is not leader)
    rest = [m for m in cluster.members if m is not stalled]
    endpoints = ",".join([stalled.endpoint, *(m.endpoint for m in rest)])
    async with AsyncClient(endpoints, timeout=2.0) as server:
        reg = await server.register("stall", f"127.0.0.1:{30000 + n}", ttl=TTL)
        lease = reg.lease_id
        began = time.monotonic()
        await _until(lambda: reg.last_keepalive > began)  # the stream is open now
        stalled.pause()
        stopped = time.monotonic()
        try:
            await _until(lambda: reg.last_keepalive > stopped)
            took = reg.last_keepalive - stopped
        finally:
            stalled.resume()
        kept = reg.lease_id == lease and reg.re_registrations == 0
        await reg.deregister()
    return took, kept


async def watch_failover(cluster: LocalEtcdCluster, n: int) -> float:
    leader = cluster.leader()
    stalled = next(m for m in cluster.members if m is not leader)
    rest = [m for m in cluster.members if m is not stalled]
    endpoints = ",".join([stalled.endpoint, *(m.endpoint for m in rest)])
    async with (
        AsyncClient(endpoints, timeout=2.0) as client,
        AsyncClient(",".join(m.endpoint for m in rest), timeout=2.0) as writer,
        client.discover("stall-watch") as cache,
    ):
        await cache.wait_ready(10)
        events = cache.events()
        first = await writer.register("stall-watch", f"127.0.0.1:{31000 + n}", ttl=30)
        await _wait_added(events, first.key, 10)  # the watch is up, on the follower
        stalled.pause()
        stopped = time.monotonic()
        try:
            late = await writer.register("stall-watch", f"127.0.0.1:{32000 + n}", ttl=30)
            await _wait_added(events, late.key, 60)
            took = time.monotonic() - stopped
        finally:
            stalled.resume()
        await late.deregister()
        await first.deregister()
    return took


async def frozen_single(member: LocalEtcd, n: int) -> float:
    async with (
        AsyncClient(member.endpoint, timeout=2.0) as client,
        AsyncClient(member.endpoint) as writer,
        client.discover("frozen") as cache,
    ):
        await cache.wait_ready(10)
        events = cache.events()
        first = await writer.register("frozen", f"127.0.0.1:{33000 + n}", ttl=30)
        await _wait_added(events, first.key, 10)
        member.pause()
        await asyncio.sleep(10)  # the fault: how long the member stays frozen
        member.resume()
        resumed = time.monotonic()
        late = await writer.register("frozen", f"127.0.0.1:{34000 + n}", ttl=30)
        await _wait_added(events, late.key, 60)
        took = time.monotonic() - resumed
        await late.deregister()
        await first.deregister()
    return took


def _row(what: str, values: list[float], note: str) -> str:
    return (
        f"| {what} | {len(values)} | {statistics.median(values):.2f} s | "
        f"{min(values):.2f}-{max(values):.2f} s | {note} |"
    )


async def run(args: argparse.Namespace) -> str:
    samples = 1 if args.quick else 5
    load = load_average()
    keepalive: list[float] = []
    kept = 0
    watch: list[float] = []
    frozen: list[float] = []
    with LocalEtcdCluster(3) as cluster:
        version = cluster.version
        for n in range(samples):
            took, ok = await keepalive_failover(cluster, n)
            keepalive.append(took)
            kept += ok
            cluster.wait_for_leader()
            watch.append(await watch_failover(cluster, n))
            cluster.wait_for_leader()
    with LocalEtcd() as member:
        for n in range(samples):
            frozen.append(await frozen_single(member, n))
    smoke = " (smoke run)" if args.quick else ""
    return (
        "\n".join(
            [
                "## Stalled members -> served again",
                "",
                f"Command: `{command_line('bench_stalls.py')}`{smoke}; etcd {version}, 1-min "
                f"load {load:.2f} before. SIGSTOP on a real member; see the script's docstring "
                "for what each row measures.",
                "",
                "| measured | samples | median | range | note |",
                "|---|---|---|---|---|",
                _row(
                    "follower under the keepalive stream stalled -> keepalive answered elsewhere",
                    keepalive,
                    f"ttl {TTL} s; lease kept in {kept} of {samples}",
                ),
                _row(
                    "follower under the watch stalled -> a new instance in the cache",
                    watch,
                    "progress probe: every 5 s, 3 s to answer",
                ),
                _row(
                    "single member frozen 10 s -> SIGCONT -> a new instance in the cache",
                    frozen,
                    "the watch was re-made during the freeze or on resume",
                ),
            ]
        )
        + "\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one sample of each")
    parser.add_argument("--out", type=Path, help="write the markdown section here")
    args = parser.parse_args()
    write_section(asyncio.run(run(args)), args.out)


if __name__ == "__main__":
    main()
