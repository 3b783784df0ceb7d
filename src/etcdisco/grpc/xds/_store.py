"""The resources the control plane currently serves, with a revision per resource.

A resource's revision changes only when its serialized content changes, so a stream
can tell in O(subscribed names) whether what it last sent is still current, and a
registry event that changes nothing a client sees (a metadata key nobody reads) sends
nothing.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import any_pb2

from . import _protos as p

TYPES = (p.LISTENER, p.ROUTE, p.CLUSTER, p.ENDPOINT)

# Encoded responses kept at most: one per distinct subscription between two changes;
# past this (many clients, each asking for different services) the cache starts over.
_ENCODED_MAX = 4096

ChangeListener = Callable[[frozenset[str]], None]


@dataclass(frozen=True)
class Resource:
    name: str
    revision: int
    body: any_pb2.Any


class ResourceStore:
    """Resources by type URL and name; listeners hear which types changed.

    ``ready`` stays false until the registry has been read once: before that an absent
    resource means "not loaded yet", and answering would make clients conclude that
    their service does not exist.
    """

    def __init__(self) -> None:
        self._by_type: dict[str, dict[str, Resource]] = {t: {} for t in TYPES}
        self._revisions = itertools.count(1)
        self._listeners: list[ChangeListener] = []
        # (type URL, ((name, revision), ...)) -> the DiscoveryResponse fields carrying
        # those resources, encoded; emptied whenever a resource changes.
        self._encoded: dict[tuple[str, tuple[tuple[str, int], ...]], bytes] = {}
        self.ready = False

    def add_listener(self, listener: ChangeListener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: ChangeListener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def resources(self, type_url: str) -> Mapping[str, Resource]:
        return self._by_type[type_url]

    def put(self, name: str, messages: Mapping[str, Any] | None) -> frozenset[str]:
        """Set (or with None, delete) the resources named ``name``; returns and announces
        the type URLs whose content changed."""
        changed: set[str] = set()
        for type_url in TYPES:
            table = self._by_type[type_url]
            message = None if messages is None else messages.get(type_url)
            if message is None:
                if table.pop(name, None) is not None:
                    changed.add(type_url)
                continue
            # Deterministic bytes, so equal content compares equal; they are also what
            # the Any carries, so each resource is serialized once.
            data = message.SerializeToString(deterministic=True)
            current = table.get(name)
            if current is not None and current.body.value == data:
                continue
            body = any_pb2.Any(type_url=type_url, value=data)
            table[name] = Resource(name, next(self._revisions), body)
            changed.add(type_url)
        result = frozenset(changed)
        if result:
            self._encoded.clear()
        if result and self.ready:
            self._announce(result)
        return result

    def encoded(self, type_url: str, chosen: Sequence[tuple[str, int, any_pb2.Any]]) -> bytes:
        """The ``type_url`` and ``resources`` fields of a DiscoveryResponse carrying
        ``chosen`` ((name, revision, body) each), serialized once for every stream that
        sends the same resources (a fan-out to 500 streams encodes them once)."""
        key = (type_url, tuple((name, revision) for name, revision, _ in chosen))
        data = self._encoded.get(key)
        if data is None:
            if len(self._encoded) >= _ENCODED_MAX:
                self._encoded.clear()
            data = p.discovery_pb2.DiscoveryResponse(
                type_url=type_url, resources=[body for _, _, body in chosen]
            ).SerializeToString()
            self._encoded[key] = data
        return data

    def mark_ready(self) -> None:
        """The registry has been read: every stream may now answer."""
        if not self.ready:
            self.ready = True
            self._announce(frozenset(TYPES))

    def _announce(self, types: frozenset[str]) -> None:
        for listener in list(self._listeners):
            listener(types)
