"""The gRPC xDS bootstrap: where a client finds its control plane, and who it is.

Every gRPC implementation reads the same JSON, from the file named by
``GRPC_XDS_BOOTSTRAP`` or from ``GRPC_XDS_BOOTSTRAP_CONFIG`` itself, once, when the
process creates its first ``xds:///`` channel.
"""

from __future__ import annotations

import os
import socket
from typing import Any


def default_node_id() -> str:
    return f"etcdisco-{socket.gethostname()}-{os.getpid()}"


def bootstrap_config(
    server_uri: str,
    *,
    node_id: str | None = None,
    cluster: str = "etcdisco",
    zone: str = "",
) -> dict[str, Any]:
    """A bootstrap for a client of the control plane at ``server_uri`` (``host:port``).

    ``server_features: ["xds_v3"]`` selects the v3 API; ``node.locality`` is always
    present because grpc-js (``@grpc/grpc-js-xds``) fails without one; the node id and
    cluster only identify the client in the control plane's logs.
    """
    return {
        "xds_servers": [
            {
                "server_uri": server_uri,
                "channel_creds": [{"type": "insecure"}],
                "server_features": ["xds_v3"],
            }
        ],
        "node": {
            "id": node_id or default_node_id(),
            "cluster": cluster,
            "locality": {"region": "", "zone": zone, "sub_zone": ""},
        },
    }
