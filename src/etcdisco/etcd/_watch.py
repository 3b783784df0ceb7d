"""A watch stream on one key range, and how its ends surface as typed errors."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import grpc.aio

from .._errors import (
    AuthError,
    ClosedError,
    CompactedError,
    EtcdError,
    EtcdTimeoutError,
    UnavailableError,
)
from .._tasks import cancelling
from ._connection import Connection, _Endpoint, map_error
from ._proto import rpc_pb2
from ._types import EOF, WatchBatch, WatchEvent, WatchEventType, kv_from_pb

__all__ = ["Watch"]

# Events converted between two yields to the event loop (a few ms of work).
_CONVERT_SLICE = 1000
_EVENT_TYPES = {t.value: t for t in WatchEventType}


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
        if response is EOF:
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
        if response is EOF:
            if self._cancelled:
                raise StopAsyncIteration
            self._fail(UnavailableError("watch stream ended"))
            raise UnavailableError("watch stream ended", self._conn.endpoint_addresses)
        try:
            self._check_cancel(response)
        except BaseException as exc:
            self._fail(exc)
            raise
        events: list[WatchEvent] = []
        for n, ev in enumerate(response.events, 1):
            events.append(
                WatchEvent(
                    type=_EVENT_TYPES[ev.type],
                    kv=kv_from_pb(ev.kv),
                    prev_kv=kv_from_pb(ev.prev_kv) if ev.HasField("prev_kv") else None,
                )
            )
            if not n % _CONVERT_SLICE:
                # One response can carry a whole mass expiry (a revoked lease's keys,
                # 20,000 of them): let the loop breathe while converting it.
                await asyncio.sleep(0)
        return WatchBatch(events=tuple(events), header_revision=response.header.revision)

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
