"""Balancing channels (sync and aio) with generated stubs, against real echo servers
in subprocesses registered in a real etcd."""

from __future__ import annotations

import asyncio
import itertools
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

import etcdisco
import etcdisco.grpc
from etcdisco.outlier import OutlierDetector

from .._util import eventually
from ..grpc_echo import echo_pb2, echo_pb2_grpc
from ..grpc_echo.fleet import Fleet

Say = echo_pb2.SayRequest


def _addresses(ch: etcdisco.grpc.BalancingChannel | etcdisco.grpc.AioBalancingChannel) -> set[str]:
    return {i.address for i in ch.instances()}


async def test_sync_channel_spreads_round_robin_and_pins_streams(etcd, fleet: Fleet) -> None:
    fleet.start("s1", "s2", "s3")
    states: list[grpc.ChannelConnectivity] = []
    with etcdisco.Client(etcd.endpoint) as client, etcdisco.grpc.channel(client, "echo") as ch:
        assert isinstance(ch, grpc.Channel)
        assert len(ch.instances()) == 3
        ch.subscribe(states.append)
        stub = echo_pb2_grpc.EchoStub(ch)

        served = Counter(stub.Say(Say(text=str(i)), timeout=5).server for i in range(300))
        assert served == {"s1": 100, "s2": 100, "s3": 100}

        counted = list(stub.Count(echo_pb2.CountRequest(n=5), timeout=5))
        assert [r.i for r in counted] == [0, 1, 2, 3, 4]
        assert len({r.server for r in counted}) == 1
        chat = list(stub.Chat(iter([Say(text=t) for t in "abc"]), timeout=5))
        assert [r.text for r in chat] == ["a", "b", "c"]
        assert len({r.server for r in chat}) == 1
        assert stub.Collect(iter([Say(text=t) for t in "xyz"]), timeout=5).text == "x,y,z"

        reply, call = stub.Say.with_call(Say(text="w"), timeout=5)
        assert (reply.text, call.code()) == ("w", grpc.StatusCode.OK)
        assert stub.Say.future(Say(text="f"), timeout=5).result(5).text == "f"

        assert ch.get_state() is grpc.ChannelConnectivity.READY
        assert grpc.ChannelConnectivity.READY in states

        # Another policy on the same client: ring_hash keeps each key on one instance.
        with etcdisco.grpc.channel(
            client, "echo", "ring_hash", hash_key=lambda method, request: request.text
        ) as hashed:
            hashed_stub = echo_pb2_grpc.EchoStub(hashed)
            owners = {
                key: {hashed_stub.Say(Say(text=key), timeout=5).server for _ in range(5)}
                for key in map(str, range(30))
            }
        assert all(len(servers) == 1 for servers in owners.values()), owners
        assert len(set().union(*owners.values())) > 1
        # Every call, streams included, was released.
        await eventually(
            lambda: all(s.in_flight == 0 for s in ch.subchannels()), 5, "calls still counted"
        )
    assert ch.get_state() is grpc.ChannelConnectivity.SHUTDOWN
    assert states[-1] is grpc.ChannelConnectivity.SHUTDOWN


async def test_aio_channel_spreads_round_robin_and_pins_streams(etcd, fleet: Fleet) -> None:
    fleet.start("s1", "s2", "s3")
    async with (
        etcdisco.AsyncClient(etcd.endpoint) as client,
        etcdisco.grpc.aio_channel(client, "echo") as ch,
    ):
        assert isinstance(ch, grpc.aio.Channel)
        await asyncio.wait_for(ch.channel_ready(), 5)
        stub = echo_pb2_grpc.EchoStub(ch)

        served = Counter([(await stub.Say(Say(text=str(i)), timeout=5)).server for i in range(300)])
        assert served == {"s1": 100, "s2": 100, "s3": 100}

        counted = [r async for r in stub.Count(echo_pb2.CountRequest(n=5), timeout=5)]
        assert [r.i for r in counted] == [0, 1, 2, 3, 4]
        assert len({r.server for r in counted}) == 1

        async def requests(texts: str) -> AsyncIterator[Any]:
            for t in texts:
                yield Say(text=t)

        chat = [r async for r in stub.Chat(requests("abc"), timeout=5)]
        assert [r.text for r in chat] == ["a", "b", "c"]
        assert len({r.server for r in chat}) == 1
        assert (await stub.Collect(requests("xyz"), timeout=5)).text == "x,y,z"

        call = stub.Say(Say(text="w"), timeout=5)
        assert (await call).text == "w"
        assert await call.code() is grpc.StatusCode.OK

        assert ch.get_state() is grpc.ChannelConnectivity.READY
        await eventually(
            lambda: all(s.in_flight == 0 for s in ch.subchannels()), 5, "calls still counted"
        )
    assert ch.get_state() is grpc.ChannelConnectivity.SHUTDOWN


async def test_channel_uses_added_instances_and_drops_removed_ones(etcd, fleet: Fleet) -> None:
    s1, _ = fleet.start("s1", "s2")
    async with (
        etcdisco.AsyncClient(etcd.endpoint) as client,
        etcdisco.grpc.aio_channel(client, "echo") as ch,
    ):
        stub = echo_pb2_grpc.EchoStub(ch)

        async def servers(n: int) -> Counter[str]:
            return Counter([(await stub.Say(Say(), timeout=5)).server for _ in range(n)])

        assert set(await servers(20)) == {"s1", "s2"}

        (s3,) = fleet.start("s3")
        await eventually(lambda: s3.address in _addresses(ch), 10, "s3 never joined")
        assert (await servers(30))["s3"] == 10

        report = await asyncio.to_thread(s1.terminate)
        assert report["quiet"], report
        await eventually(lambda: s1.address not in _addresses(ch), 10, "s1 never left")
        await eventually(
            lambda: all(s.address != s1.address for s in ch.subchannels()),
            5,
            "s1's sub-channel was never closed",
        )
        assert set(await servers(30)) == {"s2", "s3"}


async def test_removed_instance_keeps_its_channel_until_its_calls_end(etcd, fleet: Fleet) -> None:
    s1, s2 = fleet.start("s1", "s2", extra=("--grace", "10"))
    async with (
        etcdisco.AsyncClient(etcd.endpoint) as client,
        etcdisco.grpc.aio_channel(client, "echo") as ch,
    ):
        stub = echo_pb2_grpc.EchoStub(ch)
        # Long enough to be running still when the deregistration reaches the channel.
        slow = stub.Say(Say(text="slow", delay=5.0), timeout=20)
        await eventually(
            lambda: any(s.in_flight == 1 for s in ch.subchannels()), 5, "slow call not placed"
        )
        busy = next(s for s in ch.subchannels() if s.in_flight == 1)
        victim = s1 if busy.address == s1.address else s2

        victim.proc.send_signal(signal.SIGTERM)
        # Deregistered while its call runs: retired, but not closed.
        await eventually(
            lambda: any(s.address == victim.address and s.retired for s in ch.subchannels()),
            5,
            "the victim's sub-channel was not retired",
        )
        assert victim.address not in _addresses(ch)

        reply = await slow  # finished on the retired sub-channel, not cancelled
        assert (reply.text, reply.server) == ("slow", victim.name)
        await eventually(
            lambda: all(s.address != victim.address for s in ch.subchannels()),
            5,
            "retired sub-channel not closed after its last call",
        )
        assert (await asyncio.to_thread(victim.wait_exit))["quiet"]


async def test_sigkill_under_load_fails_no_idempotent_call(etcd, fleet: Fleet) -> None:
    s1, _, _ = fleet.start("s1", "s2", "s3")
    # The deadline only bounds a test gone wrong; the load is per_thread calls each.
    per_thread, deadline = 300, time.monotonic() + 120
    failures: list[str] = []
    served: Counter[str] = Counter()
    lock = threading.Lock()
    with (
        etcdisco.Client(etcd.endpoint) as client,
        etcdisco.grpc.channel(client, "echo", "p2c", idempotent=True) as ch,
    ):
        stub = echo_pb2_grpc.EchoStub(ch)

        def worker() -> None:
            for i in range(per_thread):
                if time.monotonic() > deadline:
                    return
                try:
                    reply = stub.Say(Say(text=str(i), delay=0.005), timeout=5)
                except grpc.RpcError as exc:
                    with lock:
                        failures.append(f"{exc.code()}: {exc.details()}")
                    continue
                with lock:
                    served[reply.server] += 1

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            await eventually(lambda: sum(served.values()) >= 150, 15, "load never got going")
            before = served["s1"]
            s1.kill()
        finally:
            for t in threads:
                await asyncio.to_thread(t.join, 130)
    assert not failures, failures[:5]
    assert time.monotonic() < deadline, f"the load did not finish in time: {served}"
    assert sum(served.values()) == 4 * per_thread
    assert before > 0
    assert served["s2"] > 0 and served["s3"] > 0


async def test_rolling_restart_under_load_fails_no_call(etcd, fleet: Fleet) -> None:
    # Not idempotent: no call may be retried after it reached a server, so every one
    # of them must have been answered by a server that was still serving.
    olds = [
        fleet.spawn("s1", "--sync"),
        fleet.spawn("s2"),
        fleet.spawn("s3", "--sync"),
    ]
    for old in olds:
        old.wait_ready()
    failures: list[str] = []
    served: Counter[str] = Counter()
    stop = asyncio.Event()
    deadline = time.monotonic() + 180  # only bounds a test gone wrong
    async with (
        etcdisco.AsyncClient(etcd.endpoint) as client,
        etcdisco.grpc.aio_channel(client, "echo") as ch,
    ):
        stub = echo_pb2_grpc.EchoStub(ch)

        async def worker() -> None:
            # Until the restart is over, however long it takes on a loaded machine.
            for i in itertools.count():
                if stop.is_set() or time.monotonic() > deadline:
                    return
                try:
                    reply = await stub.Say(Say(text=str(i), delay=0.005), timeout=5)
                except grpc.aio.AioRpcError as exc:
                    failures.append(f"{exc.code()}: {exc.details()}")
                    continue
                served[reply.server] += 1

        workers = [asyncio.create_task(worker()) for _ in range(4)]
        try:
            await eventually(lambda: sum(served.values()) >= 50, 10, "load never got going")
            for n, old in enumerate(olds, 1):
                report = await asyncio.to_thread(old.terminate)
                # The channel stopped sending to it within the drain timeout.
                assert report["quiet"], report
                (new,) = await asyncio.to_thread(fleet.start, f"r{n}")
                await eventually(
                    lambda new=new: new.address in _addresses(ch), 10, f"r{n} not seen"
                )
            await eventually(lambda: served["r3"] >= 10, 10, "r3 never served")
        finally:
            stop.set()
            await asyncio.gather(*workers)
    assert not failures, failures[:5]
    assert all(served[name] > 0 for name in ("s1", "s2", "s3", "r1", "r2", "r3")), served


def _dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _DeadFirst(etcdisco.RoundRobin):
    """Round robin, but the dead instance whenever it is offered: a first attempt
    that lands elsewhere would leave nothing to retry."""

    def __init__(self, dead: str) -> None:
        super().__init__()
        self.dead = dead

    def pick(self, instances: Any, key: str | None = None) -> Any:
        found = [i for i in instances if i.address == self.dead]
        return found[0] if found else super().pick(instances, key)


async def test_calls_that_never_left_are_retried_even_when_not_idempotent(
    etcd, fleet: Fleet
) -> None:
    fleet.start("s1")
    dead = f"127.0.0.1:{_dead_port()}"
    async with etcdisco.AsyncClient(etcd.endpoint) as client:
        reg = await client.register("echo", dead, ttl=5)
        detector = OutlierDetector(consecutive_failures=1)
        picker = _DeadFirst(dead)
        async with etcdisco.grpc.aio_channel(client, "echo", policy=picker, outlier=detector) as ch:
            assert dead in _addresses(ch)
            stub = echo_pb2_grpc.EchoStub(ch)
            replies = [await stub.Say(Say(text=str(i)), timeout=5) for i in range(20)]
            assert {r.server for r in replies} == {"s1"}
            assert ch.pool.retries >= 1, "no call was placed on the dead instance first"
        await reg.deregister()


async def test_no_instance_is_unavailable(etcd) -> None:
    with etcdisco.Client(etcd.endpoint) as client, etcdisco.grpc.channel(client, "nobody") as ch:
        assert ch.get_state() is grpc.ChannelConnectivity.TRANSIENT_FAILURE
        with pytest.raises(grpc.RpcError) as sync_error:
            echo_pb2_grpc.EchoStub(ch).Say(Say(), timeout=1)
        assert sync_error.value.code() is grpc.StatusCode.UNAVAILABLE
    async with (
        etcdisco.AsyncClient(etcd.endpoint) as client,
        etcdisco.grpc.aio_channel(client, "nobody") as ach,
    ):
        with pytest.raises(grpc.aio.AioRpcError) as aio_error:
            await echo_pb2_grpc.EchoStub(ach).Say(Say(), timeout=1)
        assert aio_error.value.code() is grpc.StatusCode.UNAVAILABLE


def test_sync_channel_honours_an_operator_disable(etcd, fleet: Fleet) -> None:
    s1, _s2 = fleet.start("s1", "s2")
    with (
        etcdisco.Client(etcd.endpoint) as client,
        etcdisco.grpc.channel(client, "echo") as ch,
    ):
        stub = echo_pb2_grpc.EchoStub(ch)
        assert {stub.Say(Say(), timeout=5).server for _ in range(10)} == {"s1", "s2"}
        client.set_override("echo", s1.address, disabled=True, reason="test")
        deadline = time.monotonic() + 10
        while "s1" in {stub.Say(Say(), timeout=5).server for _ in range(4)}:
            assert time.monotonic() < deadline, "the channel kept calling a disabled instance"
        assert {stub.Say(Say(), timeout=5).server for _ in range(20)} == {"s2"}
