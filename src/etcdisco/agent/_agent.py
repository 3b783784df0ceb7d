"""The sidecar agent: keeps a set of registrations equal to a config, with checks.

Each configured registration lives in a :class:`_Slot` that owns the task making the
first registration: that task retries with backoff until etcd takes it (a sidecar
must outlive an etcd that is down when it starts), after which the registration's
own lease keeper keeps it alive and heals it. :meth:`Agent.apply` moves from the
current set to a new one touching only what differs: removed slots deregister,
added ones register, a metadata-only change is one write under the same lease, any
other change re-registers that one instance; equal specs are not touched at all.

A registration etcd refuses (permission denied, a value it will not take) is not an
outage: it is logged once at error level, the slot says ``failed`` with etcd's words
(:meth:`Agent.failures`), the agent is not ready, and it is tried again only every
minute (permissions can be granted later) or at once on the next :meth:`Agent.apply`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .._async_client import AsyncClient
from .._backoff import Backoff
from .._errors import (
    ClosedError,
    CompactedError,
    ConfigError,
    EtcdError,
    EtcdTimeoutError,
    LeaseNotFoundError,
    UnavailableError,
)
from ..health import CheckResult
from ..registry import Registration, RegistrationState
from ._config import ServiceSpec

log = logging.getLogger("etcdisco.agent")

REFUSED_RETRY = 60.0
"""Seconds between attempts at a registration etcd refused (see :func:`refused`)."""

_PASSING = (UnavailableError, EtcdTimeoutError, LeaseNotFoundError, ClosedError, CompactedError)


def refused(exc: Exception) -> bool:
    """True when etcd answered and said no (permission denied, authentication failed,
    a request it will never take), as opposed to not answering (an outage, a timeout):
    trying again in a second gives the same answer."""
    return isinstance(exc, EtcdError) and not isinstance(exc, _PASSING)


@dataclass
class Changes:
    """What one :meth:`Agent.apply` did, by etcd key."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)  # metadata rewritten in place
    replaced: list[str] = field(default_factory=list)  # deregistered and registered again
    unchanged: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [
            f"{len(self.added)} added",
            f"{len(self.removed)} removed",
            f"{len(self.updated)} updated",
            f"{len(self.replaced)} replaced",
            f"{len(self.unchanged)} unchanged",
        ]
        return ", ".join(parts)


class _Slot:
    def __init__(self, agent: Agent, key: str, spec: ServiceSpec) -> None:
        self._agent = agent
        self.key = key
        self.spec = spec
        self.reg: Registration | None = None
        self.error: str | None = None
        self.failed = False  # etcd refused the last attempt (see refused())
        self._task: asyncio.Task[None] | None = None
        self._waiting = False  # in a backoff sleep: the only safe place to cancel
        self._wake = asyncio.Event()
        self._stopping = False

    @property
    def live(self) -> bool:
        return self.reg is not None and self.reg.state is RegistrationState.REGISTERED

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._register(), name=f"etcdisco-agent-{self.key}"
        )

    async def _register(self) -> None:
        backoff = Backoff(initial=0.5, maximum=15.0)
        spec = self.spec
        told: str | None = None
        while not self._stopping:
            try:
                reg = await self._agent.client.register(
                    spec.name,
                    spec.address,
                    instance_id=spec.instance_id,
                    metadata=spec.metadata,
                    ttl=spec.ttl,
                    checks=spec.checks,
                    on_failing=spec.on_failing,
                )
            except asyncio.CancelledError:
                raise
            except (EtcdError, ConfigError) as exc:
                self.error = str(exc)
                self.failed = refused(exc)
                if self.failed:
                    delay = REFUSED_RETRY
                    if self.error != told:  # once per distinct refusal, not every minute
                        told = self.error
                        log.error(
                            "etcd refused to register %s: %s; trying again every %.0fs "
                            "and on reload (SIGHUP)",
                            self.key,
                            exc,
                            delay,
                        )
                else:
                    # ConfigError here means "already registered by this client": an
                    # instance moved between entries in one reload; it settles next try.
                    delay = backoff.next_delay()
                    log.warning(
                        "registering %s failed (%s); retrying in %.1fs", self.key, exc, delay
                    )
                self._agent._notify()
                if self._stopping:  # stop() came while this attempt was in flight
                    return
                await self._pause(delay)
                continue
            self.error = None
            self.failed = False
            self.reg = reg
            reg.add_listener(self._agent._state_changed)
            reg.add_health_listener(self._agent._health_changed)
            log.info("registered %s -> %s (lease %x)", self.key, spec.address, reg.lease_id or 0)
            self._agent._notify()
            return

    async def _pause(self, delay: float) -> None:
        """Sleep ``delay`` seconds, or until :meth:`retry_now` or :meth:`stop`."""
        if self._stopping:
            return
        self._waiting = True
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
        finally:
            self._waiting = False
            self._wake.clear()

    def retry_now(self) -> None:
        """End the wait before the next attempt (a reload retries what etcd refused)."""
        self._wake.set()

    async def stop(self, timeout: float) -> None:
        """Stop trying and deregister. A registration in flight is let finish first:
        cancelling it after etcd took the write could leave the key behind on a lease
        that the other registrations keep alive."""
        self._stopping = True
        self._wake.set()
        task = self._task
        if task is not None and not task.done():
            if self._waiting:
                task.cancel()
            # Not ``await task``: a cancelled caller would cancel the task with it.
            await asyncio.wait({task})
        if self.reg is not None:
            try:
                await self.reg.deregister(timeout)
            except EtcdError as exc:
                log.warning("deregistering %s failed: %s", self.key, exc)


class Agent:
    """Keeps registrations in etcd equal to a list of :class:`ServiceSpec`."""

    def __init__(
        self,
        client: AsyncClient,
        *,
        on_change: Callable[[], None] | None = None,
        timeout: float = 5.0,
    ) -> None:
        self.client = client
        self._slots: dict[str, _Slot] = {}
        self._on_change = on_change
        self._timeout = timeout
        self._applied = False
        self._lock = asyncio.Lock()

    @property
    def ready(self) -> bool:
        """True once a config is applied and every registration is live in etcd
        (its lease answering keepalives). Failing checks do not make the agent unready:
        it is doing its job by reporting them."""
        return self._applied and all(slot.live for slot in self._slots.values())

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self._slots)

    def failures(self) -> dict[str, str]:
        """The registrations etcd refused, by key, with etcd's answer."""
        return {
            key: slot.error or "refused"
            for key, slot in self._slots.items()
            if slot.failed and slot.reg is None
        }

    def registration(self, key: str) -> Registration | None:
        slot = self._slots.get(key)
        return slot.reg if slot is not None else None

    def status(self) -> dict[str, Any]:
        """The agent's state as JSON-ready data (the readiness endpoint's body)."""
        rows = []
        for key, slot in sorted(self._slots.items()):
            if slot.reg is not None:
                row = describe(slot.reg)
            else:
                state = "failed" if slot.failed else "pending"
                row = {"key": key, "address": slot.spec.address, "state": state}
                row.update(lease=None, health=None, withdrawn=False, failures=[])
            rows.append({**row, "error": slot.error})
        return {"ready": self.ready, "registrations": rows}

    async def apply(self, specs: Sequence[ServiceSpec]) -> Changes:
        """Make the registrations equal to ``specs``, touching only what changed."""
        async with self._lock:
            changes = await self._apply(specs)
        self._applied = True
        self._notify()
        return changes

    async def _apply(self, specs: Sequence[ServiceSpec]) -> Changes:
        prefix = self.client.prefix
        wanted = {spec.key(prefix): spec for spec in specs}
        changes = Changes()
        gone = [slot for key, slot in self._slots.items() if key not in wanted]
        replace: list[_Slot] = []
        for key, spec in wanted.items():
            slot = self._slots.get(key)
            if slot is None:
                continue
            if slot.spec == spec:
                changes.unchanged.append(key)
                if slot.failed:
                    slot.retry_now()
            elif slot.reg is not None and slot.spec.only_metadata_differs(spec):
                slot.spec = spec
                try:
                    await slot.reg.update(spec.metadata)
                except EtcdError as exc:
                    # update() keeps the new metadata; the keeper writes it when it heals.
                    log.warning("updating %s failed (%s); it is written on reconnect", key, exc)
                changes.updated.append(key)
            else:
                replace.append(slot)
        # Removed and replaced instances leave first, so a replacement never meets
        # its old self in etcd.
        await asyncio.gather(*(slot.stop(self._timeout) for slot in (*gone, *replace)))
        for slot in gone:
            del self._slots[slot.key]
            changes.removed.append(slot.key)
        for key, spec in wanted.items():
            slot = self._slots.get(key)
            if slot is not None and slot not in replace:
                continue
            self._slots[key] = _Slot(self, key, spec)
            self._slots[key].start()
            (changes.replaced if slot is not None else changes.added).append(key)
        return changes

    async def close(self) -> None:
        """Deregister everything (each bounded by the timeout)."""
        async with self._lock:
            # Not ready from the start: with its slots gone, the agent must not look
            # ready (all of no registrations live) while it deregisters.
            self._applied = False
            slots = list(self._slots.values())
            self._slots.clear()
            await asyncio.gather(*(slot.stop(self._timeout) for slot in slots))
        self._notify()

    def _state_changed(self, reg: Registration, state: RegistrationState) -> None:
        self._notify()

    def _health_changed(self, reg: Registration, health: CheckResult) -> None:
        self._notify()  # the guard logs the change itself

    def _notify(self) -> None:
        if self._on_change is not None:
            try:
                self._on_change()
            except Exception:
                log.exception("agent change listener failed")


def describe(reg: Registration) -> dict[str, Any]:
    """One registration as the readiness endpoint shows it."""
    health = reg.health
    return {
        "key": reg.key,
        "address": reg.address,
        "state": reg.state.value,
        "lease": reg.lease_id,
        "health": health.value if health is not None else None,
        "withdrawn": reg.withdrawn,
        "failures": list(reg.health_failures),
    }
