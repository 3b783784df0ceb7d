"""The demos of ``etcdisco demo`` (``make demo``), run against a real etcd: the one at
the given endpoints if it answers, else a local one they start and stop themselves.

- ``_common``: the clock that stamps each printed line, and that etcd.
- ``_registry``: :func:`run_demo`, ``etcdisco demo``: instances register from
  processes of their own, a cache follows them, one crashes, one stops gracefully.
- ``_grpc``: ``run_grpc_demo``, ``etcdisco demo --grpc``: a rolling restart of gRPC
  servers under load without a failed call. It needs the ``grpc`` extra, so it is not
  imported here.
- ``grpc_server`` and ``grpc_xds_client``: the processes that demo starts,
  ``python -m etcdisco.demo.grpc_server`` (one server that registers and drains) and
  ``python -m etcdisco.demo.grpc_xds_client`` (a plain grpcio client on ``xds:///``).
- ``_http``: ``run_http_demo``, ``etcdisco demo --http``: the same rolling restart
  with uvicorn servers (``http_server``, each ``etcdisco.uvicorn.run``), GETs and
  POSTs through ``etcdisco.http``. It needs the ``http`` extra, so it is not imported
  here.
"""

from ._registry import run_demo

__all__ = ["run_demo"]
