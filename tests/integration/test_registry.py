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
    EtcdError,
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
        await asyncio.to_thread(etcd.etcdctl, "del", regs[500].key)  # the loop keeps the lease

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


async def test_twin_holding_the_key_is_not_fought(etcd, caplog: pytest.LogCaptureFixture) -> None:
    """A key owned by another live lease (same instance id elsewhere) is left alone;
    the new registrant says it took the key over, the old one that it lost it."""
    caplog.set_level(logging.WARNING, "etcdisco.registry")
    async with AsyncClient(etcd.endpoint) as a, AsyncClient(etcd.endpoint) as b:
        ra = await a.register("echo", "127.0.0.1:9001", ttl=3)
        rb = await b.register("echo", "127.0.0.1:9001", ttl=3)  # takes the key over
        assert f"was held by lease {ra.lease_id:x}" in caplog.text
        assert ra.lease_id != rb.lease_id
        # a's keeper notices the key is not on its lease (a's registration says lost),
        # and must not take it back.
        await eventually(lambda: ra.state is RegistrationState.LOST, 10, "a never noticed the twin")
        got = await a.etcd.get(ra.key)
        assert got.kvs[0].lease == rb.lease_id
        await ra.deregister()
        got = await a.etcd.get(ra.key)
        assert got.kvs and got.kvs[0].lease == rb.lease_id, "a's deregister must not delete b's key"


async def _absent(client: AsyncClient, key: str) -> bool:
    return not (await client.etcd.get(key)).kvs


async def _value(client: AsyncClient, key: str) -> dict[str, object] | None:
    got = await client.etcd.get(key)
    if not got.kvs:
        return None
    meta = json.loads(got.kvs[0].value)["Metadata"]
    return json.loads(meta) if isinstance(meta, str) else meta


async def test_deregister_during_an_outage_still_removes_the_key(etcd, proxy) -> None:
    """Two registrations share a lease; one is deregistered while etcd is unreachable.
    The sibling keeps the lease alive, so the key would live on unless it is deleted
    once etcd answers again."""
    ttl = 6  # the outage (a 2 s deregister) stays well inside it: the lease is kept
    async with (
        AsyncClient(proxy.endpoint, timeout=1.0) as server,
        AsyncClient(etcd.endpoint) as observer,
    ):
        stay = await server.register("echo", "127.0.0.1:9801", ttl=ttl)
        leave = await server.register("echo", "127.0.0.1:9802", ttl=ttl)
        assert stay.lease_id == leave.lease_id
        with proxy.outage(), pytest.raises(EtcdError):
            await leave.deregister(timeout=2)
        assert leave.state is RegistrationState.CLOSED
        await eventually(
            lambda: _absent(observer, leave.key), ttl + 2, "the deregistered key lives on"
        )
        got = await observer.etcd.get(stay.key)
        assert got.kvs and got.kvs[0].lease == stay.lease_id, "the sibling must stay"


async def test_deregister_during_a_re_registration_is_not_undone(etcd) -> None:
    """200 registrations on one lease; the lease is revoked from outside and, while the
    keeper re-grants and re-puts them, one is deregistered: it must not come back."""
    async with AsyncClient(etcd.endpoint) as server, AsyncClient(etcd.endpoint) as observer:
        regs = await asyncio.gather(
            *(server.register("echo", f"127.0.0.1:{20000 + i}", ttl=5) for i in range(200))
        )
        old = regs[0].lease_id
        assert old is not None
        first, victim = regs[0], regs[-1]
        await observer.etcd.lease_revoke(old)

        async def heal_under_way() -> bool:
            got = await observer.etcd.get(first.key)
            return bool(got.kvs) and got.kvs[0].lease != old

        # The heal has begun writing (the first key is back): deregister the last one,
        # which the heal has not reached, or is about to write.
        await eventually(heal_under_way, 15, "the keeper never re-put the first key", 0.005)
        await victim.deregister()

        async def others_back() -> bool:
            got = await observer.etcd.get("services/echo/", prefix=True)
            return len(got.kvs) == 199

        await eventually(others_back, 15, "the other registrations did not all come back")
        # An observation window of a keepalive round and more: a late re-put shows here.
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            assert await _absent(observer, victim.key), "a deregistered key came back"
            await asyncio.sleep(0.1)


async def test_failed_update_is_written_once_etcd_answers(etcd, proxy) -> None:
    async with (
        AsyncClient(proxy.endpoint, timeout=1.0) as server,
        AsyncClient(etcd.endpoint) as observer,
    ):
        reg = await server.register("echo", "127.0.0.1:9810", metadata={"v": 1}, ttl=5)
        with proxy.outage():
            with pytest.raises(EtcdError):
                await reg.update({"v": 2})
            assert reg.metadata == {"v": 2} and not reg.in_sync
        await eventually(lambda: _has(observer, reg.key, {"v": 2}), 10, "etcd never got the update")
        assert reg.in_sync


async def test_failed_drain_is_written_once_etcd_answers(etcd, proxy) -> None:
    async with (
        AsyncClient(proxy.endpoint, timeout=1.0) as server,
        AsyncClient(etcd.endpoint) as observer,
    ):
        reg = await server.register("echo", "127.0.0.1:9811", ttl=5)
        with proxy.outage(), pytest.raises(EtcdError):
            await reg.drain()
        assert reg.status == "draining"
        await eventually(
            lambda: _has(observer, reg.key, {"status": "draining"}), 10, "drain never written"
        )


async def _has(client: AsyncClient, key: str, wanted: dict[str, object]) -> bool:
    return await _value(client, key) == wanted


async def test_update_after_drain_stays_draining(etcd) -> None:
    async with AsyncClient(etcd.endpoint) as c:
        reg = await c.register("echo", "127.0.0.1:9812", metadata={"v": 1}, ttl=5)
        await reg.drain()
        await reg.update({"v": 2})
        assert await _value(c, reg.key) == {"v": 2, "status": "draining"}
        assert reg.metadata == {"v": 2} and reg.status == "draining"


@pytest.mark.parametrize("ttls", [(5, 5), (5, 10)], ids=["same-ttl", "other-ttl"])
async def test_same_instance_twice_on_one_client_is_refused(etcd, ttls) -> None:
    async with AsyncClient(etcd.endpoint) as c:
        first = await c.register("echo", "127.0.0.1:9813", ttl=ttls[0])
        with pytest.raises(ConfigError, match="already registered"):
            await c.register("echo", "127.0.0.1:9813", ttl=ttls[1])
        # Both at once: exactly one wins.
        await first.deregister()
        results = await asyncio.gather(
            c.register("echo", "127.0.0.1:9813", ttl=ttls[0]),
            c.register("echo", "127.0.0.1:9813", ttl=ttls[1]),
            return_exceptions=True,
        )
        assert sorted(type(r).__name__ for r in results) == ["ConfigError", "Registration"]
        got = await c.etcd.get("services/echo/", prefix=True)
        assert len(got.kvs) == 1
        # Once deregistered, the instance can be registered again.
        for r in results:
            if not isinstance(r, BaseException):
                await r.deregister()
        again = await c.register("echo", "127.0.0.1:9813", ttl=ttls[1])
        assert again.state is RegistrationState.REGISTERED


async def test_close_waits_for_a_deregister_in_flight(etcd) -> None:
    async with AsyncClient(etcd.endpoint) as observer:
        server = AsyncClient(etcd.endpoint)
        reg = await server.register("echo", "127.0.0.1:9814", ttl=30)
        leaving = asyncio.create_task(reg.deregister())
        await asyncio.sleep(0)  # let it start: it now waits for etcd's answer
        await server.close()
        await leaving  # must not fail because the client closed under it
        assert await _absent(observer, reg.key)


async def test_heal_survives_a_surprise_and_retries(etcd) -> None:
    """Whatever breaks a re-registration attempt, the keeper tries again."""
    async with AsyncClient(etcd.endpoint) as c:
        reg = await c.register("echo", "127.0.0.1:9815", ttl=3)
        real_grant = c.etcd.lease_grant
        surprises = 0

        async def grant_once_broken(ttl: int, **kwargs: float | None) -> object:
            nonlocal surprises
            if surprises == 0:
                surprises += 1
                raise RuntimeError("a surprise from below")
            return await real_grant(ttl, **kwargs)

        c.etcd.lease_grant = grant_once_broken  # type: ignore[method-assign,assignment]
        old = reg.lease_id
        assert old is not None
        await c.etcd.lease_revoke(old)

        async def healed() -> bool:
            got = await c.etcd.get(reg.key)
            return bool(got.kvs) and got.kvs[0].lease not in (0, old)

        await eventually(healed, 15, "the keeper gave up after a surprise")
        assert surprises == 1
