"""Discovery against a real etcd: formats written by others, garbage, discover_all."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator

import pytest

from etcdisco import AsyncClient, CacheState, EtcdTimeoutError, EventType, encode_value
from etcdisco.etcd import Op
from etcdisco.testing import LocalEtcd

from .._util import eventually, wait_event

# Values as other writers leave them: etcd's Go endpoints.Manager (Metadata null,
# a string, an object), etcd's grpcproxy (a JSON string), and plain etcdctl.
FOREIGN = {
    "services/echo/go-null": '{"Op":0,"Addr":"10.0.0.1:80","Metadata":null}',
    "services/echo/go-object": '{"Op":0,"Addr":"10.0.0.2:80","Metadata":{"zone":"b"}}',
    "services/echo/proxy": '{"Op":0,"Addr":"10.0.0.3:80","Metadata":"{\\"zone\\":\\"c\\"}"}',
    "services/echo/1.2.3.4:80": '{"Addr":"1.2.3.4:80"}',
}
GARBAGE = {
    "services/echo/not-json": "hello",
    "services/echo/no-addr": '{"Op":0}',
    "services/echo/delete-op": '{"Op":1,"Addr":"10.0.0.9:80"}',
    "services/echo/bad-addr": '{"Addr":"nohost"}',
    "services/echo/deep": "[" * 5000 + "]" * 5000,
    # Addresses that try to smuggle something into a dialer or a log line.
    "services/echo/newline": '{"Addr":"10.0.0.9:80\\nINFO fake log line"}',
    "services/echo/scheme": '{"Addr":"unix:///var/run/docker.sock"}',
    "services/echo/list": '{"Addr":"10.0.0.9:80,10.0.0.10:80"}',
    "services/echo/shell": '{"Addr":"$(reboot):80"}',
}


async def test_reads_foreign_formats_and_skips_garbage(etcd) -> None:
    for key, value in {**FOREIGN, **GARBAGE}.items():
        etcd.etcdctl("put", key, value)
    async with AsyncClient(etcd.endpoint) as c, c.discover("echo") as cache:
        await cache.wait_ready(5)
        got = {i.key: i for i in cache.instances()}
        assert set(got) == set(FOREIGN)
        assert got["services/echo/go-object"].zone == "b"
        assert got["services/echo/proxy"].zone == "c"
        assert got["services/echo/go-null"].metadata == {}
        assert cache.malformed == len(GARBAGE)

        # Garbage arriving through the watch is skipped too, and a key that turns to
        # garbage stops naming an instance.
        events = cache.events()
        await c.etcd.put("services/echo/late", b"\xff\xfe\x00")
        # Over the 1 MiB limit, though etcd (1.5 MiB per request) stores it.
        huge = '{"Addr":"10.0.0.8:80","Metadata":"' + "x" * 1_400_000 + '"}'
        await c.etcd.put("services/echo/huge", huge)
        await c.etcd.put("services/echo/1.2.3.4:80", "{}")
        ev = await wait_event(events, EventType.REMOVED, "services/echo/1.2.3.4:80", 5)
        assert ev.instance.address == "1.2.3.4:80"
        assert cache.malformed == len(GARBAGE) + 3
        assert {i.key for i in cache.instances()} == set(FOREIGN) - {ev.instance.key}


async def test_keys_outside_the_layout_are_ignored(etcd) -> None:
    etcd.etcdctl("put", "services/echo/a/b", '{"Addr":"10.0.0.1:80"}')
    etcd.etcdctl("put", "services/echo-canary/x", '{"Addr":"10.0.0.2:80"}')
    async with AsyncClient(etcd.endpoint) as c, c.discover("echo") as cache:
        await cache.wait_ready(5)
        assert cache.instances() == ()


async def test_discover_all_sees_every_service(etcd) -> None:
    async with AsyncClient(etcd.endpoint) as c:
        await c.register("a", "127.0.0.1:1001", ttl=5)
        await c.register("b", "127.0.0.1:1002", ttl=5)
        async with c.discover_all() as cache:
            await cache.wait_ready(5)
            assert set(cache.services()) == {"a", "b"}
            events = cache.events()
            await c.register("c", "127.0.0.1:1003", ttl=5)
            await wait_event(events, EventType.ADDED, "services/c/127.0.0.1:1003", 5)


def _range_calls(member: LocalEtcd) -> float:
    text = urllib.request.urlopen(f"{member.url}/metrics", timeout=5).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("grpc_server_handled_total{") and 'grpc_method="Range"' in line
    )


async def test_a_registry_larger_than_a_page_is_listed_whole_in_pages(etcd) -> None:
    """12,000 instances list in pages of 5,000 (at one revision), and the watch goes on
    from there: an instance added afterwards arrives, and none is counted twice."""
    async with AsyncClient(etcd.endpoint) as c:
        ops = []
        for i in range(12_000):
            address = f"10.1.{i // 250}.{i % 250 + 1}:80"
            ops.append(Op.put(f"services/big/{address}", encode_value(address)))
            if len(ops) == 128:
                await c.etcd.txn([], ops)
                ops = []
        await c.etcd.txn([], ops)
        ranges = await asyncio.to_thread(_range_calls, etcd)
        cache = await c.discover("big")
        await cache.wait_ready(30)
        listed = await asyncio.to_thread(_range_calls, etcd) - ranges
        assert len(cache.instances()) == 12_000
        assert listed >= 3, f"the listing took {listed:.0f} range calls, not pages"
        events = cache.events()
        await c.etcd.put("services/big/10.2.0.1:80", encode_value("10.2.0.1:80"))
        await wait_event(events, EventType.ADDED, "services/big/10.2.0.1:80", 10)
        assert len(cache.instances()) == 12_001


async def test_custom_prefix_with_leading_slash(etcd) -> None:
    async with AsyncClient(etcd.endpoint, prefix="/corp/svc") as c:
        reg = await c.register("echo", "127.0.0.1:1001", ttl=5)
        assert reg.key == "/corp/svc/echo/127.0.0.1:1001"
        async with c.discover("echo") as cache:
            await cache.wait_ready(5)
            await eventually(lambda: len(cache.instances()) == 1, 5, "instance not seen")


async def test_a_frozen_etcd_never_ends_the_watch(etcd) -> None:
    """etcd frozen (SIGSTOP: alive, TCP open, answering nothing) for longer than the
    watch's progress probe: the cache says stale, and once etcd resumes it follows
    again. Cancelling the silent stream must not read as the watcher being cancelled."""
    async with (
        AsyncClient(etcd.endpoint, timeout=2.0) as client,
        AsyncClient(etcd.endpoint) as writer,
        client.discover("echo") as cache,
    ):
        await cache.wait_ready(5)
        events = cache.events()
        # An event proves the watch itself is up (ready only means listed).
        first = await writer.register("echo", "127.0.0.1:9829", ttl=30)
        await wait_event(events, EventType.ADDED, first.key, 5)
        stale = asyncio.Event()
        cache.add_state_listener(lambda s: stale.set() if s is CacheState.STALE else None)
        etcd.pause()
        try:
            # The probe asks every 5 s and gives up after 3 more.
            await asyncio.wait_for(stale.wait(), 20)
        except TimeoutError:
            raise AssertionError(f"cache still says {cache.state.value} on a frozen etcd") from None
        finally:
            etcd.resume()
        reg = await writer.register("echo", "127.0.0.1:9830", ttl=5)
        await wait_event(events, EventType.ADDED, reg.key, 20)
        assert cache.state is CacheState.SYNCED
        assert [i.key for i in cache.instances()] == [first.key, reg.key]


async def test_closing_the_client_ends_every_iteration(etcd) -> None:
    client = AsyncClient(etcd.endpoint)
    cache = await client.discover("echo")
    await cache.wait_ready(5)

    async def drain(stream: AsyncIterator[object]) -> str:
        async for _ in stream:
            pass
        return "ended"

    iterations = [
        asyncio.create_task(drain(cache)),
        asyncio.create_task(drain(cache.events())),
    ]
    await asyncio.sleep(0)  # both are now waiting for an event
    await client.close()
    try:
        ended = await asyncio.wait_for(asyncio.gather(*iterations), 5)
    except TimeoutError:
        raise AssertionError("an iteration over a cache outlived its client") from None
    assert ended == ["ended", "ended"]
    assert cache.state is CacheState.CLOSED


def _range_denials(member: LocalEtcd) -> float:
    """How many Range calls etcd refused for lack of permission (its gRPC metrics)."""
    text = urllib.request.urlopen(f"{member.url}/metrics", timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        if (
            line.startswith("grpc_server_handled_total{")
            and 'grpc_method="Range"' in line
            and 'grpc_code="PermissionDenied"' in line
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_a_cache_without_permission_backs_off(etcd_auth) -> None:
    """A user without read permission: the cache keeps trying (permissions can be
    granted later), but slowly, not every few seconds."""
    member, _, _ = etcd_auth
    member.etcdctl("user", "add", "nobody:nobody-pw")
    async with AsyncClient(member.endpoint, username="nobody", password="nobody-pw") as c:
        cache = await c.discover("echo")
        with pytest.raises(EtcdTimeoutError, match="permission denied"):
            await cache.wait_ready(12)
        denied = await asyncio.to_thread(_range_denials, member)
        # Two followers list: the instances and the operators' overrides. Backoff from
        # 0.1 s doubling up to 5 s would try 8 times each in 12 s; after a second
        # refusal each waits 5 s, then 10 s: at most 4 each.
        assert 2 <= denied <= 8, f"{denied:.0f} refused lists in 12 s"
        await cache.close()
