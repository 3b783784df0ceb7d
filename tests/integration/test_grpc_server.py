"""The server helper: health, registration, the drain order, the advertised address.
Real etcd, real gRPC servers (in this process, or in subprocesses for signals)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import signal
import threading
from collections.abc import Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import etcdisco
import etcdisco.grpc
from etcdisco import ConfigError, EventType, InvalidAddressError, Status, parse_address

from .._util import wait_event
from ..grpc_echo import echo_pb2, echo_pb2_grpc
from ..grpc_echo.fleet import Fleet
from ..grpc_echo.server import AioEcho, SyncEcho

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
NAMES = ("", "echo", "etcdisco.test.Echo")


async def _health(address: str, names: tuple[str, ...] = NAMES) -> dict[str, int]:
    async with grpc.aio.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        return {
            name: (await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)).status
            for name in names
        }


@pytest.mark.parametrize("flavour", ["aio", "sync"])
async def test_sigterm_drains_in_order_with_truthful_health(
    etcd, fleet: Fleet, flavour: str
) -> None:
    extra = ("--quiet-period", "1.0", *(("--sync",) if flavour == "sync" else ()))
    (s1,) = fleet.start("s1", extra=extra)
    key = f"services/echo/{s1.address}"
    async with etcdisco.AsyncClient(etcd.endpoint) as client, client.discover("echo") as cache:
        await cache.wait_ready(5)
        events = cache.events()
        assert [i.address for i in cache.instances()] == [s1.address]
        assert cache.instances()[0].healthy
        assert await _health(s1.address) == dict.fromkeys(NAMES, SERVING)

        s1.proc.send_signal(signal.SIGTERM)
        drained = await wait_event(events, EventType.UPDATED, key, 5)
        assert drained.instance.status is Status.DRAINING
        # Health went first, and the server still answers while clients move away.
        assert await _health(s1.address) == dict.fromkeys(NAMES, NOT_SERVING)
        async with grpc.aio.insecure_channel(s1.address) as ch:
            reply = await echo_pb2_grpc.EchoStub(ch).Say(echo_pb2.SayRequest(text="late"))
        assert reply.server == "s1"

        await wait_event(events, EventType.REMOVED, key, 10)
        report = await asyncio.to_thread(s1.wait_exit)
    assert report["quiet"]
    assert report["rpcs_while_draining"] == 1  # the late call; health checks do not count


async def test_advertised_address_is_reachable_and_never_a_wildcard(etcd) -> None:
    async with etcdisco.AsyncClient(etcd.endpoint) as client:
        server = etcdisco.grpc.aio_server()
        port = server.add_insecure_port("[::]:0")
        served = await etcdisco.grpc.aio_serve_registered(
            client, server, "echo", port=port, quiet_period=0
        )
        host, advertised_port = parse_address(served.address)
        assert not ipaddress.ip_address(host).is_unspecified
        assert (host, advertised_port) == (etcdisco.grpc.primary_ip(), port)
        assert [i.address for i in await client.list_instances("echo")] == [served.address]
        assert await _health(served.address, ("", "echo")) == {"": SERVING, "echo": SERVING}
        report = await served.shutdown()
        assert report.quiet
        assert await client.list_instances("echo") == ()

        unstarted = etcdisco.grpc.aio_server()
        wildcards = [
            {"address": "0.0.0.0:5000"},
            {"address": "[::]:5000"},
            {"host": "0.0.0.0", "port": 5000},
            {"host": "::", "port": 5000},
        ]
        for where in wildcards:
            with pytest.raises(InvalidAddressError, match="unspecified"):
                await etcdisco.grpc.aio_serve_registered(client, unstarted, "echo", **where)
        plain = grpc.aio.server()
        with pytest.raises(ConfigError, match=r"etcdisco\.grpc\.server\(\)"):
            await etcdisco.grpc.aio_serve_registered(client, plain, "echo", port=5000)
        await unstarted.stop(None)
        await plain.stop(None)
        assert await client.list_instances("echo") == ()


async def test_drain_waits_while_clients_keep_sending_up_to_the_timeout(etcd) -> None:
    async with etcdisco.AsyncClient(etcd.endpoint) as client:
        server = etcdisco.grpc.aio_server()
        echo_pb2_grpc.add_EchoServicer_to_server(AioEcho("s1"), server)
        port = server.add_insecure_port("127.0.0.1:0")
        served = await etcdisco.grpc.aio_serve_registered(
            client, server, "echo", port=port, host="127.0.0.1", quiet_period=0.3, drain_timeout=1.0
        )
        stop = asyncio.Event()
        sent = 0

        async def stubborn_client() -> None:
            # A client that ignores the registry and keeps calling the old address.
            nonlocal sent
            async with grpc.aio.insecure_channel(served.address) as ch:
                stub = echo_pb2_grpc.EchoStub(ch)
                while not stop.is_set() and sent < 200:
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        await stub.Say(echo_pb2.SayRequest(), timeout=1)
                    sent += 1
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.05):
                            await stop.wait()

        sender = asyncio.create_task(stubborn_client())
        try:
            report = await served.shutdown()
        finally:
            stop.set()
            await sender
    # Never quiet: the wait ended at drain_timeout, and only then was it deregistered.
    assert not report.quiet
    assert report.waited >= 1.0
    assert report.rpcs_while_draining > 0


def test_sync_server_registers_drains_and_stops(etcd) -> None:
    with etcdisco.Client(etcd.endpoint) as client:
        server = etcdisco.grpc.server(max_workers=4)
        echo_pb2_grpc.add_EchoServicer_to_server(SyncEcho("s1"), server)
        port = server.add_insecure_port("127.0.0.1:0")
        with etcdisco.grpc.serve_registered(
            client, server, ["echo", "echo-admin"], port=port, host="127.0.0.1", quiet_period=0.1
        ) as served:
            assert served.address == f"127.0.0.1:{port}"
            with grpc.insecure_channel(served.address) as ch:
                assert echo_pb2_grpc.EchoStub(ch).Say(echo_pb2.SayRequest()).server == "s1"
                health = health_pb2_grpc.HealthStub(ch)
                for name in ("", "echo", "echo-admin"):
                    status = health.Check(health_pb2.HealthCheckRequest(service=name)).status
                    assert status == SERVING
            assert {r.service for r in served.registrations} == {"echo", "echo-admin"}
            with pytest.raises(ConfigError, match="main thread"):
                _in_thread(
                    lambda: etcdisco.grpc.serve_registered(
                        client, etcdisco.grpc.server(), "x", port=1, handle_signals=True
                    )
                )
        assert served.drain_report is not None and served.drain_report.quiet
        cache = client.discover_all()
        cache.wait_ready(5)
        assert cache.instances() == ()
        cache.close()
        with grpc.insecure_channel(served.address) as ch, pytest.raises(grpc.RpcError) as err:
            echo_pb2_grpc.EchoStub(ch).Say(echo_pb2.SayRequest(), timeout=2)
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE


def _in_thread(fn: Callable[[], object]) -> None:
    """Run ``fn`` on another thread and re-raise what it raised."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join(10)
    if errors:
        raise errors[0]
