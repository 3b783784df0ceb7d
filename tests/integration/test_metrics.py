"""Prometheus metrics read from live clients, caches and channels against a real etcd,
and the ``--metrics-listen`` endpoint of a real ``etcdisco register`` process."""

from __future__ import annotations

import re
import subprocess
import sys
import urllib.request

import grpc
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import etcdisco.grpc
from etcdisco import AsyncClient
from etcdisco.metrics import EtcdiscoCollector

from .._util import eventually

Labels = frozenset[tuple[str, str]]


class Scraper:
    """A fresh registry over ``objects``, scraped as Prometheus would (exposition
    text, parsed back)."""

    def __init__(self, *objects: object) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(EtcdiscoCollector(*objects))

    def all(self) -> dict[tuple[str, Labels], float]:
        text = generate_latest(self.registry).decode("utf-8")
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def value(self, name: str, **labels: str) -> float | None:
        return self.all().get((name, frozenset(labels.items())))


async def test_registration_and_cache_metrics(etcd) -> None:
    async with AsyncClient(etcd.endpoint) as client:
        reg = await client.register("echo", "127.0.0.1:7001", ttl=3)
        cache = await client.discover("echo")
        await cache.wait_ready(5)
        scraper = Scraper(client)
        me = {"service": "echo", "instance": "127.0.0.1:7001"}
        echo = {"prefix": "services/echo/"}

        assert scraper.value("etcdisco_registration_state", **me, state="registered") == 1
        assert scraper.value("etcdisco_registration_state", **me, state="lost") == 0
        assert scraper.value("etcdisco_registration_lease_ttl_seconds", **me) == 3
        assert scraper.value("etcdisco_registration_re_registrations_total", **me) == 0
        assert scraper.value("etcdisco_cache_instances", **echo, service="echo") == 1
        assert scraper.value("etcdisco_cache_suspect_instances", **echo, service="echo") == 0
        assert scraper.value("etcdisco_cache_state", **echo, state="synced") == 1
        assert scraper.value("etcdisco_cache_malformed_values_total", **echo) == 0
        staleness = scraper.value("etcdisco_cache_staleness_seconds", **echo)
        assert staleness is not None and 0 <= staleness < 5
        link = {"endpoints": etcd.endpoint, "state": "connected"}
        assert scraper.value("etcdisco_etcd_connection_state", **link) == 1

        # Garbage under the service's prefix is skipped, and counted.
        await client.etcd.put("services/echo/garbage", b"{not json")
        await eventually(
            lambda: scraper.value("etcdisco_cache_malformed_values_total", **echo) == 1,
            5,
            "malformed value not counted",
        )
        events = scraper.value("etcdisco_cache_events_applied_total", **echo)
        assert events is not None and events >= 1
        revision = scraper.value("etcdisco_cache_revision", **echo)
        assert revision is not None and revision >= reg.revision

        # The keeper's first keepalive comes a third of a TTL after the grant.
        await eventually(
            lambda: scraper.value("etcdisco_lease_keepalive_latency_seconds", ttl="3") is not None,
            5,
            "no keepalive latency reported",
        )
        age = scraper.value("etcdisco_lease_last_ack_age_seconds", ttl="3")
        assert age is not None and 0 <= age < 3

        # Someone revokes the lease behind the client's back: it re-registers.
        lease = reg.lease_id
        assert lease is not None
        await client.etcd.lease_revoke(lease)
        await eventually(
            lambda: scraper.value("etcdisco_registration_re_registrations_total", **me) == 1,
            10,
            "re-registration not counted",
        )
        await eventually(
            lambda: scraper.value("etcdisco_registration_state", **me, state="registered") == 1,
            5,
            "not registered again",
        )
        await cache.close()
    # A closed client reports nothing.
    assert scraper.all() == {}


async def test_channel_metrics_count_picks_retries_and_ejections(etcd) -> None:
    calls = {"good": 0, "bad": 0}

    def handler(name: str, code: grpc.StatusCode | None) -> grpc.RpcMethodHandler:
        async def say(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
            calls[name] += 1
            if code is not None:
                await context.abort(code, "refusing on purpose")
            return request

        return grpc.unary_unary_rpc_method_handler(say)

    servers = []
    for name, code in (("good", None), ("bad", grpc.StatusCode.UNAVAILABLE)):
        server = grpc.aio.server()
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("test.Echo", {"Say": handler(name, code)})]
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append((server, f"127.0.0.1:{port}"))
    try:
        async with AsyncClient(etcd.endpoint) as client:
            for _, address in servers:
                await client.register("echo", address, ttl=5)
            async with etcdisco.grpc.aio_channel(client, "echo", idempotent=True) as ch:
                await eventually(lambda: len(ch.instances()) == 2, 5, "instances not seen")
                say = ch.unary_unary("/test.Echo/Say")
                for i in range(20):
                    assert await say(str(i).encode(), timeout=5) == str(i).encode()
                got = Scraper(ch).all()
                echo: Labels = frozenset({("service", "echo")})
                # Round robin sends "bad" every other call until five failures in a
                # row (the default) eject it; each failure was retried on "good".
                assert calls == {"good": 20, "bad": 5}
                assert got["etcdisco_channel_retries_total", echo] == 5
                assert got["etcdisco_channel_picks_total", echo] == 25
                assert got["etcdisco_channel_ejections_total", echo] == 1
                assert got["etcdisco_channel_calls_in_flight", echo] == 0
    finally:
        for server, _ in servers:
            await server.stop(None)


def test_register_serves_metrics_over_http(etcd) -> None:
    cmd = [sys.executable, "-m", "etcdisco", "--endpoints", etcd.endpoint]
    cmd += ["register", "echo", "127.0.0.1:9", "--ttl", "3", "--metrics-listen", "127.0.0.1:0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None and proc.stdout is not None
        line = proc.stderr.readline()
        found = re.fullmatch(r"metrics at (http://127\.0\.0\.1:\d+/metrics)\n", line)
        assert found, f"no metrics address on stderr: {line!r}"
        assert proc.stdout.readline().startswith("registered services/echo/127.0.0.1:9")
        with urllib.request.urlopen(found.group(1), timeout=5) as response:
            assert response.status == 200
            body = response.read().decode("utf-8")
        registered = (
            'etcdisco_registration_state{instance="127.0.0.1:9",service="echo",'
            'state="registered"} 1.0'
        )
        assert registered in body, body
        assert "process_cpu_seconds_total" in body  # prometheus_client's own, alongside
        proc.terminate()
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        proc.wait()


def test_a_bad_listen_address_is_refused_before_connecting() -> None:
    cmd = [sys.executable, "-m", "etcdisco", "--endpoints", "127.0.0.1:1", "watch"]
    cmd += ["--metrics-listen", "nowhere"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "--metrics-listen" in result.stderr
