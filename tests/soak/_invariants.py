"""The invariants: a ledger of checks and violations, and the comparisons behind them.

Every check is counted; a violation carries what was seen (key, cache, what etcd had)
so the report alone is enough to start debugging.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import time
from collections.abc import Iterable, Mapping
from typing import Any

from ._etcd_view import Registry
from ._layout import all_keys

# Name -> what it promises, in report order.
INVARIANTS = {
    "lease_bound": "every key under the prefix (in etcd and in every cache) has a lease",
    "unique_instances": "no two keys for one service+address, in etcd or in any cache",
    "known_keys": "etcd holds only the fleet's keys, all well-formed",
    "children_alive": "no child process died or stopped answering unexpectedly",
    "convergence": "after each heal, etcd, every registration and all caches agree in time",
    "presence": "sampled: etcd holds exactly the live processes' keys, no gap over the bound",
    "caches_follow": "sampled: every cache equals etcd, no difference lasting over the bound "
    "(a suspect kept after a mass expiry: over its hold + the bound)",
    "vanish": "a crashed instance process's keys leave etcd within ttl + bound",
    "restore": "a deleted instance key is put back (checked by the convergence after it)",
    "relist": "a watcher left behind across a compaction catches up by listing again",
    "leaks": "per child: fds, threads, asyncio tasks at the end within slack of the baseline",
    "watch_streams": "etcd's open watch streams/watchers at the end: no more than clients need",
    "leases": "leases at the end: no more than the live instance processes hold",
    "graceful_stop": "SIGTERM deregisters everything (keys and leases gone) and exits 0",
    "deregistered_gone": "a deregistered key leaves etcd: at once if the call returned, "
    "within the bound after the heal if it raised",
    "metadata_matches": "etcd has the metadata each registration reports, status draining "
    "after a drain (an update that returned is reported at once; any gap closes within the "
    "bound after the heal)",
    "synced_truthful": "sampled: no cache says synced while it differs from etcd for longer "
    "than the bound",
    "ops_finish": "an operation issued during an outage returns or raises within the bound "
    "after the heal; a re-registration on a healthy cluster succeeds",
}

_DETAILS_KEPT = 5


@dataclasses.dataclass(frozen=True)
class Violation:
    invariant: str
    at: float  # seconds since the soak began
    detail: str


class Ledger:
    def __init__(self, began: float) -> None:
        self.began = began
        self.checks: collections.Counter[str] = collections.Counter()
        self.violation_counts: collections.Counter[str] = collections.Counter()
        self.first: dict[str, list[Violation]] = collections.defaultdict(list)
        self.log: list[str] = []

    def now(self) -> float:
        return time.monotonic() - self.began

    def ok(self, invariant: str) -> None:
        self.checks[invariant] += 1

    def fail(self, invariant: str, detail: str) -> None:
        self.checks[invariant] += 1
        self.violation_counts[invariant] += 1
        if len(self.first[invariant]) < _DETAILS_KEPT:
            self.first[invariant].append(Violation(invariant, self.now(), detail))
        print(f"[{self.now():7.1f}s] VIOLATION {invariant}: {detail}", flush=True)

    def check(self, invariant: str, problems: list[str]) -> bool:
        if problems:
            self.fail(invariant, "; ".join(problems))
            return False
        self.ok(invariant)
        return True

    @property
    def violated(self) -> bool:
        return sum(self.violation_counts.values()) > 0


# -- the continuous checks ----------------------------------------------------------


def lease_problems(registry: Registry, snapshots: Mapping[str, dict[str, Any]]) -> list[str]:
    problems = [
        f"etcd holds a permanent key: {entry.describe()}"
        for entry in registry.entries.values()
        if entry.lease == 0
    ]
    for name, snap in snapshots.items():
        problems += [
            f"cache {name} holds {key} with lease 0 ({item['address']})"
            for key, item in snap["instances"].items()
            if item["lease"] == 0
        ]
    return problems


def duplicate_problems(where: str, items: Iterable[tuple[str, str, str]]) -> list[str]:
    """``items`` are (key, service, address); one service+address must have one key."""
    seen: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
    for key, service, address in items:
        seen[(service, address)].append(key)
    return [
        f"{where}: {service} {address} under {len(keys)} keys: {sorted(keys)}"
        for (service, address), keys in seen.items()
        if len(keys) > 1
    ]


def all_duplicate_problems(
    registry: Registry, snapshots: Mapping[str, dict[str, Any]]
) -> list[str]:
    problems = duplicate_problems(
        "etcd", ((e.key, e.service, e.address) for e in registry.entries.values())
    )
    for name, snap in snapshots.items():
        problems += duplicate_problems(
            f"cache {name}",
            ((key, i["service"], i["address"]) for key, i in snap["instances"].items()),
        )
    return problems


def stranger_problems(registry: Registry) -> list[str]:
    known = all_keys()
    problems = [
        f"unknown key in etcd: {entry.describe()}"
        for key, entry in registry.entries.items()
        if key not in known
    ]
    problems += [
        f"malformed value in etcd: {key} = {value[:200]!r}"
        for key, value in registry.malformed.items()
    ]
    return problems


# -- convergence --------------------------------------------------------------------


def _cache_view(item: Mapping[str, Any]) -> tuple[str, str, str, int, int]:
    return (
        item["service"],
        item["address"],
        json.dumps(item["metadata"], sort_keys=True),
        item["revision"],
        item["lease"],
    )


def _cache_text(key: str, item: Mapping[str, Any]) -> str:
    suspect = " SUSPECT" if item.get("suspect") else ""
    return (
        f"{key} -> {item['address']} {json.dumps(item['metadata'], sort_keys=True)} "
        f"mod_revision={item['revision']} lease={item['lease']:x}{suspect}"
    )


def registry_mismatches(
    registry: Registry, expected_keys: set[str], withdrawn: Iterable[str] = ()
) -> dict[str, str]:
    """Where etcd differs from "exactly the live processes' keys", by a stable id.
    Withdrawn keys (deregistered, or being registered again) may be there or not:
    whether they left in time is the ``deregistered_gone`` check's business."""
    entries = registry.entries
    out = {f"lacks {key}": f"etcd lacks {key}" for key in expected_keys - entries.keys()}
    out.update(
        (f"holds {key}", f"etcd still holds {entries[key].describe()}")
        for key in entries.keys() - expected_keys - set(withdrawn)
    )
    return out


def cache_mismatches(registry: Registry, snapshots: Mapping[str, dict[str, Any]]) -> dict[str, str]:
    """Where a cache differs from etcd (keys, values, revisions, leases), by a stable id."""
    entries = registry.entries
    out: dict[str, str] = {}
    for name, snap in snapshots.items():
        cached: dict[str, Any] = snap["instances"]
        for key in entries.keys() - cached.keys():
            out[f"{name} lacks {key}"] = (
                f"cache {name} lacks {key}; etcd has {entries[key].describe()}"
            )
        for key in cached.keys() - entries.keys():
            # A suspect is kept on purpose (see held_suspect): told apart by its id.
            kind = "holds suspect" if cached[key]["suspect"] else "holds"
            out[f"{name} {kind} {key}"] = (
                f"cache {name} holds {_cache_text(key, cached[key])}; etcd has no such key"
            )
        for key in cached.keys() & entries.keys():
            if _cache_view(cached[key]) != entries[key].comparable() or cached[key]["suspect"]:
                out[f"{name} differs {key}"] = (
                    f"cache {name} holds {_cache_text(key, cached[key])}; etcd has "
                    f"{entries[key].describe()}"
                )
    return out


def held_suspect(ident: str) -> bool:
    """Whether a ``cache_mismatches`` id is a vanished instance a cache keeps as a
    suspect. The README promises that after a mass expiry (more than half of a
    service's instances gone within 10 s without saying they leave) a cache keeps them
    for up to ``ExpiryProtection.hold`` (60 s). The soak's faults cause real ones:
    etcd 3.4 and 3.5.1 revoke every lease a stalled leader did not see renewed once it
    resumes (etcd-io/etcd#15247, #12528), and a registry may give up leases during a
    quorum loss. So such an entry is held to the hold plus the bound, not the bound."""
    return " holds suspect " in ident


def synced_mismatches(
    registry: Registry, snapshots: Mapping[str, dict[str, Any]]
) -> dict[str, str]:
    """Differences from etcd in caches that say they are synced: a cache that knows it
    is behind says ``stale``; one that says ``synced`` promises to follow etcd. Entries
    held as suspects (mass-expiry protection) are a documented, flagged deviation, not
    a cache that missed events: ``caches_follow`` alone judges how long they stay."""
    synced = {
        name: {
            **snap,
            "instances": {k: i for k, i in snap["instances"].items() if not i["suspect"]},
        }
        for name, snap in snapshots.items()
        if snap["state"] == "synced"
    }
    return {
        f"{ident} (synced)": f"{text} while it says synced"
        for ident, text in cache_mismatches(registry, synced).items()
    }


def expected_metadata(reg: Mapping[str, Any]) -> dict[str, Any]:
    """What etcd must hold for a registration as its process reports it: its
    metadata, with status "draining" once drain() was called (for good)."""
    metadata = dict(reg["metadata"])
    if reg["drained"]:
        metadata["status"] = "draining"
    return metadata


def metadata_mismatches(
    registry: Registry, statuses: Mapping[str, dict[str, Any]]
) -> dict[str, str]:
    """Registrations whose key etcd holds with other metadata than they report."""
    out: dict[str, str] = {}
    for name, status in statuses.items():
        for reg in status["regs"]:
            entry = registry.entries.get(reg["key"])
            wanted = expected_metadata(reg)
            if entry is not None and entry.metadata != wanted:
                drained = ", drained" if reg["drained"] else ""
                out[f"meta {reg['key']}"] = (
                    f"{name}: {reg['key']} reports metadata "
                    f"{json.dumps(reg['metadata'], sort_keys=True)} ({reg['state']}{drained}); "
                    f"etcd has {entry.describe()}"
                )
    return out


def convergence_problems(
    registry: Registry,
    expected_keys: set[str],
    statuses: Mapping[str, dict[str, Any]],
    snapshots: Mapping[str, dict[str, Any]],
    withdrawn: Iterable[str] = (),
) -> list[str]:
    """Everything that keeps the system from the state it must reach after a heal:
    etcd holds exactly the live processes' keys, every registration says registered
    under the lease etcd has for its key, with the metadata etcd has, every cache
    equals etcd (values, revisions and leases) and is synced."""
    entries = registry.entries
    problems = sorted(registry_mismatches(registry, expected_keys, withdrawn).values())
    for name, status in statuses.items():
        for reg in status["regs"]:
            entry = entries.get(reg["key"])
            if reg["state"] != "registered":
                problems.append(f"{name}: {reg['key']} is {reg['state']}")
            elif entry is not None and entry.lease != reg["lease"]:
                problems.append(
                    f"{name}: {reg['key']} registered under lease {reg['lease']:x} but etcd "
                    f"has {entry.describe()}"
                )
    problems += sorted(metadata_mismatches(registry, statuses).values())
    problems += [
        f"cache {name} is {snap['state']}"
        for name, snap in snapshots.items()
        if snap["state"] != "synced"
    ]
    # Suspects a cache keeps for the documented hold are the sampler's to judge.
    problems += sorted(
        text
        for ident, text in cache_mismatches(registry, snapshots).items()
        if not held_suspect(ident)
    )
    return problems


class Persistence:
    """Mismatches the sampler sees between heals: a difference may come and go while
    faults play out, but one that lasts longer than ``bound`` without a break is a
    violation (reported once per episode). This catches what a convergence check
    right after a heal cannot: a registry that looks fine and fails seconds later."""

    def __init__(self, bound: float) -> None:
        self.bound = bound
        self._since: dict[str, float] = {}
        self._reported: set[str] = set()
        self._paused_at: float | None = None

    def update(self, now: float, current: Mapping[str, str]) -> list[str]:
        for ident in self._since.keys() - current.keys():
            del self._since[ident]
            self._reported.discard(ident)
        # A paused clock stands still: nothing lasts longer while it is paused.
        clock = now if self._paused_at is None else self._paused_at
        problems = []
        for ident, text in sorted(current.items()):
            since = self._since.setdefault(ident, clock)
            if clock - since > self.bound and ident not in self._reported:
                self._reported.add(ident)
                problems.append(f"{text} (for {clock - since:.1f}s; bound {self.bound:.0f}s)")
        return problems

    def pause(self, now: float) -> None:
        """Stop the clock while a fault makes repair impossible (no quorum) or while
        the promise only starts at the heal (operations issued during an outage)."""
        if self._paused_at is None:
            self._paused_at = now

    def resume(self, now: float) -> None:
        """Start the clock again: every episode's time so far excludes the pause."""
        if self._paused_at is None:
            return
        shift = now - self._paused_at
        self._paused_at = None
        for ident in self._since:
            self._since[ident] += shift

    def forget(self, prefix: str) -> None:
        """Drop episodes of something no longer observed (a stopped watcher)."""
        for ident in [i for i in self._since if i.startswith(prefix)]:
            del self._since[ident]
            self._reported.discard(ident)
