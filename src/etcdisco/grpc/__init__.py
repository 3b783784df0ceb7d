"""gRPC integration: servers that register and drain, clients that follow the registry.

Needs the ``grpc`` extra (``pip install 'etcdisco[grpc]'``).
"""
