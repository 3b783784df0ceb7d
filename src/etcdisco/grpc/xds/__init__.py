"""An xDS control plane fed by the registry: any gRPC client, in any language, reaches
registered services through ``xds:///<service>``.

Two ways to run it:

- standalone: ``etcdisco xds --listen 0.0.0.0:18000`` and give clients the bootstrap
  printed by ``etcdisco xds --listen ... --print-bootstrap`` (``GRPC_XDS_BOOTSTRAP=file``);
- embedded in a Python client: ``await start_embedded(client)`` (asyncio) or
  ``install()`` (blocking code), once, before the first ``xds:///`` channel.

Either serves plaintext ADS, or TLS / mutual TLS given an :class:`XdsTls`; the
bootstraps then carry gRFC A65 ``tls`` channel credentials.

Every registered service ``S`` is served as a Listener, RouteConfiguration, Cluster
and ClusterLoadAssignment named ``S`` (see ``_resources``): round robin by default or
ring hash on a header, retries on UNAVAILABLE, one locality per zone, draining and
unhealthy instances sent as such so that clients stop picking them at once.
"""

from ..._metadata import LB_POLICIES
from ._bootstrap import bootstrap_config
from ._embedded import BOOTSTRAP_CONFIG_ENV, BOOTSTRAP_ENV, EmbeddedXds, install, start_embedded
from ._resources import DEFAULT_RETRIES, MAX_RETRIES, ServicePolicy
from ._server import XdsServer, XdsTls

__all__ = [
    "BOOTSTRAP_CONFIG_ENV",
    "BOOTSTRAP_ENV",
    "DEFAULT_RETRIES",
    "LB_POLICIES",
    "MAX_RETRIES",
    "EmbeddedXds",
    "ServicePolicy",
    "XdsServer",
    "XdsTls",
    "bootstrap_config",
    "install",
    "start_embedded",
]
