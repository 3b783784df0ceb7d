"""The operator's commands (``disable``, ``enable``, ``weight``, ``deregister``,
``overrides``) run as an operator runs them, against a real etcd, with a client's
cache watching what they do to its picks."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from typing import Any

import pytest

from etcdisco import AsyncClient, EventType, RoundRobin, Status

from .._util import wait_event
from ._cli_process import CliProcess


async def cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """``etcdisco ARGS`` in a thread, so that the test's caches keep following etcd."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCDISCO_")}
    cmd = [sys.executable, "-m", "etcdisco", *args]
    return await asyncio.to_thread(
        subprocess.run, cmd, capture_output=True, text=True, timeout=timeout, env=env
    )


def json_lines(res: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    assert res.returncode == 0, res.stdout + res.stderr
    return [json.loads(line) for line in res.stdout.splitlines()]


async def test_disable_weight_enable_round_trip(etcd) -> None:
    ep = etcd.endpoint
    async with (
        AsyncClient(ep) as server,
        AsyncClient(ep) as client,
        client.discover("echo") as cache,
    ):
        a = await server.register("echo", "127.0.0.1:7101", ttl=10, metadata={"zone": "z1"})
        b = await server.register("echo", "127.0.0.1:7102", ttl=10)
        await cache.wait_ready(5)
        events = cache.events()
        await cli("--endpoints", ep, "list")  # warm: the first run compiles bytecode

        res = await cli(
            "--endpoints", ep, "disable", "echo", a.instance_id,
            "--reason", "kernel upgrade", "--for", "30m", "--by", "alice",
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        assert res.stdout.startswith(f"disabled echo/{a.instance_id}: disabled, by alice, until ")
        assert "kernel upgrade" in res.stdout
        # The client's cache hears it through its watch, and stops picking it.
        ev = await wait_event(events, EventType.UPDATED, a.key, 10)
        assert ev.instance.status is Status.DISABLED
        assert {RoundRobin().pick(cache.instances()).key for _ in range(4)} == {b.key}  # type: ignore[union-attr]

        # list shows the effective status and the override (table and JSON).
        table = await cli("--endpoints", ep, "list", "echo")
        row = next(line for line in table.stdout.splitlines() if a.instance_id in line)
        assert " disabled " in row and "[disabled, by alice, until " in row, table.stdout
        assert "kernel upgrade]" in row
        listed = {r["id"]: r for r in json_lines(await cli("--endpoints", ep, "--json", "list"))}
        assert listed[a.instance_id]["status"] == "disabled"
        assert listed[a.instance_id]["override"]["reason"] == "kernel upgrade"
        assert listed[b.instance_id]["status"] == "up" and "override" not in listed[b.instance_id]

        res = await cli("--endpoints", ep, "weight", "echo", a.instance_id, "7", "--by", "bob")
        assert res.returncode == 0, res.stderr
        assert "weight of echo/127.0.0.1:7101 set to 7" in res.stdout
        rows = json_lines(await cli("--endpoints", ep, "--json", "overrides"))
        assert len(rows) == 1
        row = rows[0]
        assert (row["service"], row["id"], row["disabled"], row["weight"]) == (
            "echo",
            a.instance_id,
            True,
            7,
        )
        assert row["by"] == "bob" and row["reason"] == "kernel upgrade"
        assert 1700 < row["expires_in"] <= 1800
        table = await cli("--endpoints", ep, "overrides", "echo")
        assert table.stdout.splitlines()[0].split() == [
            "SERVICE", "ID", "DISABLED", "WEIGHT", "EXPIRES", "IN", "BY", "REASON",
        ]  # fmt: skip
        cells = table.stdout.splitlines()[1].split()
        assert cells[:4] == ["echo", a.instance_id, "yes", "7"], table.stdout
        assert cells[4].startswith("29m") and cells[5:] == ["bob", "kernel", "upgrade"]

        # enable ends the disable; the weight stays.
        res = await cli("--endpoints", ep, "enable", "echo", a.instance_id)
        assert res.returncode == 0, res.stderr
        assert res.stdout.startswith(f"enabled echo/{a.instance_id}; its override stays: weight 7")
        await wait_event(events, EventType.UPDATED, a.key, 10)
        inst = next(i for i in cache.instances() if i.key == a.key)
        assert inst.status is Status.UP and inst.weight == 7
        res = await cli("--endpoints", ep, "enable", "echo", a.instance_id)
        assert res.returncode == 0 and "was not disabled" in res.stdout, res.stdout + res.stderr

        # The whole service: every instance out of rotation, with a note saying so.
        res = await cli("--endpoints", ep, "disable", "echo", "--reason", "maintenance")
        assert res.returncode == 0, res.stderr
        assert "all 2 instance(s) of echo are out of rotation" in res.stderr
        await wait_event(events, EventType.UPDATED, b.key, 10)
        assert RoundRobin().pick(cache.instances()) is None
        # Enabling one instance does not lift the service's override: it says so.
        res = await cli("--endpoints", ep, "enable", "echo", b.instance_id)
        assert "still disabled service-wide" in res.stderr, res.stderr
        res = await cli("--endpoints", ep, "--json", "enable", "echo")
        assert json_lines(res)[0]["was_disabled"] is True
        await wait_event(events, EventType.UPDATED, b.key, 10)
        assert {i.status for i in cache.instances()} == {Status.UP}


async def test_disable_before_registration_and_watch_shows_overrides(etcd) -> None:
    """An override may name an instance not registered yet (it applies when it
    comes); ``watch`` prints the change an override makes."""
    ep = etcd.endpoint
    res = await cli("--endpoints", ep, "disable", "echo", "127.0.0.1:7201", "--reason", "bad")
    assert res.returncode == 0, res.stderr
    assert "no instance echo/127.0.0.1:7201 is registered now" in res.stderr
    async with AsyncClient(ep) as server:
        await server.register("echo", "127.0.0.1:7200", ttl=10)
        watcher = await CliProcess.start("--endpoints", ep, "--json", "watch", "echo")
        try:
            # Its listing printed: it is watching from then on.
            await watcher.event("existing", timeout=20)
            await server.register("echo", "127.0.0.1:7201", ttl=10)
            added = await watcher.event("added", timeout=20)
            assert added["status"] == "disabled" and added["override"]["reason"] == "bad"
            res = await cli("--endpoints", ep, "enable", "echo", "127.0.0.1:7201")
            assert res.returncode == 0, res.stderr
            updated = await watcher.event("updated", timeout=20)
            assert updated["id"] == "127.0.0.1:7201"
            assert updated["status"] == "up" and "override" not in updated
        finally:
            await watcher.stop()


async def test_deregister_removes_a_stale_key_and_names_its_lease(etcd) -> None:
    ep = etcd.endpoint
    async with AsyncClient(ep) as c:
        # A live instance: its key goes, and the operator is told it will come back.
        lease = await c.etcd.lease_grant(60)
        etcd.etcdctl(
            "put", "services/echo/live", '{"Op":0,"Addr":"127.0.0.1:7301"}',
            f"--lease={lease.id:x}",
        )  # fmt: skip
        res = await cli("--endpoints", ep, "--json", "deregister", "echo", "live")
        event = json_lines(res)[0]
        assert event["event"] == "deregistered" and event["key"] == "services/echo/live"
        assert event["lease"] == f"{lease.id:x}" and event["lease_alive"] is True
        assert 0 < event["lease_ttl_left"] <= 60 and event["lease_granted_ttl"] == 60
        assert "etcdisco: warning:" in res.stderr and "etcdisco disable echo live" in res.stderr
        assert await c.list_instances("echo") == ()

        # A stale entry without a lease (written by hand): gone for good.
        etcd.etcdctl("put", "services/echo/ghost", '{"Op":0,"Addr":"10.9.9.9:80"}')
        res = await cli("--endpoints", ep, "deregister", "echo", "ghost")
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == "deregistered services/echo/ghost -> 10.9.9.9:80 (no lease)"
        assert res.stderr == ""

        res = await cli("--endpoints", ep, "deregister", "echo", "ghost")
        assert res.returncode == 1
        assert res.stderr.strip() == "etcdisco: error: no instance echo/ghost in etcd"


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["disable", "echo"], 2, "Missing option '--reason'"),
        (["disable", "echo", "--reason", "r", "--for", "5"], 1, "not a number with a unit"),
        (["disable", "echo", "--reason", "r", "--for", "0s"], 1, "must be longer than 0s"),
        (["disable", "echo", "--reason", "r", "--for", "400d"], 1, "longer than a year"),
        (["disable", "bad name", "--reason", "r"], 1, "service name 'bad name'"),
        (["disable", "echo", "a/b", "--reason", "r"], 1, "instance id 'a/b'"),
        (["weight", "echo", "i1", "-1"], 2, "No such option"),
        (["weight", "echo", "i1", "x"], 2, "'x' is not a valid integer"),
        (["disable", "echo", "--reason", "x" * 600], 1, "reason"),
    ],
)
async def test_bad_input_is_refused_before_any_write(etcd, args, code, message) -> None:
    res = await cli("--endpoints", etcd.endpoint, *args)
    assert res.returncode == code, res.stdout + res.stderr
    assert message in res.stderr, res.stderr
    if code == 1:
        assert res.stderr.count("\n") == 1 and res.stderr.startswith("etcdisco: error:")
    async with AsyncClient(etcd.endpoint) as c:
        assert await c.list_overrides() == ()


async def test_unreachable_etcd_is_one_error_line() -> None:
    start = time.monotonic()
    res = await cli(
        "--endpoints", "127.0.0.1:1", "--timeout", "1", "disable", "echo", "--reason", "r"
    )
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1 and "127.0.0.1:1" in res.stderr, res.stderr
    assert time.monotonic() - start < 20
