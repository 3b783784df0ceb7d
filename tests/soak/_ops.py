"""Operations on registrations issued during outages, and what they promise.

An instance process runs each operation as a task of its own and reports its outcome
through ``status`` (see ``_workers``). The book keeps what the supervisor asked for and
what came of it, and the keys a deregistration withdrew from the fleet, with the
moment from which etcd must no longer hold them:

- a deregister that *returned* deleted the key: no etcd read started after the
  return may see it (deadline = the return);
- a deregister that *raised* must still take effect: the registration's lease is
  shared with its siblings and kept alive, so nothing else removes the key. The
  library gets the bound after the heal, or after the raise if that came later, the
  same time it gets to repair anything else (deadline = max(raise, heal) + bound).

A withdrawn key is neither expected nor forbidden in etcd until its deadline; once a
read after the deadline has looked, the supervisor registers it again, so the fleet
keeps its size.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Iterable, Mapping
from typing import Any

from ._children import Child, ChildError, ChildPaused
from ._etcd_view import Registry
from ._invariants import Ledger

# How long a worker may take to accept an operation (it only starts a task).
_ACCEPT_TIMEOUT = 10.0
# The library's own deadline for one deregister (Registration.deregister's default);
# update and drain are single writes under the client's per-call deadline, the same.
OP_TIMEOUT = 5.0


@dataclasses.dataclass
class Operation:
    child: str
    process: int
    op_id: int
    op: str  # deregister, update, drain, register
    key: str
    requested: dict[str, Any] | None  # the metadata asked for by an update
    issued: float  # monotonic, machine-wide (the workers use the same clock)
    during: str  # what was broken when it was issued
    heal: float | None = None  # when the fault it was issued in ended
    outcome: str = "pending"  # returned, raised, void (its process was killed)
    error: str = ""
    ended: float | None = None
    metadata_after: dict[str, Any] | None = None

    def finish_by(self, bound: float) -> float | None:
        """The latest acceptable end: its own deadline, or the bound after the heal."""
        if self.heal is None:
            return None
        return max(self.issued + OP_TIMEOUT, self.heal) + bound

    def describe(self, began: float) -> str:
        ended = f" after {self.ended - self.issued:.1f}s" if self.ended is not None else ""
        error = f" ({self.error})" if self.error else ""
        return (
            f"{self.child} {self.op} {self.key} at {self.issued - began:.1f}s during "
            f"{self.during}: {self.outcome}{ended}{error}"
        )


@dataclasses.dataclass
class Withdrawal:
    key: str
    process: int
    op: Operation
    deadline: float | None = None
    checked: bool = False  # a read started after the deadline has looked
    reported: bool = False
    registering: Operation | None = None


class OpsBook:
    def __init__(self, ledger: Ledger, bound: float, began: float) -> None:
        self._ledger = ledger
        self._bound = bound
        self._began = began
        self._next_id = 0
        self.operations: list[Operation] = []
        self.withdrawals: dict[str, Withdrawal] = {}
        self._finish_checked: set[int] = set()
        # Set whenever a read past a withdrawal's deadline has looked.
        self.looked = asyncio.Event()

    # -- issuing ------------------------------------------------------------------------

    async def issue(
        self,
        child: Child,
        process: int,
        op: str,
        key: str,
        during: str,
        metadata: dict[str, Any] | None = None,
        withdrawal: Withdrawal | None = None,
    ) -> Operation:
        self._next_id += 1
        operation = Operation(
            child.name, process, self._next_id, op, key, metadata, time.monotonic(), during
        )
        # Booked before the worker hears of it: a sample must never see the effect of
        # an operation the book does not know yet (a key registered again would look
        # like a deregistered key still present).
        self.operations.append(operation)
        if op == "deregister":
            self.withdrawals[key] = Withdrawal(key, process, operation)
        if withdrawal is not None:
            withdrawal.registering = operation
        args: dict[str, Any] = {"op_id": operation.op_id, "op": op, "key": key}
        if metadata is not None:
            args["metadata"] = metadata
        await child.request("op", _ACCEPT_TIMEOUT, args)
        return operation

    def healed(self, operations: Iterable[Operation], at: float) -> None:
        for operation in operations:
            operation.heal = at
        self._update_deadlines()

    # -- what the workers report ----------------------------------------------------------

    def absorb(self, child: str, reported: Iterable[Mapping[str, Any]]) -> None:
        by_id = {o.op_id: o for o in self.operations if o.child == child}
        for item in reported:
            operation = by_id.get(int(item["op_id"]))
            if operation is None or operation.outcome != "pending":
                continue
            if item["outcome"] == "pending":
                continue
            operation.outcome = str(item["outcome"])
            operation.error = str(item.get("error", ""))
            operation.ended = float(item["ended"])
            operation.metadata_after = item.get("metadata_after")
            self._check_result(operation)
        for withdrawal in list(self.withdrawals.values()):
            if withdrawal.registering is not None:
                self._settle_registration(withdrawal)
        self._update_deadlines()

    def _check_result(self, operation: Operation) -> None:
        """An update that returned is what the registration says at once; a
        registration made on a healthy cluster succeeds."""
        if operation.op == "register":
            if operation.outcome == "raised":
                self._ledger.fail(
                    "ops_finish", f"{operation.describe(self._began)} on a healthy cluster"
                )
            return
        if operation.outcome != "returned" or operation.op != "update":
            return
        after = operation.metadata_after or {}
        if after != operation.requested:
            self._ledger.fail(
                "metadata_matches",
                f"{operation.describe(self._began)}, but the registration then reported "
                f"{json.dumps(after, sort_keys=True)}, not "
                f"{json.dumps(operation.requested, sort_keys=True)}",
            )
        else:
            self._ledger.ok("metadata_matches")

    def _update_deadlines(self) -> None:
        for withdrawal in self.withdrawals.values():
            op = withdrawal.op
            if withdrawal.deadline is not None or op.ended is None:
                continue
            if op.outcome == "returned":
                withdrawal.deadline = op.ended
            elif op.outcome == "raised" and op.heal is not None:
                withdrawal.deadline = max(op.ended, op.heal) + self._bound

    def void_process(self, process: int) -> None:
        """A killed process's operations and withdrawals end with it: its lease expires,
        taking every key with it, and its restart registers the whole layout again."""
        for operation in self.operations:
            if operation.process == process and operation.outcome == "pending":
                operation.outcome = "void"
        for key in [k for k, w in self.withdrawals.items() if w.process == process]:
            del self.withdrawals[key]

    # -- checks ---------------------------------------------------------------------------

    def withdrawn_keys(self) -> set[str]:
        return set(self.withdrawals)

    def check_gone(self, registry: Registry, read_started: float) -> None:
        """``deregistered_gone`` for every withdrawal whose deadline ``read_started``
        (when the read that produced ``registry`` was issued) has passed."""
        for withdrawal in self.withdrawals.values():
            deadline = withdrawal.deadline
            if deadline is None or withdrawal.registering is not None or read_started < deadline:
                continue
            withdrawal.checked = True
            self.looked.set()
            entry = registry.entries.get(withdrawal.key)
            if entry is None:
                self._ledger.ok("deregistered_gone")
                continue
            if withdrawal.reported:
                continue
            withdrawal.reported = True
            late = read_started - deadline
            self._ledger.fail(
                "deregistered_gone",
                f"{withdrawal.op.describe(self._began)}; etcd still holds "
                f"{entry.describe()} {late:.1f}s past the deadline",
            )

    def check_finished(self, now: float) -> None:
        """``ops_finish``: every operation ended within its bound (once per operation)."""
        for operation in self.operations:
            if operation.op_id in self._finish_checked or operation.outcome == "void":
                continue
            limit = operation.finish_by(self._bound)
            if operation.outcome != "pending":
                self._finish_checked.add(operation.op_id)
                assert operation.ended is not None
                if limit is not None and operation.ended > limit:
                    self._ledger.fail(
                        "ops_finish",
                        f"{operation.describe(self._began)}; ended "
                        f"{operation.ended - limit:.1f}s past its bound",
                    )
                else:
                    self._ledger.ok("ops_finish")
            elif limit is not None and now > limit:
                self._finish_checked.add(operation.op_id)
                self._ledger.fail(
                    "ops_finish",
                    f"{operation.describe(self._began)}; still pending "
                    f"{now - operation.issued:.1f}s after it was issued",
                )

    def pending(self, operations: Iterable[Operation]) -> list[Operation]:
        return [o for o in operations if o.outcome == "pending"]

    async def wait(
        self, children: Mapping[str, Child], operations: list[Operation], until: float
    ) -> None:
        """Ask the workers until every operation in ``operations`` ended or ``until``
        (monotonic) passed."""
        while self.pending(operations) and time.monotonic() < until:
            for name in {o.child for o in self.pending(operations)}:
                child = children[name]
                try:
                    status = await child.request("status", 10.0)
                except ChildPaused:
                    continue
                except ChildError:
                    if child.expected_exit or not child.ready:
                        continue
                    raise
                self.absorb(name, status["ops"])
            await asyncio.sleep(0.2)

    # -- registering withdrawn keys again ------------------------------------------------

    def due(self) -> list[Withdrawal]:
        return [
            w
            for w in self.withdrawals.values()
            if w.checked and w.registering is None and w.op.outcome != "pending"
        ]

    async def register_again(self, withdrawal: Withdrawal, child: Child) -> Operation:
        operation = await self.issue(
            child, withdrawal.process, "register", withdrawal.key, "quiet", withdrawal=withdrawal
        )
        operation.heal = operation.issued  # nothing is broken: its bound starts now
        return operation

    def _settle_registration(self, withdrawal: Withdrawal) -> None:
        """After the register operation ended: back in the fleet, or withdrawn still
        and tried again later. A register that raised must not leave its key behind
        either (the caller got no registration to deregister), within the bound."""
        registering = withdrawal.registering
        assert registering is not None
        if registering.outcome == "returned":
            del self.withdrawals[withdrawal.key]
        elif registering.outcome != "pending":
            assert registering.ended is not None
            withdrawal.op = registering
            withdrawal.deadline = registering.ended + self._bound
            withdrawal.checked = withdrawal.reported = False
            withdrawal.registering = None
