"""The async etcd v3 client: KV, lease, watch, maintenance.

Only what service discovery needs. Calls carry deadlines and fail with etcdisco's
typed errors; policy (resume, re-grant, backoff) lives in the layers above.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import grpc
import grpc.aio

from .._errors import (
    AuthError,
    ClosedError,
    CompactedError,
    EtcdError,
    EtcdTimeoutError,
    LeaseNotFoundError,
    UnavailableError,
)
from .._tasks import cancelling
from ._config import EtcdConfig, TlsConfig, parse_endpoints
from ._connection import Connection, ConnectionState, StateListener, _Endpoint, map_error
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
    WatchBatch,
    WatchEvent,
    WatchEventType,
    prefix_range_end,
)

# The end-of-stream marker of grpc.aio reads; absent from the type stubs.
_EOF: Any = getattr(grpc.aio, "EOF")  # noqa: B009


def _kv(pb: Any) -> KeyValue:
    return KeyValue(
        key=pb.key,
        value=pb.value,
        create_revision=pb.create_revision,
        mod_revision=pb.mod_revision,
        version=pb.version,
        lease=pb.lease,
    )


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
    def put(key: str | bytes, value: str | bytes, *, lease: int = 0) -> Any:
        return rpc_pb2.RequestOp(
            request_put=rpc_pb2.PutRequest(key=_b(key), value=_b(value), lease=lease)
        )

    @staticmethod
    def delete(key: str | bytes) -> Any:
        return rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=_b(key)))

    @staticmethod
    def get(key: str | bytes) -> Any:
        return rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=_b(key)))


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
            kvs=tuple(_kv(kv) for kv in r.kvs),
            revision=r.header.revision,
            more=r.more,
            count=r.count,
        )

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
            revision=r.header.revision, prev_kv=_kv(r.prev_kv) if r.HasField("prev_kv") else None
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
            prev_kvs=tuple(_kv(kv) for kv in r.prev_kvs),
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
            _kv(kv)
            for op in r.responses
            if op.HasField("response_range")
            for kv in op.response_range.kvs
        )
        return TxnResult(succeeded=r.succeeded, revision=r.header.revision, kvs=kvs)

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


class KeepAliveStream:
    """One bidirectional LeaseKeepAlive stream shared by every lease of a client.

    Requests of different leases go out concurrently; a reader task (owned here)
    hands each response to the request of the same lease id, so no lease waits
    behind another's round trip and no answer is ever taken for another lease's.
    A request without an answer within its timeout means the stream (or its member)
    is stalled: the stream is dropped, its endpoint marked failed, and the next
    request opens a new one on the next endpoint.
    """

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._call: Any = None
        self._endpoint: _Endpoint | None = None
        self._token: str | None = None
        self._reader: asyncio.Task[None] | None = None
        self._waiters: dict[int, deque[asyncio.Future[int]]] = {}
        self._opening = asyncio.Lock()
        self._closed = False

    async def keepalive(self, lease_id: int, *, timeout: float) -> int:
        """Refresh ``lease_id``; returns the new TTL. Raises LeaseNotFoundError when
        etcd answers TTL <= 0, and UnavailableError/EtcdTimeoutError when the stream
        breaks or stays silent for ``timeout`` (the next call opens a new one)."""
        call: Any = None
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout):
                call = await self._open(timeout)
                self._waiters.setdefault(lease_id, deque()).append(waiter)
                await call.write(rpc_pb2.LeaseKeepAliveRequest(ID=lease_id))
                return await waiter
        except EtcdError:
            raise  # from the waiter: the stream's failure, already handled by _break
        except TimeoutError:
            self._break(call, EtcdTimeoutError("keepalive got no answer"))
            raise EtcdTimeoutError(f"lease keepalive got no answer within {timeout:.1f}s") from None
        except grpc.aio.AioRpcError as exc:
            self._break(call, exc)
            raise map_error(exc, self._conn.endpoint_addresses) from None
        except asyncio.InvalidStateError:
            # The stream ended between two requests (its member died): grpc refuses
            # the write with this instead of an RPC error.
            self._break(call, UnavailableError("keepalive stream had ended"))
            raise UnavailableError(
                "keepalive stream had ended", self._conn.endpoint_addresses
            ) from None
        except asyncio.CancelledError:
            if cancelling() or self._closed:
                raise
            # Another request dropped the stream under this one's write.
            raise UnavailableError(
                "keepalive stream was reset", self._conn.endpoint_addresses
            ) from None
        finally:
            queue = self._waiters.get(lease_id)
            if queue is not None and waiter in queue:
                queue.remove(waiter)
                if not queue:
                    del self._waiters[lease_id]

    async def _open(self, timeout: float) -> Any:
        async with self._opening:
            if self._closed:
                raise ClosedError("etcd client is closed")
            if self._call is None:
                endpoint, metadata = await self._conn.stream_target(timeout)
                self._endpoint = endpoint
                self._token = metadata[0][1] if metadata else None
                call = endpoint.lease.LeaseKeepAlive(metadata=metadata or None)
                self._call = call
                self._reader = asyncio.get_running_loop().create_task(
                    self._read(call), name="etcdisco-keepalive-reader"
                )
            return self._call

    async def _read(self, call: Any) -> None:
        """Hand every response of ``call`` to its lease's oldest waiting request."""
        try:
            while True:
                response = await call.read()
                if response is _EOF:
                    raise UnavailableError("keepalive stream ended")
                self._conn.note_success()
                queue = self._waiters.get(response.ID)
                if not queue:
                    continue  # its request gave up meanwhile
                waiter = queue.popleft()
                if waiter.done():
                    continue
                if response.TTL <= 0:
                    waiter.set_exception(LeaseNotFoundError(response.ID))
                else:
                    waiter.set_result(int(response.TTL))
        except asyncio.CancelledError:
            # Dropped by _break or close: whoever did it has told the waiters.
            return
        except grpc.aio.AioRpcError as exc:
            self._break(call, exc)
        except UnavailableError as exc:
            self._break(call, exc)

    def _break(self, call: Any, exc: BaseException) -> None:
        """Drop ``call`` (if it is still the current stream) and fail its waiters."""
        if call is None or call is not self._call:
            return
        if self._endpoint is not None:
            self._conn.stream_failed(self._endpoint, exc, self._token)
        self._call = None
        reader, self._reader = self._reader, None
        call.cancel()
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
        if isinstance(exc, grpc.aio.AioRpcError):
            error: BaseException = map_error(exc, self._conn.endpoint_addresses)
        elif isinstance(exc, EtcdError):
            error = UnavailableError(
                f"keepalive stream broke: {exc}", self._conn.endpoint_addresses
            )
        else:
            error = UnavailableError("keepalive stream broke", self._conn.endpoint_addresses)
        waiters, self._waiters = self._waiters, {}
        for queue in waiters.values():
            for waiter in queue:
                if not waiter.done():
                    waiter.set_exception(error)

    async def close(self) -> None:
        self._closed = True
        call, self._call = self._call, None
        reader, self._reader = self._reader, None
        if call is not None:
            call.cancel()
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        for queue in self._waiters.values():
            for waiter in queue:
                if not waiter.done():
                    waiter.set_exception(ClosedError("etcd client is closed"))
        self._waiters.clear()


class Watch:
    """One watch stream on one key range.

    Iterating yields :class:`WatchBatch`. Ends of the stream surface as exceptions so
    the owner can resume: :class:`CompactedError` (re-list), :class:`UnavailableError`
    or :class:`EtcdTimeoutError` (reconnect), :class:`ClosedError` (stop). After
    :meth:`cancel` iteration simply ends; after :meth:`abandon` it raises the error
    given there.
    """

    def __init__(self, conn: Connection, create: Any, *, require_leader: bool) -> None:
        self._conn = conn
        self._create = create
        self._require_leader = require_leader
        self._call: Any = None
        self._endpoint: _Endpoint | None = None
        self._token: str | None = None
        self.watch_id: int | None = None
        self._cancelled = False
        self._abandoned: EtcdError | None = None

    async def start(self, timeout: float | None = None) -> Watch:
        budget = self._conn.config.timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(budget):
                await self._open(budget)
        except EtcdError as exc:
            self._fail(exc)
            raise
        except TimeoutError:
            self._fail(EtcdTimeoutError("watch create timed out"))
            raise EtcdTimeoutError(f"watch was not created within {budget:.1f}s") from None
        except grpc.aio.AioRpcError as exc:
            self._fail(exc)
            raise map_error(exc, self._conn.endpoint_addresses) from None
        except asyncio.CancelledError:
            self._fail(UnavailableError("watch create was cancelled"))
            if cancelling():
                raise
            raise self._stopped() from None
        except BaseException as exc:
            self._fail(exc)
            raise
        return self

    async def _open(self, timeout: float) -> None:
        endpoint, metadata = await self._conn.stream_target(timeout)
        self._endpoint = endpoint
        self._token = metadata[0][1] if metadata else None
        if self._require_leader:
            metadata = [*metadata, ("hasleader", "true")]
        self._call = endpoint.watch.Watch(metadata=metadata)
        await self._call.write(rpc_pb2.WatchRequest(create_request=self._create))
        response = await self._call.read()
        if response is _EOF:
            raise UnavailableError("watch stream ended before it was created")
        if not response.created:
            raise EtcdError("etcd answered a watch create with something else")
        self.watch_id = response.watch_id
        self._check_cancel(response)
        self._conn.note_success()

    def _check_cancel(self, response: Any) -> None:
        if response.compact_revision:
            raise CompactedError(response.compact_revision)
        if response.canceled:
            reason = response.cancel_reason or "canceled by etcd"
            if "no leader" in reason:
                raise UnavailableError(f"watch canceled: {reason}")
            if "permission denied" in reason or "invalid auth token" in reason:
                raise AuthError(f"watch canceled: {reason}")
            raise EtcdError(f"watch canceled: {reason}")

    def _stopped(self) -> EtcdError:
        """What a read on a call we cancelled ourselves means for the iterator."""
        if self._abandoned is not None:
            return self._abandoned
        return UnavailableError("watch stream was cancelled", self._conn.endpoint_addresses)

    def __aiter__(self) -> Watch:
        return self

    async def __anext__(self) -> WatchBatch:
        if self._abandoned is not None:
            raise self._abandoned
        if self._cancelled:
            raise StopAsyncIteration
        if self._call is None:
            raise ClosedError("watch is not open")
        try:
            response = await self._call.read()
        except asyncio.CancelledError:
            # A cancelled call raises this from its pending read: only when our own
            # task is being cancelled does it mean "stop"; otherwise the stream was
            # ended under us (cancel, abandon), which the caller must hear about.
            if cancelling():
                raise
            if self._cancelled and self._abandoned is None:
                raise StopAsyncIteration from None
            self._fail(UnavailableError("watch stream was cancelled"))
            raise self._stopped() from None
        except grpc.aio.AioRpcError as exc:
            if self._abandoned is not None:
                raise self._abandoned from None
            if self._cancelled:
                raise StopAsyncIteration from None
            self._fail(exc)
            raise map_error(exc, self._conn.endpoint_addresses) from None
        if response is _EOF:
            if self._cancelled:
                raise StopAsyncIteration
            self._fail(UnavailableError("watch stream ended"))
            raise UnavailableError("watch stream ended", self._conn.endpoint_addresses)
        try:
            self._check_cancel(response)
        except BaseException as exc:
            self._fail(exc)
            raise
        events = tuple(
            WatchEvent(
                type=WatchEventType(ev.type),
                kv=_kv(ev.kv),
                prev_kv=_kv(ev.prev_kv) if ev.HasField("prev_kv") else None,
            )
            for ev in response.events
        )
        return WatchBatch(events=events, header_revision=response.header.revision)

    async def request_progress(self) -> None:
        """Ask etcd for a progress notification (an empty batch) on this stream."""
        call = self._call
        if call is None:
            return
        try:
            await call.write(rpc_pb2.WatchRequest(progress_request=rpc_pb2.WatchProgressRequest()))
        except asyncio.CancelledError:
            if cancelling():
                raise
            # The stream was ended meanwhile; its reader reports that.

    def _fail(self, exc: BaseException) -> None:
        if self._endpoint is not None and not isinstance(exc, CompactedError):
            self._conn.stream_failed(self._endpoint, exc, self._token)
            self._endpoint = None  # one failure is reported once
        if self._call is not None:
            self._call.cancel()
            self._call = None

    def abandon(self, error: EtcdError) -> None:
        """Give up on this stream (it went silent, say): its endpoint counts as failed
        and iteration raises ``error``, so the owner reconnects elsewhere."""
        if self._abandoned is None and not self._cancelled:
            self._abandoned = error
            self._fail(error)

    async def cancel(self) -> None:
        self._cancelled = True
        if self._call is not None:
            self._call.cancel()
            self._call = None

    async def __aenter__(self) -> Watch:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.cancel()


__all__ = [
    "Compare",
    "EtcdClient",
    "KeepAliveStream",
    "Op",
    "Watch",
]
