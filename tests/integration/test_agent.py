"""The sidecar agent and ``register --check``, run as a user runs them: subprocesses
against a real etcd, with real targets for their checks."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from etcdisco import AsyncClient, Status

from .._proxy import TcpProxy
from .._util import eventually
from ._cli_process import CliProcess

CLI = [sys.executable, "-m", "etcdisco"]


async def launch(
    endpoint: str, *args: str, timeout: float = 5.0, command: str = "agent"
) -> CliProcess:
    """``etcdisco --json COMMAND ...`` (the agent by default) against ``endpoint``."""
    return await CliProcess.start(
        "--endpoints", endpoint, "--timeout", str(timeout), "--json", command, *args
    )


@pytest.fixture
async def agents() -> AsyncIterator[list[CliProcess]]:
    started: list[CliProcess] = []
    try:
        yield started
    finally:
        for agent in started:
            await agent.kill()


@pytest.fixture
async def listener() -> AsyncIterator[asyncio.Server]:
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    try:
        yield server
    finally:
        server.close()
        await server.wait_closed()


def port_of(server: asyncio.Server) -> int:
    return int(server.sockets[0].getsockname()[1])


def get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def kvs(client: AsyncClient) -> dict[str, Any]:
    return {kv.key.decode(): kv for kv in (await client.etcd.get("services/", prefix=True)).kvs}


def config(tcp_port: int, *, reloaded: bool) -> str:
    keep = f"""\
  - name: keep
    address: 127.0.0.1:{tcp_port}
    metadata: {{zone: a}}
    checks:
      - tcp
"""
    if not reloaded:
        rest = """\
  - {name: meta, address: 127.0.0.1:7002, metadata: {version: 1}}
  - {name: gone, address: 127.0.0.1:7003}
  - {name: ttl, address: 127.0.0.1:7004}
"""
    else:
        rest = """\
  - {name: meta, address: 127.0.0.1:7002, metadata: {version: 2}}
  - {name: ttl, address: 127.0.0.1:7004, ttl: 4}
  - {name: new, address: 127.0.0.1:7005}
"""
    return f"defaults:\n  ttl: 3\n  interval: 0.2\nservices:\n{keep}{rest}"


async def test_agent_registers_reloads_only_changes_and_deregisters(
    etcd, agents, listener, tmp_path: Path
) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(config(port_of(listener), reloaded=False))
    ready_file = tmp_path / "ready"
    agent = await launch(
        etcd.endpoint, "--config", str(path), "--ready-file", str(ready_file),
        "--health-listen", "127.0.0.1:0",
    )  # fmt: skip
    agents.append(agent)
    port = (await agent.event("listening"))["port"]
    await agent.event("ready")
    assert ready_file.exists()
    status, body = await asyncio.to_thread(get, f"http://127.0.0.1:{port}/ready")
    assert status == 200 and body["ready"] is True
    rows = {row["key"]: row for row in body["registrations"]}
    keep_key = f"services/keep/127.0.0.1:{port_of(listener)}"
    assert rows[keep_key]["health"] == "passing" and rows[keep_key]["state"] == "registered"
    assert (await asyncio.to_thread(get, f"http://127.0.0.1:{port}/live"))[0] == 200

    async with AsyncClient(etcd.endpoint) as c:
        before = await kvs(c)
        assert set(before) == {
            keep_key,
            "services/meta/127.0.0.1:7002",
            "services/gone/127.0.0.1:7003",
            "services/ttl/127.0.0.1:7004",
        }
        meta_lease = before["services/meta/127.0.0.1:7002"].lease

        # A broken edit is refused and changes nothing.
        path.write_text("services:\n  - {name: x}\n")
        agent.proc.send_signal(signal.SIGHUP)
        failed = await agent.event("reload-failed")
        assert "agent.yaml:2: services[0]: missing field 'address'" in failed["error"]

        path.write_text(config(port_of(listener), reloaded=True))
        agent.proc.send_signal(signal.SIGHUP)
        reloaded = await agent.event("reloaded")
        assert reloaded["changes"] == "1 added, 1 removed, 1 updated, 1 replaced, 1 unchanged"

        async def settled() -> bool:
            return set(await kvs(c)) == {
                keep_key,
                "services/meta/127.0.0.1:7002",
                "services/ttl/127.0.0.1:7004",
                "services/new/127.0.0.1:7005",
            }

        await eventually(settled, 10, "etcd never matched the reloaded config")
        after = await kvs(c)
        # Untouched: not one write to its key.
        assert after[keep_key].mod_revision == before[keep_key].mod_revision
        # Metadata-only change: rewritten in place, under the same lease.
        meta = after["services/meta/127.0.0.1:7002"]
        assert meta.lease == meta_lease and b'\\"version\\":2' in meta.value
        # TTL change: re-registered under a lease of the new TTL.
        info = await c.etcd.lease_time_to_live(after["services/ttl/127.0.0.1:7004"].lease)
        assert info.granted_ttl == 4

        assert await agent.stop() == 0
        assert await kvs(c) == {}, "SIGTERM must remove every key of the agent"
        assert not ready_file.exists()
        assert agent.json_events("deregistered")[0]["count"] == 4


async def test_agent_check_marks_unhealthy(etcd, agents, listener, tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    address = f"127.0.0.1:{port_of(listener)}"
    path.write_text(
        f'[[services]]\nname = "db"\naddress = "{address}"\nttl = 3\n'
        'checks = [{ tcp = "", interval = 0.1, fall = 1, rise = 1 }]\n'
    )
    agent = await launch(etcd.endpoint, "--config", str(path))
    agents.append(agent)
    await agent.event("ready")
    async with AsyncClient(etcd.endpoint) as c:

        async def status() -> Status:
            (inst,) = await c.list_instances("db")
            return inst.status

        assert await status() is Status.UP
        listener.close()
        await listener.wait_closed()
        await eventually(lambda: status_is(status, Status.UNHEALTHY), 5, "never unhealthy")
        assert await agent.stop() == 0


async def status_is(read: Any, wanted: Status) -> bool:
    return bool(await read() is wanted)


async def test_agent_readiness_follows_etcd(etcd, agents, tmp_path: Path) -> None:
    proxy = TcpProxy("127.0.0.1", int(etcd.endpoint.rsplit(":", 1)[1]))
    try:
        path = tmp_path / "agent.yaml"
        path.write_text("services:\n  - {name: web, address: 127.0.0.1:7100, ttl: 2}\n")
        ready_file = tmp_path / "ready"
        agent = await launch(
            proxy.endpoint, "--config", str(path),
            "--ready-file", str(ready_file), "--health-listen", "127.0.0.1:0", timeout=1,
        )  # fmt: skip
        agents.append(agent)
        port = (await agent.event("listening"))["port"]
        await agent.event("ready")
        proxy.cut()
        await agent.event("not-ready", 10)
        assert not ready_file.exists()
        status, body = await asyncio.to_thread(get, f"http://127.0.0.1:{port}/ready")
        assert status == 503 and body["registrations"][0]["state"] != "registered"
        proxy.heal()
        await agent.event("ready", 15, count=2)
        assert ready_file.exists()
        assert await agent.stop() == 0
    finally:
        proxy.close()


def test_agent_check_config_reports_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("services:\n  - name: web\n    address: 1.2.3.4:80\n    ttl: 1\n")
    res = subprocess.run(
        [*CLI, "agent", "--config", str(path), "--check-config"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 2
    assert "bad.yaml:4: services[0].ttl: ttl must be an integer from 2 to" in res.stderr


async def test_register_with_check_marks_unhealthy_then_deregisters(etcd, listener) -> None:
    address = f"127.0.0.1:{port_of(listener)}"
    args = ["register", "db", address, "--ttl", "3", "--check", "tcp", "--check-interval", "0.1"]
    proc = subprocess.Popen(
        [*CLI, "--endpoints", etcd.endpoint, *args, "--fall", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        async with AsyncClient(etcd.endpoint) as c:

            async def status() -> Status | None:
                found = await c.list_instances("db")
                return found[0].status if found else None

            await eventually(lambda: status_is(status, Status.UP), 15, "never registered up")
            listener.close()
            await listener.wait_closed()
            await eventually(lambda: status_is(status, Status.UNHEALTHY), 5, "never unhealthy")
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, 10) == 0
            assert await c.list_instances("db") == ()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


async def test_register_readiness_follows_the_lease(etcd, agents, tmp_path: Path) -> None:
    ready_file = tmp_path / "ready"
    reg = await launch(
        etcd.endpoint, "db", "127.0.0.1:7100", "--ttl", "2", "--ready-file", str(ready_file),
        "--health-listen", "127.0.0.1:0", timeout=1.0, command="register",
    )  # fmt: skip
    agents.append(reg)
    port = (await reg.event("listening"))["port"]
    url = f"http://127.0.0.1:{port}/ready"

    def ready_is(expected: bool) -> bool:
        status = get(url)[0]
        return status == (200 if expected else 503) and ready_file.exists() is expected

    await eventually(lambda: ready_is(True), 10, "register never became ready")
    body = get(url)[1]
    assert body["registrations"][0]["key"] == "services/db/127.0.0.1:7100"

    # etcd frozen past the TTL: the lease is gone, so the instance must not claim ready.
    etcd.pause()
    try:
        await eventually(lambda: ready_is(False), 15, "still ready with etcd frozen past the TTL")
    finally:
        etcd.resume()
    await eventually(lambda: ready_is(True), 15, "not ready again after etcd came back")

    assert await reg.stop() == 0
    assert not ready_file.exists()


def test_agent_check_config_reports_every_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "services:\n"
        "  - {name: web, address: nope}\n"  # 2
        "  - {name: db, address: 1.2.3.4:5, ttl: 9000000001}\n"  # 3
        "  - name: api\n    address: 1.2.3.4:6\n    metadata: {weight: heavy}\n"  # 6
        "    checks:\n      - command: [true]\n"  # 8
    )
    res = subprocess.run(
        [*CLI, "agent", "--config", str(path), "--check-config"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 2
    lines = res.stderr.splitlines()
    assert all(line.startswith(f"etcdisco: error: {path}:") for line in lines), res.stderr
    expected = [
        "bad.yaml:2: services[0].address: invalid address",
        "bad.yaml:3: services[1].ttl: ttl must be an integer from 2 to 9,000,000,000",
        "bad.yaml:6: services[2].metadata.weight: metadata 'weight' must be an integer",
        "bad.yaml:8: services[2].checks[0].command: unknown check; it is called 'exec'",
    ]
    assert len(lines) == len(expected), res.stderr
    for line, message in zip(lines, expected, strict=True):
        assert message in line, (message, line)


async def test_agent_reports_what_etcd_refuses_and_is_not_ready(
    etcd_auth, agents, tmp_path: Path
) -> None:
    """Permission denied on one key: said once at error level and as a ``failed``
    event, the agent never claims to be ready (not even while it shuts down), the
    other service is registered, and a reload after the grant registers it."""
    member, _, _ = etcd_auth
    for args in (
        ("role", "add", "registrant-echo"),
        ("role", "grant-permission", "registrant-echo", "readwrite", "services/echo/",
         "--prefix=true"),
        ("user", "add", "echo-svc:echo-pw"),
        ("user", "grant-role", "echo-svc", "registrant-echo"),
    ):  # fmt: skip
        member.etcdctl(*args)
    path = tmp_path / "agent.yaml"
    path.write_text(
        "services:\n"
        "  - {name: echo, address: 127.0.0.1:7501, ttl: 3}\n"
        "  - {name: billing, address: 127.0.0.1:7502, ttl: 3}\n"
    )
    ready_file = tmp_path / "ready"
    agent = await CliProcess.start(
        "--endpoints", member.endpoint, "--user", "echo-svc", "--json", "agent",
        "--config", str(path), "--health-listen", "127.0.0.1:0", "--ready-file", str(ready_file),
        env={"ETCDISCO_PASSWORD": "echo-pw"},
    )  # fmt: skip
    agents.append(agent)
    port = (await agent.event("listening"))["port"]
    failed = await agent.event("failed")
    assert failed["key"] == "services/billing/127.0.0.1:7502"
    assert "permission denied" in failed["error"]
    await agent.line("ERROR etcdisco.agent: etcd refused to register services/billing", stderr=True)

    async def echo_registered() -> bool:
        status, body = await asyncio.to_thread(get, f"http://127.0.0.1:{port}/ready")
        states = {row["key"]: row["state"] for row in body["registrations"]}
        return status == 503 and states == {
            "services/echo/127.0.0.1:7501": "registered",
            "services/billing/127.0.0.1:7502": "failed",
        }

    await eventually(echo_registered, 10, "echo never registered beside the refused billing")
    assert not ready_file.exists()

    # The grant comes; a reload tries the refused entry again at once.
    member.etcdctl("role", "grant-permission", "registrant-echo", "readwrite",
                   "services/billing/", "--prefix=true")  # fmt: skip
    agent.proc.send_signal(signal.SIGHUP)
    await agent.event("reloaded")
    await agent.event("ready")
    assert ready_file.exists()
    assert await agent.stop() == 0
    assert len(agent.json_events("failed")) == 1
    assert len(agent.json_events("ready")) == 1  # none while shutting down
    assert sum("refused to register" in line for line in agent.err) == 1
