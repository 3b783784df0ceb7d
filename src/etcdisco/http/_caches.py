"""One discovery cache per service per etcdisco client, shared by every transport
(and adapter) built on that client, and closed when the last one lets go.

The watch under the caches is shared anyway (one per prefix per client, see
``etcdisco.discovery``); sharing the cache too means one snapshot and one set of
listeners per service, however many HTTP clients a program makes.
"""

from __future__ import annotations

import logging
import threading
import weakref

from .._async_client import AsyncClient
from .._errors import EtcdiscoError
from ..discovery import CacheState, ServiceCache
from ..sync import Client, SyncServiceCache

log = logging.getLogger("etcdisco.http")

_lock = threading.Lock()
_sync: weakref.WeakKeyDictionary[Client, dict[str, tuple[SyncServiceCache, int]]] = (
    weakref.WeakKeyDictionary()
)
_async: weakref.WeakKeyDictionary[AsyncClient, dict[str, tuple[ServiceCache, int]]] = (
    weakref.WeakKeyDictionary()
)


def acquire_sync(client: Client, service: str) -> SyncServiceCache:
    """The shared cache of ``service`` on ``client`` (opened on first use)."""
    with _lock:
        caches = _sync.setdefault(client, {})
        held = caches.get(service)
        if held is None or held[0].state is CacheState.CLOSED:
            cache = client.discover(service)
            caches[service] = (cache, 1)
            return cache
        caches[service] = (held[0], held[1] + 1)
        return held[0]


def release_sync(client: Client, service: str) -> None:
    with _lock:
        caches = _sync.get(client, {})
        held = caches.get(service)
        if held is None:
            return
        if held[1] > 1:
            caches[service] = (held[0], held[1] - 1)
            return
        del caches[service]
    if not client.closed:
        try:
            held[0].close()
        except EtcdiscoError as exc:
            log.warning("%s: closing the discovery cache failed: %s", service, exc)


async def acquire_async(client: AsyncClient, service: str) -> ServiceCache:
    """The shared cache of ``service`` on ``client`` (opened on first use)."""
    caches = _async.setdefault(client, {})
    held = caches.get(service)
    if held is None or held[0].state is CacheState.CLOSED:
        cache = await client.discover(service)
        held = caches.get(service)  # another task may have opened one meanwhile
        if held is None or held[0].state is CacheState.CLOSED:
            caches[service] = (cache, 1)
            return cache
        await cache.close()
    caches[service] = (held[0], held[1] + 1)
    return held[0]


async def release_async(client: AsyncClient, service: str) -> None:
    caches = _async.get(client, {})
    held = caches.get(service)
    if held is None:
        return
    if held[1] > 1:
        caches[service] = (held[0], held[1] - 1)
        return
    del caches[service]
    if not client.closed:
        try:
            await held[0].close()
        except EtcdiscoError as exc:
            log.warning("%s: closing the discovery cache failed: %s", service, exc)
