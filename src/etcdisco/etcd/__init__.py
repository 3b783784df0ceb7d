"""A thin async client for etcd v3, written for service discovery.

It speaks etcd's gRPC API directly (generated modules in ``_proto``) and keeps only
the calls a registry needs: KV, leases with one keepalive stream, watches, auth, TLS,
several endpoints with failover.
"""

from ._client import Compare, EtcdClient, KeepAliveStream, Op, Watch
from ._config import DEFAULT_ENDPOINT, EtcdConfig, TlsConfig, parse_endpoints
from ._connection import ConnectionState
from ._types import (
    DeleteResult,
    KeyValue,
    LeaseGrant,
    LeaseInfo,
    MemberStatus,
    PutResult,
    RangeResult,
    TxnResult,
    WatchBatch,
    WatchEvent,
    WatchEventType,
    prefix_range_end,
)

__all__ = [
    "DEFAULT_ENDPOINT",
    "Compare",
    "ConnectionState",
    "DeleteResult",
    "EtcdClient",
    "EtcdConfig",
    "KeepAliveStream",
    "KeyValue",
    "LeaseGrant",
    "LeaseInfo",
    "MemberStatus",
    "Op",
    "PutResult",
    "RangeResult",
    "TlsConfig",
    "TxnResult",
    "Watch",
    "WatchBatch",
    "WatchEvent",
    "WatchEventType",
    "parse_endpoints",
    "prefix_range_end",
]
