"""gRPC integration: servers that register and drain, clients that follow the registry.

Needs the ``grpc`` extra (``pip install 'etcdisco[grpc]'``).

Server side: build the server with :func:`server` / :func:`aio_server` (they add the
health service and the activity tracker a drain needs; grpc takes neither after
start), add servicers and a port, then :func:`serve_registered` /
:func:`aio_serve_registered` start it, report it SERVING and register it; its
``shutdown()`` drains (NOT_SERVING + "draining", wait for quiet, deregister, stop).

Client side: :func:`channel` / :func:`aio_channel` give a ``grpc.Channel`` /
``grpc.aio.Channel`` over every live instance of a service, for generated stubs.
"""

from .._advertise import advertised_address, primary_ip
from ._aio_channel import AioBalancingChannel, aio_channel
from ._channel import BalancingChannel, NoInstanceError, channel
from ._drain import DrainPolicy, DrainReport
from ._pool import SubChannelInfo
from ._serve_aio import AioRegisteredServer, aio_serve_registered
from ._serve_sync import RegisteredServer, serve_registered
from ._server import aio_server, server

__all__ = [
    "AioBalancingChannel",
    "AioRegisteredServer",
    "BalancingChannel",
    "DrainPolicy",
    "DrainReport",
    "NoInstanceError",
    "RegisteredServer",
    "SubChannelInfo",
    "advertised_address",
    "aio_channel",
    "aio_serve_registered",
    "aio_server",
    "channel",
    "primary_ip",
    "serve_registered",
    "server",
]
# The xDS control plane lives in etcdisco.grpc.xds (import it from there).
