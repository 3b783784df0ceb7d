"""What etcd holds, read by the supervisor from outside the library under test's
registries and caches (its own thin etcd client, etcdctl and /metrics)."""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import json
import re
from typing import Any

from etcdisco import CompactedError, MalformedValueError
from etcdisco._local_etcd import LocalEtcdCluster
from etcdisco._model import decode_instance
from etcdisco.etcd import EtcdClient

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


_METRIC = re.compile(rb"^(etcd_debugging_mvcc_watch(?:_stream|er)_total) (\S+)$", re.M)


class EtcdView:
    def __init__(self, cluster: LocalEtcdCluster) -> None:
        self.cluster = cluster
        self.client = EtcdClient(endpoints=cluster.endpoints, timeout=5.0)

    async def close(self) -> None:
        await self.client.close()

    async def registry(self) -> Registry:
        result = await self.client.get(PREFIX + "/", prefix=True)
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
        result = await self.client.delete(key)
        return result.deleted

    async def compact_now(self) -> str:
        """Compact at the current revision; says which, for the report."""
        revision = (await self.client.get("soak-compaction-probe")).revision
        try:
            await self.client.compact(revision)
        except CompactedError:
            # Nothing written since the last compaction: history already ends here.
            return f"{revision}, already compacted there"
        return str(revision)

    async def leases(self) -> set[int]:
        result = await asyncio.to_thread(
            self.cluster.etcdctl, "lease", "list", "-w", "json", timeout=15.0
        )
        return {int(item["id"]) for item in json.loads(result.stdout).get("leases") or []}

    async def watch_metrics(self) -> dict[str, dict[str, float]]:
        """Per running member: open watch streams and watchers, from its /metrics."""
        return await asyncio.to_thread(self._watch_metrics)

    def _watch_metrics(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for member in self.cluster.members:
            if not member.running:
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
