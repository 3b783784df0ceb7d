"""``etcdisco demo``: the whole story in under a minute, against a real etcd.

Instances register from separate processes; this process follows them through a
cache, picks among them, then watches one crash (gone when its lease expires) and
one stop gracefully (gone at once).
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

import click

from .._async_client import AsyncClient
from .._model import ChangeEvent, EventType
from ..balancing import RoundRobin
from ..discovery import EventStream, ServiceCache
from ._common import Clock, local_etcd_if_needed, reachable

SERVICE = "sample"
ZONES = ("zone-a", "zone-b", "zone-c")


def _address(index: int) -> str:
    return f"127.0.0.1:{50051 + index}"


def _spawn(endpoint: str, index: int, ttl: int) -> subprocess.Popen[bytes]:
    address = _address(index)
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "etcdisco",
            "--endpoints",
            endpoint,
            "register",
            SERVICE,
            address,
            "--ttl",
            str(ttl),
            "--meta",
            f"zone={ZONES[index % 3]}",
            "--meta",
            f"weight={index + 1}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _show(cache: ServiceCache, clock: Clock) -> None:
    rows = cache.instances()
    clock.say(f"live view: {len(rows)} instance(s) of {SERVICE}")
    for inst in rows:
        click.echo(
            f"            {inst.address:<18} {inst.zone or '-':<8} weight={inst.weight}"
            f" status={inst.status.value}"
        )


def _event_line(ev: ChangeEvent) -> str:
    return f"{ev.type.value:<8} {ev.instance.address}"


async def _until(
    events: EventStream, kind: EventType, address: str, timeout: float, clock: Clock
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        ev = await asyncio.wait_for(anext(events), max(deadline - time.monotonic(), 0.01))
        clock.say(f"event: {_event_line(ev)}")
        if ev.type is kind and ev.instance.address == address:
            return


async def run_demo(endpoints: str, instances: int = 3, ttl: int = 3) -> None:
    clock = Clock()
    with local_etcd_if_needed(endpoints, await reachable(endpoints), clock) as endpoint:
        procs: list[subprocess.Popen[bytes]] = []
        try:
            async with AsyncClient(endpoint) as client, client.discover(SERVICE) as cache:
                await cache.wait_ready(10)
                events = cache.events()
                clock.say(
                    f"starting {instances} instances of '{SERVICE}' as separate "
                    f"processes (ttl {ttl}s)"
                )
                for i in range(instances):
                    procs.append(_spawn(endpoint, i, ttl))
                while len(cache.instances()) < instances:
                    ev = await asyncio.wait_for(anext(events), 30)
                    clock.say(f"event: {_event_line(ev)}")
                _show(cache, clock)

                picker = RoundRobin()
                picks = [picker.pick(cache.instances()) for _ in range(2 * instances)]
                clock.say(
                    "round-robin picks: " + ", ".join(p.address for p in picks if p is not None)
                )

                victim = _address(0)
                clock.say(
                    f"crash: SIGKILL to the process of {victim}; etcd removes it "
                    f"when its lease expires (ttl {ttl}s)"
                )
                procs[0].send_signal(signal.SIGKILL)
                crashed = time.monotonic()
                await _until(events, EventType.REMOVED, victim, 6 * ttl, clock)
                clock.say(f"{victim} vanished {time.monotonic() - crashed:.2f}s after the crash")

                graceful = _address(1)
                clock.say(f"graceful stop: SIGTERM to the process of {graceful}")
                procs[1].send_signal(signal.SIGTERM)
                stopped = time.monotonic()
                await _until(events, EventType.REMOVED, graceful, 10, clock)
                took_ms = (time.monotonic() - stopped) * 1000
                clock.say(f"{graceful} vanished {took_ms:.0f} ms after SIGTERM (deregistered)")
                _show(cache, clock)
                picks = [picker.pick(cache.instances()) for _ in range(3)]
                clock.say("picks now: " + ", ".join(p.address for p in picks if p is not None))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            for p in procs:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
            clock.say("instances stopped; demo done")
