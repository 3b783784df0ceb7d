"""What one service looks like to an xDS client: pure builders, no I/O.

A service ``S`` becomes four resources, all named ``S``:

- Listener: an ``api_listener`` holding an HttpConnectionManager with the router filter
  and the RouteConfiguration *inline*. Inline rather than RDS because the route is
  derived from the same registry data as the listener, so a separate resource would
  never change on its own, and it saves the client one round trip (LDS -> CDS -> EDS
  instead of LDS -> RDS -> CDS -> EDS) before its first call.
- RouteConfiguration: virtual host ``*``, prefix ``""`` to cluster ``S``, a retry policy on
  UNAVAILABLE (an instance that crashed between two registry updates costs callers a
  retry, not a failed call) and, under ring hash, the hash policy.
- Cluster: type EDS over ADS, ``ROUND_ROBIN`` or ``RING_HASH``.
- ClusterLoadAssignment: endpoints grouped by zone into localities.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import any_pb2, wrappers_pb2

from ..._address import parse_address
from ..._errors import ConfigError, InvalidAddressError
from ..._metadata import LB_POLICIES, RING_HASH, ROUND_ROBIN, validate_hash_header
from ..._model import Instance, Status
from . import _protos as p

DEFAULT_RETRIES = 2
# gRPC caps an RPC at 5 attempts whatever the route asks for.
MAX_RETRIES = 4

# gRPC rejects an assignment whose weights add up past 2**32 - 1 in one locality; capping
# each weight keeps any realistic instance count far below that.
MAX_WEIGHT = 10_000

# Without a hash header, ring hash hashes gRPC's per-channel id: each client channel then
# sticks to one instance (affinity per channel) instead of scattering calls at random.
_CHANNEL_ID = "io.grpc.channel_id"
_ROUTER_FILTER = "envoy.filters.http.router"


@dataclass(frozen=True)
class ServicePolicy:
    """How clients balance over one service. Unset fields come from the instances'
    metadata (``lb``, ``hash_header``), else from the control plane's defaults."""

    lb: str | None = None
    hash_header: str | None = None
    retries: int | None = None

    def __post_init__(self) -> None:
        if self.lb is not None and self.lb not in LB_POLICIES:
            raise ConfigError(f"lb policy {self.lb!r} is not one of {', '.join(LB_POLICIES)}")
        if self.hash_header is not None:
            object.__setattr__(self, "hash_header", validate_hash_header(self.hash_header))
        if self.retries is not None:
            validate_retries(self.retries)


@dataclass(frozen=True)
class ResolvedPolicy:
    """The policy in force for one service after configuration and metadata."""

    lb: str = ROUND_ROBIN
    hash_header: str | None = None
    retries: int = DEFAULT_RETRIES


@dataclass(frozen=True, order=True)
class EndpointSpec:
    """One instance as the data plane sees it: an IP literal, never a host name."""

    ip: str
    port: int
    zone: str
    weight: int
    status: Status


def validate_retries(retries: int) -> int:
    if isinstance(retries, bool) or not isinstance(retries, int):
        raise ConfigError(f"retries must be an integer, not {type(retries).__name__}")
    if not 0 <= retries <= MAX_RETRIES:
        raise ConfigError(f"retries must be between 0 and {MAX_RETRIES} (gRPC's limit)")
    return retries


def resolve_policy(
    instances: Iterable[Instance],
    configured: ServicePolicy | None,
    default_retries: int = DEFAULT_RETRIES,
) -> tuple[ResolvedPolicy, list[str]]:
    """The policy for a service and the problems worth a log line.

    Configuration wins field by field; otherwise the newest instance carrying the
    metadata key decides, so a rollout that changes the policy takes effect with its
    first new instance.
    """
    listed = list(instances)
    problems: list[str] = []
    configured = configured or ServicePolicy()

    def newest_with(key: str) -> Instance | None:
        return max((i for i in listed if key in i.metadata), key=lambda i: i.revision, default=None)

    lb = configured.lb
    if lb is None and (carrier := newest_with("lb")) is not None:
        raw = carrier.metadata["lb"]
        if isinstance(raw, str) and raw in LB_POLICIES:
            lb = raw
        else:
            problems.append(f"instance {carrier.id}: unknown lb {raw!r}, using round_robin")
        if len({str(i.metadata.get("lb")) for i in listed if "lb" in i.metadata}) > 1:
            problems.append(f"instances disagree on lb; the newest ({carrier.id}) wins")
    header = configured.hash_header
    if lb == RING_HASH and header is None and (carrier := newest_with("hash_header")):
        try:
            header = validate_hash_header(str(carrier.metadata["hash_header"]))
        except ConfigError as exc:
            problems.append(f"instance {carrier.id}: {exc}; hashing per channel")
    retries = default_retries if configured.retries is None else configured.retries
    return ResolvedPolicy(lb or ROUND_ROBIN, header if lb == RING_HASH else None, retries), problems


def host_names(instances: Iterable[Instance]) -> set[str]:
    """The hosts among ``instances``' addresses that are names, not IP literals."""
    names: set[str] = set()
    for inst in instances:
        try:
            host, _ = parse_address(inst.address)
        except InvalidAddressError:
            continue
        if not _is_ip(host):
            names.add(host)
    return names


def endpoint_specs(
    instances: Iterable[Instance], resolved: Mapping[str, str] | None = None
) -> tuple[list[EndpointSpec], list[str]]:
    """Endpoints for ``instances`` and the problems worth a log line.

    Host names are replaced by ``resolved[name]`` (gRPC accepts only IP literals in an
    assignment) and skipped when unresolved. Weight 0 means "no traffic": skipped. Two
    instances on one address are merged, keeping the healthiest then the newest,
    because gRPC rejects a whole assignment that lists an address twice.
    """
    resolved = resolved or {}
    problems: list[str] = []
    best: dict[tuple[str, int], tuple[tuple[int, int], EndpointSpec]] = {}
    instances = list(instances)
    # Suspects (kept after a mass expiry) are a last resort, as for pickers: sent as
    # unhealthy while any live instance remains, as serving when none does.
    any_live = any(i.healthy for i in instances)
    for inst in instances:
        try:
            host, port = parse_address(inst.address)
        except InvalidAddressError as exc:
            problems.append(f"instance {inst.id}: {exc}")
            continue
        ip = host if _is_ip(host) else resolved.get(host)
        if ip is None:
            problems.append(f"instance {inst.id}: host {host!r} did not resolve; skipped")
            continue
        if inst.weight == 0:
            continue
        status = Status.UNHEALTHY if inst.suspect and any_live else inst.status
        spec = EndpointSpec(ip, port, inst.zone or "", min(inst.weight, MAX_WEIGHT), status)
        rank = (_STATUS_RANK[status], inst.revision)
        current = best.get((ip, port))
        if current is not None:
            problems.append(f"instances share the address {ip}:{port}; one endpoint is sent")
        if current is None or rank > current[0]:
            best[(ip, port)] = (rank, spec)
    return sorted(spec for _, spec in best.values()), problems


_STATUS_RANK = {Status.UP: 2, Status.DRAINING: 1, Status.DISABLED: 1, Status.UNHEALTHY: 0}
# An operator's disable reads as DRAINING: gRPC stops sending new calls at once.
_HEALTH = {
    Status.UP: "HEALTHY",
    Status.DRAINING: "DRAINING",
    Status.DISABLED: "DRAINING",
    Status.UNHEALTHY: "UNHEALTHY",
}


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def route_configuration(service: str, policy: ResolvedPolicy) -> Any:
    rc = p.route_components_pb2
    action = rc.RouteAction(cluster=service)
    if policy.retries > 0:
        action.retry_policy.CopyFrom(
            rc.RetryPolicy(
                retry_on="unavailable",
                num_retries=wrappers_pb2.UInt32Value(value=policy.retries),
            )
        )
    if policy.lb == RING_HASH:
        hash_policy = action.hash_policy.add()
        if policy.hash_header:
            hash_policy.header.header_name = policy.hash_header
        else:
            hash_policy.filter_state.key = _CHANNEL_ID
    route = rc.Route(match=rc.RouteMatch(prefix=""), route=action)
    host = rc.VirtualHost(name=service, domains=["*"], routes=[route])
    return p.route_pb2.RouteConfiguration(name=service, virtual_hosts=[host])


def listener(service: str, route: Any) -> Any:
    """The API listener gRPC resolves ``xds:///service`` to, with ``route`` inline."""
    return _api_listener(service, p.hcm_pb2.HttpConnectionManager(route_config=route))


def _api_listener(service: str, hcm: Any) -> Any:
    hcm.http_filters.append(
        p.hcm_pb2.HttpFilter(name=_ROUTER_FILTER, typed_config=pack(p.router_pb2.Router()))
    )
    return p.listener_pb2.Listener(
        name=service, api_listener=p.api_listener_pb2.ApiListener(api_listener=pack(hcm))
    )


def _over_ads() -> Any:
    cs = p.config_source_pb2
    return cs.ConfigSource(ads=cs.AggregatedConfigSource(), resource_api_version=cs.ApiVersion.V3)


def missing_route_name(service: str) -> str:
    """The RDS name a missing service's listener points at. gRPC quotes it in the
    status of every call, so it says what is wrong."""
    return f"etcdisco: no instance of {service} is registered"


def missing_listener(service: str) -> Any:
    """The listener served for a name that is not a registered service.

    gRPC does not take a name's absence from an LDS response as "does not exist" for a
    name it has never received (the response might predate its request): it waits for
    its 15 s timer. A listener whose route has no virtual host makes its calls fail at
    once with UNAVAILABLE "... no instance of <service> is registered: could not find
    VirtualHost ...", and when the service registers, the real listener replaces this
    one and the same channel starts working.
    """
    rds = p.hcm_pb2.Rds(route_config_name=missing_route_name(service), config_source=_over_ads())
    return _api_listener(service, p.hcm_pb2.HttpConnectionManager(rds=rds))


def empty_route(name: str) -> Any:
    """A route configuration without virtual hosts: it routes nothing."""
    return p.route_pb2.RouteConfiguration(name=name)


def cluster(service: str, policy: ResolvedPolicy) -> Any:
    c = p.cluster_pb2.Cluster
    return p.cluster_pb2.Cluster(
        name=service,
        type=c.EDS,
        eds_cluster_config=c.EdsClusterConfig(eds_config=_over_ads(), service_name=service),
        lb_policy=c.RING_HASH if policy.lb == RING_HASH else c.ROUND_ROBIN,
    )


def load_assignment(service: str, endpoints: Sequence[EndpointSpec]) -> Any:
    """Localities by zone. A locality's weight is the sum of its serving endpoints'
    weights (at least 1: gRPC ignores a locality of weight 0, which would also hide its
    draining endpoints from the assignment)."""
    e = p.endpoint_components_pb2
    zones: dict[str, list[EndpointSpec]] = {}
    for spec in endpoints:
        zones.setdefault(spec.zone, []).append(spec)
    localities = []
    for zone in sorted(zones):
        specs = zones[zone]
        serving = sum(s.weight for s in specs if s.status is Status.UP)
        localities.append(
            e.LocalityLbEndpoints(
                locality=p.base_pb2.Locality(zone=zone),
                load_balancing_weight=wrappers_pb2.UInt32Value(value=max(serving, 1)),
                lb_endpoints=[_lb_endpoint(s) for s in specs],
            )
        )
    return p.endpoint_pb2.ClusterLoadAssignment(cluster_name=service, endpoints=localities)


def _lb_endpoint(spec: EndpointSpec) -> Any:
    e = p.endpoint_components_pb2
    address = p.address_pb2.Address(
        socket_address=p.address_pb2.SocketAddress(address=spec.ip, port_value=spec.port)
    )
    return e.LbEndpoint(
        endpoint=e.Endpoint(address=address),
        health_status=p.health_check_pb2.HealthStatus.Value(_HEALTH[spec.status]),
        load_balancing_weight=wrappers_pb2.UInt32Value(value=spec.weight),
    )


def service_resources(
    service: str, policy: ResolvedPolicy, endpoints: Sequence[EndpointSpec]
) -> dict[str, Any]:
    """The four resources of one service, by type URL. The route travels inside the
    listener; it is also listed under its own type for RDS clients and for tools."""
    route = route_configuration(service, policy)
    return {
        p.LISTENER: listener(service, route),
        p.ROUTE: route,
        p.CLUSTER: cluster(service, policy),
        p.ENDPOINT: load_assignment(service, endpoints),
    }
