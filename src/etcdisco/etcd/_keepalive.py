"""The lease keepalive stream: one per client, shared by all its leases."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Any

import grpc
import grpc.aio

from .._errors import (
    ClosedError,
    EtcdError,
    EtcdTimeoutError,
    LeaseNotFoundError,
    UnavailableError,
)
from .._tasks import cancelling
from ._connection import Connection, _Endpoint, map_error
from ._proto import rpc_pb2
from ._types import EOF

__all__ = ["KeepAliveStream"]


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
                if response is EOF:
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
