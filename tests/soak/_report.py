"""The plain-text report printed at the end (made to be read in a CI log)."""

from __future__ import annotations

import collections
import dataclasses
import statistics
from pathlib import Path

from ._faults import FAULT_KINDS, VANISH_MARGIN, FaultRecord
from ._invariants import INVARIANTS, Ledger
from ._ops import Operation

# Operations listed one by one in the report (all are counted).
_OPERATIONS_LISTED = 24


@dataclasses.dataclass(frozen=True)
class LeakRow:
    child: str
    metric: str
    start: int
    end: int
    slack: int

    @property
    def ok(self) -> bool:
        return self.end <= self.start + self.slack


@dataclasses.dataclass
class Results:
    duration: float
    seed: int
    ttl: int
    bound: float
    ledger: Ledger
    faults: list[FaultRecord]
    log_dir: Path
    leak_slack: dict[str, int]
    auth: bool = False
    operations: list[Operation] = dataclasses.field(default_factory=list)
    etcd_version: str = "?"
    etcd_binary: str = "?"
    wall_seconds: float = 0.0
    samples: int = 0
    samples_skipped: int = 0
    leaks: list[LeakRow] = dataclasses.field(default_factory=list)
    watch_start: tuple[float, float] | None = None
    watch_end: tuple[float, float] | None = None
    leases_start: int | None = None
    leases_end: int | None = None
    live_instance_processes: int | None = None
    expiry_protections: int | None = None
    aborted: str | None = None
    kept_logs: bool = False

    @property
    def passed(self) -> bool:
        return self.aborted is None and not self.ledger.violated


def _seconds(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):5.1f}s / {max(values):5.1f}s"


def _fault_lines(results: Results) -> list[str]:
    by_kind: dict[str, list[FaultRecord]] = collections.defaultdict(list)
    for record in results.faults:
        by_kind[record.kind].append(record)
    lines = [
        f"Faults ({len(results.faults)}; convergence bound {results.bound:.0f}s = 2*ttl + 10s,"
        " measured from the heal):",
        f"  {'kind':<16}{'count':>6}  {'converged':>10}  {'median / max':>17}  notes",
    ]
    for kind in FAULT_KINDS:
        records = by_kind.get(kind, [])
        times = [r.convergence for r in records if r.convergence is not None]
        notes = []
        if kind == "member_kill" and records:
            notes.append(f"{sum('(the leader)' in r.detail for r in records)} leader kills")
            restarts = [
                r.facts["member_restart_s"] for r in records if "member_restart_s" in r.facts
            ]
            notes.append(f"member restart median/max {_seconds(restarts)}")
        if kind == "instance_pause" and records:
            expired = sum(int(r.facts.get("keys_expired", 0)) for r in records)
            notes.append(f"keys had expired during {expired} of {len(records)} pauses")
        if kind == "compaction" and records:
            behind = [r for r in records if "relisted" in r.facts]
            relisted = sum(int(r.facts["relisted"]) for r in behind)
            notes.append(f"{len(behind)} with a watcher left behind, {relisted} forced a re-list")
        if kind == "instance_kill" and records:
            vanish = [r.facts["vanish_s"] for r in records if "vanish_s" in r.facts]
            notes.append(
                f"keys gone (etcd + caches) median/max {_seconds(vanish)}, "
                f"bound ttl + {VANISH_MARGIN:.0f}s"
            )
        if kind in ("member_stall", "partition") and records:
            leaders = sum("(the leader" in r.detail for r in records)
            streams = sum("streams)" in r.detail for r in records)
            regrants = sum(r.facts.get("leases_changed", 0) > 0 for r in records)
            notes.append(
                f"{leaders} of the leader, {streams} of a member carrying an instance's or "
                f"watcher's streams; some process took a new lease during {regrants}"
            )
        if kind in ("outage_ops", "overlap") and records:
            variants = collections.Counter(r.variant for r in records)
            notes.append(", ".join(f"{v} {n}" for v, n in sorted(variants.items())))
        lines.append(
            f"  {kind:<16}{len(records):>6}  {len(times):>10}  {_seconds(times):>17}  "
            + "; ".join(notes)
        )
    return lines


def _invariant_lines(results: Results) -> list[str]:
    ledger = results.ledger
    lines = [
        f"Invariants (sampler every 0.5s: {results.samples} samples, {results.samples_skipped}"
        " skipped while etcd could not answer):",
        f"  {'invariant':<18}{'checks':>8}{'violations':>12}  promise",
    ]
    for name, promise in INVARIANTS.items():
        lines.append(
            f"  {name:<18}{ledger.checks[name]:>8}{ledger.violation_counts[name]:>12}  {promise}"
        )
    for name in INVARIANTS:
        for violation in ledger.first.get(name, []):
            lines.append(f"  ! {name} at {violation.at:.1f}s: {violation.detail}")
    return lines


def _operation_lines(results: Results) -> list[str]:
    operations = results.operations
    counts = collections.Counter(f"{o.op} {o.outcome}" for o in operations)
    lines = [
        f"Operations ({len(operations)}; issued during outages, and re-registrations after): "
        + (", ".join(f"{k} {n}" for k, n in sorted(counts.items())) or "none")
    ]
    began = results.ledger.began
    for operation in operations[:_OPERATIONS_LISTED]:
        lines.append(f"  {operation.describe(began)}")
    if len(operations) > _OPERATIONS_LISTED:
        lines.append(f"  ... {len(operations) - _OPERATIONS_LISTED} more")
    return lines


def _leak_lines(results: Results) -> list[str]:
    slack = ", ".join(f"{k} +{v}" for k, v in results.leak_slack.items())
    lines = [f"Leaks (baseline after each child's warm-up -> end; slack {slack}):"]
    if not results.leaks:
        lines.append("  (not measured)")
    by_child: dict[str, list[LeakRow]] = collections.defaultdict(list)
    for row in results.leaks:
        by_child[row.child].append(row)
    for child, rows in by_child.items():
        cells = "  ".join(f"{r.metric} {r.start}->{r.end}{'' if r.ok else ' LEAK'}" for r in rows)
        lines.append(f"  {child:<11} {cells}")

    def pair(value: tuple[float, float] | None) -> str:
        return "-" if value is None else f"{value[0]:.0f} streams / {value[1]:.0f} watchers"

    lines.append(
        f"  etcd watches (sum over members): {pair(results.watch_start)} after warm-up -> "
        f"{pair(results.watch_end)} at the end"
    )
    lines.append(
        f"  etcd leases: {results.leases_start if results.leases_start is not None else '-'}"
        f" after warm-up -> {results.leases_end if results.leases_end is not None else '-'}"
        f" at the end ({results.live_instance_processes or '-'} live instance processes)"
    )
    protections = results.expiry_protections
    lines.append(
        "  mass-expiry protections triggered (sum over caches): "
        f"{'-' if protections is None else protections}"
    )
    return lines


def render(results: Results) -> str:
    lines = [
        "",
        "==== etcdisco soak report",
        f"etcd {results.etcd_version} ({results.etcd_binary}), 3 members"
        + (", auth on (children as least-privilege users)" if results.auth else ""),
        f"duration {results.duration:.0f}s of faults, {results.wall_seconds:.0f}s in all; "
        f"seed {results.seed}; ttl {results.ttl}s",
        "",
        *_fault_lines(results),
        "",
        *_invariant_lines(results),
        "",
        *_operation_lines(results),
        "",
        *_leak_lines(results),
        "",
    ]
    if results.aborted is not None:
        lines.append(f"ABORTED: {results.aborted}")
    if results.kept_logs:
        lines.append(f"child and etcd logs kept in {results.log_dir}")
    total = sum(results.ledger.violation_counts.values())
    verdict = "PASS" if results.passed else "FAIL"
    lines.append(
        f"{verdict}: {sum(results.ledger.checks.values())} checks, {total} violations"
        + (", aborted" if results.aborted is not None else "")
    )
    return "\n".join(lines)
