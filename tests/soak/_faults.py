"""The fault injector: one fault at a time, healed, then converged on.

Fault durations are timers on purpose (a soak is about how long things stay broken);
everything after a heal is a bounded wait on observed state.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from typing import Protocol

from etcdisco._local_etcd import LocalEtcd, LocalEtcdCluster

from ._children import Child
from ._etcd_view import EtcdView
from ._invariants import Ledger
from ._layout import instances_of

FAULT_KINDS = ("member_kill", "instance_pause", "key_delete", "compaction", "instance_kill")
# A crashed process's keys must be gone from etcd and every cache within ttl + this:
# etcd checks for expired leases every 500 ms, and a loaded machine adds seconds.
VANISH_MARGIN = 10.0


class SoakContext(Protocol):
    cluster: LocalEtcdCluster
    view: EtcdView
    instances: list[Child]
    watchers: list[Child]
    ttl: int
    bound: float
    ledger: Ledger

    async def converge(self, what: str, bound: float) -> float | None: ...

    def expected_keys(self) -> set[str]: ...

    async def start_child(self, child: Child) -> None: ...

    def note(self, message: str) -> None: ...


@dataclasses.dataclass
class FaultRecord:
    kind: str
    detail: str = ""
    started: float = 0.0  # seconds since the soak began
    convergence: float | None = None  # heal -> converged; None when the bound passed
    facts: dict[str, float] = dataclasses.field(default_factory=dict)


def process_index(child: Child) -> int:
    return int(child.name.removeprefix("instance"))


class FaultInjector:
    def __init__(self, ctx: SoakContext, rng: random.Random) -> None:
        self._ctx = ctx
        self._rng = rng
        self._order = list(FAULT_KINDS)
        rng.shuffle(self._order)
        self.records: list[FaultRecord] = []
        self._compactions = 0

    def next_kind(self) -> str:
        """Every kind once (in a seeded order), then seeded random picks."""
        done = len(self.records)
        return self._order[done] if done < len(self._order) else self._rng.choice(FAULT_KINDS)

    async def inject(self, kind: str) -> FaultRecord:
        record = FaultRecord(kind, started=self._ctx.ledger.now())
        self.records.append(record)
        await getattr(self, f"_{kind}")(record)
        return record

    async def _settle(self, record: FaultRecord) -> None:
        record.convergence = await self._ctx.converge(
            f"after {record.kind} ({record.detail})", self._ctx.bound
        )

    # -- 1. an etcd member crashes ----------------------------------------------------

    async def _member_kill(self, record: FaultRecord) -> None:
        cluster = self._ctx.cluster
        leader = await asyncio.to_thread(cluster.leader)
        if leader is not None and self._rng.random() < 0.5:
            member, why = leader, "the leader"
        else:
            member = self._rng.choice(cluster.members)
            why = "the leader" if member is leader else "a follower"
        down = self._rng.uniform(1.0, 4.0)
        record.detail = f"SIGKILL {member.name} ({why}), restart after {down:.1f}s"
        self._ctx.note(f"fault {record.kind}: {record.detail}")
        await asyncio.to_thread(member.kill)
        await asyncio.sleep(down)
        await self._restart_member(member, record)
        await self._settle(record)

    async def _restart_member(self, member: LocalEtcd, record: FaultRecord) -> None:
        began = time.monotonic()
        await asyncio.to_thread(member.start, 30.0)
        record.facts["member_restart_s"] = time.monotonic() - began

    # -- 2. an instance process stops for longer than its TTL ---------------------------

    async def _instance_pause(self, record: FaultRecord) -> None:
        child = self._rng.choice([c for c in self._ctx.instances if c.live])
        stopped_for = self._ctx.ttl + self._rng.uniform(1.0, 3.0)
        keys = {spec.key for spec in instances_of(process_index(child))}
        record.detail = f"SIGSTOP {child.name} for {stopped_for:.1f}s (ttl {self._ctx.ttl}s)"
        self._ctx.note(f"fault {record.kind}: {record.detail}")
        await child.pause()
        await asyncio.sleep(stopped_for)
        # Whether etcd really let the leases go: a pause the registry did not notice
        # proves little, so the report says how often the keys were gone.
        registry = await self._ctx.view.registry()
        record.facts["keys_expired"] = float(not (keys & registry.entries.keys()))
        await child.resume()
        await self._settle(record)

    # -- 3. a key is deleted from outside -------------------------------------------------

    async def _key_delete(self, record: FaultRecord) -> None:
        key = await self._pick_key()
        record.detail = f"delete {key} from outside"
        self._ctx.note(f"fault {record.kind}: {record.detail}")
        deleted = await self._ctx.view.delete(key)
        record.facts["deleted"] = float(deleted)
        await self._settle(record)
        if record.convergence is None:
            self._ctx.ledger.fail("restore", f"{key} was not put back (see convergence)")
        else:
            self._ctx.ledger.ok("restore")

    async def _pick_key(self) -> str:
        """A key a live process should hold, preferably one etcd has now (after an
        earlier failure etcd may lack some, or all)."""
        expected = self._ctx.expected_keys()
        present = expected & (await self._ctx.view.registry()).entries.keys()
        return self._rng.choice(sorted(present or expected))

    # -- 4. compaction, sometimes with a watcher left behind across it --------------------

    async def _compaction(self, record: FaultRecord) -> None:
        self._compactions += 1
        if self._compactions % 2 == 1:
            await self._compaction_behind(record)
            return
        record.detail = "compact at the current revision"
        self._ctx.note(f"fault {record.kind}: {record.detail}")
        revision = await self._ctx.view.compact_now()
        record.detail += f" ({revision})"
        await self._settle(record)

    async def _compaction_behind(self, record: FaultRecord) -> None:
        """A stopped watcher's etcd member dies, changes it cannot see happen, history
        is compacted past them: once continued, the watcher must resume from a
        compacted revision and re-list."""
        ctx = self._ctx
        watcher = self._rng.choice([w for w in ctx.watchers if w.live])
        ports = watcher.connected_ports()
        members = [m for m in ctx.cluster.members if m.client_port in ports and m.running]
        member = self._rng.choice(members) if members else None
        before = await watcher.request("snapshot", 10.0)
        victim = await self._pick_key()
        record.detail = (
            f"SIGSTOP {watcher.name}; SIGKILL its member "
            f"{member.name if member else '(none found)'}; delete {victim}; compact; "
            "restart the member; SIGCONT"
        )
        ctx.note(f"fault {record.kind}: {record.detail}")
        await watcher.pause()
        # Killed first, so the changes below cannot reach the stopped watcher's socket
        # (a live member would deliver them into its buffers, and it would not be behind).
        if member is not None:
            await asyncio.to_thread(member.kill)
        await ctx.view.delete(victim)
        # The registry puts the key back: two revisions the stopped watcher misses.
        restored = await ctx.converge(f"{victim} put back while {watcher.name} is stopped", 30.0)
        revision = await ctx.view.compact_now()
        record.detail += f" (compacted at {revision})"
        if member is not None:
            await self._restart_member(member, record)
        await watcher.resume()
        await self._settle(record)
        if restored is not None:
            record.facts["restore_s"] = restored
        after = await watcher.request("snapshot", 10.0)
        relisted = after["resyncs"] > before["resyncs"]
        record.facts["relisted"] = float(relisted)
        if member is not None:
            # Its stream died with the member, and history before the compaction is
            # gone: the watcher can only have caught up by listing again.
            ctx.ledger.check(
                "relist", [] if relisted else [f"{watcher.name} caught up without a re-list"]
            )

    # -- 5. an instance process crashes and is restarted ----------------------------------

    async def _instance_kill(self, record: FaultRecord) -> None:
        ctx = self._ctx
        child = self._rng.choice([c for c in ctx.instances if c.live])
        record.detail = f"SIGKILL {child.name}, restart once its keys are gone"
        ctx.note(f"fault {record.kind}: {record.detail}")
        await child.kill()
        # Its keys must leave etcd by lease expiry alone, and every cache must follow.
        vanished = await ctx.converge(f"{child.name}'s keys vanish after SIGKILL", ctx.bound)
        if vanished is not None:
            record.facts["vanish_s"] = vanished
            if vanished <= ctx.ttl + VANISH_MARGIN:
                ctx.ledger.ok("vanish")
            else:
                ctx.ledger.fail(
                    "vanish",
                    f"{child.name}'s keys took {vanished:.1f}s to leave etcd and the caches "
                    f"(bound: ttl {ctx.ttl}s + {VANISH_MARGIN:.0f}s)",
                )
        else:
            ctx.ledger.fail("vanish", f"{child.name}'s keys did not vanish (see convergence)")
        await ctx.start_child(child)
        await self._settle(record)
