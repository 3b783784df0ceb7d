"""TLS, mutual TLS, and user/password auth with tokens invalidated by a restart."""

from __future__ import annotations

import asyncio

import pytest

from etcdisco import AsyncClient, AuthError, EtcdError, EventType, RegistrationState

from .._util import eventually, wait_event


async def test_mutual_tls_round_trip(etcd_tls) -> None:
    member, files = etcd_tls
    kwargs = {"cacert": str(files.ca), "cert": str(files.client_cert), "key": str(files.client_key)}
    async with AsyncClient(member.endpoint, **kwargs) as c, c.discover("echo") as cache:
        await cache.wait_ready(5)
        events = cache.events()
        reg = await c.register("echo", "127.0.0.1:9600", ttl=5)
        await wait_event(events, EventType.ADDED, reg.key, 5)


async def test_tls_without_client_certificate_is_refused(etcd_tls) -> None:
    member, files = etcd_tls
    async with AsyncClient(member.endpoint, cacert=str(files.ca), timeout=2.0) as c:
        with pytest.raises(EtcdError) as info:
            await c.register("echo", "127.0.0.1:9601", ttl=5)
        # etcd 3.4 and 3.5 fail differently on the wire; both must point at the cause.
        assert "client certificate" in str(info.value)


async def test_plaintext_to_tls_endpoint_fails_clearly(etcd_tls) -> None:
    member, _ = etcd_tls
    async with AsyncClient(member.endpoint, timeout=1.0) as c:
        with pytest.raises(EtcdError) as info:
            await c.register("echo", "127.0.0.1:9602", ttl=5)
        assert member.endpoint in str(info.value)


async def test_wrong_password_is_an_auth_error(etcd_auth) -> None:
    member, user, _password = etcd_auth
    async with AsyncClient(member.endpoint, username=user, password="wrong") as c:
        with pytest.raises(AuthError):
            await c.register("echo", "127.0.0.1:9603", ttl=5)


async def test_auth_survives_token_invalidated_by_restart(etcd_auth) -> None:
    member, user, password = etcd_auth
    async with (
        AsyncClient(member.endpoint, username=user, password=password) as server,
        AsyncClient(member.endpoint, username=user, password=password) as client,
        client.discover("echo") as cache,
    ):
        reg = await server.register("echo", "127.0.0.1:9604", ttl=5)
        await cache.wait_ready(5)
        events = cache.events()
        member.restart()  # simple tokens live in memory: every token is now invalid
        # Unary calls re-authenticate transparently...
        late = await server.register("echo", "127.0.0.1:9605", ttl=5)
        # ...and so do the streams: the cache's watch and the keepalive stream.
        await wait_event(events, EventType.ADDED, late.key, 20)
        await eventually(
            lambda: reg.state is RegistrationState.REGISTERED, 15, "registration not healthy"
        )
        got = await client.etcd.get(reg.key)
        assert got.kvs, "registration lost across the restart"


async def test_auth_fails_over_past_a_dead_endpoint(etcd_auth) -> None:
    """The first endpoint is down for maintenance: authentication, unary calls, the
    watch and the keepalive stream all reach the live member."""
    member, user, password = etcd_auth
    endpoints = f"127.0.0.1:1,{member.endpoint}"
    async with (
        AsyncClient(endpoints, username=user, password=password, timeout=3.0) as c,
        AsyncClient(member.endpoint, username=user, password=password) as observer,
        c.discover("echo") as cache,
    ):
        await cache.wait_ready(5)
        events = cache.events()
        reg = await c.register("echo", "127.0.0.1:9606", ttl=3)
        await wait_event(events, EventType.ADDED, reg.key, 5)
        lease = reg.lease_id
        # Two TTLs: without keepalives reaching etcd the lease would expire in this window.
        deadline = asyncio.get_running_loop().time() + 6
        while asyncio.get_running_loop().time() < deadline:
            got = await observer.etcd.get(reg.key)
            assert got.kvs and got.kvs[0].lease == lease, "the lease was not kept alive"
            await asyncio.sleep(0.2)
        assert reg.state is RegistrationState.REGISTERED and reg.re_registrations == 0


async def test_auth_error_behind_a_dead_endpoint_names_only_what_was_tried(etcd_auth) -> None:
    member, user, _ = etcd_auth
    endpoints = f"127.0.0.1:1,{member.endpoint}"
    async with AsyncClient(endpoints, username=user, password="wrong", timeout=3.0) as c:
        with pytest.raises(AuthError) as info:
            await c.list_instances()
        assert "authentication failed" in str(info.value)
