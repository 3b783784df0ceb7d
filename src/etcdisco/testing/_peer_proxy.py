"""Peer proxies: TCP proxies in front of each cluster member's peer port, so that a
member can be cut off from its peers while its clients still reach it (network
partitions without privileges or iptables). Used by
``LocalEtcdCluster(peer_proxies=True)``; see `LocalEtcdCluster.partition`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from ._process import _HOST

_T = TypeVar("_T")


# etcd's rafthttp names the sending member, as hex (types.ID.String()), in this header
# on every raft request: the stream GETs (/raft/stream/...), the pipeline POSTs (/raft)
# and snapshots. Go canonicalises the header name, so the exact bytes are known.
_SENDER_HEADER = b"\r\nX-Server-From: "
_HEAD_LIMIT = 64 * 1024
# How long the proxy waits for the first request head of a new connection.
_HEAD_TIMEOUT = 10.0


class _PeerConnection:
    """One TCP connection through a peer proxy: which proxy took it, and every member
    seen sending on it (Go's HTTP client reuses connections: the header can come with
    a later request than the first)."""

    def __init__(self, proxy: int) -> None:
        self.proxy = proxy
        self.senders: set[str] = set()
        self.transports: list[asyncio.WriteTransport] = []
        self._carry = b""

    def scan(self, chunk: bytes) -> bool:
        """Note the senders named in ``chunk``; True when a complete header was seen.
        A header split across reads is found by scanning the previous read's tail
        along with this one."""
        data = self._carry + chunk
        found = False
        start = 0
        while (at := data.find(_SENDER_HEADER, start)) >= 0:
            end = data.find(b"\r\n", at + len(_SENDER_HEADER))
            if end < 0:
                self._carry = data[at:]
                return found
            self.senders.add(data[at + len(_SENDER_HEADER) : end].decode("ascii", "replace"))
            found = True
            start = end
        self._carry = data[-(len(_SENDER_HEADER) + 20) :]
        return found

    def abort(self) -> None:
        for transport in self.transports:
            transport.abort()


class _PeerProxies:
    """A TCP proxy in front of each member's peer port, all on one asyncio loop on a
    thread of its own, so that a member can be cut off from its peers while its
    clients still reach it (see `LocalEtcdCluster.partition`).

    Member i advertises proxy i's port; the proxy forwards to the member's real peer
    port. Cutting member X off means: refuse (accept and close at once) every
    connection arriving at X's proxy, and every connection at the other proxies on
    which X's id appears in ``X-Server-From``. Connections that never carry the header
    (etcd's version probes, the raft prober, lease renewals a follower forwards to its
    leader) may pass at the other proxies: they move no raft messages, and a cut-off
    member loses its leader within an election timeout, after which it forwards no
    lease renewals either.
    """

    def __init__(self, count: int) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="etcd-peer-proxies", daemon=True
        )
        self._thread.start()
        self._targets = [0] * count
        self._cut: set[int] = set()
        self._cut_ids: set[str] = set()
        self._connections: set[_PeerConnection] = set()
        # Only touched on the loop's thread; read through `senders`.
        self.senders_seen: set[str] = set()
        self._servers: list[asyncio.Server] = []
        try:
            self.ports = [self._call(self._listen(i)) for i in range(count)]
        except BaseException:
            self.close()
            raise

    def _call(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10.0)

    async def _listen(self, index: int) -> int:
        server = await asyncio.start_server(
            lambda r, w: self._handle(index, r, w), _HOST, 0, limit=_HEAD_LIMIT
        )
        self._servers.append(server)
        port: int = server.sockets[0].getsockname()[1]
        return port

    def set_target(self, index: int, port: int) -> None:
        self._targets[index] = port

    def _refused(self, conn: _PeerConnection) -> bool:
        return conn.proxy in self._cut or bool(conn.senders & self._cut_ids)

    async def _handle(
        self, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        conn = _PeerConnection(index)
        conn.transports.append(writer.transport)
        try:
            upstream = await self._open(conn, reader)
            if upstream is None:
                return
            up_reader, up_writer, head = upstream
            conn.transports.append(up_writer.transport)
            self._connections.add(conn)
            up_writer.write(head)
            await asyncio.gather(
                self._pump(conn, reader, up_writer, scan=True),
                self._pump(conn, up_reader, writer, scan=False),
            )
        finally:
            self._connections.discard(conn)
            conn.abort()

    async def _open(
        self, conn: _PeerConnection, reader: asyncio.StreamReader
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes] | None:
        """Read the first request head and connect upstream, unless refused."""
        if conn.proxy in self._cut:
            return None
        try:
            # Go's HTTP client writes its request as soon as it is connected, so the
            # first head is there to read before anything goes upstream.
            async with asyncio.timeout(_HEAD_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return None
        conn.scan(head)
        self.senders_seen |= conn.senders
        if self._refused(conn):
            return None
        try:
            up_reader, up_writer = await asyncio.open_connection(_HOST, self._targets[conn.proxy])
        except OSError:
            return None
        # A cut made while connecting did not see this connection yet.
        if self._refused(conn):
            up_writer.transport.abort()
            return None
        return up_reader, up_writer, head

    async def _pump(
        self,
        conn: _PeerConnection,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        *,
        scan: bool,
    ) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            while chunk := await src.read(65536):
                if scan and conn.scan(chunk):
                    self.senders_seen |= conn.senders
                    if self._refused(conn):
                        conn.abort()
                        return
                dst.write(chunk)
                await dst.drain()
        # One side ended: end the other too (a half-open peer connection helps nobody).
        conn.abort()

    def senders(self) -> frozenset[str]:
        async def copy() -> frozenset[str]:
            return frozenset(self.senders_seen)

        return self._call(copy())

    def cut(self, index: int, member_id: str) -> None:
        async def cut() -> None:
            self._cut.add(index)
            self._cut_ids.add(member_id)
            for conn in list(self._connections):
                # Connections with no sender seen yet may be the cut member's too.
                if self._refused(conn) or not conn.senders:
                    conn.abort()

        self._call(cut())

    def heal(self, index: int, member_id: str) -> None:
        async def heal() -> None:
            self._cut.discard(index)
            self._cut_ids.discard(member_id)

        self._call(heal())

    def close(self) -> None:
        if self._loop.is_closed():
            return

        async def stop() -> None:
            for server in self._servers:
                server.close()
            for conn in list(self._connections):
                conn.abort()
            for server in self._servers:
                await server.wait_closed()

        with contextlib.suppress(Exception):
            self._call(stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5.0)
        if not self._thread.is_alive():
            self._loop.close()
