"""Prometheus metrics, read from the live objects at scrape time.

Needs the ``metrics`` extra (``pip install 'etcdisco[metrics]'``). Nothing is counted
for the sake of metrics on a hot path: the collector reads the state and the plain
counters that the clients, caches and channels keep anyway, when Prometheus asks.

    from etcdisco import metrics

    metrics.track(client)           # an AsyncClient, a Client, a balancing channel,
    metrics.track(channel)          # or an XdsServer; held weakly
    server = metrics.serve("0.0.0.0", 9100)    # GET /metrics on a thread of its own
    ...
    server.close()

``track`` adds to one collector registered in ``prometheus_client.REGISTRY`` (with the
process and platform metrics of prometheus_client). For a registry of your own:
``registry.register(EtcdiscoCollector(client, channel))``. Objects are tracked
weakly: a closed client reports nothing and a collected one disappears.

Metrics (labels in braces):

Registrations, one series per registered instance:

- ``etcdisco_registration_state{service,instance,state}``: 1 for the current state
  (pending, registered, reconnecting, lost, closed), 0 for the others.
- ``etcdisco_registration_re_registrations_total{service,instance}``: times the key
  was written again after a lost lease or an outside delete.
- ``etcdisco_registration_lease_ttl_seconds{service,instance}``: the lease's TTL.
- ``etcdisco_registration_health{service,instance,result}``: 1 for the checks'
  combined result (passing, failing, unknown); only for registrations with checks.

Leases, one per TTL per client:

- ``etcdisco_lease_keepalive_latency_seconds{ttl}``: round trip of the latest
  successful keepalive.
- ``etcdisco_lease_last_ack_age_seconds{ttl}``: seconds since etcd last granted or
  refreshed the lease; nearing the TTL means the instances are about to expire.

Caches, one per watched prefix (``services/echo/``, or ``services/`` for all):

- ``etcdisco_cache_state{prefix,state}``: 1 for the current state (connecting,
  synced, stale, closed), 0 for the others.
- ``etcdisco_cache_instances{prefix,service}``: instances held, suspects included.
- ``etcdisco_cache_suspect_instances{prefix,service}``: instances held after a mass
  expiry (gone from etcd, kept for a while).
- ``etcdisco_cache_staleness_seconds{prefix}``: seconds since the cache last heard
  from etcd (a list, events or a progress answer); below about 15 while it follows
  etcd, growing while etcd is unreachable. Absent before the first list.
- ``etcdisco_cache_revision{prefix}``: the etcd revision applied.
- ``etcdisco_cache_events_applied_total{prefix}``: watch events applied.
- ``etcdisco_cache_malformed_values_total{prefix}``: values skipped as malformed.
- ``etcdisco_cache_resyncs_total{prefix}``: re-lists after a compaction.
- ``etcdisco_cache_expiry_protections_total{prefix}``: times mass-expiry protection
  engaged.

The connection to etcd:

- ``etcdisco_etcd_connection_state{endpoints,state}``: 1 for the current state
  (idle, connected, disconnected, closed), 0 for the others.

Balancing channels (``etcdisco.grpc.channel`` / ``aio_channel``), summed over the
channels of one service:

- ``etcdisco_channel_picks_total{service}``: instances picked for a call attempt.
- ``etcdisco_channel_retries_total{service}``: attempts on another instance after a
  failure that allowed it.
- ``etcdisco_channel_ejections_total{service}``: outlier ejections (when outlier
  detection is on).
- ``etcdisco_channel_subchannels{service,state}``: sub-channels by connectivity.
- ``etcdisco_channel_calls_in_flight{service}``: calls running.

xDS control plane (``etcdisco.grpc.xds.XdsServer``):

- ``etcdisco_xds_streams_total``, ``etcdisco_xds_responses_total``,
  ``etcdisco_xds_acks_total``, ``etcdisco_xds_nacks_total``.

Two tracked objects that yield the same series (two clients caching the same prefix)
report it once, from the first; channel series are summed instead.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

from prometheus_client import REGISTRY, start_http_server
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import CollectorRegistry

from ._address import join_address
from ._async_client import AsyncClient
from .discovery import CacheState, PrefixWatcher
from .etcd._connection import ConnectionState
from .health import CheckResult
from .registry import LeaseKeeper, Registration, RegistrationState

__all__ = ["EtcdiscoCollector", "MetricsServer", "serve", "track", "untrack"]

# name: (kind, help, labels)
_FAMILIES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "etcdisco_registration_state": (
        "gauge",
        "1 for the registration's current state, 0 for the others.",
        ("service", "instance", "state"),
    ),
    "etcdisco_registration_re_registrations_total": (
        "counter",
        "Times the registration's key was written again (lost lease, outside delete).",
        ("service", "instance"),
    ),
    "etcdisco_registration_lease_ttl_seconds": (
        "gauge",
        "TTL of the registration's lease.",
        ("service", "instance"),
    ),
    "etcdisco_registration_health": (
        "gauge",
        "1 for the combined result of the registration's checks, 0 for the others.",
        ("service", "instance", "result"),
    ),
    "etcdisco_lease_keepalive_latency_seconds": (
        "gauge",
        "Round trip of the latest successful lease keepalive.",
        ("ttl",),
    ),
    "etcdisco_lease_last_ack_age_seconds": (
        "gauge",
        "Seconds since etcd last granted or refreshed the lease.",
        ("ttl",),
    ),
    "etcdisco_cache_state": (
        "gauge",
        "1 for the cache's current state, 0 for the others.",
        ("prefix", "state"),
    ),
    "etcdisco_cache_instances": (
        "gauge",
        "Instances held by the cache, suspects included.",
        ("prefix", "service"),
    ),
    "etcdisco_cache_suspect_instances": (
        "gauge",
        "Instances held after a mass expiry (gone from etcd, kept for a while).",
        ("prefix", "service"),
    ),
    "etcdisco_cache_staleness_seconds": (
        "gauge",
        "Seconds since the cache last heard from etcd.",
        ("prefix",),
    ),
    "etcdisco_cache_revision": ("gauge", "etcd revision applied by the cache.", ("prefix",)),
    "etcdisco_cache_events_applied_total": (
        "counter",
        "Watch events applied by the cache.",
        ("prefix",),
    ),
    "etcdisco_cache_malformed_values_total": (
        "counter",
        "Values skipped as malformed.",
        ("prefix",),
    ),
    "etcdisco_cache_resyncs_total": (
        "counter",
        "Re-lists after a compaction.",
        ("prefix",),
    ),
    "etcdisco_cache_expiry_protections_total": (
        "counter",
        "Times mass-expiry protection engaged.",
        ("prefix",),
    ),
    "etcdisco_etcd_connection_state": (
        "gauge",
        "1 for the connection's current state, 0 for the others.",
        ("endpoints", "state"),
    ),
    "etcdisco_channel_picks_total": (
        "counter",
        "Instances picked for a call attempt.",
        ("service",),
    ),
    "etcdisco_channel_retries_total": (
        "counter",
        "Call attempts on another instance after a retryable failure.",
        ("service",),
    ),
    "etcdisco_channel_ejections_total": (
        "counter",
        "Instances ejected by outlier detection.",
        ("service",),
    ),
    "etcdisco_channel_subchannels": (
        "gauge",
        "Sub-channels by connectivity state.",
        ("service", "state"),
    ),
    "etcdisco_channel_calls_in_flight": ("gauge", "Calls running.", ("service",)),
    "etcdisco_xds_streams_total": ("counter", "ADS streams opened.", ()),
    "etcdisco_xds_responses_total": ("counter", "ADS responses sent.", ()),
    "etcdisco_xds_acks_total": ("counter", "ADS responses acknowledged.", ()),
    "etcdisco_xds_nacks_total": ("counter", "ADS responses rejected.", ()),
}

_SUMMED_PREFIXES = ("etcdisco_channel_", "etcdisco_xds_")

_CONNECTIVITY = ("IDLE", "CONNECTING", "READY", "TRANSIENT_FAILURE", "SHUTDOWN")

Sample = tuple[str, tuple[str, ...], float]


class _PoolLike(Protocol):
    """What is read from a balancing channel's pool (etcdisco.grpc._pool.Pool), by
    shape, so this module does not import the grpc extra."""

    service: str
    closed: bool
    picks: int
    retries: int
    outlier: Any

    def info(self) -> Iterable[Any]: ...


def _new_family(name: str) -> CounterMetricFamily | GaugeMetricFamily:
    kind, doc, labels = _FAMILIES[name]
    if kind == "counter":
        return CounterMetricFamily(name, doc, labels=list(labels))
    return GaugeMetricFamily(name, doc, labels=list(labels))


class EtcdiscoCollector:
    """A ``prometheus_client`` collector over tracked etcdisco objects."""

    def __init__(self, *objects: object) -> None:
        self._lock = threading.Lock()
        self._objects: weakref.WeakSet[Any] = weakref.WeakSet()
        for obj in objects:
            self.track(obj)

    def track(self, obj: object) -> None:
        """Report ``obj``: an AsyncClient, a sync Client, a balancing channel (sync or
        aio) or an XdsServer. Held weakly."""
        target = _resolve(obj)
        with self._lock:
            self._objects.add(target)

    def untrack(self, obj: object) -> None:
        target = _resolve(obj)
        with self._lock:
            self._objects.discard(target)

    def describe(self) -> Iterator[Metric]:
        # The names, without reading anything: a registry checks them for clashes.
        for name in _FAMILIES:
            yield _new_family(name)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            objects = list(self._objects)
        families = {name: _new_family(name) for name in _FAMILIES}
        seen: set[tuple[str, tuple[str, ...]]] = set()
        summed: dict[tuple[str, tuple[str, ...]], float] = {}
        now = time.monotonic()
        for obj in objects:
            for sample in _read(obj, now):
                name, labels, value = sample
                if name.startswith(_SUMMED_PREFIXES):
                    summed[name, labels] = summed.get((name, labels), 0.0) + value
                elif (name, labels) not in seen:
                    seen.add((name, labels))
                    families[name].add_metric(list(labels), value)
        for (name, labels), value in summed.items():
            families[name].add_metric(list(labels), value)
        yield from families.values()


def _resolve(obj: object) -> object:
    """The object whose state is read for ``obj``."""
    if isinstance(obj, AsyncClient):
        return obj
    inner = getattr(obj, "async_client", None)  # etcdisco.Client
    if isinstance(inner, AsyncClient):
        return inner
    pool = getattr(obj, "pool", None)  # BalancingChannel, AioBalancingChannel
    if pool is not None and hasattr(pool, "picks"):
        return pool
    if hasattr(obj, "picks") and hasattr(obj, "info"):
        return obj
    if hasattr(getattr(obj, "stats", None), "nacks"):  # XdsServer
        return obj
    raise TypeError(
        "metrics can track an AsyncClient, a Client, a balancing channel or an XdsServer, "
        f"not {type(obj).__name__}"
    )


def _read(obj: object, now: float) -> list[Sample]:
    """Every sample of one object. The state may change on another thread (the
    objects live on an event loop, scrapes come on the HTTP server's thread):
    collections are copied in one step (one C call, atomic under the GIL) and a
    read that still lost a race is read again."""
    for _ in range(3):
        try:
            if isinstance(obj, AsyncClient):
                return _read_client(obj, now)
            if hasattr(obj, "picks"):
                return _read_pool(obj)  # type: ignore[arg-type]
            return _read_xds(obj)
        except RuntimeError:  # "changed size during iteration"
            continue
    return []


def _enum_samples(
    name: str, labels: tuple[str, ...], current: object, values: Iterable[Any]
) -> Iterator[Sample]:
    for value in values:
        yield name, (*labels, str(value.value)), 1.0 if value is current else 0.0


def _read_client(client: AsyncClient, now: float) -> list[Sample]:
    if client.closed:
        return []
    out: list[Sample] = []
    etcd = client.etcd
    out.extend(
        _enum_samples(
            "etcdisco_etcd_connection_state",
            (",".join(etcd.endpoints),),
            etcd.state,
            ConnectionState,
        )
    )
    for keeper in client.lease_keepers:
        out.extend(_read_keeper(keeper, now))
        for reg in keeper.registrations:
            out.extend(_read_registration(reg))
    for watcher in client.watchers:
        out.extend(_read_watcher(watcher, now))
    return out


def _read_keeper(keeper: LeaseKeeper[Registration], now: float) -> Iterator[Sample]:
    ttl = (str(keeper.ttl),)
    latency = keeper.last_keepalive_latency
    if latency is not None:
        yield "etcdisco_lease_keepalive_latency_seconds", ttl, latency
    if keeper.lease_id is not None:
        yield "etcdisco_lease_last_ack_age_seconds", ttl, max(now - keeper.last_ack, 0.0)


def _read_registration(reg: Registration) -> Iterator[Sample]:
    labels = (reg.service, reg.instance_id)
    yield from _enum_samples("etcdisco_registration_state", labels, reg.state, RegistrationState)
    yield "etcdisco_registration_re_registrations_total", labels, float(reg.re_registrations)
    yield "etcdisco_registration_lease_ttl_seconds", labels, float(reg.ttl)
    health = reg.health
    if health is not None:
        yield from _enum_samples("etcdisco_registration_health", labels, health, CheckResult)


def _read_watcher(watcher: PrefixWatcher, now: float) -> Iterator[Sample]:
    prefix = (watcher.key_prefix,)
    yield from _enum_samples("etcdisco_cache_state", prefix, watcher.state, CacheState)
    counts: dict[str, list[int]] = {}
    # A cache of one service reports it even when empty: "no instances" is the alert.
    own = watcher.key_prefix[len(watcher.root) + 1 :].rstrip("/")
    if own:
        counts[own] = [0, 0]
    for inst in tuple(watcher.instances.values()):
        count = counts.setdefault(inst.service, [0, 0])
        count[0] += 1
        count[1] += inst.suspect
    for service, (held, suspects) in sorted(counts.items()):
        yield "etcdisco_cache_instances", (*prefix, service), float(held)
        yield "etcdisco_cache_suspect_instances", (*prefix, service), float(suspects)
    if watcher.last_sync:
        yield "etcdisco_cache_staleness_seconds", prefix, max(now - watcher.last_sync, 0.0)
    yield "etcdisco_cache_revision", prefix, float(watcher.revision)
    yield "etcdisco_cache_events_applied_total", prefix, float(watcher.events_applied)
    yield "etcdisco_cache_malformed_values_total", prefix, float(watcher.malformed)
    yield "etcdisco_cache_resyncs_total", prefix, float(watcher.resyncs)
    yield "etcdisco_cache_expiry_protections_total", prefix, float(watcher.expiry_protections)


def _read_pool(pool: _PoolLike) -> list[Sample]:
    if pool.closed:
        return []
    service = (pool.service,)
    out: list[Sample] = [
        ("etcdisco_channel_picks_total", service, float(pool.picks)),
        ("etcdisco_channel_retries_total", service, float(pool.retries)),
    ]
    if pool.outlier is not None:
        out.append(("etcdisco_channel_ejections_total", service, float(pool.outlier.ejections)))
    by_state = dict.fromkeys(_CONNECTIVITY, 0)
    in_flight = 0
    for sub in pool.info():
        by_state[sub.state.name] = by_state.get(sub.state.name, 0) + 1
        in_flight += sub.in_flight
    out.extend(
        ("etcdisco_channel_subchannels", (*service, state.lower()), float(count))
        for state, count in by_state.items()
    )
    out.append(("etcdisco_channel_calls_in_flight", service, float(in_flight)))
    return out


def _read_xds(server: object) -> list[Sample]:
    stats = getattr(server, "stats", None)
    return [
        (f"etcdisco_xds_{field}_total", (), float(getattr(stats, field, 0)))
        for field in ("streams", "responses", "acks", "nacks")
    ]


# -- the process-wide collector and endpoint ----------------------------------------

_default: EtcdiscoCollector | None = None
_default_lock = threading.Lock()


def _default_collector() -> EtcdiscoCollector:
    global _default
    with _default_lock:
        if _default is None:
            _default = EtcdiscoCollector()
            REGISTRY.register(_default)
        return _default


def track(*objects: object) -> None:
    """Report ``objects`` through ``prometheus_client.REGISTRY`` (see the module doc)."""
    collector = _default_collector()
    for obj in objects:
        collector.track(obj)


def untrack(*objects: object) -> None:
    """Stop reporting ``objects`` (the opposite of ``track``)."""
    collector = _default_collector()
    for obj in objects:
        collector.untrack(obj)


class MetricsServer:
    """``GET /metrics`` on a daemon thread; ``close()`` stops it and frees the port."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry) -> None:
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        self.host = host

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    @property
    def url(self) -> str:
        return f"http://{join_address(self.host, self.port)}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5.0)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve(
    host: str = "127.0.0.1", port: int = 9100, registry: CollectorRegistry | None = None
) -> MetricsServer:
    """Serve ``registry`` (default: prometheus_client's, with every tracked object) at
    ``http://HOST:PORT/metrics``; port 0 picks a free port (see ``.port``)."""
    if registry is None:
        _default_collector()
        registry = REGISTRY
    return MetricsServer(host, port, registry)
