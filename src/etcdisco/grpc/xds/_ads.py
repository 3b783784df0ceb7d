"""The Aggregated Discovery Service, state of the world (v3): one :class:`AdsStream` per
client stream, with the bookkeeping the xDS protocol asks of a server.

Per type URL a stream keeps the client's subscription, the last nonce and version it
sent and what it sent (resource name -> revision). The rules:

- A request whose ``response_nonce`` is not the last nonce sent for its type is stale:
  the client has not seen the newest response yet and will send a current request when
  it has (with the full, current subscription), so a stale one is ignored.
- A current request with ``error_detail`` is a NACK: logged with the client's node id;
  the rejected content is not sent again (it would be rejected again) until it changes.
  Without ``error_detail`` it is an ACK.
- A response goes out when the subscription changes (every newly named resource gets
  an answer) or when the content of the subscribed resources changes; never otherwise.
- LDS and CDS responses carry every subscribed resource that exists (state of the
  world); an empty first subscription and ``*`` mean every resource (wildcard).
- A listener asked for by name that is not a registered service is answered with a
  stand-in that fails calls at once (``missing_listener``): gRPC ignores a name's
  absence from a response until it has received the name once, and would otherwise
  hold the first calls for its 15 s does-not-exist timer.
- Nothing is answered before the registry has been read once (``ResourceStore.ready``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import any_pb2

from . import _protos as p
from ._resources import empty_route, missing_listener, pack
from ._store import TYPES, ResourceStore

log = logging.getLogger("etcdisco.xds")

SERVICE_NAME = "envoy.service.discovery.v3.AggregatedDiscoveryService"

# Types where an empty first request means "everything" (the xDS legacy wildcard).
_WILDCARD_TYPES = frozenset({p.LISTENER, p.CLUSTER})


@dataclass
class _TypeState:
    wildcard: bool = False
    names: frozenset[str] = frozenset()
    named_once: bool = False  # after a named request, an empty one no longer means wildcard
    nonce: str = ""
    version: int = 0
    sent: dict[str, int] | None = None  # None: nothing sent yet on this stream

    def subscribe(self, type_url: str, names: list[str]) -> bool:
        """Apply a request's resource names; True when the subscription changed."""
        wanted = frozenset(names)
        if "*" in wanted:
            wildcard = True
            wanted = wanted - {"*"}
        elif not wanted and not self.named_once and type_url in _WILDCARD_TYPES:
            wildcard = True
        else:
            wildcard = False
        if wanted:
            self.named_once = True
        changed = wildcard != self.wildcard or wanted != self.names
        self.wildcard, self.names = wildcard, wanted
        return changed


@dataclass
class AdsStats:
    """Counters over every stream of one server (for logs, tests and metrics)."""

    streams: int = 0
    responses: int = 0
    acks: int = 0
    nacks: int = 0
    last_nack: str = ""


_EOF = object()
_CLOSE = object()
_CHANGED = object()


class AdsStream:
    """One client's ADS stream; ``run()`` is the RPC handler's body."""

    def __init__(
        self,
        store: ResourceStore,
        requests: AsyncIterator[Any],
        context: grpc.aio.ServicerContext[Any, Any],
        stats: AdsStats,
    ) -> None:
        self._store = store
        self._requests = requests
        self._context = context
        self._stats = stats
        self._types: dict[str, _TypeState] = {}
        self._inbox: asyncio.Queue[Any] = asyncio.Queue()
        # Store changes not yet handled: merged, so a client that reads slowly costs one
        # queued marker, not one per registry event.
        self._changed: set[str] = set()
        self._nonces = itertools.count(1)
        self.node = ""
        self.peer = context.peer()

    def close(self) -> None:
        """End the stream with status OK (server shutdown); the client reconnects."""
        self._inbox.put_nowait(_CLOSE)

    async def run(self) -> None:
        reader = asyncio.get_running_loop().create_task(self._read(), name="etcdisco-xds-read")
        self._store.add_listener(self._on_change)
        try:
            while True:
                item = await self._inbox.get()
                if item is _EOF or item is _CLOSE:
                    return
                if item is _CHANGED:
                    changed, self._changed = self._changed, set()
                    for type_url in TYPES:
                        if type_url in changed:
                            await self._respond(type_url, force=False)
                else:
                    await self._on_request(item)
        finally:
            self._store.remove_listener(self._on_change)
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    def _on_change(self, types: frozenset[str]) -> None:
        if not self._changed:
            self._inbox.put_nowait(_CHANGED)
        self._changed |= types

    async def _read(self) -> None:
        try:
            async for request in self._requests:
                self._inbox.put_nowait(request)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The client went away mid-read; the stream simply ends.
            log.debug("ADS stream from %s broke: %s", self.peer, exc)
        self._inbox.put_nowait(_EOF)

    async def _on_request(self, request: Any) -> None:
        type_url: str = request.type_url
        if request.HasField("node") and request.node.id and not self.node:
            # The node is sent on the first request only.
            self.node = request.node.id
            log.info("xDS client %s (%s) connected", self.node, self.peer)
        if type_url not in TYPES:
            log.debug("ignoring request for unserved type %s from %s", type_url, self.node)
            return
        state = self._types.setdefault(type_url, _TypeState())
        # A nonce from before this stream (the client reconnected) answers nothing of ours.
        if request.response_nonce and state.nonce:
            if request.response_nonce != state.nonce:
                log.debug("stale %s request from %s ignored", p.TYPE_NAMES[type_url], self.node)
                return
            if request.HasField("error_detail"):
                self._stats.nacks += 1
                self._stats.last_nack = request.error_detail.message
                log.warning(
                    "xDS client %s rejected %s version %d (keeps version %r): %s",
                    self.node or self.peer,
                    p.TYPE_NAMES[type_url],
                    state.version,
                    request.version_info,
                    request.error_detail.message,
                )
            else:
                self._stats.acks += 1
        changed = state.subscribe(type_url, list(request.resource_names))
        if changed or state.sent is None:
            await self._respond(type_url, force=True)
        # Otherwise an ACK or NACK of the current subscription: nothing to answer. A
        # content change since the last response has its own marker in the inbox, so
        # not comparing the view here costs a 500-stream fan-out nothing per ACK.

    async def _respond(self, type_url: str, *, force: bool) -> None:
        state = self._types.get(type_url)
        if state is None or not self._store.ready:
            return
        if not state.wildcard and not state.names:
            # Nothing subscribed: a client that unsubscribed expects no answer.
            state.sent = {}
            return
        chosen = self._view(type_url, state)
        view = {name: revision for name, revision, _ in chosen}
        if not force and view == state.sent:
            return
        state.version += 1
        state.nonce = str(next(self._nonces))
        state.sent = view
        # The resources are encoded once per distinct content and shared by every stream
        # that sends it; this stream's version and nonce follow as fields of their own
        # (a message's fields may come in any order: the bytes parse as one response).
        envelope = p.discovery_pb2.DiscoveryResponse(
            version_info=str(state.version), nonce=state.nonce
        ).SerializeToString()
        response = self._store.encoded(type_url, chosen) + envelope
        self._stats.responses += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "-> %s %s v%d %s", self.node, p.TYPE_NAMES[type_url], state.version, sorted(view)
            )
        await self._context.write(response)

    def _view(self, type_url: str, state: _TypeState) -> list[tuple[str, int, any_pb2.Any]]:
        """(name, revision, body) of what this client should hold for ``type_url``.

        Names this client asked for by name that the registry does not have get a
        stand-in (revision 0) on LDS and RDS, so its calls fail fast and clearly (see
        ``missing_listener``); wildcard subscribers get only what exists.
        """
        table = self._store.resources(type_url)
        if state.wildcard:
            chosen = [(n, r.revision, r.body) for n, r in sorted(table.items())]
        else:
            chosen = [
                (n, table[n].revision, table[n].body) for n in sorted(state.names) if n in table
            ]
        missing = sorted(state.names - table.keys())
        if type_url == p.LISTENER:
            chosen += [(n, 0, pack(missing_listener(n))) for n in missing]
        elif type_url == p.ROUTE:
            chosen += [(n, 0, pack(empty_route(n))) for n in missing]
        return chosen
