"""The xDS control plane against real etcd, real gRPC servers and real gRPC clients.

A grpcio process reads its xDS bootstrap once, so every xDS *client* here is a
subprocess (CLIENT below) driven over stdin/stdout with JSON lines; the control plane
and the backends (gRPC servers that answer with their own name) run in the test.
The ADS bookkeeping is checked with a raw ADS stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import status_pb2

from etcdisco import AsyncClient, EventType, Registration, encode_value
from etcdisco.etcd import KeepAliveStream
from etcdisco.grpc.xds import ServicePolicy, XdsServer, bootstrap_config

from .._util import communicate, eventually, wait_event

# xDS type URLs (wire facts of the envoy v3 API).
LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"

# Drives one xDS client process: {"op": "call", "n": N} makes N calls; {"op": "until",
# "want": NAME, "present": bool} calls until NAME answers (present) or until 30 calls
# in a row do not reach it (absent), and reports when (wall clock) that happened.
CLIENT = r"""
import json, sys, time, grpc
stubs = {}
def call(target, header, timeout):
    if target not in stubs:
        stubs[target] = grpc.insecure_channel(target).unary_unary("/etcdisco.test.Echo/Who")
    md = (("x-user", header),) if header else None
    try:
        return stubs[target](b"", timeout=timeout, metadata=md).decode(), None
    except grpc.RpcError as e:
        return None, [e.code().name, e.details()]
for line in sys.stdin:
    cmd = json.loads(line)
    target, header = cmd.get("target", "xds:///echo"), cmd.get("header")
    timeout = cmd.get("timeout", 5)
    names, errors, at = [], [], None
    start = time.time()
    if cmd["op"] == "call":
        for _ in range(cmd["n"]):
            name, err = call(target, header, timeout)
            names.append(name) if name else errors.append(err)
    else:
        want, quiet, last = cmd["want"], 0, None
        deadline = start + cmd.get("within", 10)
        while time.time() < deadline:
            name, err = call(target, header, cmd.get("call_timeout", 1))
            names.append(name) if name else errors.append(err)
            if cmd["present"] and name == want:
                at = time.time()
                break
            if not cmd["present"]:
                if name == want:
                    last, quiet = time.time(), 0
                elif name is not None:
                    quiet += 1
                if quiet >= 30:
                    at = last or start
                    break
    counts = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    print(json.dumps({"counts": counts, "names": names[:200], "errors": errors[:5],
                      "n_errors": len(errors), "at": at, "elapsed": time.time() - start}),
          flush=True)
"""


class Backend:
    """A gRPC server in this process that answers /etcdisco.test.Echo/Who with its name."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.server = grpc.aio.server()
        self.address = ""
        self.stopped = False

    async def start(self) -> Backend:
        answer = self.name.encode()  # not self: a cycle would keep the server past the loop

        async def who(request: bytes, context: Any) -> bytes:
            return answer

        handler = grpc.unary_unary_rpc_method_handler(who)
        self.server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("etcdisco.test.Echo", {"Who": handler})]
        )
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        self.address = f"127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            await self.server.stop(None)


class XdsClientProcess:
    """One subprocess running CLIENT with a given bootstrap."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, env: dict[str, str]) -> XdsClientProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CLIENT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, **env},
        )
        return cls(proc)

    async def run(self, timeout: float = 20, **command: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write((json.dumps(command) + "\n").encode())
        await self.proc.stdin.drain()
        try:
            async with asyncio.timeout(timeout):
                line = await self.proc.stdout.readline()
        except TimeoutError:
            raise AssertionError(f"xDS client gave no answer to {command} in {timeout}s") from None
        assert line, f"xDS client exited (code {self.proc.returncode}) on {command}"
        result: dict[str, Any] = json.loads(line)
        return result

    async def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            async with asyncio.timeout(5):
                await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


@contextlib.asynccontextmanager
async def xds_client(bootstrap: dict[str, Any]) -> AsyncIterator[XdsClientProcess]:
    client = await XdsClientProcess.start({"GRPC_XDS_BOOTSTRAP_CONFIG": json.dumps(bootstrap)})
    try:
        yield client
    finally:
        await client.close()


@contextlib.asynccontextmanager
async def backends(count: int, first: int = 0) -> AsyncIterator[list[Backend]]:
    started = [await Backend(f"b{i}").start() for i in range(first, first + count)]
    try:
        yield started
    finally:
        for backend in started:
            await backend.stop()


@pytest.fixture
async def client(etcd: Any) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(etcd.endpoint) as c:
        yield c


@pytest.fixture
async def xds(client: AsyncClient) -> AsyncIterator[XdsServer]:
    async with XdsServer(client) as server:
        await server.wait_ready(10)
        yield server
    assert server.stats.nacks == 0, f"a client rejected our resources: {server.stats.last_nack}"


async def register_all(
    client: AsyncClient, servers: list[Backend], **metadata: Any
) -> list[Registration]:
    return [
        await client.register("echo", b.address, metadata={"name": b.name, **metadata}, ttl=5)
        for b in servers
    ]


def report(what: str, seconds: float) -> None:
    """Latencies are measurements, not assertions: shown with pytest -s."""
    print(f"xds latency: {what}: {seconds * 1000:.1f} ms")


async def wait_served(xds: XdsServer, service: str, endpoints: int) -> None:
    def served() -> bool:
        table = xds.store.resources(EDS)
        if service not in table:
            return False
        cla = endpoint_pb2.ClusterLoadAssignment()
        table[service].body.Unpack(cla)
        return sum(len(loc.lb_endpoints) for loc in cla.endpoints) == endpoints

    await eventually(served, 10, f"{service} not served with {endpoints} endpoints")


# -- through real gRPC clients -------------------------------------------------------------


async def test_round_robin_spreads_calls(client: AsyncClient, xds: XdsServer) -> None:
    async with backends(3) as servers:
        # A second (draining) id on b0's address, registered first: merged into one
        # endpoint, the serving one, since gRPC rejects an assignment that lists an
        # address twice (the fixture checks that no client rejected anything).
        await client.register(
            "echo", servers[0].address, instance_id="twin", metadata={"status": "draining"}
        )
        await register_all(client, servers)
        await wait_served(xds, "echo", 3)
        async with xds_client(xds.bootstrap()) as caller:
            for name in ("b0", "b1", "b2"):  # every connection up before counting
                warm = await caller.run(op="until", want=name, present=True)
                assert warm["at"] is not None, f"{name} never answered: {warm}"
            result = await caller.run(op="call", n=30)
    assert result["n_errors"] == 0, result["errors"]
    assert sorted(result["counts"]) == ["b0", "b1", "b2"]
    assert all(8 <= n <= 12 for n in result["counts"].values()), result["counts"]


async def test_added_instance_is_used(client: AsyncClient, xds: XdsServer) -> None:
    async with backends(2) as servers, backends(1, first=2) as (late,):
        await register_all(client, servers)
        await wait_served(xds, "echo", 2)
        async with xds_client(xds.bootstrap()) as caller:
            first = await caller.run(op="call", n=10)
            assert first["n_errors"] == 0 and "b2" not in first["counts"], first
            waiting = asyncio.ensure_future(caller.run(op="until", want="b2", present=True))
            changed = time.time()
            await client.register("echo", late.address, ttl=5)
            result = await waiting
    assert result["at"] is not None, f"b2 never answered: {result['counts']}"
    assert result["n_errors"] == 0, result["errors"]
    report("instance added -> first call to it", result["at"] - changed)


async def test_draining_instance_stops_receiving_calls(client: AsyncClient, xds: XdsServer) -> None:
    async with backends(3) as servers:
        regs = await register_all(client, servers)
        await wait_served(xds, "echo", 3)
        async with xds_client(xds.bootstrap()) as caller:
            warm = await caller.run(op="call", n=9)
            assert "b0" in warm["counts"], warm
            waiting = asyncio.ensure_future(caller.run(op="until", want="b0", present=False))
            changed = time.time()
            await regs[0].drain()
            drained = await waiting
            after = await caller.run(op="call", n=40)
            waiting = asyncio.ensure_future(caller.run(op="until", want="b1", present=False))
            removed = time.time()
            await regs[1].deregister()
            gone = await waiting
    assert drained["at"] is not None and drained["n_errors"] == 0, drained
    assert after["n_errors"] == 0 and "b0" not in after["counts"], after
    assert gone["at"] is not None and gone["n_errors"] == 0, gone
    report("drain -> last call to the draining instance", drained["at"] - changed)
    report("deregister -> last call to the removed instance", gone["at"] - removed)


async def test_an_operator_disable_stops_calls_to_an_instance(
    client: AsyncClient, xds: XdsServer
) -> None:
    """An override (kept apart from the instance's own key) reaches gRPC clients
    through xDS: the endpoint goes DRAINING, calls stop, and come back on enable."""
    async with backends(3) as servers:
        regs = await register_all(client, servers)
        await wait_served(xds, "echo", 3)
        async with xds_client(xds.bootstrap()) as caller:
            warm = await caller.run(op="call", n=9)
            assert "b0" in warm["counts"], warm
            waiting = asyncio.ensure_future(caller.run(op="until", want="b0", present=False))
            await client.set_override("echo", regs[0].instance_id, disabled=True, reason="test")
            disabled = await waiting
            after = await caller.run(op="call", n=30)
            waiting = asyncio.ensure_future(caller.run(op="until", want="b0", present=True))
            await client.set_override("echo", regs[0].instance_id, disabled=False)
            enabled = await waiting
    assert disabled["at"] is not None and disabled["n_errors"] == 0, disabled
    assert after["n_errors"] == 0 and "b0" not in after["counts"], after
    assert enabled["at"] is not None, f"b0 never came back: {enabled['counts']}"


# A backend in a process of its own, to be killed (SIGKILL) with a call in flight: it
# prints its port, then "call" as each call starts, and answers after a second.
SLOW_BACKEND = r"""
import sys, time, grpc
from concurrent import futures
def who(request, context):
    print("call", flush=True)
    time.sleep(1)
    return b"b2"
server = grpc.server(futures.ThreadPoolExecutor(4))
handler = grpc.unary_unary_rpc_method_handler(who)
server.add_generic_rpc_handlers(
    [grpc.method_handlers_generic_handler("etcdisco.test.Echo", {"Who": handler})])
print(server.add_insecure_port("127.0.0.1:0"), flush=True)
server.start()
sys.stdin.read()
"""


async def _stop_keeping(keeper: asyncio.Future[None], keepalive: KeepAliveStream) -> None:
    keeper.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await keeper
    await keepalive.close()


async def test_crashed_instance_costs_no_failed_call(client: AsyncClient, xds: XdsServer) -> None:
    doomed = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SLOW_BACKEND, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    output = doomed.stdout
    assert output is not None

    async def line() -> str:
        async with asyncio.timeout(10):
            return (await output.readline()).decode().strip()

    keeper: asyncio.Future[None] | None = None
    try:
        address = f"127.0.0.1:{await line()}"
        async with backends(2) as servers:
            await register_all(client, servers)
            # The doomed instance's lease is kept alive here until the crash, then left to
            # expire by itself, as a crashed process's would.
            lease = await client.etcd.lease_grant(3)
            keepalive = client.etcd.keepalive_stream()

            async def keep() -> None:
                while True:
                    await keepalive.keepalive(lease.id, timeout=2)
                    await asyncio.sleep(0.5)

            keeper = asyncio.ensure_future(keep())
            key = f"services/echo/{address}"
            await client.etcd.put(key, encode_value(address, {"name": "b2"}), lease=lease.id)
            await wait_served(xds, "echo", 3)
            pushed: list[float] = []
            xds.store.add_listener(lambda t: pushed.append(time.time()) if EDS in t else None)
            async with xds_client(xds.bootstrap()) as caller, client.discover("echo") as cache:
                events = cache.events()
                # Calls may take the doomed instance's second: one "call" line per call
                # that reached it, none cut short by the caller's deadline.
                first = await caller.run(op="until", want="b2", present=True, call_timeout=5)
                assert first["at"] is not None, first
                assert await line() == "call"
                calling = asyncio.ensure_future(
                    caller.run(op="until", want="b2", present=False, call_timeout=5)
                )
                assert await line() == "call"  # a call is in flight on the doomed instance
                doomed.kill()
                crashed = time.time()
                await _stop_keeping(keeper, keepalive)
                during = await calling
                expired = await wait_event(events, EventType.REMOVED, key, 15)
                seen = time.time()
                await wait_served(xds, "echo", 2)
                after = await caller.run(op="call", n=20)
    finally:
        if keeper is not None:
            await _stop_keeping(keeper, keepalive)
        if doomed.returncode is None:
            doomed.kill()
        await doomed.wait()
    assert expired.instance.address == address
    # The call cut by the crash was retried on another instance (retry_on: unavailable).
    assert during["n_errors"] == 0, during["errors"]
    assert after["n_errors"] == 0 and "b2" not in after["counts"], after
    report("crash -> last call to the crashed instance", during["at"] - crashed)
    report("crash -> lease expiry seen", seen - crashed)
    report("lease expiry seen -> assignment without it", pushed[-1] - seen)


async def test_ring_hash_keeps_a_key_on_one_server(client: AsyncClient, xds: XdsServer) -> None:
    users = [f"user-{i}" for i in range(12)]
    async with backends(3) as servers:
        regs = await register_all(client, servers, lb="ring_hash", hash_header="x-user")
        await wait_served(xds, "echo", 3)
        async with xds_client(xds.bootstrap()) as caller:
            placed: dict[str, str] = {}
            for user in users:
                result = await caller.run(op="call", n=6, header=user)
                assert result["n_errors"] == 0, result["errors"]
                assert len(result["counts"]) == 1, f"{user} spread over {result['counts']}"
                placed[user] = next(iter(result["counts"]))
            assert len(set(placed.values())) > 1, f"every user hashed to one server: {placed}"
            await regs[0].drain()
            # Wait on a user that b0 served, when there is one: its calls move last.
            probe = next((u for u in users if placed[u] == "b0"), users[0])
            moved = await caller.run(op="until", want="b0", present=False, header=probe)
            assert moved["at"] is not None and moved["n_errors"] == 0, moved
            moved_users = 0
            for user in users:
                result = await caller.run(op="call", n=4, header=user)
                assert result["n_errors"] == 0, result["errors"]
                # Still one server per key, and never the draining one. (Keys of the
                # other servers may move too: gRPC's ring gives each remaining server
                # more points, which take over some keys.)
                assert len(result["counts"]) == 1, f"{user} spread over {result['counts']}"
                (server,) = result["counts"]
                assert server != "b0", f"{user} still sent to the draining server"
                moved_users += server != placed[user] and placed[user] != "b0"
            print(f"ring hash: {moved_users} of {len(users)} keys moved between live servers")


async def test_unknown_service_fails_fast_then_recovers(
    client: AsyncClient, xds: XdsServer
) -> None:
    async with xds_client(xds.bootstrap()) as caller, backends(1) as (server,):
        result = await caller.run(op="call", n=1, target="xds:///nosuch", timeout=10)
        assert result["n_errors"] == 1, result
        (code, details) = result["errors"][0]
        assert code == "UNAVAILABLE", result["errors"]
        assert "no instance of nosuch is registered" in details, details
        # Well before the call's 10 s deadline (the client's own clock: its start-up
        # is left out).
        assert result["elapsed"] < 8, f"an unknown service took {result['elapsed']:.1f}s to fail"
        report("unknown service -> failed call", result["elapsed"])
        # The same channel works once the service exists.
        await client.register("nosuch", server.address, ttl=5)
        found = await caller.run(op="until", want="b0", present=True, target="xds:///nosuch")
        assert found["at"] is not None, found


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "etcdisco", *args]


async def test_cli_server_and_printed_bootstrap(
    etcd: Any, client: AsyncClient, tmp_path: Path
) -> None:
    proc = await asyncio.create_subprocess_exec(
        *_cli("--endpoints", etcd.endpoint, "xds", "--listen", "127.0.0.1:0"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(20):
            line = (await proc.stdout.readline()).decode()
        assert "listening on 127.0.0.1:" in line, line
        address = line.split()[-1]
        printed = subprocess.run(
            _cli("xds", "--listen", address, "--print-bootstrap", "--zone", "a"),
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
        bootstrap = json.loads(printed)
        assert bootstrap["xds_servers"][0]["server_uri"] == address
        assert bootstrap["node"]["locality"]["zone"] == "a"
        path = tmp_path / "bootstrap.json"
        path.write_text(printed)
        async with backends(2) as servers:
            await register_all(client, servers)
            caller = await XdsClientProcess.start({"GRPC_XDS_BOOTSTRAP": str(path)})
            try:
                await caller.run(op="until", want="b1", present=True)
                result = await caller.run(op="call", n=10)
            finally:
                await caller.close()
        assert result["n_errors"] == 0, result["errors"]
        assert sorted(result["counts"]) == ["b0", "b1"]
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
        try:
            async with asyncio.timeout(10):
                code = await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert code == 0, (await proc.stderr.read()).decode() if proc.stderr else code


EMBEDDED_SYNC = """
import os, grpc
from etcdisco.grpc import xds
with xds.install(os.environ["ETCDISCO_ENDPOINTS"]) as plane:
    call = grpc.insecure_channel("xds:///echo").unary_unary("/etcdisco.test.Echo/Who")
    print(sorted({call(b"", timeout=5).decode() for _ in range(8)}), plane.address)
"""

EMBEDDED_AIO = """
import asyncio, os, grpc
from etcdisco import AsyncClient
from etcdisco.grpc import xds

async def main():
    async with AsyncClient() as client:
        plane = await xds.start_embedded(client)
        try:
            async with grpc.aio.insecure_channel("xds:///echo") as channel:
                call = channel.unary_unary("/etcdisco.test.Echo/Who")
                names = {(await call(b"", timeout=5)).decode() for _ in range(8)}
            print(sorted(names), plane.address)
        finally:
            await plane.close()
        assert "GRPC_XDS_BOOTSTRAP_CONFIG" not in os.environ

asyncio.run(main())
"""


@pytest.mark.parametrize("script", [EMBEDDED_SYNC, EMBEDDED_AIO], ids=["install", "aio"])
async def test_embedded_control_plane(etcd: Any, client: AsyncClient, script: str) -> None:
    async with backends(2) as servers:
        await register_all(client, servers)
        env = {k: v for k, v in os.environ.items() if not k.startswith("GRPC_XDS")}
        env["ETCDISCO_ENDPOINTS"] = etcd.endpoint
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            script,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = await communicate(proc, 30)
    assert proc.returncode == 0, err.decode()
    assert out.decode().startswith("['b0', 'b1'] 127.0.0.1:"), out.decode()


# -- the ADS protocol, over a raw stream ---------------------------------------------------


class RawAds:
    """A hand-driven ADS stream: send requests, read responses with a deadline."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.aio.insecure_channel(address)
        self.requests: asyncio.Queue[Any] = asyncio.Queue()
        self.call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(
            self.channel
        ).StreamAggregatedResources(self._requests())

    async def _requests(self) -> AsyncIterator[Any]:
        while (request := await self.requests.get()) is not None:
            yield request

    def send(self, type_url: str, names: list[str], *, nonce: str = "", **fields: Any) -> None:
        self.requests.put_nowait(
            discovery_pb2.DiscoveryRequest(
                type_url=type_url, resource_names=names, response_nonce=nonce, **fields
            )
        )

    async def receive(self, timeout: float = 5) -> Any:
        try:
            async with asyncio.timeout(timeout):
                return await self.call.read()
        except TimeoutError:
            raise AssertionError(f"no ADS response within {timeout}s") from None

    async def close(self) -> None:
        self.requests.put_nowait(None)
        self.call.cancel()
        await self.channel.close()


def unpack(response: Any, message_type: Any) -> list[Any]:
    out = []
    for body in response.resources:
        message = message_type()
        assert body.Unpack(message)
        out.append(message)
    return out


@pytest.fixture
async def ads(xds: XdsServer) -> AsyncIterator[RawAds]:
    stream = RawAds(xds.address)
    try:
        yield stream
    finally:
        await stream.close()


async def test_ads_versions_acks_and_quiet_when_nothing_changed(
    client: AsyncClient, xds: XdsServer, ads: RawAds
) -> None:
    async with backends(1) as (server,):
        (reg,) = await register_all(client, [server], zone="a")
        await wait_served(xds, "echo", 1)
        ads.send(EDS, ["echo"])
        first = await ads.receive()
        assert first.type_url == EDS and first.version_info and first.nonce
        (cla,) = unpack(first, endpoint_pb2.ClusterLoadAssignment)
        assert cla.endpoints[0].locality.zone == "a"
        assert cla.endpoints[0].load_balancing_weight.value >= 1
        ads.send(EDS, ["echo"], nonce=first.nonce, version_info=first.version_info)  # ACK
        await eventually(lambda: xds.stats.acks >= 1, 5, "the ACK was not counted")
        # A metadata key that changes no resource sends nothing; the weight does.
        await reg.update({"name": "b0", "zone": "a", "build": "2"})
        await reg.update({"name": "b0", "zone": "a", "weight": 5})
        second = await ads.receive()
        (cla,) = unpack(second, endpoint_pb2.ClusterLoadAssignment)
        assert cla.endpoints[0].lb_endpoints[0].load_balancing_weight.value == 5
        assert second.nonce != first.nonce and second.version_info != first.version_info
        await reg.drain()
        third = await ads.receive()
        (cla,) = unpack(third, endpoint_pb2.ClusterLoadAssignment)
        assert cla.endpoints[0].lb_endpoints[0].health_status == 3  # DRAINING


async def test_ads_nack_is_logged_and_not_resent(
    client: AsyncClient, xds: XdsServer, ads: RawAds, caplog: pytest.LogCaptureFixture
) -> None:
    async with backends(2) as servers:
        regs = await register_all(client, servers)
        await wait_served(xds, "echo", 2)
        ads.send(CDS, ["echo"], node={"id": "nacker"})
        first = await ads.receive()
        ads.send(
            CDS,
            ["echo"],
            nonce=first.nonce,
            error_detail=status_pb2.Status(code=3, message="cluster looks wrong"),
        )
        await eventually(lambda: xds.stats.nacks == 1, 5, "the NACK was not counted")
        assert "nacker" in caplog.text and "cluster looks wrong" in caplog.text
        # A stale request (an old nonce) is ignored even with a new subscription ...
        ads.send(CDS, ["echo", "other"], nonce="stale")
        # ... and the next response is the next change, not a resend of the NACKed one.
        await regs[0].update({"lb": "ring_hash"})
        second = await ads.receive()
        (cluster,) = unpack(second, cluster_pb2.Cluster)
        assert cluster.lb_policy == cluster_pb2.Cluster.RING_HASH
    xds.stats.nacks = 0  # deliberate; the fixture checks that real clients sent none


async def test_ads_wildcard_unknown_names_and_clean_shutdown(
    client: AsyncClient, xds: XdsServer, ads: RawAds, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A long grace: a close() that waited for it would be unmistakable.
    monkeypatch.setattr("etcdisco.grpc.xds._server._CLOSE_GRACE", 30.0)
    async with backends(2) as servers:
        await client.register("alpha", servers[0].address, ttl=5)
        await client.register("beta", servers[1].address, ttl=5)
        await wait_served(xds, "beta", 1)
        ads.send(CDS, [])  # an empty first CDS request is a wildcard
        wildcard = await ads.receive()
        assert sorted(c.name for c in unpack(wildcard, cluster_pb2.Cluster)) == ["alpha", "beta"]
        ads.send(LDS, ["alpha", "ghost"])
        listeners = await ads.receive()
        names = sorted(li.name for li in unpack(listeners, listener_pb2.Listener))
        assert names == ["alpha", "ghost"]  # ghost: the stand-in that fails calls fast
        closing = time.monotonic()
        await xds.close()
        # The streams ended at once, not at the end of the grace period.
        assert time.monotonic() - closing < 10, "close() waited for its streams to time out"
        try:
            async with asyncio.timeout(5):
                end = await ads.call.read()
        except TimeoutError:
            raise AssertionError("the stream did not end when the server closed") from None
        assert end is grpc.aio.EOF
        assert await ads.call.code() is grpc.StatusCode.OK


async def test_policy_from_configuration_and_bootstrap_shape(client: AsyncClient) -> None:
    policies = {"echo": ServicePolicy(lb="ring_hash", hash_header="X-User", retries=3)}
    async with XdsServer(client, policies=policies) as xds, backends(1) as servers:
        await xds.wait_ready(10)
        await register_all(client, servers, lb="round_robin")
        await wait_served(xds, "echo", 1)
        cluster = cluster_pb2.Cluster()
        xds.store.resources(CDS)["echo"].body.Unpack(cluster)
        assert cluster.lb_policy == cluster_pb2.Cluster.RING_HASH  # configuration wins
        listener = listener_pb2.Listener()
        xds.store.resources(LDS)["echo"].body.Unpack(listener)
        hcm = hcm_pb2.HttpConnectionManager()
        assert listener.api_listener.api_listener.Unpack(hcm)
        assert [f.name for f in hcm.http_filters] == ["envoy.filters.http.router"]
        (host,) = hcm.route_config.virtual_hosts
        assert list(host.domains) == ["*"]
        (route,) = host.routes
        assert route.match.prefix == "" and route.route.cluster == "echo"
        assert route.route.hash_policy[0].header.header_name == "x-user"
        retry = route.route.retry_policy
        assert retry.retry_on == "unavailable" and retry.num_retries.value == 3
    config = bootstrap_config("10.0.0.1:18000", node_id="n1", zone="z")
    assert config["xds_servers"][0]["server_features"] == ["xds_v3"]
    assert config["node"] == {
        "id": "n1",
        "cluster": "etcdisco",
        "locality": {"region": "", "zone": "z", "sub_zone": ""},
    }


async def test_rolling_restart_under_load_fails_no_call(
    etcd: Any, xds: XdsServer, tmp_path: Path
) -> None:
    # The servers drain through etcdisco.grpc's server helper (the demo's server, which
    # answers any method with its name): SIGTERM -> NOT_SERVING and "draining", a quiet
    # period, deregister, stop. Each is replaced in turn while a client keeps calling;
    # every reply takes 5 ms, so a call is in flight almost all the time.
    procs: list[asyncio.subprocess.Process] = []

    async def line(proc: asyncio.subprocess.Process, what: str) -> dict[str, Any]:
        assert proc.stdout is not None
        try:
            async with asyncio.timeout(15):
                raw = await proc.stdout.readline()
        except TimeoutError:
            raise AssertionError(f"no {what} from a server in 15s (logs: {tmp_path})") from None
        assert raw, f"a server exited ({await proc.wait()}) before its {what} (logs: {tmp_path})"
        result: dict[str, Any] = json.loads(raw)
        return result

    async def start(name: str) -> asyncio.subprocess.Process:
        with (tmp_path / f"{name}.log").open("wb") as log:
            proc = await asyncio.create_subprocess_exec(
                *[sys.executable, "-m", "etcdisco.demo.grpc_server"],
                *["--endpoints", etcd.endpoint, "--service", "echo", "--name", name],
                *["--quiet-period", "0.3", "--delay", "0.005"],
                stdout=subprocess.PIPE,
                stderr=log,
            )
        procs.append(proc)
        await line(proc, "ready line")  # listening and registered
        return proc

    served: dict[str, int] = {}
    errors: list[Any] = []
    failed = 0
    restarted = asyncio.Event()
    try:
        olds = await asyncio.gather(*(start(f"b{i}") for i in range(3)))
        await wait_served(xds, "echo", 3)
        async with xds_client(xds.bootstrap()) as caller:

            async def load() -> None:
                nonlocal failed
                while not restarted.is_set():
                    result = await caller.run(op="call", n=50)
                    for name, count in result["counts"].items():
                        served[name] = served.get(name, 0) + count
                    failed += result["n_errors"]
                    errors.extend(result["errors"])

            loading = asyncio.ensure_future(load())
            try:
                await eventually(
                    lambda: len(served) == 3 or loading.done(), 10, f"not all served: {served}"
                )
                for n, old in enumerate(olds):
                    old.send_signal(signal.SIGTERM)
                    drained = (await line(old, "drain report"))["drained"]
                    # The client stopped sending to it well within the drain timeout.
                    assert drained["quiet"], drained
                    async with asyncio.timeout(10):
                        assert await old.wait() == 0
                    await start(f"r{n}")
                    await eventually(
                        lambda n=n: served.get(f"r{n}", 0) > 0 or loading.done(),
                        10,
                        f"r{n} registered but never served a call",
                    )
            finally:
                restarted.set()
                await loading
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
    assert failed == 0, f"{failed} failed calls: {errors[:5]}"
    assert all(served.get(name, 0) > 0 for name in ("b0", "b1", "b2", "r0", "r1", "r2")), served
