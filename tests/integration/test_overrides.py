"""Operator overrides against a real etcd: honoured by every reader, kept apart from
the instances' leases, ended by their expiry, invisible to etcd's naming readers."""

from __future__ import annotations

import asyncio
import collections

import pytest

from etcdisco import (
    AsyncClient,
    ConfigError,
    EventType,
    RoundRobin,
    Status,
    WeightedRoundRobin,
)

from .._util import eventually, wait_event


async def test_disable_takes_an_instance_out_of_every_pick(etcd) -> None:
    async with (
        AsyncClient(etcd.endpoint) as server,
        AsyncClient(etcd.endpoint) as operator,
        AsyncClient(etcd.endpoint) as client,
        client.discover("echo") as cache,
    ):
        regs = [await server.register("echo", f"127.0.0.1:{9900 + i}", ttl=10) for i in range(2)]
        await cache.wait_ready(5)
        await eventually(lambda: len(cache.instances()) == 2, 5, "cache did not see both")
        events = cache.events()
        override = await operator.set_override(
            "echo", regs[0].instance_id, disabled=True, reason="kernel upgrade", by="ops"
        )
        assert override is not None and override.disabled
        ev = await wait_event(events, EventType.UPDATED, regs[0].key, 5)
        assert ev.instance.status is Status.DISABLED and not ev.instance.healthy
        assert ev.instance.override is not None and ev.instance.override.reason == "kernel upgrade"
        picker = RoundRobin()
        assert {picker.pick(cache.instances()).key for _ in range(10)} == {regs[1].key}  # type: ignore[union-attr]
        # Listed by the operator's tools, with who and why.
        listed = await operator.list_overrides("echo")
        assert [(o.instance_id, o.by, o.reason) for o in listed] == [
            (regs[0].instance_id, "ops", "kernel upgrade")
        ]
        # Enabling brings it back.
        assert await operator.set_override("echo", regs[0].instance_id, disabled=False) is None
        ev = await wait_event(events, EventType.UPDATED, regs[0].key, 5)
        assert ev.instance.status is Status.UP and ev.instance.override is None


async def test_an_override_survives_re_registration_and_a_new_client(etcd) -> None:
    async with AsyncClient(etcd.endpoint) as operator:
        await operator.set_override("echo", "127.0.0.1:9910", disabled=True, reason="broken disk")
        async with AsyncClient(etcd.endpoint) as server:
            reg = await server.register("echo", "127.0.0.1:9910", ttl=3)
            await reg.deregister()
            reg = await server.register("echo", "127.0.0.1:9910", ttl=3)
            # A client started after the override: ready means it already knows it.
            async with AsyncClient(etcd.endpoint) as fresh, fresh.discover("echo") as cache:
                await cache.wait_ready(5)
                await eventually(lambda: len(cache.instances()) == 1, 5, "instance not seen")
                (inst,) = cache.instances()
                assert inst.status is Status.DISABLED
                assert inst.metadata.get("status") is None, "the instance's own word is kept"


async def test_an_override_ends_at_its_expiry(etcd) -> None:
    async with (
        AsyncClient(etcd.endpoint) as server,
        AsyncClient(etcd.endpoint) as client,
        client.discover("echo") as cache,
    ):
        reg = await server.register("echo", "127.0.0.1:9920", ttl=10)
        await cache.wait_ready(5)
        await eventually(lambda: len(cache.instances()) == 1, 5, "cache did not see it")
        events = cache.events()
        await client.set_override("echo", reg.instance_id, disabled=True, expires_in=2)
        ev = await wait_event(events, EventType.UPDATED, reg.key, 5)
        assert ev.instance.status is Status.DISABLED
        ev = await wait_event(events, EventType.UPDATED, reg.key, 6)
        assert ev.instance.status is Status.UP, "the override did not end at its expiry"
        # etcd removes the key itself (a lease of that length, plus a second).
        await eventually(
            lambda: _no_overrides(client), 10, "the expired override's key stayed in etcd"
        )


async def _no_overrides(client: AsyncClient) -> bool:
    got = await client.etcd.get("etcdisco/overrides/", prefix=True)
    return not got.kvs


async def test_weight_override_steers_weighted_picks(etcd) -> None:
    async with (
        AsyncClient(etcd.endpoint) as server,
        AsyncClient(etcd.endpoint) as client,
        client.discover("echo") as cache,
    ):
        regs = [await server.register("echo", f"127.0.0.1:{9930 + i}", ttl=10) for i in range(2)]
        await cache.wait_ready(5)
        await eventually(lambda: len(cache.instances()) == 2, 5, "cache did not see both")
        events = cache.events()
        await client.set_override("echo", regs[0].instance_id, weight=3)
        ev = await wait_event(events, EventType.UPDATED, regs[0].key, 5)
        assert ev.instance.weight == 3
        picker = WeightedRoundRobin()
        counts = collections.Counter(picker.pick(cache.instances()).key for _ in range(40))  # type: ignore[union-attr]
        assert counts == {regs[0].key: 30, regs[1].key: 10}


async def test_a_service_wide_override_covers_every_instance(etcd) -> None:
    async with (
        AsyncClient(etcd.endpoint) as server,
        AsyncClient(etcd.endpoint) as client,
        client.discover("echo") as cache,
    ):
        for i in range(3):
            await server.register("echo", f"127.0.0.1:{9940 + i}", ttl=10)
        await cache.wait_ready(5)
        await eventually(lambda: len(cache.instances()) == 3, 5, "cache did not see all")
        await client.set_override("echo", disabled=True, reason="maintenance window")
        await eventually(
            lambda: all(i.status is Status.DISABLED for i in cache.instances()),
            5,
            "not every instance was disabled",
        )
        assert RoundRobin().pick(cache.instances()) is None
        assert await client.clear_override("echo")
        await eventually(
            lambda: all(i.status is Status.UP for i in cache.instances()), 5, "not restored"
        )


async def test_overrides_are_invisible_to_naming_readers(etcd) -> None:
    """Go's resolver dialled with etcd:///services/echo reads the prefix
    ``services/echo`` (no trailing slash): nothing but instances may live there."""
    async with AsyncClient(etcd.endpoint) as c:
        reg = await c.register("echo", "127.0.0.1:9950", ttl=10)
        await c.set_override("echo", reg.instance_id, disabled=True)
        await c.set_override("echo", weight=2)
        listed = etcd.etcdctl("get", "--prefix", "services/echo", "--keys-only").stdout.split()
        assert listed == [reg.key]
        listed = etcd.etcdctl("get", "--prefix", "services", "--keys-only").stdout.split()
        assert listed == [reg.key]


async def test_remove_instance_deletes_a_stale_entry_and_names_its_lease(etcd) -> None:
    async with AsyncClient(etcd.endpoint) as c:
        etcd.etcdctl("put", "services/echo/ghost", '{"Addr":"10.9.9.9:80"}')
        gone = await c.remove_instance("echo", "ghost")
        assert gone is not None and gone.address == "10.9.9.9:80" and gone.lease == 0
        assert await c.remove_instance("echo", "ghost") is None


@pytest.mark.parametrize(
    "kwargs", [{"weight": -1}, {"weight": 1.5}, {"expires_in": 0}, {"reason": "x" * 600}]
)
async def test_bad_overrides_are_refused_before_writing(etcd, kwargs) -> None:
    async with AsyncClient(etcd.endpoint) as c:
        with pytest.raises(ConfigError):
            await c.set_override("echo", "i1", disabled=True, **kwargs)
        assert await c.list_overrides() == ()


async def test_a_reader_that_may_not_read_overrides_still_discovers(etcd_auth) -> None:
    member, root, password = etcd_auth
    for args in (
        ("role", "add", "registry-reader"),
        ("role", "grant-permission", "registry-reader", "read", "services/", "--prefix=true"),
        ("user", "add", "reader:reader-pw"),
        ("user", "grant-role", "reader", "registry-reader"),
    ):
        member.etcdctl(*args)
    async with (
        AsyncClient(member.endpoint, username=root, password=password) as admin,
        AsyncClient(member.endpoint, username="reader", password="reader-pw") as reader,
        reader.discover("echo") as cache,
    ):
        reg = await admin.register("echo", "127.0.0.1:9960", ttl=10)
        await asyncio.wait_for(cache.wait_ready(), 10)
        await eventually(lambda: len(cache.instances()) == 1, 5, "reader did not discover")
        assert cache.instances()[0].key == reg.key
