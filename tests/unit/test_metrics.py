"""The metrics collector's pure parts: what it reads from pools, how it merges series."""

from __future__ import annotations

import grpc
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from etcdisco import AsyncClient, make_picker
from etcdisco.grpc._pool import Pool, SubChannel
from etcdisco.metrics import EtcdiscoCollector
from etcdisco.outlier import OutlierDetector

from ._factories import inst

Labels = frozenset[tuple[str, str]]


def scrape(*objects: object) -> dict[tuple[str, Labels], float]:
    """The exposition text of a fresh registry, parsed back: what Prometheus sees."""
    registry = CollectorRegistry()
    registry.register(EtcdiscoCollector(*objects))
    text = generate_latest(registry).decode("utf-8")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


class Transport:
    def open(self, address: str) -> str:
        return address

    def watch(self, sub: SubChannel[str]) -> None:
        pass

    def close(self, sub: SubChannel[str]) -> None:
        pass


class Channel:
    """Stands in for a balancing channel: the collector reads its ``pool``."""

    def __init__(self, outlier: OutlierDetector | None = None) -> None:
        self.pool: Pool[str] = Pool("echo", make_picker("round_robin"), outlier, Transport())
        self.pool.update([inst(1), inst(2)])


def test_pool_counts_picks_and_retries() -> None:
    ch = Channel()
    first = ch.pool.acquire()
    assert first is not None
    retried = ch.pool.acquire(None, frozenset({first[1].key}))
    assert retried is not None and retried[1].key != first[1].key
    assert (ch.pool.picks, ch.pool.retries) == (2, 1)
    for sub, instance in (first, retried):
        ch.pool.release(sub, instance, 0.01, True)


def test_channels_of_one_service_are_summed() -> None:
    detector = OutlierDetector(consecutive_failures=1)
    a, b = Channel(detector), Channel()
    held = []
    for _ in range(3):
        picked = a.pool.acquire()
        assert picked is not None
        held.append(picked)
    assert b.pool.acquire(None, frozenset({"services/echo/i1"})) is not None
    sub, instance = held.pop()
    a.pool.release(sub, instance, 0.01, False)  # ejects it

    got = scrape(a, b)
    echo: Labels = frozenset({("service", "echo")})
    assert got["etcdisco_channel_picks_total", echo] == 4
    assert got["etcdisco_channel_retries_total", echo] == 1
    assert got["etcdisco_channel_ejections_total", echo] == 1
    assert got["etcdisco_channel_calls_in_flight", echo] == 3
    idle: Labels = frozenset({("service", "echo"), ("state", "idle")})
    assert got["etcdisco_channel_subchannels", idle] == 4


def test_a_closed_channel_reports_nothing() -> None:
    ch = Channel()
    ch.pool.close()
    assert not any(name.startswith("etcdisco_channel_") for name, _ in scrape(ch))


async def test_identical_series_are_reported_once() -> None:
    # Two clients on the same endpoints: one connection series per state, not two.
    first, second = AsyncClient("127.0.0.1:1"), AsyncClient("127.0.0.1:1")
    try:
        got = scrape(first, second)
        states = {
            dict(labels)["state"]: value
            for (name, labels), value in got.items()
            if name == "etcdisco_etcd_connection_state"
        }
        assert states == {"idle": 1, "connected": 0, "disconnected": 0, "closed": 0}
    finally:
        await first.close()
        await second.close()
    # Closed clients are left out.
    assert not any(name.startswith("etcdisco_etcd_") for name, _ in scrape(first, second))


def test_only_known_objects_are_tracked() -> None:
    with pytest.raises(TypeError, match="not object"):
        EtcdiscoCollector(object())


def test_describe_names_every_family_without_reading() -> None:
    registry = CollectorRegistry()
    registry.register(EtcdiscoCollector())
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        registry.register(EtcdiscoCollector())


def test_connectivity_states_are_grpcs() -> None:
    from etcdisco.metrics import _CONNECTIVITY

    assert set(_CONNECTIVITY) == {state.name for state in grpc.ChannelConnectivity}
