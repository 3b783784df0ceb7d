"""A 3-member etcd cluster losing its leader: nothing lost, caches keep following."""

from __future__ import annotations

import asyncio
import time

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
        keeper = server._keepers[ttl]
        registered = time.monotonic()
        await eventually(lambda: keeper.last_ack > registered, 2 * ttl, "no keepalive")
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
