"""The envoy v3 messages the control plane speaks, and their type URLs.

The modules come from ``xds-protos`` (the ``grpc`` extra), which ships no type stubs:
they are imported here once, so the rest of the package has one place where protobuf
classes are untyped.
"""

from __future__ import annotations

try:
    from envoy.config.cluster.v3 import cluster_pb2  # type: ignore[import-untyped]
    from envoy.config.core.v3 import (  # type: ignore[import-untyped]
        address_pb2,
        base_pb2,
        config_source_pb2,
        health_check_pb2,
    )
    from envoy.config.endpoint.v3 import (  # type: ignore[import-untyped]
        endpoint_components_pb2,
        endpoint_pb2,
    )
    from envoy.config.listener.v3 import (  # type: ignore[import-untyped]
        api_listener_pb2,
        listener_pb2,
    )
    from envoy.config.route.v3 import (  # type: ignore[import-untyped]
        route_components_pb2,
        route_pb2,
    )
    from envoy.extensions.filters.http.router.v3 import (  # type: ignore[import-untyped]
        router_pb2,
    )
    from envoy.extensions.filters.network.http_connection_manager.v3 import (  # type: ignore[import-untyped]
        http_connection_manager_pb2 as hcm_pb2,
    )
    from envoy.service.discovery.v3 import (  # type: ignore[import-untyped]
        ads_pb2_grpc,
        discovery_pb2,
    )
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "etcdisco.grpc.xds needs the envoy protos: pip install 'etcdisco[grpc]'"
    ) from exc

__all__ = [
    "CLUSTER",
    "ENDPOINT",
    "LISTENER",
    "ROUTE",
    "TYPE_NAMES",
    "address_pb2",
    "ads_pb2_grpc",
    "api_listener_pb2",
    "base_pb2",
    "cluster_pb2",
    "config_source_pb2",
    "discovery_pb2",
    "endpoint_components_pb2",
    "endpoint_pb2",
    "hcm_pb2",
    "health_check_pb2",
    "listener_pb2",
    "route_components_pb2",
    "route_pb2",
    "router_pb2",
]

_PREFIX = "type.googleapis.com/"
LISTENER = _PREFIX + "envoy.config.listener.v3.Listener"
ROUTE = _PREFIX + "envoy.config.route.v3.RouteConfiguration"
CLUSTER = _PREFIX + "envoy.config.cluster.v3.Cluster"
ENDPOINT = _PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"

# Short names for logs ("LDS" reads better than a type URL in a warning).
TYPE_NAMES = {LISTENER: "LDS", ROUTE: "RDS", CLUSTER: "CDS", ENDPOINT: "EDS"}
