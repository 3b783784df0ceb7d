"""A 3-member etcd cluster losing its leader: nothing lost, caches keep following."""

from __future__ import annotations

import asyncio
import time

import pytest

from etcdisco import AsyncClient, CacheState, EventType, RegistrationState

from .._util import eventually, wait_event


async def test_leader_killed_nothing_lost(etcd_cluster) -> None:
    endpoints = ",".join(etcd_cluster.endpoints)
    ttl = 3
    async with (
        AsyncClient(endpoints, timeout=2.0) as server,
        AsyncClient(endpoints, timeout=2.0) as client,
        client.discover("echo") as cache,
    ):
        regs = [await server.register("echo", f"127.0.0.1:{9500 + i}", ttl=ttl) for i in range(3)]
        await cache.wait_ready(5)
        await eventually(lambda: len(cache.instances()) == 3, 5, "cache did not see 3 instances")
        events = cache.events()

        leader = etcd_cluster.leader()
        leader.kill()
        await eventually(
            lambda: etcd_cluster.leader(timeout=1.0) is not None, 20, "no new leader elected"
        )

        # The cache still follows: a registration made after the failover shows up.
        late = await server.register("echo", "127.0.0.1:9599", ttl=ttl)
        await wait_event(events, EventType.ADDED, late.key, 20)

        async def all_present() -> bool:
            got = await client.etcd.get("services/echo/", prefix=True)
            return {kv.key.decode() for kv in got.kvs} == {r.key for r in [*regs, late]}

        await eventually(all_present, 10, "a registration was lost in the failover")
        await eventually(
            lambda: all(r.state is RegistrationState.REGISTERED for r in [*regs, late]),
            10,
            "registrations did not settle as registered",
        )
        # An observation window of two TTLs: keys that lost their keepalives across
        # the failover would expire inside it.
        await asyncio.sleep(2 * ttl)
        assert await all_present(), "a registration expired after the failover"
        assert {i.key for i in cache.instances()} == {r.key for r in [*regs, late]}
        assert cache.state is CacheState.SYNCED

        leader.restart()
        await eventually(all_present, 10, "a registration was lost when the old leader rejoined")


async def test_member_under_the_keepalive_stream_killed(etcd_cluster) -> None:
    """The member serving the keepalive stream dies between two keepalives. The next
    write finds the call already finished (grpc raises InvalidStateError there, not an
    RPC error); the keeper must carry on through another member before the TTL ends."""
    first, *others = etcd_cluster.members
    ttl = 3
    async with (
        # The first endpoint is the one streams open on.
        AsyncClient(",".join(etcd_cluster.endpoints), timeout=2.0) as server,
        AsyncClient(",".join(m.endpoint for m in others), timeout=2.0) as observer,
    ):
        reg = await server.register("echo", "127.0.0.1:9700", ttl=ttl)
        lease = reg.lease_id
        # The stream opens with the first keepalive, a third of a TTL after the grant.
        registered = time.monotonic()
        await eventually(lambda: reg.last_keepalive > registered, 2 * ttl, "no keepalive")
        first.kill()
        killed = time.monotonic()

        async def alive_past_ttl() -> bool:
            if time.monotonic() - killed < ttl + 1:
                return False
            got = await observer.etcd.get(reg.key)
            return bool(got.kvs) and got.kvs[0].lease == lease

        await eventually(alive_past_ttl, 6 * ttl, "the key did not outlive its first TTL")
        assert reg.lease_id == lease and reg.re_registrations == 0, "the lease was not kept"
        assert reg.state is RegistrationState.REGISTERED


@pytest.mark.parametrize("ttl", [6, 10])
async def test_stalled_member_under_the_keepalive_stream_costs_no_lease(etcd_cluster, ttl) -> None:
    """The follower carrying the keepalive stream is frozen (SIGSTOP: TCP open, nothing
    answered) for 2 x TTL + 3 s while the other two keep quorum. Keepalives must move
    to a live member in time, for leases of two TTLs sharing that stream."""
    leader = etcd_cluster.leader()
    assert leader is not None
    stalled = next(m for m in etcd_cluster.members if m is not leader)
    rest = [m for m in etcd_cluster.members if m is not stalled]
    other_ttl = 10 if ttl == 6 else 6
    async with (
        # The first endpoint is the one streams open on.
        AsyncClient(
            ",".join([stalled.endpoint, *(m.endpoint for m in rest)]), timeout=2.0
        ) as server,
        AsyncClient(",".join(m.endpoint for m in rest), timeout=2.0) as observer,
    ):
        regs = [
            await server.register("echo", "127.0.0.1:9710", ttl=ttl),
            await server.register("echo", "127.0.0.1:9711", ttl=other_ttl),
        ]
        leases = {r.key: r.lease_id for r in regs}
        registered = time.monotonic()
        await eventually(
            lambda: all(r.last_keepalive > registered for r in regs), 2 * ttl, "no keepalive"
        )
        states: list[tuple[str, RegistrationState]] = []
        for r in regs:
            r.add_listener(lambda r_, s: states.append((r_.key, s)))
        problems: list[str] = []
        stalled.pause()
        began = time.monotonic()
        try:
            while (elapsed := time.monotonic() - began) < 2 * ttl + 3:
                for r in regs:
                    got = await observer.etcd.get(r.key)
                    if not got.kvs or got.kvs[0].lease != leases[r.key]:
                        problems.append(f"{r.key} lost its key at +{elapsed:.1f}s ({r.state})")
                await asyncio.sleep(0.25)
        finally:
            stalled.resume()
        assert not problems, problems[:4]
        assert not [s for s in states if s[1] is RegistrationState.LOST], states
        assert [r.re_registrations for r in regs] == [0, 0]
        assert all(r.state is RegistrationState.REGISTERED for r in regs)


async def test_quorum_lost_past_the_ttl_keeps_the_lease(etcd_cluster) -> None:
    """Both followers frozen for longer than the TTL: the leader steps down (it hears
    from no quorum) before the lease runs out, so etcd expires nothing, and the next
    leader extends every lease. The registration says ``lost`` meanwhile, then carries
    on under the same lease: no re-grant, and no caller ever sees the instance leave.

    (A frozen *leader* is another story: on waking it revokes what it believes
    expired, etcd's own behaviour, and the keeper re-registers.)"""
    ttl = 3
    leader = etcd_cluster.leader()
    assert leader is not None
    others = [m for m in etcd_cluster.members if m is not leader]
    async with (
        AsyncClient(",".join(etcd_cluster.endpoints), timeout=2.0) as server,
        AsyncClient(",".join(etcd_cluster.endpoints), timeout=2.0) as client,
        client.discover("echo") as cache,
    ):
        await cache.wait_ready(5)
        events = cache.events()
        reg = await server.register("echo", "127.0.0.1:9720", ttl=ttl)
        await wait_event(events, EventType.ADDED, reg.key, 5)
        lease = reg.lease_id
        lost = asyncio.Event()
        reg.add_listener(lambda _r, s: lost.set() if s is RegistrationState.LOST else None)
        for member in others:
            member.pause()
        try:
            await asyncio.wait_for(lost.wait(), 4 * ttl)
        finally:
            for member in others:
                member.resume()
        await eventually(
            lambda: reg.state is RegistrationState.REGISTERED,
            30,
            "the registration never came back",
        )
        assert reg.lease_id == lease and reg.re_registrations == 0
        got = await client.etcd.get(reg.key)
        assert got.kvs and got.kvs[0].lease == lease
        seen = []
        while True:
            try:
                seen.append(await asyncio.wait_for(anext(events), 0.5))
            except TimeoutError:
                break
        assert not [e for e in seen if e.type is EventType.REMOVED], seen
