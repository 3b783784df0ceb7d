"""Plain values returned by the etcd client, detached from protobuf."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import grpc.aio


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int


@dataclass(frozen=True, slots=True)
class RangeResult:
    kvs: tuple[KeyValue, ...]
    revision: int
    """The store's revision when the range was served (the header revision)."""
    more: bool
    count: int


@dataclass(frozen=True, slots=True)
class PutResult:
    revision: int
    prev_kv: KeyValue | None


@dataclass(frozen=True, slots=True)
class DeleteResult:
    revision: int
    deleted: int
    prev_kvs: tuple[KeyValue, ...]


@dataclass(frozen=True, slots=True)
class TxnResult:
    succeeded: bool
    revision: int
    kvs: tuple[KeyValue, ...] = ()
    """What the executed branch's ``Op.get`` operations read, in order."""


@dataclass(frozen=True, slots=True)
class LeaseGrant:
    id: int
    ttl: int


@dataclass(frozen=True, slots=True)
class LeaseInfo:
    id: int
    ttl: int
    """Remaining seconds; -1 when the lease does not exist."""
    granted_ttl: int
    keys: tuple[bytes, ...]


class WatchEventType(enum.Enum):
    PUT = 0
    DELETE = 1


@dataclass(frozen=True, slots=True)
class WatchEvent:
    type: WatchEventType
    kv: KeyValue
    prev_kv: KeyValue | None


@dataclass(frozen=True, slots=True)
class WatchBatch:
    """One response of a watch stream: some events, or a progress notification."""

    events: tuple[WatchEvent, ...]
    header_revision: int

    @property
    def is_progress(self) -> bool:
        return not self.events


@dataclass(frozen=True, slots=True)
class MemberStatus:
    endpoint: str
    version: str
    member_id: int
    leader: int
    raft_term: int
    db_size: int

    @property
    def is_leader(self) -> bool:
        return self.member_id == self.leader


def prefix_range_end(prefix: bytes) -> bytes:
    """The range end that makes ``[prefix, end)`` cover every key starting with prefix."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"  # the whole keyspace


# The end-of-stream marker of grpc.aio reads; absent from the type stubs.
EOF: Any = getattr(grpc.aio, "EOF")  # noqa: B009


def kv_from_pb(pb: Any) -> KeyValue:
    """A protobuf ``mvccpb.KeyValue`` as a plain :class:`KeyValue`."""
    return KeyValue(
        key=pb.key,
        value=pb.value,
        create_revision=pb.create_revision,
        mod_revision=pb.mod_revision,
        version=pb.version,
        lease=pb.lease,
    )
