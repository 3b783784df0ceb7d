"""Least privilege with etcd roles, as documented in the README: a registrant writes only
under its own service's prefix, a client only reads."""

from __future__ import annotations

import asyncio
import logging

import pytest

from etcdisco import AsyncClient, AuthError, EventType, RegistrationState

from .._util import eventually, wait_event


def _setup_roles(member) -> None:
    for args in (
        ("role", "add", "registrant-echo"),
        (
            "role",
            "grant-permission",
            "registrant-echo",
            "readwrite",
            "services/echo/",
            "--prefix=true",
        ),
        ("user", "add", "echo-svc:echo-pw"),
        ("user", "grant-role", "echo-svc", "registrant-echo"),
        ("role", "add", "registry-reader"),
        ("role", "grant-permission", "registry-reader", "read", "services/", "--prefix=true"),
        ("user", "add", "reader:reader-pw"),
        ("user", "grant-role", "reader", "registry-reader"),
    ):
        member.etcdctl(*args)


async def test_registrant_is_confined_and_reader_discovers(etcd_auth) -> None:
    member, root, root_password = etcd_auth
    _setup_roles(member)
    ep = member.endpoint
    async with (
        AsyncClient(ep, username=root, password=root_password) as admin,
        AsyncClient(ep, username="echo-svc", password="echo-pw") as registrant,
        AsyncClient(ep, username="reader", password="reader-pw") as reader,
        reader.discover("echo") as cache,
    ):
        other = await admin.register("billing", "127.0.0.1:7100", ttl=10)
        await cache.wait_ready(5)
        events = cache.events()

        reg = await registrant.register("echo", "127.0.0.1:7000", ttl=5)
        await wait_event(events, EventType.ADDED, reg.key, 5)
        await reg.drain()
        await wait_event(events, EventType.UPDATED, reg.key, 5)

        # Another service's keys are out of the registrant's reach, for writing and deleting.
        with pytest.raises(AuthError):
            await registrant.register("billing", "127.0.0.1:7001", ttl=5)
        with pytest.raises(AuthError):
            await registrant.etcd.delete(other.key)
        assert (await admin.etcd.get(other.key)).kvs, "billing's key must be untouched"

        # The reader reads everything under the prefix and writes nothing.
        assert {i.service for i in await reader.list_instances()} == {"echo", "billing"}
        with pytest.raises(AuthError):
            await reader.register("echo", "127.0.0.1:7002", ttl=5)

        await reg.deregister()
        await wait_event(events, EventType.REMOVED, reg.key, 5)


async def test_a_refused_re_registration_is_reported_once(
    etcd_auth, caplog: pytest.LogCaptureFixture
) -> None:
    """The registrant loses its permission, then its lease: the keeper keeps trying
    (permissions can come back) but says so once, at error level, and the
    registration does not claim to be registered."""
    member, root, root_password = etcd_auth
    _setup_roles(member)
    caplog.set_level(logging.DEBUG, "etcdisco.registry")
    async with (
        AsyncClient(member.endpoint, username=root, password=root_password) as admin,
        AsyncClient(member.endpoint, username="echo-svc", password="echo-pw") as registrant,
    ):
        reg = await registrant.register("echo", "127.0.0.1:7010", ttl=2)
        lost = asyncio.Event()
        reg.add_listener(lambda _r, s: lost.set() if s is RegistrationState.LOST else None)
        member.etcdctl("role", "revoke-permission", "registrant-echo", "services/echo/", "--prefix")
        assert reg.lease_id is not None
        await admin.etcd.lease_revoke(reg.lease_id)
        await asyncio.wait_for(lost.wait(), 10)

        def refusals() -> list[logging.LogRecord]:
            return [
                r
                for r in caplog.records
                if r.levelno == logging.ERROR and "re-registering failed" in r.getMessage()
            ]

        await eventually(lambda: bool(refusals()), 10, "the refusal was never reported")
        # Several more attempts (backoff 0.2 s doubling, capped at 1 s for ttl 2)...
        attempts = len([r for r in caplog.records if "re-register failed" in r.getMessage()])
        await eventually(
            lambda: (
                len([r for r in caplog.records if "re-register failed" in r.getMessage()])
                >= attempts + 3
            ),
            15,
            "the keeper stopped trying",
        )
        # ...and still one report, and no claim of being registered.
        assert len(refusals()) == 1
        assert reg.state is RegistrationState.LOST
        with pytest.raises(AuthError):  # the key is out of its reach now
            await reg.deregister(timeout=2)
