"""The fault injector: one fault at a time (or a planned pair of them), healed, then
converged on.

Fault durations are timers on purpose (a soak is about how long things stay broken);
everything after a heal is a bounded wait on observed state.

Which faults a run gets: the seed orders them. A first round interleaves the faults
that break registries the hardest (a stalled member, a partition, operations during an
outage) with the others, so that a 120 s run always has all three of those and a 60 s
run some of each; later rounds are seeded shuffles of every kind. A fault only starts
when its usual length fits in the time left. ``--kinds`` restricts the kinds (in the
order given, then shuffled rounds of them).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any, Protocol

from etcdisco.testing import LocalEtcd, LocalEtcdCluster

from ._children import Child
from ._etcd_view import EtcdView
from ._invariants import Ledger, Persistence
from ._layout import instances_of
from ._ops import OP_TIMEOUT, Operation, OpsBook

FAULT_KINDS = (
    "member_kill",
    "instance_pause",
    "key_delete",
    "compaction",
    "instance_kill",
    "member_stall",
    "partition",
    "outage_ops",
    "overlap",
)
# The faults a registry library most often gets wrong (DESIGN.md section 5, items 11
# to 14): every run of 120 s has each of them.
FIRST_KINDS = ("member_stall", "partition", "outage_ops")
# Usual seconds from injection to convergence when the library behaves (measured on
# 2 cores); a fault only starts when this fits in what is left of the run.
FAULT_COST = {
    "member_kill": 8.0,
    "instance_pause": 9.0,
    "key_delete": 3.0,
    "compaction": 5.0,
    "instance_kill": 10.0,
    "member_stall": 15.0,
    "partition": 15.0,
    "outage_ops": 18.0,
    "overlap": 16.0,
}
# Quorum held (the member carrying the process's streams is broken) or lost (two
# members stopped). A run's first outage keeps quorum: there a lease outlives the
# outage, so nothing but the library's own follow-up can repair what an operation
# left behind (with quorum lost, leases are often given up and everything re-put).
QUORUM_VARIANTS = ("stall", "partition")
NO_QUORUM_VARIANTS = ("no_quorum_stop", "no_quorum_kill")
OVERLAP_VARIANTS = ("stall+pause", "partition+delete", "partition+kill", "stall+compaction")
# A crashed process's keys must be gone from etcd and every cache within ttl + this:
# etcd checks for expired leases every 500 ms, and a loaded machine adds seconds.
VANISH_MARGIN = 10.0
# The clocks of the sampled invariants (see Soak.clocks).
ALL_CLOCKS = (
    "presence",
    "caches_follow",
    "held_suspects",
    "synced_truthful",
    "metadata_matches",
)


class SoakContext(Protocol):
    cluster: LocalEtcdCluster
    view: EtcdView
    instances: list[Child]
    watchers: list[Child]
    ttl: int
    bound: float
    ledger: Ledger
    ops: OpsBook
    clocks: dict[str, Persistence]

    async def converge(self, what: str, bound: float) -> float | None: ...

    def expected_keys(self) -> set[str]: ...

    async def start_child(self, child: Child) -> None: ...

    async def statuses(self) -> dict[str, dict[str, Any]]: ...

    def note(self, message: str) -> None: ...


@dataclasses.dataclass
class FaultRecord:
    kind: str
    detail: str = ""
    started: float = 0.0  # seconds since the soak began
    convergence: float | None = None  # heal -> converged; None when the bound passed
    facts: dict[str, float] = dataclasses.field(default_factory=dict)
    variant: str = ""
    operations: list[Operation] = dataclasses.field(default_factory=list)


def process_index(child: Child) -> int:
    return int(child.name.removeprefix("instance"))


def _interleave(first: list[str], rest: list[str]) -> list[str]:
    out: list[str] = []
    for index in range(max(len(first), len(rest))):
        out += first[index : index + 1] + rest[index : index + 1]
    return out


class FaultInjector:
    def __init__(
        self,
        ctx: SoakContext,
        rng: random.Random,
        kinds: tuple[str, ...] | None = None,
        auth: bool = False,
    ) -> None:
        self._ctx = ctx
        self._rng = rng
        if kinds:
            self._pool = tuple(kinds)
            self._queue = list(kinds)
        else:
            self._pool = FAULT_KINDS
            first = list(FIRST_KINDS)
            rest = [k for k in FAULT_KINDS if k not in FIRST_KINDS]
            rng.shuffle(first)
            rng.shuffle(rest)
            if auth:
                # Only a restarted member invalidates tokens: have one early.
                rest.remove("member_kill")
                rest.insert(0, "member_kill")
            self._queue = _interleave(first, rest)
        self._variants: dict[str, list[str]] = {}
        held, lost = list(QUORUM_VARIANTS), list(NO_QUORUM_VARIANTS)
        overlaps = list(OVERLAP_VARIANTS)
        for order in (held, lost, overlaps):
            rng.shuffle(order)
        self._variants["outage_ops"] = _interleave(held, lost)
        self._variants["overlap"] = overlaps
        self.records: list[FaultRecord] = []
        self._compactions = 0
        self._version = 0

    def next_kind(self, remaining: float) -> str | None:
        """The next kind whose usual length fits in ``remaining`` seconds, or None."""
        if not self._queue:
            self._queue = list(self._pool)
            self._rng.shuffle(self._queue)
        for index, kind in enumerate(self._queue):
            if FAULT_COST[kind] <= remaining:
                return self._queue.pop(index)
        # The end of the run: a short fault rather than idle time.
        short = sorted(k for k in self._pool if FAULT_COST[k] <= remaining)
        return self._rng.choice(short) if short else None

    def _variant(self, kind: str) -> str:
        """Variants in a seeded order, round after round."""
        order = self._variants[kind]
        done = sum(1 for r in self.records if r.kind == kind) - 1
        return order[done % len(order)]

    async def inject(self, kind: str) -> FaultRecord:
        record = FaultRecord(kind, started=self._ctx.ledger.now())
        self.records.append(record)
        await getattr(self, f"_{kind}")(record)
        return record

    async def _settle(self, record: FaultRecord) -> None:
        record.convergence = await self._ctx.converge(
            f"after {record.kind} ({record.detail})", self._ctx.bound
        )

    def _announce(self, record: FaultRecord) -> None:
        self._ctx.note(f"fault {record.kind}: {record.detail}")

    # -- building blocks ------------------------------------------------------------------

    def _live_instances(self) -> list[Child]:
        return [c for c in self._ctx.instances if c.live]

    def _members_of(self, child: Child) -> list[LocalEtcd]:
        """The members this child has a connection to (its keepalive or watch stream
        runs on one of them)."""
        ports = child.connected_ports() if child.running else set()
        return [
            m
            for m in self._ctx.cluster.members
            if m.client_port in ports and m.running and not m.paused
        ]

    def _member_of(self, child: Child) -> LocalEtcd | None:
        """A member this child has a connection to, or None when it has none open."""
        members = self._members_of(child)
        return self._rng.choice(members) if members else None

    async def _pick_member(self) -> tuple[LocalEtcd, str]:
        """Sometimes the leader, sometimes a follower, most often the member that
        carries a child's streams (the case that hurts a client most)."""
        cluster = self._ctx.cluster
        choice = self._rng.choice(("leader", "follower", "instance", "instance", "watcher"))
        leader = await asyncio.to_thread(cluster.leader)
        running = [m for m in cluster.members if m.running and not m.paused]
        if choice in ("instance", "watcher"):
            children = self._live_instances() if choice == "instance" else self._ctx.watchers
            child = self._rng.choice([c for c in children if c.live])
            member = self._member_of(child)
            if member is not None:
                role = "the leader" if member is leader else "a follower"
                return member, f"{role}, carrying {child.name}'s streams"
        if choice == "leader" and leader is not None:
            return leader, "the leader"
        followers = [m for m in running if m is not leader] or running
        member = self._rng.choice(followers)
        return member, "the leader" if member is leader else "a follower"

    async def _pick_key(self, process: int | None = None) -> str:
        """A key a live process should hold (of ``process`` if given), preferably one
        etcd has now (after an earlier failure etcd may lack some, or all)."""
        expected = self._ctx.expected_keys()
        if process is not None:
            own = {spec.key for spec in instances_of(process)} & expected
            expected = own or expected
        present = expected & (await self._ctx.view.registry()).entries.keys()
        return self._rng.choice(sorted(present or expected))

    async def _role(self, member: LocalEtcd) -> str:
        leader = await asyncio.to_thread(self._ctx.cluster.leader)
        return "the leader" if member is leader else "a follower"

    async def _leases(self) -> dict[str, set[int]]:
        statuses = await self._ctx.statuses()
        return {name: {reg["lease"] for reg in s["regs"]} for name, s in statuses.items()}

    @contextlib.asynccontextmanager
    async def _stalled(self, *members: LocalEtcd) -> AsyncIterator[None]:
        """SIGSTOP: the members keep their sockets open and answer nothing."""
        view = self._ctx.view
        try:
            for member in members:
                view.avoid.add(member.name)
                await asyncio.to_thread(member.pause)
            yield
        finally:
            for member in members:
                if member.paused:
                    await asyncio.to_thread(member.resume)
                view.avoid.discard(member.name)

    @contextlib.asynccontextmanager
    async def _partitioned(self, member: LocalEtcd) -> AsyncIterator[None]:
        cluster, view = self._ctx.cluster, self._ctx.view
        view.avoid.add(member.name)
        try:
            await asyncio.to_thread(cluster.partition, member)
            yield
        finally:
            await asyncio.to_thread(cluster.heal, member)
            view.avoid.discard(member.name)

    @contextlib.asynccontextmanager
    async def _killed(self, record: FaultRecord, *members: LocalEtcd) -> AsyncIterator[None]:
        view = self._ctx.view
        try:
            for member in members:
                view.avoid.add(member.name)
                await asyncio.to_thread(member.kill)
            yield
        finally:
            for member in members:
                await self._restart_member(member, record)
                view.avoid.discard(member.name)

    @contextlib.contextmanager
    def _clocks_paused(self, names: Iterable[str]) -> Iterator[None]:
        clocks = [self._ctx.clocks[name] for name in names]
        for clock in clocks:
            clock.pause(time.monotonic())
        try:
            yield
        finally:
            for clock in clocks:
                clock.resume(time.monotonic())

    async def _restart_member(self, member: LocalEtcd, record: FaultRecord) -> None:
        began = time.monotonic()
        await asyncio.to_thread(member.start, 30.0)
        record.facts["member_restart_s"] = time.monotonic() - began

    def _outage_length(self) -> float:
        # Longer than two TTLs: anything that waits on the broken member for a whole
        # TTL (a keepalive, a watch without a deadline) loses. Up to two TTLs more, so
        # that a client's periodic probe (a progress request every few seconds) falls
        # inside the outage with its answer overdue, as often as not.
        ttl = self._ctx.ttl
        return self._rng.uniform(2.0 * ttl + 3.0, 4.0 * ttl + 3.0)

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
        self._announce(record)
        async with self._killed(record, member):
            await asyncio.sleep(down)
        await self._settle(record)

    # -- 2. an instance process stops for longer than its TTL ---------------------------

    async def _instance_pause(self, record: FaultRecord) -> None:
        child = self._rng.choice(self._live_instances())
        stopped_for = self._ctx.ttl + self._rng.uniform(1.0, 3.0)
        keys = {spec.key for spec in instances_of(process_index(child))}
        record.detail = f"SIGSTOP {child.name} for {stopped_for:.1f}s (ttl {self._ctx.ttl}s)"
        self._announce(record)
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
        self._announce(record)
        deleted = await self._ctx.view.delete(key)
        record.facts["deleted"] = float(deleted)
        await self._settle(record)
        self._check_restored(record, key)

    def _check_restored(self, record: FaultRecord, key: str) -> None:
        if record.convergence is None:
            self._ctx.ledger.fail("restore", f"{key} was not put back (see convergence)")
        else:
            self._ctx.ledger.ok("restore")

    # -- 4. compaction, sometimes with a watcher left behind across it --------------------

    async def _compaction(self, record: FaultRecord) -> None:
        self._compactions += 1
        if self._compactions % 2 == 1:
            await self._compaction_behind(record)
            return
        record.detail = "compact at the current revision"
        self._announce(record)
        revision = await self._ctx.view.compact_now()
        record.detail += f" ({revision})"
        await self._settle(record)

    async def _compaction_behind(self, record: FaultRecord) -> None:
        """A stopped watcher's etcd member dies, changes it cannot see happen, history
        is compacted past them: once continued, the watcher must resume from a
        compacted revision and re-list."""
        ctx = self._ctx
        watcher = self._rng.choice([w for w in ctx.watchers if w.live])
        connected = self._members_of(watcher)
        member = self._rng.choice(connected) if connected else None
        before = await watcher.request("snapshot", 10.0)
        victim = await self._pick_key()
        among = f" (one of {len(connected)} it is connected to)" if len(connected) > 1 else ""
        record.detail = (
            f"SIGSTOP {watcher.name}; SIGKILL its member "
            f"{member.name if member else '(none found)'}{among}; delete {victim}; compact; "
            "restart the member; SIGCONT"
        )
        self._announce(record)
        await watcher.pause()
        # Killed first, so the changes below cannot reach the stopped watcher's socket
        # (a live member would deliver them into its buffers, and it would not be behind).
        async with contextlib.AsyncExitStack() as stack:
            if member is not None:
                await stack.enter_async_context(self._killed(record, member))
            await ctx.view.delete(victim)
            # The registry puts the key back: two revisions the stopped watcher misses.
            restored = await ctx.converge(
                f"{victim} put back while {watcher.name} is stopped", 30.0
            )
            revision = await ctx.view.compact_now()
            record.detail += f" (compacted at {revision})"
        await watcher.resume()
        await self._settle(record)
        if restored is not None:
            record.facts["restore_s"] = restored
        after = await watcher.request("snapshot", 10.0)
        relisted = after["resyncs"] > before["resyncs"]
        record.facts["relisted"] = float(relisted)
        if member is not None and len(connected) == 1:
            # Its stream died with the member, and history before the compaction is
            # gone: the watcher can only have caught up by listing again. (Connected
            # to more than one member, the watch may have run on another, live one,
            # which delivered the changes into the stopped watcher's socket.)
            ctx.ledger.check(
                "relist", [] if relisted else [f"{watcher.name} caught up without a re-list"]
            )

    # -- 5. an instance process crashes and is restarted ----------------------------------

    async def _instance_kill(self, record: FaultRecord) -> None:
        child = self._rng.choice(self._live_instances())
        record.detail = f"SIGKILL {child.name}, restart once its keys are gone"
        self._announce(record)
        await self._kill_and_vanish(record, child)
        await self._ctx.start_child(child)
        await self._settle(record)

    async def _kill_and_vanish(self, record: FaultRecord, child: Child) -> None:
        ctx = self._ctx
        await child.kill()
        ctx.ops.void_process(process_index(child))
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

    # -- 6. an etcd member stalls (SIGSTOP) for longer than the TTL ----------------------

    async def _member_stall(self, record: FaultRecord) -> None:
        """Alive, TCP open, answering nothing: quorum holds, so no registration may
        lose its key for longer than the bound, and caches must keep following (a key
        is deleted meanwhile, so a cache frozen on the stalled member falls behind)."""
        member, why = await self._pick_member()
        length = self._outage_length()
        record.detail = f"SIGSTOP {member.name} ({why}) for {length:.1f}s"
        self._announce(record)
        before = await self._leases()
        async with self._stalled(member):
            await asyncio.sleep(self._ctx.ttl)
            victim = await self._pick_key()
            await self._ctx.view.delete(victim)
            record.detail += f"; {victim} deleted meanwhile"
            await asyncio.sleep(length - self._ctx.ttl)
        await self._settle(record)
        await self._note_lease_losses(record, before)

    async def _note_lease_losses(self, record: FaultRecord, before: dict[str, set[int]]) -> None:
        # Not an invariant: a loaded 2-core machine can delay a keepalive past a 3 s
        # TTL without any fault. The report shows it, for reading next to the faults.
        after = await self._leases()
        changed = [name for name in before.keys() & after.keys() if before[name] != after[name]]
        record.facts["leases_changed"] = float(len(changed))
        if changed:
            record.detail += f"; new lease in {', '.join(sorted(changed))}"

    # -- 7. an etcd member is cut off from its peers ---------------------------------------

    async def _partition(self, record: FaultRecord) -> None:
        """Clients still reach the member, which has no leader: require-leader watches
        on it are cancelled, keepalives through it go nowhere. Quorum holds."""
        member, why = await self._pick_member()
        length = self._outage_length()
        record.detail = f"partition {member.name} ({why}) for {length:.1f}s"
        self._announce(record)
        before = await self._leases()
        async with self._partitioned(member):
            await asyncio.sleep(self._ctx.ttl)
            victim = await self._pick_key()
            await self._ctx.view.delete(victim)
            record.detail += f"; {victim} deleted meanwhile"
            await asyncio.sleep(length - self._ctx.ttl)
        await self._settle(record)
        await self._note_lease_losses(record, before)

    # -- 8. operations on registrations while their member is broken ---------------------

    async def _outage_ops(self, record: FaultRecord) -> None:
        """Deregister one registration, update another, drain a third, in a process
        whose member is stalled or cut off (quorum held), or while the cluster has no
        quorum (two members stopped or killed); then deregister the fourth right after
        the heal, when a registry that gave its lease up is busy registering again."""
        ctx = self._ctx
        variant = record.variant = self._variant("outage_ops")
        target = self._rng.choice(self._live_instances())
        member = self._member_of(target) or self._rng.choice(ctx.cluster.members)
        members = [member]
        if variant.startswith("no_quorum"):
            members.append(self._rng.choice([m for m in ctx.cluster.members if m is not member]))
        role = await self._role(member)
        names = f"{member.name} ({role}, carrying {target.name}'s streams)"
        names += "".join(f" + {m.name}" for m in members[1:])
        others = [c for c in self._live_instances() if c is not target]
        targets = [target]
        if others and self._rng.random() < 0.5:
            targets.append(self._rng.choice(others))
        length = self._outage_length()
        record.detail = (
            f"{variant}: {names} for {length:.1f}s; "
            f"deregister, update, drain on {', '.join(c.name for c in targets)}; "
            f"deregister on {target.name} after the heal"
        )
        self._announce(record)
        # No quorum: nothing can be repaired, so no sampled promise runs its clock.
        # Quorum held: keys and caches keep their promises, but what an operation
        # changes is only due the bound after the heal.
        paused = ALL_CLOCKS if variant.startswith("no_quorum") else ("metadata_matches",)
        with self._clocks_paused(paused):
            async with self._outage(record, variant, members):
                await asyncio.sleep(self._rng.uniform(0.5, 1.5))
                for child in targets:
                    record.operations += await self._issue_ops(child, variant)
                await asyncio.sleep(max(0.0, length - 1.5))
            healed = time.monotonic()
        ctx.ops.healed(record.operations, healed)
        await asyncio.sleep(self._rng.uniform(0.0, 0.5))
        if target.live:
            late = await self._issue_ops(target, f"{variant} heal", ("deregister",))
            ctx.ops.healed(late, healed)
            record.operations += late
        await ctx.ops.wait(
            {c.name: c for c in ctx.instances},
            record.operations,
            healed + OP_TIMEOUT + ctx.bound,
        )
        ctx.ops.check_finished(time.monotonic())
        outcomes = [f"{o.op} {o.outcome}" for o in record.operations]
        record.detail += f" -> {', '.join(outcomes)}"
        await self._settle(record)

    @contextlib.asynccontextmanager
    async def _outage(
        self, record: FaultRecord, variant: str, members: list[LocalEtcd]
    ) -> AsyncIterator[None]:
        cm: contextlib.AbstractAsyncContextManager[None]
        if variant in ("stall", "no_quorum_stop"):
            cm = self._stalled(*members)
        elif variant == "partition":
            cm = self._partitioned(members[0])
        else:
            cm = self._killed(record, *members)
        async with cm:
            yield

    async def _issue_ops(
        self, child: Child, during: str, plan: tuple[str, ...] = ("deregister", "update", "drain")
    ) -> list[Operation]:
        ctx = self._ctx
        process = process_index(child)
        status = await child.request("status", 10.0)
        keys = [r["key"] for r in status["regs"] if r["key"] not in ctx.ops.withdrawals]
        self._rng.shuffle(keys)
        specs = {spec.key: spec for spec in instances_of(process)}
        operations = []
        # Keys no operation touched yet first, so each does its own damage.
        touched = {o.key for o in ctx.ops.operations}
        keys.sort(key=lambda k: k in touched)
        for op, key in zip(plan, keys, strict=False):
            metadata = None
            if op == "update":
                self._version += 1
                metadata = {"zone": specs[key].zone, "process": process, "version": self._version}
            operations.append(await ctx.ops.issue(child, process, op, key, during, metadata))
        return operations

    # -- 9. two faults at once --------------------------------------------------------------

    async def _overlap(self, record: FaultRecord) -> None:
        variant = record.variant = self._variant("overlap")
        await getattr(self, "_overlap_" + variant.replace("+", "_"))(record)

    async def _overlap_stall_pause(self, record: FaultRecord) -> None:
        """A registrant stopped past its TTL while its member is stalled: its keys
        expire, and once continued it must register again through another member."""
        child = self._rng.choice(self._live_instances())
        member = self._member_of(child) or self._rng.choice(self._ctx.cluster.members)
        length = self._outage_length()
        paused_for = self._ctx.ttl + 2.0
        record.detail = (
            f"SIGSTOP {member.name} ({await self._role(member)}, carrying {child.name}'s "
            f"streams) for {length:.1f}s; "
            f"SIGSTOP {child.name} for {paused_for:.1f}s within it"
        )
        self._announce(record)
        async with self._stalled(member):
            await asyncio.sleep(0.5)
            await child.pause()
            await asyncio.sleep(paused_for)
            await child.resume()
            await asyncio.sleep(max(0.0, length - paused_for - 0.5))
        await self._settle(record)

    async def _overlap_partition_delete(self, record: FaultRecord) -> None:
        """A key deleted from outside while its process's member is cut off: the
        registry must put it back through another member."""
        child = self._rng.choice(self._live_instances())
        member = self._member_of(child) or self._rng.choice(self._ctx.cluster.members)
        length = self._outage_length()
        victim = await self._pick_key(process_index(child))
        record.detail = (
            f"partition {member.name} ({await self._role(member)}, carrying {child.name}'s "
            f"streams) for {length:.1f}s; "
            f"delete {victim} within it"
        )
        self._announce(record)
        async with self._partitioned(member):
            await asyncio.sleep(1.0)
            await self._ctx.view.delete(victim)
            await asyncio.sleep(length - 1.0)
        await self._settle(record)
        self._check_restored(record, victim)

    async def _overlap_partition_kill(self, record: FaultRecord) -> None:
        """A registrant crashes while its member is cut off: its keys must still
        vanish (lease expiry on the majority side), and its restart must register
        through the members that have a leader."""
        child = self._rng.choice(self._live_instances())
        member = self._member_of(child) or self._rng.choice(self._ctx.cluster.members)
        record.detail = (
            f"partition {member.name} ({await self._role(member)}, carrying {child.name}'s "
            "streams); SIGKILL "
            f"{child.name}; restart it once its keys are gone; heal"
        )
        self._announce(record)
        async with self._partitioned(member):
            await asyncio.sleep(0.5)
            await self._kill_and_vanish(record, child)
            await self._ctx.start_child(child)
            await asyncio.sleep(1.0)
        await self._settle(record)

    async def _overlap_stall_compaction(self, record: FaultRecord) -> None:
        """History compacted while a watcher's member is stalled: the watcher must
        catch up, by resuming elsewhere in time or by listing again."""
        ctx = self._ctx
        watcher = self._rng.choice([w for w in ctx.watchers if w.live])
        member = self._member_of(watcher) or self._rng.choice(ctx.cluster.members)
        length = self._outage_length()
        before = await watcher.request("snapshot", 10.0)
        victim = await self._pick_key()
        record.detail = (
            f"SIGSTOP {member.name} ({await self._role(member)}, carrying {watcher.name}'s "
            f"watch) for {length:.1f}s; "
            f"delete {victim} and compact within it"
        )
        self._announce(record)
        async with self._stalled(member):
            await asyncio.sleep(1.0)
            await ctx.view.delete(victim)
            await asyncio.sleep(ctx.ttl)
            revision = await ctx.view.compact_now()
            record.detail += f" (compacted at {revision})"
            await asyncio.sleep(max(0.0, length - ctx.ttl - 1.0))
        await self._settle(record)
        after = await watcher.request("snapshot", 10.0)
        record.facts["relisted"] = float(after["resyncs"] > before["resyncs"])
