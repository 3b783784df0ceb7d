"""Health checks against real targets that flip, and registrations that follow them.

The check tests need no etcd: each probes a real server in this process (a grpc.aio
server with the standard health service, an asyncio HTTP(S) server, a TCP listener,
a real subprocess). The registration tests run against a real etcd and watch the
instance through a client's cache, the way a caller would see it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from etcdisco import AsyncClient, EventType, RoundRobin, Status
from etcdisco.health import (
    CheckResult,
    CommandCheck,
    GrpcCheck,
    HttpCheck,
    TcpCheck,
    parse_check,
    run_probe,
)
from etcdisco.testing import TlsFiles

from .._util import eventually, wait_event

FAST = {"interval": 0.1, "timeout": 1.0, "rise": 2, "fall": 2, "jitter": 0.0}
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


# -- targets ---------------------------------------------------------------------------


class GrpcTarget:
    def __init__(self) -> None:
        self.servicer = health.aio.HealthServicer()
        self.server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{self.port}"

    async def serving(self, ok: bool, service: str = "") -> None:
        await self.servicer.set(service, SERVING if ok else NOT_SERVING)


@pytest.fixture
async def grpc_target() -> AsyncIterator[GrpcTarget]:
    target = GrpcTarget()
    await target.server.start()
    try:
        yield target
    finally:
        await target.server.stop(None)


class HttpTarget:
    """Answers every GET with ``self.status``; counts requests."""

    def __init__(self) -> None:
        self.status = 200
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=ssl_context)
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ssl.SSLError):
            self.requests.append(await reader.readline())
            while await reader.readline() not in (b"\r\n", b""):
                pass
            head = f"HTTP/1.1 {self.status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            writer.write(head.encode())
            await writer.drain()
        writer.close()


@pytest.fixture
async def http_target() -> AsyncIterator[HttpTarget]:
    target = HttpTarget()
    await target.start()
    try:
        yield target
    finally:
        await target.close()


class TcpTarget:
    """A listener that can be closed and opened again on the same port."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.port = 0

    async def open(self) -> None:
        self.server = await asyncio.start_server(
            lambda r, w: w.close(), "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture
async def tcp_target() -> AsyncIterator[TcpTarget]:
    target = TcpTarget()
    await target.open()
    try:
        yield target
    finally:
        await target.close()


# -- each check type against a flipping target -----------------------------------------


async def test_grpc_check_follows_the_health_service(grpc_target: GrpcTarget) -> None:
    check = GrpcCheck(grpc_target.address, **FAST)
    named = GrpcCheck(grpc_target.address, service="echo", **FAST)
    assert (await run_probe(check)).result is CheckResult.PASSING
    await grpc_target.serving(False)
    outcome = await run_probe(check)
    assert (outcome.result, outcome.detail) == (CheckResult.FAILING, "NOT_SERVING")
    await grpc_target.serving(True)
    assert (await run_probe(check)).result is CheckResult.PASSING
    # A named service the server does not know fails; once it is set, it counts.
    assert "does not know" in (await run_probe(named)).detail
    await grpc_target.serving(True, "echo")
    assert (await run_probe(named)).result is CheckResult.PASSING
    await grpc_target.servicer.set("echo", health_pb2.HealthCheckResponse.UNKNOWN)
    assert (await run_probe(named)).result is CheckResult.UNKNOWN
    await grpc_target.server.stop(None)
    outcome = await run_probe(check)
    assert outcome.result is CheckResult.FAILING and "UNAVAILABLE" in outcome.detail


async def test_grpc_check_on_a_server_without_health_service() -> None:
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        outcome = await run_probe(GrpcCheck(f"127.0.0.1:{port}", **FAST))
    finally:
        await server.stop(None)
    assert outcome.result is CheckResult.FAILING and "no grpc.health.v1" in outcome.detail


async def test_http_check_follows_the_status_code(http_target: HttpTarget) -> None:
    check = HttpCheck(f"http://127.0.0.1:{http_target.port}/healthz?deep=1", **FAST)
    assert (await run_probe(check)).detail == "HTTP 200"
    assert http_target.requests[-1] == b"GET /healthz?deep=1 HTTP/1.1\r\n"
    http_target.status = 503
    outcome = await run_probe(check)
    assert (outcome.result, outcome.detail) == (CheckResult.FAILING, "HTTP 503")
    narrow = HttpCheck(f"http://127.0.0.1:{http_target.port}/", status=(200, 200), **FAST)
    http_target.status = 204
    assert (await run_probe(narrow)).result is CheckResult.FAILING
    assert (await run_probe(check)).result is CheckResult.PASSING
    await http_target.close()
    outcome = await run_probe(check)
    assert outcome.result is CheckResult.FAILING and "connect" in outcome.detail


async def test_http_check_times_out_on_a_silent_server() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            await reader.read()  # never answers; the probe hangs up first
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        started = time.monotonic()
        outcome = await run_probe(HttpCheck(f"http://127.0.0.1:{port}/", timeout=0.3))
        took = time.monotonic() - started
    finally:
        server.close()
        await server.wait_closed()
    assert outcome.result is CheckResult.FAILING and "no answer within 0.3s" in outcome.detail
    assert took < 2


async def test_https_check_verifies_with_the_given_ca(tls_files: TlsFiles) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls_files.server_cert, tls_files.server_key)
    target = HttpTarget()
    await target.start(context)
    try:
        url = f"https://127.0.0.1:{target.port}/"
        assert (await run_probe(HttpCheck(url, ca=str(tls_files.ca)))).detail == "HTTP 200"
        untrusted = await run_probe(HttpCheck(url))  # the system CAs do not know it
        assert untrusted.result is CheckResult.FAILING and "TLS" in untrusted.detail
        assert (await run_probe(HttpCheck(url, verify_tls=False))).detail == "HTTP 200"
    finally:
        await target.close()


async def test_tcp_check_follows_the_listener(tcp_target: TcpTarget) -> None:
    check = TcpCheck(tcp_target.address, **FAST)
    assert (await run_probe(check)).result is CheckResult.PASSING
    await tcp_target.close()
    outcome = await run_probe(check)
    assert outcome.result is CheckResult.FAILING and "refused" in outcome.detail.lower()
    await tcp_target.open()
    assert (await run_probe(check)).result is CheckResult.PASSING


async def test_command_check_follows_the_exit_code(tmp_path: Path) -> None:
    flag = tmp_path / "code"
    flag.write_text("0")
    script = (
        f"import sys; code = open({str(flag)!r}).read(); print('state', code); sys.exit(int(code))"
    )
    # A Python start-up may take over a second on a loaded machine.
    check = CommandCheck((sys.executable, "-c", script), **{**FAST, "timeout": 10.0})
    assert (await run_probe(check)).result is CheckResult.PASSING
    flag.write_text("2")
    outcome = await run_probe(check)
    assert (outcome.result, outcome.detail) == (CheckResult.FAILING, "exit 2: state 2")
    missing = await run_probe(CommandCheck(("/nonexistent/etcdisco-check",)))
    assert missing.result is CheckResult.FAILING and "cannot run" in missing.detail


async def test_command_check_kills_a_command_past_its_timeout(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    # A shell whose child outlives it would keep running if only the shell were killed.
    script = f"sleep 30 & echo $! > {pidfile}; wait"
    outcome = await run_probe(CommandCheck(("sh", "-c", script), timeout=2.0))
    assert outcome.result is CheckResult.FAILING and "no answer" in outcome.detail
    child = int(pidfile.read_text())

    def gone() -> bool:
        try:
            with open(f"/proc/{child}/stat") as f:
                return f.read().split()[2] == "Z"
        except FileNotFoundError:
            return True

    await eventually(gone, 5, "the command's child survived the timeout")


def test_check_specs_parse() -> None:
    assert parse_check("tcp") == TcpCheck()
    assert parse_check("tcp://127.0.0.1:80", interval=1) == TcpCheck("127.0.0.1:80", interval=1)
    assert parse_check("grpc:///echo") == GrpcCheck(None, service="echo")
    assert parse_check("grpc://[::1]:50051/echo") == GrpcCheck("[::1]:50051", service="echo")
    assert parse_check("https://h:8443/x") == HttpCheck("https://h:8443/x")
    assert parse_check("exec:pg_isready -q") == CommandCheck(("pg_isready", "-q"))
    for bad in ("udp://x:1", "", "tcp://x:1/path", "http://:80/", "exec:'unclosed"):
        with pytest.raises(ValueError):
            parse_check(bad)


# -- registrations that follow their checks --------------------------------------------


async def test_failing_check_marks_the_instance_and_clients_stop_picking(
    etcd, grpc_target: GrpcTarget
) -> None:
    async with (
        AsyncClient(etcd.endpoint) as server,
        AsyncClient(etcd.endpoint) as client,
        client.discover("echo") as cache,
    ):
        await cache.wait_ready(5)
        events = cache.events()
        other = await server.register("echo", "127.0.0.1:9555", ttl=5)
        reg = await server.register("echo", grpc_target.address, ttl=5, checks=[GrpcCheck(**FAST)])
        assert reg.health is CheckResult.PASSING
        await wait_event(events, EventType.ADDED, reg.key, 5)
        lease, picker = reg.lease_id, RoundRobin()
        key_lease = (await server.etcd.get(reg.key)).kvs[0].lease

        detection = []
        for _ in range(2):  # fail, recover, fail again: no lease churn at any step
            flipped = time.monotonic()
            await grpc_target.serving(False)
            ev = await wait_event(events, EventType.UPDATED, reg.key, 5)
            detection.append(time.monotonic() - flipped)
            assert ev.instance.status is Status.UNHEALTHY
            assert reg.health is CheckResult.FAILING and "NOT_SERVING" in reg.health_failures[0]
            picks = {picker.pick(cache.instances()) for _ in range(10)}
            assert {p.address for p in picks if p} == {other.address}
            await grpc_target.serving(True)
            ev = await wait_event(events, EventType.UPDATED, reg.key, 5)
            assert ev.instance.status is Status.UP and reg.health is CheckResult.PASSING
            picks = {picker.pick(cache.instances()) for _ in range(10)}
            assert {p.address for p in picks if p} == {other.address, reg.address}

        assert reg.lease_id == lease and reg.re_registrations == 0
        assert (await server.etcd.get(reg.key)).kvs[0].lease == key_lease
        print(f"\ndetection (check fails -> cache shows unhealthy): {detection}")
        # interval 0.1 s x fall 2: both detections well within a second.
        assert max(detection) < 3


async def test_withdraw_mode_removes_and_restores_the_key(etcd, http_target: HttpTarget) -> None:
    async with (
        AsyncClient(etcd.endpoint) as server,
        AsyncClient(etcd.endpoint) as client,
        client.discover("web") as cache,
    ):
        await cache.wait_ready(5)
        events = cache.events()
        url = f"http://127.0.0.1:{http_target.port}/healthz"
        reg = await server.register(
            "web", f"127.0.0.1:{http_target.port}", ttl=5,
            checks=[HttpCheck(url, **FAST)], on_failing="withdraw",
        )  # fmt: skip
        await wait_event(events, EventType.ADDED, reg.key, 5)
        lease = reg.lease_id

        http_target.status = 500
        ev = await wait_event(events, EventType.REMOVED, reg.key, 5)
        # It said "unhealthy" before leaving, so the cache holds no suspect.
        assert ev.instance.status is Status.UNHEALTHY and not cache.suspects()
        assert reg.withdrawn and not (await server.etcd.get(reg.key)).kvs
        info = await server.etcd.lease_time_to_live(lease or 0)
        assert info.ttl > 0, "the lease must live on while the key is withdrawn"

        http_target.status = 200
        ev = await wait_event(events, EventType.ADDED, reg.key, 5)
        assert ev.instance.status is Status.UP
        # The watch can deliver the key before the put's own answer arrives, and
        # "not withdrawn" is only said once the put has returned.
        await eventually(lambda: not reg.withdrawn, 5, "key is back but still withdrawn")
        assert reg.lease_id == lease and (await server.etcd.get(reg.key)).kvs[0].lease == lease
        await reg.deregister()
        await wait_event(events, EventType.REMOVED, reg.key, 5)


async def test_a_withdrawn_key_is_not_put_back_by_the_keeper(etcd, tcp_target: TcpTarget) -> None:
    """The keeper re-puts keys deleted from outside; a withdrawn key is not one."""
    await tcp_target.close()
    async with AsyncClient(etcd.endpoint) as c:
        reg = await c.register(
            "db", tcp_target.address, ttl=2, on_failing="withdraw",
            checks=[TcpCheck(interval=0.2, rise=1, fall=1, jitter=0)],
        )  # fmt: skip
        assert reg.withdrawn and reg.health is CheckResult.FAILING
        # Several keepalive ticks (every ttl/3) pass: the key must stay out.
        await asyncio.sleep(2.0)
        assert not (await c.etcd.get(reg.key)).kvs
        await tcp_target.open()
        await eventually(lambda: not reg.withdrawn, 5, "never restored")
        assert (await c.etcd.get(reg.key)).kvs


async def test_target_down_at_start_registers_unhealthy(etcd, tcp_target: TcpTarget) -> None:
    await tcp_target.close()
    async with AsyncClient(etcd.endpoint) as c:
        reg = await c.register(
            "db", tcp_target.address, ttl=5, checks=[TcpCheck(**FAST)], metadata={"zone": "a"}
        )
        (inst,) = await c.list_instances("db")
        # The very first write already says so: no window where clients pick it.
        assert inst.status is Status.UNHEALTHY and inst.metadata["zone"] == "a"
        await tcp_target.open()
        await eventually(lambda: reg.health is CheckResult.PASSING, 5, "never passed")

        async def up() -> bool:
            (i,) = await c.list_instances("db")
            return i.status is Status.UP

        await eventually(up, 5, "etcd never showed the instance up")


async def test_draining_outranks_a_check(etcd, tcp_target: TcpTarget) -> None:
    async with AsyncClient(etcd.endpoint) as c:
        reg = await c.register("db", tcp_target.address, ttl=5, checks=[TcpCheck(**FAST)])
        await reg.drain()
        drained_at = reg.revision
        await tcp_target.close()
        await eventually(lambda: reg.health is CheckResult.FAILING, 5, "never failed")
        # While failing: the verdict is written, and what etcd holds still says draining.
        await eventually(lambda: reg.revision > drained_at, 5, "failing verdict never written")
        (inst,) = await c.list_instances("db")
        assert inst.status is Status.DRAINING
        await tcp_target.open()
        await eventually(lambda: reg.health is CheckResult.PASSING, 5, "never passed")
        (inst,) = await c.list_instances("db")
        assert inst.status is Status.DRAINING


def test_sync_client_registers_with_checks(etcd) -> None:
    from etcdisco import Client

    with Client(etcd.endpoint) as c:
        reg = c.register("db", "127.0.0.1:1", ttl=5, checks=[TcpCheck(**FAST)])
        (inst,) = c.list_instances("db")
        assert inst.status is Status.UNHEALTHY  # nothing listens on port 1
        reg.deregister()
        assert c.list_instances("db") == ()
