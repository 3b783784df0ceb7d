"""The gRPC xDS bootstrap: where a client finds its control plane, and who it is.

Every gRPC implementation reads the same JSON, from the file named by
``GRPC_XDS_BOOTSTRAP`` or from ``GRPC_XDS_BOOTSTRAP_CONFIG`` itself, once, when the
process creates its first ``xds:///`` channel.

A control plane served over TLS is described with the ``tls`` channel credentials of
gRFC A65 (``ca_certificate_file``, ``certificate_file``, ``private_key_file``). gRPC
C-core (so grpcio) has them since grpc/grpc#33234 (2023); measured here with grpcio
1.66.2 and 1.85. A client whose gRPC lacks them refuses the bootstrap at its first
``xds:///`` channel, so the credentials are never downgraded to ``insecure`` here.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from ..._errors import ConfigError


def default_node_id() -> str:
    return f"etcdisco-{socket.gethostname()}-{os.getpid()}"


def channel_creds(
    *,
    tls: bool = False,
    cacert: str | None = None,
    cert: str | None = None,
    key: str | None = None,
) -> list[dict[str, Any]]:
    """The bootstrap's ``channel_creds``: ``insecure``, or gRFC A65 ``tls`` when ``tls``
    is true or any file is given. ``cacert`` verifies the server (without it: the
    system's roots); ``cert`` and ``key`` are the client's, for mutual TLS."""
    if (cert is None) != (key is None):
        # gRPC rejects the whole bootstrap when only one of the two is set.
        raise ConfigError("the bootstrap's client certificate and key go together (cert and key)")
    if not (tls or cacert or cert):
        return [{"type": "insecure"}]
    config: dict[str, str] = {}
    if cacert:
        config["ca_certificate_file"] = cacert
    if cert and key:
        config["certificate_file"] = cert
        config["private_key_file"] = key
    return [{"type": "tls", "config": config}]


def bootstrap_config(
    server_uri: str,
    *,
    node_id: str | None = None,
    cluster: str = "etcdisco",
    zone: str = "",
    tls: bool = False,
    cacert: str | None = None,
    cert: str | None = None,
    key: str | None = None,
) -> dict[str, Any]:
    """A bootstrap for a client of the control plane at ``server_uri`` (``host:port``).

    ``server_features: ["xds_v3"]`` selects the v3 API; ``node.locality`` is always
    present because grpc-js (``@grpc/grpc-js-xds``) fails without one; the node id and
    cluster only identify the client in the control plane's logs. With ``tls`` (or any
    of ``cacert``, ``cert``/``key``: paths as the clients see them) the client dials the
    control plane over TLS; gRPC then checks that the server's certificate names the
    host of ``server_uri``.
    """
    return {
        "xds_servers": [
            {
                "server_uri": server_uri,
                "channel_creds": channel_creds(tls=tls, cacert=cacert, cert=cert, key=key),
                "server_features": ["xds_v3"],
            }
        ],
        "node": {
            "id": node_id or default_node_id(),
            "cluster": cluster,
            "locality": {"region": "", "zone": zone, "sub_zone": ""},
        },
    }
