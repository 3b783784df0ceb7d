"""Registration of service instances: one lease, kept alive, healed forever.

A :class:`LeaseKeeper` owns one lease of a given TTL and the task that keeps it alive;
every :class:`Registration` of that TTL on the client shares it, so a process costs
etcd one lease and one keepalive stream however many services it registers.

The keeper's loop is the single place where registration states change:

    REGISTERED --keepalive fails--> RECONNECTING --no ack for a TTL--> LOST
        ^                                 |                              |
        +------ keepalive answers --------+       re-grant + re-put <----+
    any --deregister()--> CLOSED

A lost lease is re-granted and every key re-put, with capped exponential backoff and
jitter, without ever giving up. Keys are only written with a live lease id, so etcd
itself refuses a write whose lease has gone (no permanent keys, ever).

A registration given health checks owns a :class:`~etcdisco.health._guard.HealthGuard`:
while its checks fail the value says ``status: unhealthy`` (or the key is withdrawn),
always under the same lease, so a flapping check never causes a re-grant.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from ._backoff import Backoff
from ._errors import (
    ConfigError,
    EtcdError,
    EtcdTimeoutError,
    LeaseNotFoundError,
    RegistrationError,
)
from ._model import (
    Status,
    encode_value,
    instance_key,
    normalize_address,
    validate_instance_id,
    validate_service_name,
)
from .etcd import Compare, EtcdClient, KeepAliveStream, Op
from .health import Check, CheckResult
from .health._guard import HealthGuard, OnFailing, validate_checks

log = logging.getLogger("etcdisco.registry")

MIN_TTL = 2  # etcd's minimum with the default election timeout
# One txn of first writes stays within etcd's defaults: --max-txn-ops 128 and a
# 1.5 MiB request limit.
_MAX_BATCH_OPS = 128
_MAX_BATCH_BYTES = 512 * 1024


class RegistrationState(enum.StrEnum):
    PENDING = "pending"
    REGISTERED = "registered"
    RECONNECTING = "reconnecting"
    LOST = "lost"
    CLOSED = "closed"


StateListener = Callable[["Registration", RegistrationState], None]
HealthListener = Callable[["Registration", CheckResult], None]


class Registration:
    """One service instance in etcd. Use ``async with`` to deregister on exit."""

    def __init__(
        self,
        keeper: LeaseKeeper,
        *,
        prefix: str,
        service: str,
        address: str,
        instance_id: str,
        metadata: Mapping[str, Any],
        checks: Sequence[Check] = (),
        on_failing: OnFailing = OnFailing.MARK,
    ) -> None:
        self._keeper = keeper
        self.service = service
        self.address = address
        self.instance_id = instance_id
        self.key = instance_key(prefix, service, instance_id)
        self._metadata: dict[str, Any] = dict(metadata)
        self._failing = False  # checks say unhealthy: written as status "unhealthy"
        self._withdrawn = False  # key deleted on purpose while the lease lives on
        self._value = b""
        self._status: Any = None  # the status _value carries
        self._written_status: Any = None  # the status of our latest write
        self._encode()
        self._state = RegistrationState.PENDING
        self._listeners: list[StateListener] = []
        self._health_listeners: list[HealthListener] = []
        self._guard = HealthGuard(self, checks, on_failing) if checks else None
        self._conflict_logged = False
        self.revision = 0
        """mod_revision of our latest write."""
        self.re_registrations = 0

    # -- read-only views -----------------------------------------------------------

    @property
    def metadata(self) -> Mapping[str, Any]:
        return MappingProxyType(self._metadata)

    @property
    def value(self) -> bytes:
        return self._value

    @property
    def state(self) -> RegistrationState:
        return self._state

    @property
    def lease_id(self) -> int | None:
        return self._keeper.lease_id

    @property
    def ttl(self) -> int:
        return self._keeper.ttl

    @property
    def health(self) -> CheckResult | None:
        """The combined state of the checks (None when registered without checks)."""
        return self._guard.state if self._guard is not None else None

    @property
    def health_failures(self) -> tuple[str, ...]:
        """What each check that is not passing last said."""
        return tuple(self._guard.monitor.failures()) if self._guard is not None else ()

    @property
    def withdrawn(self) -> bool:
        """True while failing checks keep the key out of etcd (``on_failing="withdraw"``)."""
        return self._withdrawn

    def add_health_listener(self, listener: HealthListener) -> None:
        """Call ``listener(registration, health)`` when the checks' combined state changes."""
        self._health_listeners.append(listener)

    def add_listener(self, listener: StateListener) -> None:
        """Call ``listener(registration, state)`` on every state change."""
        self._listeners.append(listener)

    def remove_listener(self, listener: StateListener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _set_state(self, state: RegistrationState) -> None:
        if state is self._state or self._state is RegistrationState.CLOSED:
            return
        old, self._state = self._state, state
        level = logging.WARNING if state is RegistrationState.LOST else logging.INFO
        log.log(level, "registration %s: %s -> %s", self.key, old.value, state.value)
        for listener in list(self._listeners):
            try:
                listener(self, state)
            except Exception:
                log.exception("registration listener failed")

    # -- health --------------------------------------------------------------------

    def _encode(self) -> None:
        meta: Mapping[str, Any] = self._metadata
        # A draining instance stays draining: leaving outranks being unwell.
        if self._failing and meta.get("status") != Status.DRAINING.value:
            meta = {**meta, "status": Status.UNHEALTHY.value}
        self._value = encode_value(self.address, meta)
        self._status = meta.get("status")

    def _leaving_announced(self) -> bool:
        """Whether etcd already tells clients not to count on this instance, so that
        deleting the key needs no ``draining`` mark first (see LeaseKeeper.detach)."""
        return self._withdrawn or self._written_status in (
            Status.DRAINING.value,
            Status.UNHEALTHY.value,
        )

    def _health_changed(self, state: CheckResult) -> None:
        for listener in list(self._health_listeners):
            try:
                listener(self, state)
            except Exception:
                log.exception("health listener failed")

    async def _apply_health(self, failing: bool) -> None:
        """Write the checks' verdict under the current lease (called by the guard)."""
        if self._state is RegistrationState.CLOSED:
            return
        self._failing = failing
        self._encode()
        assert self._guard is not None  # only the guard calls this
        if failing and self._guard.mode is OnFailing.WITHDRAW:
            await self._keeper.withdraw(self)
        elif self._withdrawn:
            await self._keeper.restore(self)
        else:
            await self._keeper.write(self)

    async def _open(self) -> None:
        """First write (after one round of checks, so it already tells the truth),
        then start the checks."""
        if self._guard is not None:
            self._failing = await self._guard.first_round()
            self._withdrawn = self._failing and self._guard.mode is OnFailing.WITHDRAW
            self._encode()
        await self._keeper.attach(self)
        if self._guard is not None:
            self._guard.start()

    # -- changes -------------------------------------------------------------------

    async def update(self, metadata: Mapping[str, Any]) -> None:
        """Replace the metadata (kept across re-registrations)."""
        self._check_open()
        encode_value(self.address, metadata)  # validate before changing anything
        self._metadata = dict(metadata)
        self._encode()
        await self._keeper.write(self)

    async def drain(self, wait: float = 0.0) -> None:
        """Mark the instance ``draining`` so clients stop picking it; then wait
        ``wait`` seconds for them to notice before the caller stops serving."""
        self._check_open()
        await self.update({**self._metadata, "status": Status.DRAINING.value})
        if wait > 0:
            await asyncio.sleep(wait)

    async def deregister(self, timeout: float = 5.0) -> None:
        """Mark the instance ``draining`` (unless it already is), delete the key, then
        revoke the lease if no other registration uses it."""
        if self._state is RegistrationState.CLOSED:
            return
        try:
            async with asyncio.timeout(timeout):
                if self._guard is not None:
                    await self._guard.stop()
                await self._keeper.detach(self)
        except TimeoutError as exc:
            if isinstance(exc, EtcdError):
                raise
            raise EtcdTimeoutError(f"deregistering {self.key} took over {timeout}s") from None
        finally:
            self._set_state(RegistrationState.CLOSED)

    def _check_open(self) -> None:
        if self._state is RegistrationState.CLOSED:
            raise RegistrationError(f"registration {self.key} is closed")

    async def __aenter__(self) -> Registration:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.deregister()

    def __repr__(self) -> str:
        return f"<Registration {self.key} {self.address} {self._state.value}>"


class LeaseKeeper:
    """Owns one lease and the task that keeps it alive and heals it."""

    def __init__(
        self,
        etcd: EtcdClient,
        stream: KeepAliveStream,
        ttl: int,
        *,
        backoff: Backoff | None = None,
    ) -> None:
        self._etcd = etcd
        self._stream = stream
        self.ttl = ttl
        self.lease_id: int | None = None
        self._registrations: dict[str, Registration] = {}
        # Attached, first write not done yet: the next lock holder writes them.
        self._unwritten: dict[str, Registration] = {}
        self._backoff = backoff or Backoff(initial=0.2, maximum=max(ttl / 2, 1.0))
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()  # serializes lease (re)creation and writes
        self._last_ack = 0.0
        self._abandoned: int | None = None
        self._closed = False
        self.last_keepalive_latency: float | None = None
        """Round trip of the latest successful keepalive (seconds; for metrics)."""

    @property
    def registrations(self) -> tuple[Registration, ...]:
        return tuple(self._registrations.values())

    @property
    def last_ack(self) -> float:
        """``time.monotonic()`` when etcd last granted or refreshed the lease."""
        return self._last_ack

    # -- attach / detach -----------------------------------------------------------

    async def attach(self, reg: Registration) -> None:
        """Write ``reg`` under the lease (granting it first if needed)."""
        if reg.key in self._registrations:
            raise ConfigError(f"{reg.key} is already registered by this client")
        self._registrations[reg.key] = reg
        self._unwritten[reg.key] = reg
        try:
            async with self._lock:
                # Whoever holds the lock writes every first write queued behind it in
                # one txn: many register() calls at once cost a few round trips, not
                # one each. A failed batch leaves its members queued; each retries.
                if reg.key in self._unwritten:
                    batch = self._next_batch(reg)
                    if self.lease_id is None:
                        await self._grant()
                    try:
                        await self._put_batch(batch)
                    except LeaseNotFoundError:
                        # The lease died unseen (no keepalive runs while nothing is attached).
                        await self._grant()
                        await self._put_batch(batch)
        except BaseException:
            self._unwritten.pop(reg.key, None)
            self._registrations.pop(reg.key, None)
            if not self._registrations and self.lease_id is not None:
                # Nothing keeps this lease alive now: let the next attach start afresh.
                self._lose_lease()
                await self._revoke_abandoned()
            raise
        reg._set_state(RegistrationState.REGISTERED)
        self._ensure_task()

    def _next_batch(self, first: Registration) -> list[Registration]:
        batch = [first]
        size = len(first.key) + len(first.value)
        for other in self._unwritten.values():
            if len(batch) >= _MAX_BATCH_OPS or size >= _MAX_BATCH_BYTES:
                break
            if other is not first:
                batch.append(other)
                size += len(other.key) + len(other.value)
        return batch

    async def _put_batch(self, batch: list[Registration]) -> None:
        lease = self.lease_id
        assert lease is not None
        todo = [reg for reg in batch if not reg._withdrawn]
        if todo:
            ops = [Op.put(reg.key, reg.value, lease=lease) for reg in todo]
            result = await self._etcd.txn([], ops)
            for reg in todo:
                reg.revision = result.revision
                reg._written_status = reg._status
        for reg in batch:
            self._unwritten.pop(reg.key, None)
        # A member whose register() was cancelled while the txn ran must not stay
        # behind under a lease that lives on for the others.
        for reg in todo:
            if self._registrations.get(reg.key) is not reg:
                with contextlib.suppress(EtcdError):
                    await self._etcd.txn(
                        [Compare.lease(reg.key, "==", lease)], [Op.delete(reg.key)]
                    )

    async def write(self, reg: Registration) -> None:
        async with self._lock:
            if self.lease_id is not None and reg.key in self._registrations:
                await self._put(reg)

    async def withdraw(self, reg: Registration) -> None:
        """Take ``reg``'s key out of etcd while the lease lives on (failing checks)."""
        async with self._lock:
            reg._withdrawn = True  # first, so neither healing nor verifying puts it back
            lease = self.lease_id
            if lease is None or reg.key not in self._registrations:
                return
            # Say "unhealthy" before deleting, so caches count the removal as announced
            # and never hold the instance as suspect (discovery's mass-expiry guard).
            owned = [Compare.lease(reg.key, "==", lease)]
            await self._etcd.txn(owned, [Op.put(reg.key, reg.value, lease=lease)])
            await self._etcd.txn(owned, [Op.delete(reg.key)])

    async def restore(self, reg: Registration) -> None:
        """Put a withdrawn key back under the current lease."""
        async with self._lock:
            try:
                if self.lease_id is not None and reg.key in self._registrations:
                    await self._put(reg, restoring=True)
            finally:
                # Only now, so "not withdrawn" means the key is back; after a failed
                # put the keeper's key check puts it back on a later tick.
                reg._withdrawn = False

    async def detach(self, reg: Registration) -> None:
        if self._registrations.pop(reg.key, None) is None:
            return
        lease = self.lease_id
        try:
            # Only touch the key if it is still ours: a restarted twin may own it now.
            owned = [Compare.lease(reg.key, "==", lease or 0)]
            if lease is not None and not reg._leaving_announced():
                # A lease expiry and a deletion look the same in a watch (a DELETE
                # event, nothing else), so a graceful exit says "draining" first: a
                # cache then tells a planned departure from a crash, and only crashes
                # count towards mass-expiry protection. One extra write per exit; a
                # put and a delete of one key cannot share a txn.
                leaving = {**reg._metadata, "status": Status.DRAINING.value}
                value = encode_value(reg.address, leaving)
                await self._etcd.txn(owned, [Op.put(reg.key, value, lease=lease)])
            await self._etcd.txn(owned, [Op.delete(reg.key)])
        finally:
            if not self._registrations:
                await self._stop_task()
                self.lease_id = None
                if lease is not None:
                    with contextlib.suppress(LeaseNotFoundError):
                        await self._etcd.lease_revoke(lease)

    async def close(self, timeout: float = 5.0) -> None:
        """Deregister everything (bounded), then stop."""
        regs = list(self._registrations.values())
        with contextlib.suppress(EtcdError, TimeoutError):
            async with asyncio.timeout(timeout):
                await asyncio.gather(*(r.deregister(timeout) for r in regs))
        self._closed = True
        await self._stop_task()

    # -- lease and writes ----------------------------------------------------------

    async def _grant(self) -> None:
        grant = await self._etcd.lease_grant(self.ttl)
        self.lease_id = grant.id
        self._last_ack = time.monotonic()
        log.info("granted lease %x (ttl %ss)", grant.id, grant.ttl)

    async def _put(self, reg: Registration, *, restoring: bool = False) -> None:
        assert self.lease_id is not None
        if reg._withdrawn and not restoring:
            return
        result = await self._etcd.put(reg.key, reg.value, lease=self.lease_id)
        reg.revision = result.revision
        reg._written_status = reg._status

    # -- the loop ------------------------------------------------------------------

    def _ensure_task(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"etcdisco-lease-keeper-{self.ttl}s"
            )

    async def _stop_task(self) -> None:
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _set_all(self, state: RegistrationState) -> None:
        for reg in list(self._registrations.values()):
            reg._set_state(state)

    async def _run(self) -> None:
        interval = max(self.ttl / 3.0, 0.5)
        while self._registrations and not self._closed:
            if self.lease_id is None:
                await self._heal()
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self._tick(interval)
            except asyncio.CancelledError:
                raise
            except Exception:
                # The keeper must outlive any surprise: a dead keeper is a vanished service.
                log.exception("lease keeper tick failed; continuing")

    async def _tick(self, interval: float) -> None:
        lease = self.lease_id
        if lease is None:
            return
        sent = time.monotonic()
        try:
            await self._stream.keepalive(lease, timeout=interval)
        except asyncio.CancelledError:
            raise
        except LeaseNotFoundError:
            log.warning("lease %x is gone; re-registering", lease)
            self._lose_lease()
            return
        except Exception as exc:
            # Whatever broke the round trip (a typed etcd error or a surprise from grpc),
            # a lease without an ack for a whole TTL is gone.
            silent_for = time.monotonic() - self._last_ack
            if silent_for >= self.ttl:
                log.warning("no keepalive ack for %.1fs (ttl %ss): %s", silent_for, self.ttl, exc)
                self._lose_lease()
            else:
                self._set_all(RegistrationState.RECONNECTING)
            return
        self._last_ack = time.monotonic()
        self.last_keepalive_latency = self._last_ack - sent
        self._set_all(RegistrationState.REGISTERED)
        with contextlib.suppress(EtcdError):
            await self._verify_keys(lease)

    def _lose_lease(self) -> None:
        self._abandoned = self.lease_id
        self.lease_id = None
        self._set_all(RegistrationState.LOST)

    async def _heal(self) -> None:
        """Re-grant and re-put every registration; retries forever with backoff."""
        while self._registrations and not self._closed:
            try:
                async with self._lock:
                    # attach() may have granted one meanwhile: reuse it.
                    if self.lease_id is None:
                        await self._grant()
                    for reg in list(self._registrations.values()):
                        await self._put(reg)
                        reg.re_registrations += 1
            except asyncio.CancelledError:
                raise
            except EtcdError as exc:
                self.lease_id = None
                delay = self._backoff.next_delay()
                log.debug("re-register failed (%s); retrying in %.2fs", exc, delay)
                await asyncio.sleep(delay)
                continue
            self._backoff.reset()
            self._set_all(RegistrationState.REGISTERED)
            await self._revoke_abandoned()
            log.info(
                "re-registered %d instance(s) under lease %x",
                len(self._registrations),
                self.lease_id,
            )
            return

    async def _revoke_abandoned(self) -> None:
        """A lease given up for silence may still live (etcd keeps leases across its
        own restarts); it holds no keys now, so revoke it rather than wait a TTL."""
        old, self._abandoned = self._abandoned, None
        if old is not None and old != self.lease_id:
            with contextlib.suppress(EtcdError):
                await self._etcd.lease_revoke(old, timeout=1.0)

    async def _verify_keys(self, lease: int) -> None:
        """Put back keys that were deleted from outside while the lease lives."""
        # Only keys written before the lookup can be judged by its answer: a
        # registration still waiting for its first write (a batch of register()
        # calls queued on the lock) is absent from it but about to be written.
        settled = [
            reg
            for reg in self._registrations.values()
            if reg.state is not RegistrationState.PENDING
        ]
        try:
            info = await self._etcd.lease_time_to_live(lease, keys=True)
        except EtcdError:
            return  # the next tick tries again
        bound = {k.decode("utf-8", "replace") for k in info.keys}
        for reg in settled:
            if reg.key in bound:
                reg._conflict_logged = False
                continue
            async with self._lock:
                if self.lease_id != lease:
                    return
                if reg.key not in self._registrations or reg._withdrawn:
                    continue
                # Put back only when the key is absent: a key on another lease belongs
                # to someone else (a twin with the same id), and we do not fight it.
                result = await self._etcd.txn(
                    [Compare.version(reg.key, "==", 0)],
                    [Op.put(reg.key, reg.value, lease=lease)],
                )
            if result.succeeded:
                reg.re_registrations += 1
                reg.revision = result.revision
                reg._written_status = reg._status
                log.warning("%s was deleted from outside; put it back", reg.key)
            elif not reg._conflict_logged:
                reg._conflict_logged = True
                log.warning("%s is held by another lease (same instance id elsewhere?)", reg.key)


def make_registration(
    keeper: LeaseKeeper,
    *,
    prefix: str,
    service: str,
    address: str,
    instance_id: str | None,
    metadata: Mapping[str, Any] | None,
    checks: Sequence[Check] = (),
    on_failing: str = "mark",
) -> Registration:
    """Validate everything before anything is written."""
    service = validate_service_name(service)
    address = normalize_address(address)
    instance_id = validate_instance_id(instance_id if instance_id is not None else address)
    found, mode = validate_checks(checks, on_failing)
    return Registration(
        keeper,
        prefix=prefix,
        service=service,
        address=address,
        instance_id=instance_id,
        metadata=dict(metadata or {}),
        checks=found,
        on_failing=mode,
    )


def validate_ttl(ttl: int) -> int:
    if not isinstance(ttl, int) or isinstance(ttl, bool) or ttl < MIN_TTL:
        raise ConfigError(f"ttl must be an integer >= {MIN_TTL} seconds, got {ttl!r}")
    return ttl
