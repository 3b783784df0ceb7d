"""HTTP clients that follow the registry (etcdisco.http): httpx sync and async, and the
requests adapter, against real HTTP servers (in-process threads, or subprocesses for
SIGKILL) registered in a real etcd."""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests

import etcdisco
import etcdisco.http
from etcdisco.outlier import OutlierDetector

from .._util import eventually
from ..http_echo.certs import make_service_certs, server_context
from ..http_echo.fleet import HttpFleet
from ..http_echo.server import EchoServer

Servers = Callable[..., EchoServer]


@pytest.fixture
def servers() -> Iterator[Servers]:
    """``servers(name, tls=None)`` starts an in-process echo server; all closed after."""
    started: list[EchoServer] = []

    def start(name: str, **options: Any) -> EchoServer:
        server = EchoServer(name, **options).start()
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.close()


@pytest.fixture
def http_fleet(etcd: Any, tmp_path: Path) -> Iterator[HttpFleet]:
    fleet = HttpFleet(etcd.endpoint, tmp_path)
    try:
        yield fleet
    finally:
        fleet.close()


class Prefer(etcdisco.RoundRobin):
    """Round robin, but ``address`` whenever it is offered: the first attempt lands
    there, so what happens next is the retry rule's doing."""

    def __init__(self, address: str) -> None:
        super().__init__()
        self.address = address

    def pick(self, instances: Any, key: str | None = None) -> Any:
        found = [i for i in instances if i.address == self.address]
        return found[0] if found else super().pick(instances, key)


def dead_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def in_flight(pools: tuple[etcdisco.http.ConnectionPoolInfo, ...]) -> int:
    return sum(p.in_flight for p in pools)


# -- spreading and policies ------------------------------------------------------------


def test_sync_client_spreads_round_robin_and_leaves_other_hosts_alone(
    etcd: Any, servers: Servers
) -> None:
    fleet = [servers(f"s{n}") for n in range(3)]
    other = servers("other")  # not registered: an ordinary host
    with etcdisco.Client(etcd.endpoint) as registry:
        for server in fleet:
            registry.register("users", server.address, ttl=5)
        with etcdisco.http.Client(registry, services=["users"]) as http:
            served = Counter(http.get("http://users/v1/me").json()["server"] for _ in range(30))
            assert served == {"s0": 10, "s1": 10, "s2": 10}
            # The Host header is the service's; the port in a service URL is ignored.
            assert {h for s in fleet for h in s.hosts} == {"users"}
            # One connection per instance, kept alive across requests.
            assert [s.connections_total for s in fleet] == [1, 1, 1]
            assert http.get("http://users:1/x").json()["host"] == "users:1"
            # Not a service: reached as any httpx client reaches it, untouched.
            reply = http.get(f"http://{other.address}/x").json()
            assert (reply["server"], reply["host"]) == ("other", other.address)
            pools = http.balancer.pools()
            assert sorted(p.address for p in pools) == sorted(s.address for s in fleet)
            assert in_flight(pools) == 0  # every response was closed


POLICIES = [
    ("round_robin", {}),
    ("random", {}),
    ("weighted_round_robin", {}),
    ("p2c", {}),
    ("ring_hash", {}),
    ("zone_aware", {"zone": "a"}),
]


@pytest.mark.parametrize(("policy", "options"), POLICIES, ids=[p for p, _ in POLICIES])
async def test_async_client_spreads_by_policy(
    etcd: Any, servers: Servers, policy: str, options: dict[str, Any]
) -> None:
    fleet = [servers(f"s{n}") for n in range(3)]
    metadata = [{"zone": "a", "weight": 3}, {"zone": "a", "weight": 1}, {"zone": "b", "weight": 2}]
    async with etcdisco.AsyncClient(etcd.endpoint) as registry:
        for server, meta in zip(fleet, metadata, strict=True):
            await registry.register("users", server.address, metadata=meta, ttl=5)
        async with etcdisco.http.AsyncClient(
            registry,
            services=["users"],
            policy=policy,
            policy_options=options,
            hash_header="x-user" if policy == "ring_hash" else None,
        ) as http:

            async def served(n: int, **kwargs: Any) -> Counter[str]:
                replies = [await http.get("http://users/x", **kwargs) for _ in range(n)]
                return Counter(r.json()["server"] for r in replies)

            if policy == "ring_hash":
                owners = {
                    user: await served(5, headers={"x-user": user}) for user in map(str, range(20))
                }
                assert all(len(by) == 1 for by in owners.values()), owners
                assert len({s for by in owners.values() for s in by}) > 1
            else:
                counts = await served(60)
                expected = {
                    "round_robin": {"s0": 20, "s1": 20, "s2": 20},
                    "weighted_round_robin": {"s0": 30, "s1": 10, "s2": 20},
                    "zone_aware": {"s0": 30, "s1": 30},
                }.get(policy)
                if expected is not None:
                    assert counts == expected, counts
                else:  # random, p2c: every instance gets some
                    assert set(counts) == {"s0", "s1", "s2"}, counts
            assert in_flight(http.balancer.pools()) == 0


async def test_zone_aware_uses_other_zones_when_its_own_has_no_instance(
    etcd: Any, servers: Servers
) -> None:
    a, b = servers("a"), servers("b")
    async with etcdisco.AsyncClient(etcd.endpoint) as registry:
        reg_a = await registry.register("users", a.address, metadata={"zone": "a"}, ttl=5)
        await registry.register("users", b.address, metadata={"zone": "b"}, ttl=5)
        async with etcdisco.http.AsyncClient(
            registry, ["users"], "zone_aware", policy_options={"zone": "a"}
        ) as http:
            assert {(await http.get("http://users/")).json()["server"] for _ in range(6)} == {"a"}
            await reg_a.drain()
            await eventually(
                lambda: all(
                    i.address != a.address or not i.healthy
                    for i in http.balancer.instances("users")
                ),
                5,
                "the drain never reached the transport",
            )
            assert {(await http.get("http://users/")).json()["server"] for _ in range(6)} == {"b"}


class Recording(etcdisco.PowerOfTwoChoices):
    """p2c that counts what it was told is in flight, per address."""

    def __init__(self) -> None:
        super().__init__()
        self.open: Counter[str] = Counter()

    def started(self, instance: etcdisco.Instance) -> None:
        super().started(instance)
        self.open[instance.address] += 1

    def finished(self, instance: etcdisco.Instance, latency: float, ok: bool) -> None:
        super().finished(instance, latency, ok)
        self.open[instance.address] -= 1


async def test_p2c_counts_a_request_in_flight_until_its_response_is_closed(
    etcd: Any, servers: Servers
) -> None:
    fleet = [servers("a"), servers("b")]
    picker = Recording()
    async with etcdisco.AsyncClient(etcd.endpoint) as registry:
        for server in fleet:
            await registry.register("users", server.address, ttl=5)
        async with etcdisco.http.AsyncClient(registry, ["users"], policy=picker) as http:
            async with http.stream("GET", "http://users/x") as streamed:
                # Headers are in, the body is not read: still in flight, for p2c too.
                assert streamed.status_code == 200
                busy = [p for p in http.balancer.pools() if p.in_flight]
                assert len(busy) == 1 and picker.open[busy[0].address] == 1
            # Closed (reading it to the end closes it too): no longer in flight.
            assert in_flight(http.balancer.pools()) == 0
            assert set(picker.open.values()) == {0}


# -- skipping instances that cannot take requests --------------------------------------


def test_draining_unhealthy_and_ejected_instances_get_no_request(
    etcd: Any, servers: Servers
) -> None:
    up, draining, unhealthy, failing = (servers(n) for n in ("up", "draining", "sick", "failing"))
    failing.status = 503
    with etcdisco.Client(etcd.endpoint) as registry:
        registry.register("users", up.address, ttl=5)
        registry.register("users", draining.address, ttl=5).drain()
        registry.register("users", unhealthy.address, metadata={"status": "unhealthy"}, ttl=5)
        registry.register("users", failing.address, ttl=5)
        detector = OutlierDetector(consecutive_failures=2, base_ejection=60)
        with etcdisco.http.Client(
            registry, ["users"], Prefer(failing.address), outlier=detector
        ) as http:
            # Two 503s retried elsewhere eject the failing instance; then it is not
            # even offered to the picker that prefers it.
            for _ in range(2):
                assert http.get("http://users/x").json()["server"] == "up"
            assert detector.is_ejected(f"services/users/{failing.address}")
            retries = http.balancer.route("users").pool.retries
            assert {http.get("http://users/x").json()["server"] for _ in range(10)} == {"up"}
            assert http.balancer.route("users").pool.retries == retries
            assert (draining.seen, unhealthy.seen) == (Counter(), Counter())
            assert failing.seen == Counter({"GET": 2})


async def test_removed_instance_gets_no_new_request_and_closes_after_its_last_response(
    etcd: Any, servers: Servers
) -> None:
    a, b = servers("a"), servers("b")
    with etcdisco.Client(etcd.endpoint) as registry:
        reg_a = registry.register("users", a.address, ttl=5)
        registry.register("users", b.address, ttl=5)
        with etcdisco.http.Client(registry, ["users"], Prefer(a.address)) as http:
            assert http.get("http://users/x").json()["server"] == "a"
            slow = concurrent.futures.ThreadPoolExecutor(1)
            held = slow.submit(lambda: http.get("http://users/hold/slow", timeout=30))
            await asyncio.to_thread(a.wait_arrived, "slow")
            reg_a.deregister()
            expected = sorted([(a.address, True, 1), (b.address, False, 0)])
            await eventually(
                lambda: (
                    sorted((p.address, p.retired, p.in_flight) for p in http.balancer.pools())
                    == expected
                ),
                5,
                "a was not retired with its request in flight",
            )
            # Not picked any more, though the picker prefers it; its connection stays.
            assert {http.get("http://users/x").json()["server"] for _ in range(5)} == {"b"}
            assert a.connections == 1
            a.release("slow")
            reply = await asyncio.to_thread(held.result, 10)
            slow.shutdown()
            assert (reply.json()["server"], reply.json()["path"]) == ("a", "/hold/slow")
            # Its last response closed: its pool closed, and with it the connection.
            await asyncio.to_thread(a.wait_connections, 0)
            assert [p.address for p in http.balancer.pools("users")] == [b.address]


# -- retries -----------------------------------------------------------------------------


async def test_post_after_a_connect_error_goes_to_another_instance(
    etcd: Any, servers: Servers
) -> None:
    live = servers("live")
    dead = dead_address()
    async with etcdisco.AsyncClient(etcd.endpoint) as registry:
        await registry.register("users", dead, ttl=5)
        await registry.register("users", live.address, ttl=5)
        async with etcdisco.http.AsyncClient(registry, ["users"], Prefer(dead)) as http:
            reply = await http.post("http://users/orders", json={"n": 1})
            assert (reply.status_code, reply.json()["server"]) == (200, "live")
            assert reply.json()["body"] == '{"n":1}' or reply.json()["body"] == '{"n": 1}'
            assert http.balancer.route("users").pool.retries == 1
            assert live.seen == Counter({"POST": 1})


def test_request_that_reached_an_instance_is_retried_only_when_idempotent(
    etcd: Any, servers: Servers
) -> None:
    dropper, live = servers("dropper"), servers("live")
    dropper.drop = True  # reads each request, then closes the connection unanswered
    with etcdisco.Client(etcd.endpoint) as registry:
        registry.register("users", dropper.address, ttl=5)
        registry.register("users", live.address, ttl=5)
        with etcdisco.http.Client(
            registry, ["users"], Prefer(dropper.address), outlier=False
        ) as http:
            with pytest.raises(httpx.RemoteProtocolError):
                http.post("http://users/orders", content=b"once")
            assert (dropper.seen["POST"], live.seen["POST"]) == (1, 0)
            # Idempotent methods, and a POST with an Idempotency-Key, go elsewhere.
            assert http.get("http://users/x").json()["server"] == "live"
            assert http.put("http://users/x", content=b"v").json()["server"] == "live"
            keyed = http.post("http://users/o", content=b"k", headers={"Idempotency-Key": "1"})
            assert keyed.json()["server"] == "live"
            # A body that cannot be replayed is not sent twice, even with PUT.
            with pytest.raises(httpx.RemoteProtocolError):
                http.put("http://users/x", content=iter([b"streamed"]))
            assert live.seen == Counter({"GET": 1, "PUT": 1, "POST": 1})


async def test_failure_statuses_are_retried_when_idempotent_and_returned_otherwise(
    etcd: Any, servers: Servers
) -> None:
    failing, live = servers("failing"), servers("live")
    failing.status = 503
    async with etcdisco.AsyncClient(etcd.endpoint) as registry:
        await registry.register("users", failing.address, ttl=5)
        await registry.register("users", live.address, ttl=5)
        async with etcdisco.http.AsyncClient(
            registry, ["users"], Prefer(failing.address), outlier=False
        ) as http:
            ok = await http.get("http://users/x")
            assert (ok.status_code, ok.json()["server"]) == (200, "live")
            posted = await http.post("http://users/x", content=b"1")
            assert (posted.status_code, posted.json()["server"]) == (503, "failing")
            live.status = 502  # now every instance fails: the last answer comes back
            last = await http.get("http://users/x")
            assert (last.status_code, last.json()["server"]) == (502, "live")
            assert in_flight(http.balancer.pools()) == 0
        async with etcdisco.http.AsyncClient(
            registry, ["users"], Prefer(failing.address), failure_statuses=()
        ) as plain:
            assert (await plain.get("http://users/x")).status_code == 503


def test_retry_budget_caps_retries(etcd: Any, servers: Servers) -> None:
    failing, live = servers("failing"), servers("live")
    failing.status = 503
    budget = etcdisco.http.RetryBudget(ratio=0.25, min_per_second=0, window=60)
    with etcdisco.Client(etcd.endpoint) as registry:
        registry.register("users", failing.address, ttl=5)
        registry.register("users", live.address, ttl=5)
        with etcdisco.http.Client(
            registry, ["users"], Prefer(failing.address), outlier=False, retry_budget=budget
        ) as http:
            statuses = Counter(http.get("http://users/x").status_code for _ in range(40))
    # Each request may retry while retries stay under a quarter of the requests.
    assert statuses == {200: 10, 503: 30}, statuses


# -- crashes under load ------------------------------------------------------------------

FLAVOURS = ["httpx", "httpx-async", "requests"]


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_sigkill_under_idempotent_load_fails_no_request(
    etcd: Any, http_fleet: HttpFleet, flavour: str
) -> None:
    victim, _, _ = http_fleet.start("s1", "s2", "s3", ttl=10)
    per_worker, workers = 150, 4
    failures: list[str] = []
    served: Counter[str] = Counter()
    going = threading.Event()

    def count(name: str) -> None:
        served[name] += 1
        if sum(served.values()) >= 100:
            going.set()

    if flavour == "httpx-async":
        async with (
            etcdisco.AsyncClient(etcd.endpoint) as registry,
            etcdisco.http.AsyncClient(registry, ["users"], timeout=5) as http,
        ):

            async def worker() -> None:
                for _ in range(per_worker):
                    try:
                        count((await http.get("http://users/x")).json()["server"])
                    except httpx.HTTPError as exc:
                        failures.append(repr(exc))

            tasks = [asyncio.create_task(worker()) for _ in range(workers)]
            try:
                assert await asyncio.to_thread(going.wait, 20), "load never got going"
                await asyncio.to_thread(victim.kill)
            finally:
                await asyncio.wait_for(asyncio.gather(*tasks), 60)
            retries = http.balancer.route("users").pool.retries
    else:
        with etcdisco.Client(etcd.endpoint) as registry:
            if flavour == "httpx":
                client: Any = etcdisco.http.Client(registry, ["users"], timeout=5)
                get: Callable[[], Any] = lambda: client.get("http://users/x")  # noqa: E731
            else:
                client = etcdisco.http.Session(registry, ["users"])
                get = lambda: client.get("http://users/x", timeout=5)  # noqa: E731
            lock = threading.Lock()

            def sync_worker() -> None:
                for _ in range(per_worker):
                    try:
                        name = get().json()["server"]
                    except (httpx.HTTPError, requests.RequestException) as exc:
                        with lock:
                            failures.append(repr(exc))
                        continue
                    with lock:
                        count(name)

            with client:
                threads = [threading.Thread(target=sync_worker) for _ in range(workers)]
                for t in threads:
                    t.start()
                try:
                    assert await asyncio.to_thread(going.wait, 20), "load never got going"
                    await asyncio.to_thread(victim.kill)
                finally:
                    for t in threads:
                        await asyncio.to_thread(t.join, 60)
                retries = client.balancer.route("users").pool.retries
    assert not failures, failures[:5]
    assert retries > 0, "no request met the killed instance"
    assert sum(served.values()) == per_worker * workers
    assert served["s1"] > 0 and served["s2"] > 0 and served["s3"] > 0, served


# -- no instance -------------------------------------------------------------------------


async def test_no_instance_is_a_clear_error_naming_the_service(etcd: Any, servers: Servers) -> None:
    lone = servers("lone")
    with etcdisco.Client(etcd.endpoint) as registry:
        with etcdisco.http.Client(registry, ["users", "orders"]) as http:
            started = time.monotonic()
            with pytest.raises(httpx.ConnectError) as caught:
                http.get("http://users/v1/me")
            assert time.monotonic() - started < 2  # no DNS lookup, no wait
            error = caught.value
            assert isinstance(error, etcdisco.http.NoInstanceError)
            assert isinstance(error, etcdisco.EtcdiscoError)
            assert error.service == "users"
            assert "no instance of service 'users' is registered" in str(error)
            assert error.request.url == "http://users/v1/me"
            # Registered, but draining: a different reason, the same error.
            registry.register("users", lone.address, ttl=5).drain()
            await eventually(
                lambda: [i.status.value for i in http.balancer.instances("users")] == ["draining"],
                5,
                "the draining instance never appeared",
            )
            with pytest.raises(etcdisco.http.NoInstanceError, match="1 registered, none up"):
                http.get("http://users/")
        with etcdisco.http.Session(registry, ["orders"]) as session:
            with pytest.raises(requests.ConnectionError) as requests_error:
                session.get("http://orders/")
            assert isinstance(requests_error.value, etcdisco.http.NoInstanceError)
            assert requests_error.value.service == "orders"
    async with (
        etcdisco.AsyncClient(etcd.endpoint) as aregistry,
        etcdisco.http.AsyncClient(aregistry, ["orders"]) as ahttp,
    ):
        with pytest.raises(etcdisco.http.HttpxNoInstanceError, match="'orders'"):
            await ahttp.get("http://orders/")


def test_unanswered_registry_is_a_clear_error_after_ready_timeout() -> None:
    with (
        etcdisco.Client(dead_address(), timeout=1) as registry,
        etcdisco.http.Client(registry, ["users"], ready_timeout=0.5) as http,
        pytest.raises(etcdisco.http.NoInstanceError, match="registry did not answer"),
    ):
        http.get("http://users/")


# -- TLS ---------------------------------------------------------------------------------


async def test_https_uses_the_service_name_for_sni_and_verification(
    etcd: Any, servers: Servers, tmp_path: Path
) -> None:
    ca, crt, key = make_service_certs(tmp_path / "users", "users")
    ca2, crt2, key2 = make_service_certs(tmp_path / "internal", "users.internal.test")
    plain = servers("plain-name", tls=server_context(crt, key))
    internal = servers("internal-name", tls=server_context(crt2, key2))
    trust = ssl.create_default_context(cafile=str(ca))
    trust.load_verify_locations(cafile=str(ca2))
    async with etcdisco.AsyncClient(etcd.endpoint) as registry:
        reg = await registry.register("users", plain.address, ttl=5)
        async with etcdisco.http.AsyncClient(registry, ["users"], verify=trust) as http:
            reply = await http.get("https://users/secure")
            assert (reply.json()["server"], reply.json()["host"]) == ("plain-name", "users")
            assert plain.sni == ["users"]  # SNI, and the certificate checked, say "users"
        # A server name of its own: the certificate must carry that name.
        async with etcdisco.http.AsyncClient(
            registry, ["users"], verify=trust, server_name="{service}.internal.test"
        ) as named:
            with pytest.raises(httpx.ConnectError, match=r"(?i)certificate|hostname"):
                await named.get("https://users/")
            await reg.deregister()
            await registry.register("users", internal.address, ttl=5)
            await eventually(
                lambda: (
                    [i.address for i in named.balancer.instances("users")] == [internal.address]
                ),
                5,
                "the second server never replaced the first",
            )
            reply = await named.get("https://users/secure")
            assert (reply.json()["server"], reply.json()["host"]) == ("internal-name", "users")
            assert internal.sni == ["users.internal.test"]
        # Without the CA, the certificate is refused.
        async with etcdisco.http.AsyncClient(registry, ["users"]) as untrusting:
            with pytest.raises(httpx.ConnectError, match=r"(?i)certificate"):
                await untrusting.get("https://users/")


def test_requests_https_uses_the_service_name_for_sni_and_verification(
    etcd: Any, servers: Servers, tmp_path: Path
) -> None:
    ca, crt, key = make_service_certs(tmp_path / "users", "users")
    secure = servers("secure", tls=server_context(crt, key))
    with etcdisco.Client(etcd.endpoint) as registry:
        registry.register("users", secure.address, ttl=5)
        with etcdisco.http.Session(registry, ["users"]) as session:
            # First: requests before 2.32 reuse a verified connection whatever `verify`.
            with pytest.raises(requests.exceptions.SSLError):
                session.get("https://users/secure", timeout=5)  # the system CAs do not know it
            reply = session.get("https://users/secure", verify=str(ca), timeout=5)
            assert (reply.json()["server"], reply.json()["host"]) == ("secure", "users")
            assert secure.sni == ["users", "users"]  # both handshakes named the service


# -- the requests adapter on the same scenarios -----------------------------------------


def test_requests_adapter_spreads_and_leaves_other_hosts_alone(etcd: Any, servers: Servers) -> None:
    fleet = [servers(f"s{n}") for n in range(3)]
    other = servers("other")
    with etcdisco.Client(etcd.endpoint) as registry:
        for server in fleet:
            registry.register("users", server.address, ttl=5)
        session = requests.Session()
        adapter = etcdisco.http.RequestsAdapter(registry, ["users"])
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        with session:
            served = Counter(session.get("http://users/v1/me").json()["server"] for _ in range(30))
            assert served == {"s0": 10, "s1": 10, "s2": 10}
            assert {h for s in fleet for h in s.hosts} == {"users"}
            reply = session.get("http://users/v1/me?q=1")
            assert reply.url == "http://users/v1/me?q=1"  # as asked, not the instance's
            assert reply.json()["path"] == "/v1/me?q=1"
            other_reply = session.get(f"http://{other.address}/x").json()
            assert (other_reply["server"], other_reply["host"]) == ("other", other.address)
            assert in_flight(adapter.pools()) == 0
            assert [s.connections_total for s in fleet] == [1, 1, 1]


def test_requests_p2c_counts_a_request_in_flight_until_its_response_is_closed(
    etcd: Any, servers: Servers
) -> None:
    """The requests adapter with p2c: a streamed response not yet read is in flight
    (for the pool and the picker) until it is closed, and new requests avoid it."""
    fleet = [servers("a"), servers("b")]
    picker = Recording()
    with etcdisco.Client(etcd.endpoint) as registry:
        for server in fleet:
            registry.register("users", server.address, ttl=5)
        with etcdisco.http.Session(registry, ["users"], picker) as session:
            adapter = session.balancer
            streamed = session.get("http://users/x", stream=True)  # the body not read
            assert streamed.status_code == 200
            busy = [p for p in adapter.pools() if p.in_flight]
            assert len(busy) == 1 and picker.open[busy[0].address] == 1
            # p2c sends the next requests to the idle instance.
            idle = next(p.address for p in adapter.pools() if p.address != busy[0].address)
            served = {session.get("http://users/x").json()["server"] for _ in range(5)}
            assert served == {next(s.name for s in fleet if s.address == idle)}, served
            streamed.close()
            assert in_flight(adapter.pools()) == 0
            assert set(picker.open.values()) == {0}


async def test_requests_removed_instance_closes_after_its_last_response(
    etcd: Any, servers: Servers
) -> None:
    a, b = servers("a"), servers("b")
    with etcdisco.Client(etcd.endpoint) as registry:
        reg_a = registry.register("users", a.address, ttl=5)
        registry.register("users", b.address, ttl=5)
        with etcdisco.http.Session(registry, ["users"], Prefer(a.address)) as session:
            adapter = session.balancer
            streamed = session.get("http://users/x", stream=True)  # not read: in flight
            assert streamed.status_code == 200
            reg_a.deregister()
            await eventually(
                lambda: any(p.retired and p.in_flight == 1 for p in adapter.pools()),
                5,
                "a was not retired with its response open",
            )
            assert {session.get("http://users/x").json()["server"] for _ in range(5)} == {"b"}
            assert a.connections == 1
            assert streamed.json()["server"] == "a"  # reads the body: the response ends
            await asyncio.to_thread(a.wait_connections, 0)
            assert [p.address for p in adapter.pools()] == [b.address]


def test_requests_retry_rule(etcd: Any, servers: Servers) -> None:
    dropper, live = servers("dropper"), servers("live")
    dropper.drop = True
    dead = dead_address()
    with etcdisco.Client(etcd.endpoint) as registry:
        registry.register("users", dead, ttl=5)
        registry.register("users", live.address, ttl=5)
        with etcdisco.http.Session(registry, ["users"], Prefer(dead)) as session:
            reply = session.post("http://users/orders", data=b"x")  # connect error: retried
            assert (reply.status_code, reply.json()["server"]) == (200, "live")
        registry.register("users", dropper.address, ttl=5)
        with etcdisco.http.Session(
            registry, ["users"], Prefer(dropper.address), outlier=False
        ) as session:
            with pytest.raises(requests.ConnectionError):
                session.post("http://users/orders", data=b"x")  # reached it: not retried
            assert dropper.seen["POST"] == 1 and live.seen["POST"] == 1
            assert session.get("http://users/x").json()["server"] == "live"
            dropper.drop, dropper.status = False, 503
            assert session.delete("http://users/x").json()["server"] == "live"
            assert session.post("http://users/x", data=b"y").status_code == 503
