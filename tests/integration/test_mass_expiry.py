"""Mass-expiry protection against a real etcd: leases lost together vs. graceful exits."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from etcdisco import AsyncClient, ChangeEvent, EventType, ExpiryProtection, RoundRobin, usable
from etcdisco.discovery import EventStream

from .._util import eventually, next_event, wait_event

ADDRESSES = [f"127.0.0.1:{9700 + i}" for i in range(4)]
CLI = [sys.executable, "-m", "etcdisco"]


async def collect(
    stream: EventStream, wanted: Callable[[ChangeEvent], bool], keys: set[str], timeout: float
) -> dict[str, ChangeEvent]:
    """The first event per key in ``keys`` that ``wanted`` accepts (order-free, unlike
    wait_event, which would drop another key's event that arrives in between)."""
    found: dict[str, ChangeEvent] = {}
    deadline = time.monotonic() + timeout
    while found.keys() != keys:
        ev = await next_event(stream, max(deadline - time.monotonic(), 0.01), f"events on {keys}")
        if ev.instance.key in keys and ev.instance.key not in found and wanted(ev):
            found[ev.instance.key] = ev
    return found


@pytest.fixture
def registrants(etcd) -> Iterator[list[subprocess.Popen[str]]]:
    """Four ``etcdisco register`` processes (ttl 2 s), one per instance."""
    procs = [
        subprocess.Popen(
            [*CLI, "--endpoints", etcd.endpoint, "register", "fleet", address, "--ttl", "2"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for address in ADDRESSES
    ]
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=10)


async def test_three_of_four_leases_expiring_are_held_as_suspects(etcd, registrants) -> None:
    # The hold must outlast the survivor's graceful exit below, on a loaded machine too.
    protection = ExpiryProtection(hold=10.0)
    async with (
        AsyncClient(etcd.endpoint, expiry_protection=protection) as client,
        client.discover("fleet") as cache,
    ):
        await cache.wait_ready(5)
        await eventually(lambda: len(cache.instances()) == 4, 20, "registrants never appeared")
        events = cache.events()
        for proc in registrants[:3]:
            proc.send_signal(signal.SIGKILL)  # a crash: no deregistration, the leases expire

        await eventually(lambda: len(cache.suspects()) == 3, 10, "no suspects after the expiry")
        assert cache.expiry_protections == 1
        assert {i.address for i in cache.suspects()} == set(ADDRESSES[:3])
        assert len(cache.instances()) == 4
        in_etcd = (await client.etcd.get("services/fleet/", prefix=True)).kvs
        assert [kv.key.decode() for kv in in_etcd] == [f"services/fleet/{ADDRESSES[3]}"]
        # While a live instance remains, pickers keep to it.
        picker = RoundRobin()
        picks = {picker.pick(cache.instances()) for _ in range(8)}
        assert {p.address for p in picks if p is not None} == {ADDRESSES[3]} and None not in picks

        # The survivor leaves gracefully: removed at once, not held.
        registrants[3].send_signal(signal.SIGTERM)
        ev = await wait_event(events, EventType.REMOVED, f"services/fleet/{ADDRESSES[3]}", 10)
        assert not ev.instance.suspect
        assert len(cache.suspects()) == 3 and len(cache.instances()) == 3
        # Nothing live is left: a picker still returns a suspect rather than nothing.
        picked = picker.pick(cache.instances())
        assert picked is not None and picked.suspect
        assert len(usable(cache.instances())) == 3

        # The hold is bounded: the suspects go when it is over.
        keys = {f"services/fleet/{a}" for a in ADDRESSES[:3]}
        removed = await collect(events, lambda ev: ev.type is EventType.REMOVED, keys, 20)
        assert all(ev.instance.suspect for ev in removed.values())
        assert cache.instances() == ()


async def test_graceful_deregistrations_are_removed_at_once(etcd) -> None:
    async with (
        AsyncClient(etcd.endpoint) as server,
        AsyncClient(etcd.endpoint) as client,
        client.discover("fleet") as cache,
    ):
        await cache.wait_ready(5)
        regs = [await server.register("fleet", address, ttl=2) for address in ADDRESSES]
        await eventually(lambda: len(cache.instances()) == 4, 5, "registrations never appeared")
        events = cache.events()
        await asyncio.gather(*(reg.deregister() for reg in regs[:3]))
        keys = {reg.key for reg in regs[:3]}
        removed = await collect(events, lambda ev: ev.type is EventType.REMOVED, keys, 5)
        assert not any(ev.instance.suspect for ev in removed.values())
        assert [i.address for i in cache.instances()] == [ADDRESSES[3]]
        assert cache.suspects() == () and cache.expiry_protections == 0


async def test_suspects_come_back_live_when_their_instances_re_register(etcd) -> None:
    """Leases revoked from outside while the instances live: the caches hold them as
    suspects until the instances' keepers re-grant and re-put."""
    clients = [AsyncClient(etcd.endpoint) for _ in ADDRESSES]
    try:
        async with (
            AsyncClient(etcd.endpoint) as client,
            AsyncClient(etcd.endpoint, expiry_protection=None) as unprotected,
            client.discover("fleet") as cache,
            unprotected.discover("fleet") as plain,
        ):
            await cache.wait_ready(5)
            await plain.wait_ready(5)
            regs = [
                await c.register("fleet", a, ttl=5) for c, a in zip(clients, ADDRESSES, strict=True)
            ]
            await eventually(lambda: len(cache.instances()) == 4, 5, "never saw 4 instances")
            events, plain_events = cache.events(), plain.events()
            old = [reg.lease_id or 0 for reg in regs[:3]]
            await asyncio.gather(*(client.etcd.lease_revoke(lease) for lease in old))

            keys = {reg.key for reg in regs[:3]}
            # Without protection the removals go through at once.
            await collect(plain_events, lambda ev: ev.type is EventType.REMOVED, keys, 5)
            # With it, each is held, then comes back under a new lease replacing its suspect.
            back = await collect(
                events,
                lambda ev: ev.type is EventType.UPDATED and not ev.instance.suspect,
                keys,
                10,
            )
            assert cache.expiry_protections == 1
            for ev in back.values():
                assert ev.previous is not None and ev.previous.suspect
                assert ev.instance.lease not in old
            assert cache.suspects() == () and len(cache.instances()) == 4
    finally:
        await asyncio.gather(*(c.close() for c in clients))
