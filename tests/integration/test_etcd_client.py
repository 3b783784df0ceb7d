"""The thin etcd client against a real etcd: calls, typed errors, failover, deadlines."""

from __future__ import annotations

import asyncio
import time

import pytest

from etcdisco import CompactedError, EtcdTimeoutError, LeaseNotFoundError, UnavailableError
from etcdisco.etcd import Compare, EtcdClient, Op, WatchEventType


async def test_kv_and_txn(etcd) -> None:
    async with EtcdClient(etcd.endpoint) as c:
        put = await c.put("a/1", "x")
        await c.put("a/2", "y")
        await c.put("b/1", "z")
        got = await c.get("a/", prefix=True)
        assert [kv.key for kv in got.kvs] == [b"a/1", b"a/2"]
        assert got.revision >= put.revision
        ok = await c.txn([Compare.version("a/1", "==", 0)], [Op.put("a/1", "never")])
        assert not ok.succeeded
        ok = await c.txn([Compare.version("a/3", "==", 0)], [Op.put("a/3", "new")])
        assert ok.succeeded
        deleted = await c.delete("a/", prefix=True, prev_kv=True)
        assert deleted.deleted == 3
        assert {kv.value for kv in deleted.prev_kvs} == {b"x", b"y", b"new"}
        assert (await c.get("b/1")).kvs[0].value == b"z"


async def test_prefix_pages_are_one_snapshot(etcd) -> None:
    """A listing in pages reads every page at the first page's revision: a write made
    between two pages is not in it, and nothing is missed or repeated."""
    async with EtcdClient(etcd.endpoint) as c:
        for i in range(10):
            await c.put(f"p/{i:02d}", str(i))
        pages = c.get_prefix_pages("p/", page=3)
        first = await anext(pages)
        await c.put("p/99", "late")
        await c.delete("p/09")
        rest = [page async for page in pages]
        keys = [kv.key for page in (first, *rest) for kv in page.kvs]
        assert keys == [f"p/{i:02d}".encode() for i in range(10)]
        assert [len(page.kvs) for page in (first, *rest)] == [3, 3, 3, 1]
        assert {page.revision for page in rest} == {first.revision}
        whole = await c.get_prefix("p/", page=4)
        assert [kv.key for kv in whole.kvs][-1] == b"p/99" and len(whole.kvs) == 10


async def test_watch_delivers_events_with_prev_kv(etcd) -> None:
    async with EtcdClient(etcd.endpoint) as c:
        start = (await c.get("w")).revision + 1
        async with c.watch("w/", prefix=True, start_revision=start, prev_kv=True) as w:
            await c.put("w/1", "one")
            await c.put("w/1", "two")
            await c.delete("w/1")
            seen = []
            while len(seen) < 3:
                batch = await asyncio.wait_for(anext(w), 5)
                seen.extend(batch.events)
        assert [e.type for e in seen] == [
            WatchEventType.PUT,
            WatchEventType.PUT,
            WatchEventType.DELETE,
        ]
        assert seen[1].prev_kv is not None and seen[1].prev_kv.value == b"one"
        assert seen[2].prev_kv is not None and seen[2].prev_kv.value == b"two"


async def test_watch_below_compaction_raises_typed_error(etcd) -> None:
    async with EtcdClient(etcd.endpoint) as c:
        first = await c.put("k", "1")
        for i in range(5):
            last = await c.put("k", str(i))
        await c.compact(last.revision)
        # etcd answers "created", then cancels with the compaction point.
        with pytest.raises(CompactedError) as info:
            async with c.watch("k", start_revision=first.revision) as w:
                await asyncio.wait_for(anext(w), 5)
        assert info.value.compact_revision == last.revision

        # Compacting again to the same point names the revision, not a bogus "0".
        with pytest.raises(CompactedError, match=f"revision {last.revision} is already"):
            await c.compact(last.revision)


async def test_watch_progress_request_is_answered(etcd) -> None:
    async with EtcdClient(etcd.endpoint) as c, c.watch("quiet/", prefix=True) as w:
        await w.request_progress()
        batch = await asyncio.wait_for(anext(w), 5)
        assert batch.is_progress


async def test_lease_keepalive_and_loss(etcd) -> None:
    async with EtcdClient(etcd.endpoint) as c:
        lease = await c.lease_grant(5)
        stream = c.keepalive_stream()
        assert await stream.keepalive(lease.id, timeout=5) == 5
        await c.put("l", "v", lease=lease.id)
        info = await c.lease_time_to_live(lease.id, keys=True)
        assert info.keys == (b"l",) and 0 < info.ttl <= 5
        await c.lease_revoke(lease.id)
        with pytest.raises(LeaseNotFoundError):
            await stream.keepalive(lease.id, timeout=5)
        with pytest.raises(LeaseNotFoundError) as err:
            await c.put("l2", "v", lease=lease.id)
        assert err.value.lease_id == lease.id
        assert (await c.get("l")).kvs == ()
        await stream.close()


async def test_failover_past_a_dead_endpoint(etcd) -> None:
    async with EtcdClient(["127.0.0.1:1", etcd.endpoint], timeout=5) as c:
        await c.put("f", "v")
        assert (await c.get("f")).kvs[0].value == b"v"
        async with c.watch("f") as w:  # streams use the endpoint that answered
            await c.put("f", "w")
            batch = await asyncio.wait_for(anext(w), 5)
            assert batch.events[0].kv.value == b"w"


async def test_unreachable_names_the_endpoints() -> None:
    async with EtcdClient(["127.0.0.1:1", "127.0.0.1:2"], timeout=1) as c:
        with pytest.raises(UnavailableError) as info:
            await c.get("x")
        assert "127.0.0.1:1" in str(info.value) and "127.0.0.1:2" in str(info.value)


async def test_deadline_on_a_frozen_server(etcd) -> None:
    async with EtcdClient(etcd.endpoint, timeout=1.0) as c:
        await c.put("x", "1")
        etcd.pause()
        try:
            started = time.monotonic()
            with pytest.raises((EtcdTimeoutError, UnavailableError)):
                await c.get("x")
            # The deadline bounds the call even when the server never answers.
            assert time.monotonic() - started < 3
        finally:
            etcd.resume()
        assert (await c.get("x")).kvs[0].value == b"1"
