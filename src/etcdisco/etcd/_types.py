"""Plain values returned by the etcd client, detached from protobuf."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, NamedTuple

import grpc.aio


class KeyValue(NamedTuple):
    """One key as etcd holds it (``mvccpb.KeyValue``). A named tuple: a listing makes
    one per key, and building a frozen dataclass costs several times more."""

    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int


@dataclass(frozen=True, slots=True)
class RangeResult:
    """What a range read returned, and at which revision."""

    kvs: tuple[KeyValue, ...]
    revision: int
    """The store's revision when the range was served (the header revision)."""
    more: bool
    count: int


@dataclass(frozen=True, slots=True)
class PutResult:
    """A put: the revision it made, and the value it replaced when asked for."""

    revision: int
    prev_kv: KeyValue | None


@dataclass(frozen=True, slots=True)
class DeleteResult:
    """A delete: the revision, how many keys went, and their values when asked for."""

    revision: int
    deleted: int
    prev_kvs: tuple[KeyValue, ...]


@dataclass(frozen=True, slots=True)
class TxnResult:
    """A transaction: which branch ran, at which revision, and what it read."""

    succeeded: bool
    revision: int
    kvs: tuple[KeyValue, ...] = ()
    """What the executed branch's ``Op.get`` operations read, in order."""
    prev_kvs: tuple[KeyValue | None, ...] = ()
    """For each put of the executed branch, in order, the value it replaced (when
    asked for with ``prev_kv=True``; None for a new key)."""


@dataclass(frozen=True, slots=True)
class LeaseGrant:
    """A granted lease: its id and TTL in seconds."""

    id: int
    ttl: int


@dataclass(frozen=True, slots=True)
class LeaseInfo:
    """A lease as LeaseTimeToLive reports it."""

    id: int
    ttl: int
    """Remaining seconds; -1 when the lease does not exist."""
    granted_ttl: int
    keys: tuple[bytes, ...]


class WatchEventType(enum.Enum):
    """PUT or DELETE."""

    PUT = 0
    DELETE = 1


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One change of one key."""

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
    """One member as its Status call reports it."""

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
        pb.key,
        pb.value,
        pb.create_revision,
        pb.mod_revision,
        pb.version,
        pb.lease,
    )
