"""What etcd holds, read by the supervisor from outside the library under test's
registries and caches (its own thin etcd client, etcdctl and /metrics).

The supervisor knows which members its faults made unusable (stopped, stalled, cut
off), so it asks a healthy one directly, one client per member, instead of relying on
the failover of the library it is testing: a soak that goes blind during a fault can
only miss findings.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from etcdisco import AuthError, CompactedError, EtcdError, MalformedValueError, decode_instance
from etcdisco.etcd import EtcdClient
from etcdisco.testing import Credentials, LocalEtcd, LocalEtcdCluster

from ._layout import PREFIX


@dataclasses.dataclass(frozen=True)
class Entry:
    """One key under the registry prefix, as etcd has it."""

    key: str
    service: str
    address: str
    metadata: dict[str, Any]
    revision: int
    lease: int

    def comparable(self) -> tuple[str, str, str, int, int]:
        return (
            self.service,
            self.address,
            json.dumps(self.metadata, sort_keys=True),
            self.revision,
            self.lease,
        )

    def describe(self) -> str:
        return (
            f"{self.key} -> {self.address} {json.dumps(self.metadata, sort_keys=True)} "
            f"mod_revision={self.revision} lease={self.lease:x}"
        )


@dataclasses.dataclass(frozen=True)
class Registry:
    revision: int
    entries: dict[str, Entry]
    malformed: dict[str, bytes]


_T = TypeVar("_T")
# Per call on one member; a stalled member must not hold a sample up for long.
_CALL_TIMEOUT = 3.0

_METRIC = re.compile(rb"^(etcd_debugging_mvcc_watch(?:_stream|er)_total) (\S+)$", re.M)


class EtcdView:
    def __init__(self, cluster: LocalEtcdCluster, credentials: Credentials | None = None) -> None:
        self.cluster = cluster
        self._credentials = credentials
        self._clients = {m.name: self._client(m) for m in cluster.members}
        # Members a fault has made unusable: tried last, if at all.
        self.avoid: set[str] = set()

    def _client(self, member: LocalEtcd) -> EtcdClient:
        creds = self._credentials
        return EtcdClient(
            endpoints=[member.endpoint],
            timeout=_CALL_TIMEOUT,
            username=creds.user if creds else None,
            password=creds.password if creds else None,
        )

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()

    def usable(self) -> list[LocalEtcd]:
        return [m for m in self.cluster.members if m.running and m.name not in self.avoid]

    async def _call(self, call: Callable[[EtcdClient], Awaitable[_T]]) -> _T:
        """``call`` on the first usable member that answers; the last error if none."""
        error: EtcdError = EtcdError("no usable etcd member")
        for member in self.usable():
            try:
                return await call(self._clients[member.name])
            except AuthError as exc:
                # A fresh client authenticates afresh: the supervisor must see etcd
                # even when the library's token renewal (under test) does not work.
                error = exc
                await self._clients[member.name].close()
                self._clients[member.name] = self._client(member)
            except EtcdError as exc:
                error = exc
        raise error

    @property
    def client(self) -> EtcdClient:
        """A client of some usable member, for one-off calls."""
        members = self.usable() or self.cluster.members
        return self._clients[members[0].name]

    async def registry(self) -> Registry:
        result = await self._call(lambda c: c.get(PREFIX + "/", prefix=True))
        entries: dict[str, Entry] = {}
        malformed: dict[str, bytes] = {}
        for kv in result.kvs:
            key = kv.key.decode("utf-8", "replace")
            try:
                inst = decode_instance(PREFIX, kv.key, kv.value, kv.mod_revision, kv.lease)
            except MalformedValueError:
                malformed[key] = kv.value
                continue
            entries[key] = Entry(
                key=key,
                service=inst.service,
                address=inst.address,
                metadata=dict(inst.metadata),
                revision=kv.mod_revision,
                lease=kv.lease,
            )
        return Registry(result.revision, entries, malformed)

    async def delete(self, key: str) -> int:
        result = await self._call(lambda c: c.delete(key))
        return result.deleted

    async def compact_now(self) -> str:
        """Compact at the current revision; says which, for the report."""
        revision = (await self._call(lambda c: c.get("soak-compaction-probe"))).revision
        try:
            await self._call(lambda c: c.compact(revision))
        except CompactedError:
            # Nothing written since the last compaction: history already ends here.
            return f"{revision}, already compacted there"
        return str(revision)

    async def leases(self) -> set[int]:
        member = (self.usable() or self.cluster.members)[0]
        result = await asyncio.to_thread(
            member.etcdctl, "lease", "list", "-w", "json", timeout=15.0
        )
        return {int(item["id"]) for item in json.loads(result.stdout).get("leases") or []}

    async def watch_metrics(self) -> dict[str, dict[str, float]]:
        """Per running member: open watch streams and watchers, from its /metrics."""
        return await asyncio.to_thread(self._watch_metrics)

    def _watch_metrics(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for member in self.cluster.members:
            if not member.running or member.paused:
                continue
            conn = http.client.HTTPConnection("127.0.0.1", member.client_port, timeout=5.0)
            try:
                conn.request("GET", "/metrics")
                body = conn.getresponse().read()
            finally:
                conn.close()
            out[member.name] = {
                name.decode(): float(value) for name, value in _METRIC.findall(body)
            }
        return out
