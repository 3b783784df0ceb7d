"""Failure paths, each injected for real: crash, etcd restart, network cut, compaction."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

from etcdisco import AsyncClient, CacheState, EventType, RegistrationState

from .._util import eventually, wait_event


def _spawn_register(endpoint: str, address: str, ttl: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "etcdisco",
            "--endpoints",
            endpoint,
            "register",
            "echo",
            address,
            "--ttl",
            str(ttl),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def test_crashed_instance_vanishes_after_its_ttl(etcd) -> None:
    ttl = 4
    async with AsyncClient(etcd.endpoint) as client, client.discover("echo") as cache:
        await cache.wait_ready(5)
        events = cache.events()
        proc = _spawn_register(etcd.endpoint, "127.0.0.1:9100", ttl)
        try:
            await wait_event(events, EventType.ADDED, "services/echo/127.0.0.1:9100", 15)
            killed = time.monotonic()
            proc.send_signal(signal.SIGKILL)
            await wait_event(events, EventType.REMOVED, "services/echo/127.0.0.1:9100", 6 * ttl)
            gone_after = time.monotonic() - killed
        finally:
            proc.kill()
            proc.wait()
        # Removal comes from lease expiry: never before the remaining TTL could run out.
        # (Its last keepalive was at most about ttl/3 before the kill, later only on a
        # starved machine.)
        assert gone_after > 1.0, f"removed {gone_after:.2f}s after SIGKILL: too early for a TTL"


async def test_sigterm_deregisters_at_once_and_exits_zero(etcd) -> None:
    async with AsyncClient(etcd.endpoint) as client, client.discover("echo") as cache:
        await cache.wait_ready(5)
        events = cache.events()
        proc = _spawn_register(etcd.endpoint, "127.0.0.1:9101", ttl=30)
        try:
            await wait_event(events, EventType.ADDED, "services/echo/127.0.0.1:9101", 15)
            stopped = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            await wait_event(events, EventType.REMOVED, "services/echo/127.0.0.1:9101", 15)
            assert time.monotonic() - stopped < 15  # far below the 30 s TTL
            assert await asyncio.to_thread(proc.wait, 10) == 0
        finally:
            proc.kill()
            proc.wait()


async def test_etcd_down_longer_than_ttl_then_back(etcd) -> None:
    """Every registration comes back and every cache equals etcd's state again."""
    ttl = 2
    async with (
        AsyncClient(etcd.endpoint) as server,
        AsyncClient(etcd.endpoint) as client,
        client.discover("echo") as cache,
    ):
        regs = [await server.register("echo", f"127.0.0.1:{9200 + i}", ttl=ttl) for i in range(3)]
        await cache.wait_ready(5)
        await eventually(lambda: len(cache.instances()) == 3, 5, "cache did not see 3 instances")

        lost = asyncio.Event()
        regs[0].add_listener(lambda _r, s: lost.set() if s is RegistrationState.LOST else None)
        etcd.stop()
        await asyncio.wait_for(lost.wait(), 6 * ttl)  # the keeper noticed a whole TTL of silence
        # The outage itself lasts longer than the TTL: that is the fault being injected.
        await asyncio.sleep(ttl)
        assert len(cache.instances()) == 3, "an outage must not empty the cache"
        assert cache.state is CacheState.STALE
        etcd.restart()

        async def all_back() -> bool:
            got = await client.etcd.get("services/echo/", prefix=True)
            return sorted(kv.key.decode() for kv in got.kvs) == sorted(r.key for r in regs)

        await eventually(all_back, 20, "registrations did not all come back in etcd")
        for r in regs:
            await eventually(
                lambda r=r: r.state is RegistrationState.REGISTERED, 10, f"{r.key} state"
            )
            got = await client.etcd.get(r.key)
            info = await client.etcd.lease_time_to_live(got.kvs[0].lease)
            assert info.ttl > 0, f"{r.key} must be bound to a live lease"
        await eventually(lambda: cache.state is CacheState.SYNCED, 10, "cache did not resync")
        got = await client.etcd.get("services/echo/", prefix=True)
        await eventually(
            lambda: {i.key for i in cache.instances()} == {kv.key.decode() for kv in got.kvs},
            10,
            "cache differs from etcd after the outage",
        )


async def test_keepalive_cut_shorter_than_ttl_keeps_the_lease(etcd, proxy) -> None:
    ttl = 6
    async with AsyncClient(proxy.endpoint, timeout=1.0) as server:
        reg = await server.register("echo", "127.0.0.1:9300", ttl=ttl)
        lease = reg.lease_id
        reconnecting = asyncio.Event()
        registered = asyncio.Event()

        def on_state(_r: object, s: RegistrationState) -> None:
            if s is RegistrationState.RECONNECTING:
                reconnecting.set()
            elif s is RegistrationState.REGISTERED and reconnecting.is_set():
                registered.set()

        reg.add_listener(on_state)
        with proxy.outage():
            await asyncio.wait_for(reconnecting.wait(), ttl)
        await asyncio.wait_for(registered.wait(), ttl)
        assert reg.lease_id == lease, "a short cut must not cost the lease"
        assert reg.re_registrations == 0


async def test_keepalive_cut_longer_than_ttl_recreates_the_registration(etcd, proxy) -> None:
    ttl = 2
    async with (
        AsyncClient(proxy.endpoint, timeout=1.0) as server,
        AsyncClient(etcd.endpoint) as direct,
    ):
        reg = await server.register("echo", "127.0.0.1:9301", ttl=ttl)
        lost = asyncio.Event()
        reg.add_listener(lambda _r, s: lost.set() if s is RegistrationState.LOST else None)
        with proxy.outage():
            await asyncio.wait_for(lost.wait(), 6 * ttl)
            # etcd expires the old lease on its own side meanwhile.
            await eventually(
                lambda: _absent(direct, reg.key), 6 * ttl, "etcd did not expire the cut lease"
            )

        async def back() -> bool:
            got = await direct.etcd.get(reg.key)
            if not got.kvs:
                return False
            return (await direct.etcd.lease_time_to_live(got.kvs[0].lease)).ttl > 0

        await eventually(back, 15, "registration did not come back under a live lease")
        assert reg.re_registrations >= 1


async def _absent(c: AsyncClient, key: str) -> bool:
    return not (await c.etcd.get(key)).kvs


async def test_compaction_while_cache_disconnected_converges(etcd, proxy) -> None:
    async with (
        AsyncClient(etcd.endpoint) as server,
        AsyncClient(proxy.endpoint, timeout=1.0) as client,
        client.discover("echo") as cache,
    ):
        stay = await server.register("echo", "127.0.0.1:9400", ttl=10)
        leave = await server.register("echo", "127.0.0.1:9401", ttl=10)
        change = await server.register("echo", "127.0.0.1:9402", metadata={"v": 1}, ttl=10)
        await cache.wait_ready(5)
        await eventually(lambda: len(cache.instances()) == 3, 5, "cache did not see 3 instances")
        events = cache.events()

        with proxy.outage():
            await eventually(lambda: cache.state is CacheState.STALE, 10, "cache never went stale")
            await leave.deregister()
            await change.update({"v": 2})
            new = await server.register("echo", "127.0.0.1:9403", ttl=10)
            for i in range(20):  # history the cache will never be able to replay
                await server.etcd.put(f"other/{i}", "x")
            rev = (await server.etcd.get("x")).revision
            await server.etcd.compact(rev)

        seen = {
            (ev.type, ev.instance.key)
            for ev in [
                await wait_event(events, t, k, 15)
                for t, k in (
                    (EventType.REMOVED, leave.key),
                    (EventType.UPDATED, change.key),
                    (EventType.ADDED, new.key),
                )
            ]
        }
        assert len(seen) == 3
        assert cache.resyncs >= 1, "the cache must have re-listed after the compaction"
        assert {i.key for i in cache.instances()} == {stay.key, change.key, new.key}
        assert next(i for i in cache.instances() if i.key == change.key).metadata["v"] == 2
        # Only the difference was emitted: nothing about the untouched instance.
        extra = []
        while True:
            try:
                extra.append(await asyncio.wait_for(anext(events), 0.2))
            except TimeoutError:
                break
        assert all(ev.instance.key != stay.key for ev in extra), extra


async def test_many_caches_share_one_watch(etcd) -> None:
    async with AsyncClient(etcd.endpoint) as client:
        caches = [await client.discover("echo") for _ in range(5)]
        other = await client.discover("other")
        assert client.watch_count == 2
        for c in caches:
            await c.close()
        assert client.watch_count == 1
        await other.close()
        assert client.watch_count == 0


def test_environment_is_not_leaking_processes() -> None:
    # Sanity for the crash tests above: the register subprocesses are reaped. Only
    # this process's children count: other test runs may share the machine.
    out = subprocess.run(
        ["pgrep", "-P", str(os.getpid()), "-f", "etcdisco --endpoints"],
        capture_output=True,
        text=True,
    )
    mine = [line for line in out.stdout.split() if line]
    assert mine == [], f"leftover register processes: {mine}"
