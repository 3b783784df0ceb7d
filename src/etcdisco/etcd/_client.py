"""The async etcd v3 client: KV, lease, watch, maintenance.

Only what service discovery needs. Calls carry deadlines and fail with etcdisco's
typed errors; policy (resume, re-grant, backoff) lives in the layers above.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Any

import grpc
import grpc.aio

from .._errors import (
    CompactedError,
    EtcdError,
    LeaseNotFoundError,
)
from ._config import EtcdConfig, TlsConfig, parse_endpoints
from ._connection import Connection, ConnectionState, StateListener, _Endpoint, map_error
from ._keepalive import KeepAliveStream
from ._proto import rpc_pb2
from ._types import (
    DeleteResult,
    KeyValue,
    LeaseGrant,
    LeaseInfo,
    MemberStatus,
    PutResult,
    RangeResult,
    TxnResult,
    kv_from_pb,
    prefix_range_end,
)
from ._watch import Watch


def _b(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else value


class Compare:
    """Conditions for :meth:`EtcdClient.txn`."""

    @staticmethod
    def version(key: str | bytes, op: str, value: int) -> Any:
        return rpc_pb2.Compare(
            key=_b(key), target=rpc_pb2.Compare.VERSION, result=_CMP[op], version=value
        )

    @staticmethod
    def lease(key: str | bytes, op: str, value: int) -> Any:
        return rpc_pb2.Compare(
            key=_b(key), target=rpc_pb2.Compare.LEASE, result=_CMP[op], lease=value
        )

    @staticmethod
    def mod_revision(key: str | bytes, op: str, value: int) -> Any:
        return rpc_pb2.Compare(
            key=_b(key), target=rpc_pb2.Compare.MOD, result=_CMP[op], mod_revision=value
        )


_CMP = {
    "==": rpc_pb2.Compare.EQUAL,
    "!=": rpc_pb2.Compare.NOT_EQUAL,
    ">": rpc_pb2.Compare.GREATER,
    "<": rpc_pb2.Compare.LESS,
}


class Op:
    """Operations for :meth:`EtcdClient.txn`."""

    @staticmethod
    def put(key: str | bytes, value: str | bytes, *, lease: int = 0, prev_kv: bool = False) -> Any:
        return rpc_pb2.RequestOp(
            request_put=rpc_pb2.PutRequest(
                key=_b(key), value=_b(value), lease=lease, prev_kv=prev_kv
            )
        )

    @staticmethod
    def delete(key: str | bytes) -> Any:
        return rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=_b(key)))

    @staticmethod
    def get(key: str | bytes) -> Any:
        return rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=_b(key)))


# Keys per page of a prefix listing: a few MiB per response with registry-sized values,
# far under gRPC's and etcd's limits, and few enough round trips at 100,000 keys.
PAGE_SIZE = 5000


def _consume(task: asyncio.Task[Any]) -> None:
    """Retrieve an abandoned task's outcome so asyncio does not log it as lost."""
    if not task.cancelled():
        task.exception()


class EtcdClient:
    """An async client for etcd v3 over gRPC.

    Use as ``async with EtcdClient(endpoints=[...]) as client:``. Unary calls fail over
    between endpoints; streams (watch, keepalive) are opened on the current endpoint
    and their owners reopen them after a break.
    """

    def __init__(
        self,
        endpoints: str | Sequence[str] | None = None,
        *,
        tls: TlsConfig | None = None,
        username: str | None = None,
        password: str | None = None,
        timeout: float = 5.0,
        config: EtcdConfig | None = None,
    ) -> None:
        if config is None:
            config = EtcdConfig(
                endpoints=parse_endpoints(endpoints) if endpoints else EtcdConfig().endpoints,
                tls=tls,
                username=username,
                password=password,
                timeout=timeout,
            )
        self.config = config
        self._conn = Connection(config)
        self._closed = False

    # -- lifecycle -----------------------------------------------------------------

    async def __aenter__(self) -> EtcdClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self._conn.close()

    @property
    def state(self) -> ConnectionState:
        return self._conn.state

    def add_state_listener(self, listener: StateListener) -> None:
        self._conn.add_listener(listener)

    def remove_state_listener(self, listener: StateListener) -> None:
        self._conn.remove_listener(listener)

    @property
    def endpoints(self) -> tuple[str, ...]:
        return self._conn.endpoint_addresses

    @property
    def connection(self) -> Connection:
        return self._conn

    # -- KV ------------------------------------------------------------------------

    async def get(
        self,
        key: str | bytes,
        *,
        prefix: bool = False,
        range_end: bytes | None = None,
        revision: int = 0,
        limit: int = 0,
        keys_only: bool = False,
        serializable: bool = False,
        timeout: float | None = None,
    ) -> RangeResult:
        k = _b(key)
        end = prefix_range_end(k) if prefix else (range_end or b"")
        request = rpc_pb2.RangeRequest(
            key=k,
            range_end=end,
            revision=revision,
            limit=limit,
            keys_only=keys_only,
            serializable=serializable,
        )
        r = await self._conn.call(lambda ep: ep.kv.Range, request, timeout=timeout)
        return RangeResult(
            kvs=tuple(kv_from_pb(kv) for kv in r.kvs),
            revision=r.header.revision,
            more=r.more,
            count=r.count,
        )

    async def get_prefix_pages(
        self, prefix: str | bytes, *, page: int = PAGE_SIZE, timeout: float | None = None
    ) -> AsyncIterator[RangeResult]:
        """Every key under ``prefix``, in pages of at most ``page`` keys, all read at the
        first page's revision (as Kubernetes' reflector lists): no single response has
        to fit gRPC's or etcd's message limits, the whole listing is one consistent
        snapshot (a compaction past it in between raises CompactedError: list again),
        and a reader that handles each page as it comes never holds the raw listing
        whole. Every page's ``revision`` is the first page's."""
        k = _b(prefix)
        end = prefix_range_end(k)
        first = await self.get(k, range_end=end, limit=page, timeout=timeout)

        def after(result: RangeResult) -> asyncio.Task[RangeResult] | None:
            # The next page is asked for before this one is handed over: etcd reads
            # it while the caller decodes this one.
            if not (result.more and result.kvs):
                return None
            return asyncio.ensure_future(
                self.get(
                    result.kvs[-1].key + b"\0",
                    range_end=end,
                    revision=first.revision,
                    limit=page,
                    timeout=timeout,
                )
            )

        pending = after(first)
        try:
            yield first
            while pending is not None:
                nxt = await pending
                pending = after(nxt)
                yield RangeResult(
                    kvs=nxt.kvs, revision=first.revision, more=nxt.more, count=nxt.count
                )
        finally:
            if pending is not None:  # the caller stopped early: nobody wants the page
                pending.cancel()
                pending.add_done_callback(_consume)

    async def get_prefix(
        self, prefix: str | bytes, *, page: int = PAGE_SIZE, timeout: float | None = None
    ) -> RangeResult:
        """Every key under ``prefix`` in one result, read in pages at one revision
        (see :meth:`get_prefix_pages`)."""
        kvs: list[KeyValue] = []
        revision = 0
        async for part in self.get_prefix_pages(prefix, page=page, timeout=timeout):
            kvs.extend(part.kvs)
            revision = part.revision
        return RangeResult(kvs=tuple(kvs), revision=revision, more=False, count=len(kvs))

    async def put(
        self,
        key: str | bytes,
        value: str | bytes,
        *,
        lease: int = 0,
        prev_kv: bool = False,
        timeout: float | None = None,
    ) -> PutResult:
        request = rpc_pb2.PutRequest(key=_b(key), value=_b(value), lease=lease, prev_kv=prev_kv)
        try:
            r = await self._conn.call(lambda ep: ep.kv.Put, request, timeout=timeout)
        except LeaseNotFoundError:
            raise LeaseNotFoundError(lease) from None
        return PutResult(
            revision=r.header.revision,
            prev_kv=kv_from_pb(r.prev_kv) if r.HasField("prev_kv") else None,
        )

    async def delete(
        self,
        key: str | bytes,
        *,
        prefix: bool = False,
        prev_kv: bool = False,
        timeout: float | None = None,
    ) -> DeleteResult:
        k = _b(key)
        request = rpc_pb2.DeleteRangeRequest(
            key=k, range_end=prefix_range_end(k) if prefix else b"", prev_kv=prev_kv
        )
        r = await self._conn.call(lambda ep: ep.kv.DeleteRange, request, timeout=timeout)
        return DeleteResult(
            revision=r.header.revision,
            deleted=r.deleted,
            prev_kvs=tuple(kv_from_pb(kv) for kv in r.prev_kvs),
        )

    async def txn(
        self,
        compare: Sequence[Any],
        success: Sequence[Any],
        failure: Sequence[Any] = (),
        *,
        timeout: float | None = None,
    ) -> TxnResult:
        """A transaction built with :class:`Compare` and :class:`Op`."""
        request = rpc_pb2.TxnRequest(compare=compare, success=success, failure=failure)
        r = await self._conn.call(lambda ep: ep.kv.Txn, request, timeout=timeout)
        kvs = tuple(
            kv_from_pb(kv)
            for op in r.responses
            if op.HasField("response_range")
            for kv in op.response_range.kvs
        )
        prev_kvs = tuple(
            kv_from_pb(op.response_put.prev_kv) if op.response_put.HasField("prev_kv") else None
            for op in r.responses
            if op.HasField("response_put")
        )
        return TxnResult(
            succeeded=r.succeeded, revision=r.header.revision, kvs=kvs, prev_kvs=prev_kvs
        )

    async def compact(self, revision: int, *, physical: bool = True) -> None:
        """Compact history up to ``revision``; CompactedError when it already is."""
        request = rpc_pb2.CompactionRequest(revision=revision, physical=physical)
        try:
            await self._conn.call(lambda ep: ep.kv.Compact, request, timeout=30.0)
        except CompactedError:
            raise CompactedError(0, f"revision {revision} is already compacted") from None

    # -- lease ---------------------------------------------------------------------

    async def lease_grant(self, ttl: int, *, timeout: float | None = None) -> LeaseGrant:
        r = await self._conn.call(
            lambda ep: ep.lease.LeaseGrant, rpc_pb2.LeaseGrantRequest(TTL=ttl), timeout=timeout
        )
        if r.error:
            raise EtcdError(f"lease grant failed: {r.error}")
        return LeaseGrant(id=r.ID, ttl=r.TTL)

    async def lease_revoke(self, lease_id: int, *, timeout: float | None = None) -> None:
        try:
            await self._conn.call(
                lambda ep: ep.lease.LeaseRevoke,
                rpc_pb2.LeaseRevokeRequest(ID=lease_id),
                timeout=timeout,
            )
        except LeaseNotFoundError:
            raise LeaseNotFoundError(lease_id) from None

    async def lease_time_to_live(
        self, lease_id: int, *, keys: bool = False, timeout: float | None = None
    ) -> LeaseInfo:
        r = await self._conn.call(
            lambda ep: ep.lease.LeaseTimeToLive,
            rpc_pb2.LeaseTimeToLiveRequest(ID=lease_id, keys=keys),
            timeout=timeout,
        )
        return LeaseInfo(id=r.ID, ttl=r.TTL, granted_ttl=r.grantedTTL, keys=tuple(r.keys))

    def keepalive_stream(self) -> KeepAliveStream:
        """A lease keepalive stream; one per process is enough for any number of leases."""
        return KeepAliveStream(self._conn)

    # -- watch ---------------------------------------------------------------------

    def watch(
        self,
        key: str | bytes,
        *,
        prefix: bool = False,
        start_revision: int = 0,
        prev_kv: bool = False,
        progress_notify: bool = True,
        require_leader: bool = True,
        no_put: bool = False,
        no_delete: bool = False,
    ) -> Watch:
        """A watch on one key or prefix. Open it with ``await watch.start()`` or
        ``async with``; iterate it for :class:`WatchBatch` values."""
        k = _b(key)
        filters = []
        if no_put:
            filters.append(rpc_pb2.WatchCreateRequest.NOPUT)
        if no_delete:
            filters.append(rpc_pb2.WatchCreateRequest.NODELETE)
        create = rpc_pb2.WatchCreateRequest(
            key=k,
            range_end=prefix_range_end(k) if prefix else b"",
            start_revision=start_revision,
            prev_kv=prev_kv,
            progress_notify=progress_notify,
            filters=filters,
        )
        return Watch(self._conn, create, require_leader=require_leader)

    # -- maintenance ---------------------------------------------------------------

    async def status(self, endpoint: str | None = None, *, timeout: float = 2.0) -> MemberStatus:
        """Status of one endpoint (the current one by default), without failover."""
        ep = self._endpoint(endpoint)
        try:
            r = await ep.maint.Status(rpc_pb2.StatusRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise map_error(exc, (ep.address,)) from None
        return MemberStatus(
            endpoint=ep.address,
            version=r.version,
            member_id=r.header.member_id,
            leader=r.leader,
            raft_term=r.raftTerm,
            db_size=r.dbSize,
        )

    def _endpoint(self, address: str | None) -> _Endpoint:
        for ep in self._conn._endpoints:
            if address is None or ep.address == address:
                return ep
        raise EtcdError(f"unknown endpoint {address!r}")


__all__ = [
    "Compare",
    "EtcdClient",
    "KeepAliveStream",
    "Op",
    "Watch",
]
