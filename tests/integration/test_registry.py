"""Registration against a real etcd: round trip, drain, deregister, self-healing."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest

from etcdisco import (
    AsyncClient,
    ConfigError,
    EventType,
    InvalidAddressError,
    RegistrationState,
    Status,
)

from .._util import eventually, wait_event


async def test_register_then_discover_round_trip(etcd) -> None:
    async with (
        AsyncClient(etcd.endpoint) as server,
        AsyncClient(etcd.endpoint) as client,
        client.discover("echo") as cache,
    ):
        await cache.wait_ready(5)
        events = cache.events()
        reg = await server.register("echo", "10.0.0.5:50051", metadata={"zone": "a"}, ttl=5)
        assert reg.state is RegistrationState.REGISTERED
        ev = await wait_event(events, EventType.ADDED, reg.key, 5)
        assert ev.instance.address == "10.0.0.5:50051"
        assert ev.instance.zone == "a"
        assert ev.instance.lease == reg.lease_id
        assert [i.key for i in cache.instances()] == ["services/echo/10.0.0.5:50051"]
        # Read back with etcd's own tool too.
        raw = etcd.etcdctl("get", reg.key, "--print-value-only").stdout.strip()
        assert json.loads(raw)["Addr"] == "10.0.0.5:50051"


async def test_value_in_etcd_is_etcds_naming_format(etcd) -> None:
    async with AsyncClient(etcd.endpoint) as c:
        await c.register("echo", "10.0.0.5:50051", metadata={"zone": "a"}, ttl=5)
        got = await c.etcd.get("services/echo/10.0.0.5:50051")
        assert (
            got.kvs[0].value
            == b'{"Op":0,"Addr":"10.0.0.5:50051","Metadata":"{\\"zone\\":\\"a\\"}"}'
        )


async def test_deregister_removes_at_once_and_revokes_lease(etcd) -> None:
    async with AsyncClient(etcd.endpoint) as server, AsyncClient(etcd.endpoint) as client:
        reg = await server.register("echo", "127.0.0.1:9001", ttl=30)
        lease = reg.lease_id
        assert lease is not None
        async with client.discover("echo") as cache:
            await cache.wait_ready(5)
            events = cache.events()
            started = time.monotonic()
            await reg.deregister()
            await wait_event(events, EventType.REMOVED, reg.key, 5)
            # Far below the 30 s TTL: the key was deleted, not left to expire.
            assert time.monotonic() - started < 5
        assert reg.state is RegistrationState.CLOSED
        info = await client.etcd.lease_time_to_live(lease)
        assert info.ttl == -1, "lease must be revoked when its last registration leaves"


async def test_update_and_drain_are_seen_by_clients(etcd) -> None:
    async with AsyncClient(etcd.endpoint) as server, AsyncClient(etcd.endpoint) as client:
        reg = await server.register("echo", "127.0.0.1:9001", metadata={"weight": 2}, ttl=5)
        async with client.discover("echo") as cache:
            await cache.wait_ready(5)
            events = cache.events()
            await reg.update({"weight": 5})
            ev = await wait_event(events, EventType.UPDATED, reg.key, 5)
            assert ev.instance.weight == 5 and ev.previous is not None
            assert ev.previous.weight == 2
            await reg.drain()
            ev = await wait_event(events, EventType.UPDATED, reg.key, 5)
            assert ev.instance.status is Status.DRAINING
            assert ev.instance.weight == 5, "drain keeps the other metadata"


async def test_one_lease_shared_by_all_registrations(etcd) -> None:
    async with AsyncClient(etcd.endpoint) as c:
        a = await c.register("a", "127.0.0.1:1001", ttl=5)
        b = await c.register("b", "127.0.0.1:1002", ttl=5)
        assert a.lease_id == b.lease_id
        info = await c.etcd.lease_time_to_live(a.lease_id or 0, keys=True)
        assert sorted(info.keys) == [a.key.encode(), b.key.encode()]
        await a.deregister()
        info = await c.etcd.lease_time_to_live(b.lease_id or 0, keys=True)
        assert info.ttl > 0 and info.keys == (b.key.encode(),), "lease stays for b"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"service": "echo", "address": "10.0.0.5"}, "10.0.0.5"),
        ({"service": "echo", "address": "::1:80"}, "::1:80"),
        ({"service": "echo", "address": "0.0.0.0:80"}, "0.0.0.0:80"),
        ({"service": "a/b", "address": "10.0.0.5:80"}, "a/b"),
        ({"service": "echo", "address": "10.0.0.5:80", "ttl": 1}, "ttl"),
        ({"service": "echo", "address": "10.0.0.5:80", "metadata": {"x": object()}}, "metadata"),
    ],
)
async def test_bad_input_is_refused_before_anything_is_written(etcd, kwargs, message) -> None:
    async with AsyncClient(etcd.endpoint) as c:
        with pytest.raises(ConfigError) as info:
            await c.register(**kwargs)
        assert message in str(info.value)
        assert (await c.etcd.get("services/", prefix=True)).kvs == ()
    if "0.0.0.0" in message:
        assert isinstance(info.value, InvalidAddressError)


async def test_many_registrations_at_once_are_batched_and_healed_alone(
    etcd, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "etcdisco.registry")
    async with AsyncClient(etcd.endpoint) as c:
        regs = await asyncio.gather(
            *(c.register(f"s{n % 10}", f"127.0.0.1:{10000 + n}", ttl=2) for n in range(1000))
        )
        assert {r.state for r in regs} == {RegistrationState.REGISTERED}
        assert len({r.lease_id for r in regs}) == 1
        kvs = (await c.etcd.get("services/", prefix=True)).kvs
        assert len(kvs) == 1000
        # Queued first writes go out together (at most 128 per txn), not one each.
        assert len({kv.mod_revision for kv in kvs}) <= 1000 // 128 + 2

        # The keeper's key check after a keepalive must heal exactly the deleted key
        # and must not take the others for keys that a twin holds.
        etcd.etcdctl("del", regs[500].key)

        async def back() -> bool:
            got = await c.etcd.get(regs[500].key)
            return bool(got.kvs) and got.kvs[0].lease == regs[500].lease_id

        await eventually(back, 10, "deleted key was not put back")
        assert [r.re_registrations for r in regs].count(0) == 999
        assert "held by another lease" not in caplog.text


async def test_external_delete_is_put_back_under_the_lease(etcd) -> None:
    async with AsyncClient(etcd.endpoint) as c:
        reg = await c.register("echo", "127.0.0.1:9001", ttl=3)
        etcd.etcdctl("del", reg.key)

        async def back() -> bool:
            got = await c.etcd.get(reg.key)
            return bool(got.kvs) and got.kvs[0].lease == reg.lease_id

        await eventually(back, 10, "deleted key was not put back under the same live lease")
        assert reg.state is RegistrationState.REGISTERED
        assert reg.re_registrations >= 1


async def test_revoked_lease_is_regranted_and_keys_reput(etcd) -> None:
    async with AsyncClient(etcd.endpoint) as c:
        reg = await c.register("echo", "127.0.0.1:9001", ttl=3)
        states: list[RegistrationState] = []
        reg.add_listener(lambda _r, s: states.append(s))
        old = reg.lease_id
        assert old is not None
        await c.etcd.lease_revoke(old)

        async def healed() -> bool:
            got = await c.etcd.get(reg.key)
            return bool(got.kvs) and got.kvs[0].lease not in (0, old)

        await eventually(healed, 10, "registration did not come back under a new lease")
        assert RegistrationState.LOST in states
        assert reg.state is RegistrationState.REGISTERED
        info = await c.etcd.lease_time_to_live(reg.lease_id or 0)
        assert info.ttl > 0


async def test_twin_holding_the_key_is_not_fought(etcd) -> None:
    """A key owned by another live lease (same instance id elsewhere) is left alone."""
    async with AsyncClient(etcd.endpoint) as a, AsyncClient(etcd.endpoint) as b:
        ra = await a.register("echo", "127.0.0.1:9001", ttl=3)
        rb = await b.register("echo", "127.0.0.1:9001", ttl=3)  # takes the key over
        assert ra.lease_id != rb.lease_id
        # a's keeper notices the key is not on its lease, and must not take it back.
        await eventually(lambda: ra._conflict_logged, 10, "a never checked its key")
        got = await a.etcd.get(ra.key)
        assert got.kvs[0].lease == rb.lease_id
        await ra.deregister()
        got = await a.etcd.get(ra.key)
        assert got.kvs and got.kvs[0].lease == rb.lease_id, "a's deregister must not delete b's key"
