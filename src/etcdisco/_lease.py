"""The lease under a client's registrations: kept alive, healed forever, repaired.

A :class:`LeaseKeeper` owns one lease of a given TTL and the task that keeps it alive;
every :class:`Registration` of that TTL on the client shares it, so a process costs
etcd one lease and one keepalive stream however many services it registers.

The keeper's loop is the single place where registration states change:

    REGISTERED --keepalive fails--> RECONNECTING --lease presumed expired--> LOST
        ^                                 |                                    |
        +------ keepalive answers --------+--------------<---------------------+
        +------ re-grant + re-put <------ etcd says the lease is gone ---------+
    any --deregister()--> CLOSED

A keepalive that gets no answer is retried at once on the next endpoint, with a short
deadline, until the lease's own expiry (measured from when the last answered request
was sent): a stalled member costs a second, not the lease. Past that expiry the
registrations say ``lost``, and the keeper keeps asking about the same lease: etcd
extends every lease when it elects a leader, so after a loss of quorum the lease
usually lives on. A lease etcd reports gone is re-granted and every key re-put, with
capped exponential backoff and jitter, without ever giving up. Keys are only written
with a live lease id, so etcd itself refuses a write whose lease has gone (no
permanent keys, ever).

etcd is made to match what the registrations say, not merely told once: each round
after a keepalive the keeper reads the keys bound to its lease and repairs the
difference. A value that ``update()`` or ``drain()`` could not write is written; a key
deleted from outside is put back; a key that ``deregister()`` could not delete (etcd
unreachable) is deleted; and a key bound to the lease that no registration owns (a
late write landing after its deregister) is deleted. So a write that failed during an
outage is never the end of the story while a sibling keeps the shared lease alive.

The keeper knows registrations only through :class:`Member` (what it reads and writes
of them), so this module does not import the registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from typing import Any, Generic, Protocol, TypeVar

from ._backoff import Backoff
from ._errors import AuthError, ConfigError, EtcdError, LeaseNotFoundError, UnavailableError
from ._model import Status, encode_value
from ._tasks import cancelling
from .etcd import Compare, EtcdClient, KeepAliveStream, Op

__all__ = ["LeaseKeeper", "Member", "RegistrationState"]

# The registry's own logger: these are the registrations' events.
log = logging.getLogger("etcdisco.registry")

# One txn of first writes stays within etcd's defaults: --max-txn-ops 128 and a
# 1.5 MiB request limit.
_MAX_BATCH_OPS = 128
_MAX_BATCH_BYTES = 512 * 1024


class RegistrationState(enum.StrEnum):
    """Where a registration stands (``Registration.state``): ``pending`` until its
    first write, ``registered`` while its lease can be alive, ``reconnecting`` while
    keepalives fail, ``lost`` when the lease is presumed or known gone (or the key is
    held by another lease), ``closed`` after ``deregister()``."""

    PENDING = "pending"
    REGISTERED = "registered"
    RECONNECTING = "reconnecting"
    LOST = "lost"
    CLOSED = "closed"


class Member(Protocol):
    """What the keeper reads and writes of a registration (``Registration`` is one).

    The registration owns what the user asked for (address, metadata, status: its
    ``value``); the keeper owns what etcd is known to hold (``_written_value``,
    ``_held``) and the state."""

    key: str
    address: str
    revision: int
    re_registrations: int
    _metadata: dict[str, Any]
    _withdrawn: bool
    _held: bool
    _written_value: bytes | None
    _conflict_logged: bool

    @property
    def value(self) -> bytes: ...

    @property
    def state(self) -> RegistrationState: ...

    def _set_state(self, state: RegistrationState) -> None: ...

    def _wrote(self, value: bytes, revision: int) -> None: ...

    def _leaving_announced(self) -> bool: ...

    async def deregister(self, timeout: float = 5.0) -> None: ...


M = TypeVar("M", bound=Member)


class LeaseKeeper(Generic[M]):
    """Owns one lease and the task that keeps it alive, heals it, and makes etcd
    match the registrations under it.

    Every write of a key goes through ``self._lock``, so a deregistration can never
    be overtaken by a heal or an update of the same key.
    """

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
        self._registrations: dict[str, M] = {}
        # Attached, first write not done yet: the next lock holder writes them.
        self._unwritten: dict[str, M] = {}
        # Deregistered keys etcd may still hold under the lease: deleted once it answers.
        self._pending_deletes: set[str] = set()
        # Deregistrations under way, so that close() can wait for them.
        self._detaching: set[asyncio.Future[None]] = set()
        self._backoff = backoff or Backoff(initial=0.2, maximum=max(ttl / 2, 1.0))
        # Between keepalive attempts that failed: the next one goes to the next
        # endpoint, so it may follow at once; a little spacing spares a dead cluster.
        self._retry = Backoff(initial=0.05, maximum=1.0)
        self._interval = max(ttl / 3.0, 0.5)
        # A keepalive answer normally takes milliseconds; waiting longer than this for
        # one only eats into the TTL that a retry on another member needs.
        self._attempt_timeout = max(min(self._interval / 2, 2.0), 0.5)
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # serializes lease (re)creation and writes
        self._last_ack = 0.0
        self._expires_at = 0.0  # when the lease runs out unless refreshed (our estimate)
        self._next_round = 0.0
        self._abandoned: int | None = None
        self._closed = False
        self.last_keepalive_latency: float | None = None
        """Round trip of the latest successful keepalive (seconds; for metrics)."""

    @property
    def registrations(self) -> tuple[M, ...]:
        return tuple(self._registrations.values())

    @property
    def last_ack(self) -> float:
        """``time.monotonic()`` when etcd last granted or refreshed the lease."""
        return self._last_ack

    # -- attach / detach -----------------------------------------------------------

    async def attach(self, reg: M) -> None:
        """Write ``reg`` under the lease (granting it first if needed)."""
        if reg.key in self._registrations:
            raise ConfigError(f"{reg.key} is already registered by this client")
        self._registrations[reg.key] = reg
        self._unwritten[reg.key] = reg
        # Registered again after a deregister that etcd has not confirmed yet: the key
        # is this registration's now, and must not be deleted behind its back.
        self._pending_deletes.discard(reg.key)
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
            if self._registrations.get(reg.key) is reg:
                del self._registrations[reg.key]
            await self._retire_if_idle()
            raise
        reg._set_state(RegistrationState.REGISTERED)
        self._ensure_task()

    def _next_batch(self, first: M) -> list[M]:
        batch = [first]
        size = len(first.key) + len(first.value)
        for other in self._unwritten.values():
            if len(batch) >= _MAX_BATCH_OPS or size >= _MAX_BATCH_BYTES:
                break
            if other is not first:
                batch.append(other)
                size += len(other.key) + len(other.value)
        return batch

    async def _put_batch(self, batch: list[M]) -> None:
        lease = self.lease_id
        assert lease is not None
        todo = [reg for reg in batch if not reg._withdrawn]
        if todo:
            values = [reg.value for reg in todo]
            ops = [
                Op.put(reg.key, value, lease=lease, prev_kv=True)
                for reg, value in zip(todo, values, strict=True)
            ]
            result = await self._etcd.txn([], ops)
            for reg, value, prev in zip(todo, values, result.prev_kvs, strict=True):
                reg._wrote(value, result.revision)
                if prev is not None and prev.lease not in (0, lease):
                    # The newest registrant wins the key; the other one hears of it from
                    # its keeper's next check. Both sides are told.
                    log.warning(
                        "%s was held by lease %x (the same instance id registered "
                        "elsewhere?); it is this process's now",
                        reg.key,
                        prev.lease,
                    )
        for reg in batch:
            reg._held = True
            self._unwritten.pop(reg.key, None)
        # A member whose register() was cancelled while the txn ran must not stay
        # behind under a lease that lives on for the others.
        for reg in todo:
            if self._registrations.get(reg.key) is not reg:
                with contextlib.suppress(EtcdError):
                    await self._etcd.txn(
                        [Compare.lease(reg.key, "==", lease)], [Op.delete(reg.key)]
                    )

    async def write(self, reg: M) -> None:
        """Write ``reg``'s current value if the key is still ours; a failure (or a
        key not ours right now) is settled by the keeper's next round."""
        async with self._lock:
            lease = self.lease_id
            if self._registrations.get(reg.key) is not reg or reg._withdrawn:
                return  # nothing to write now; restore() writes the current value
            if lease is None:
                # The re-registration under way writes the current value.
                raise UnavailableError(
                    f"{reg.key}: the lease is being re-granted; the value is written with it"
                )
            value = reg.value
            result = await self._etcd.txn(
                [Compare.lease(reg.key, "==", lease)], [Op.put(reg.key, value, lease=lease)]
            )
            if result.succeeded:
                reg._wrote(value, result.revision)

    async def withdraw(self, reg: M) -> None:
        """Take ``reg``'s key out of etcd while the lease lives on (failing checks)."""
        async with self._lock:
            reg._withdrawn = True  # first, so neither healing nor verifying puts it back
            lease = self.lease_id
            if lease is None or reg.key not in self._registrations:
                return
            # Say "unhealthy" before deleting, so caches count the removal as announced
            # and never hold the instance as suspect (discovery's mass-expiry guard).
            owned = [Compare.lease(reg.key, "==", lease)]
            value = reg.value
            result = await self._etcd.txn(owned, [Op.put(reg.key, value, lease=lease)])
            if result.succeeded:
                reg._wrote(value, result.revision)
            await self._etcd.txn(owned, [Op.delete(reg.key)])
            reg._written_value = None

    async def restore(self, reg: M) -> None:
        """Put a withdrawn key back under the current lease."""
        async with self._lock:
            try:
                lease = self.lease_id
                if lease is not None and self._registrations.get(reg.key) is reg:
                    value = reg.value
                    result = await self._etcd.put(reg.key, value, lease=lease)
                    reg._wrote(value, result.revision)
            finally:
                # Only now, so "not withdrawn" means the key is back; after a failed
                # put the keeper's key check puts it back on a later round.
                reg._withdrawn = False

    async def detach(self, reg: M) -> None:
        """Delete ``reg``'s key (saying ``draining`` first) and forget it; revoke the
        lease when it was the last. A delete that etcd does not confirm stays pending
        and is retried by the keeper for as long as the lease lives."""
        if self._registrations.get(reg.key) is not reg:
            return
        # Forgotten before the first await: no heal, update or key check writes it again.
        del self._registrations[reg.key]
        self._unwritten.pop(reg.key, None)
        self._pending_deletes.add(reg.key)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._detaching.add(done)
        try:
            async with self._lock:
                lease = self.lease_id
                if reg.key in self._registrations:
                    pass  # registered anew meanwhile: the key belongs to the new one
                elif lease is None:
                    # Lost: the key went with the old lease, or goes when the heal
                    # revokes it; the heal does not put it back.
                    self._pending_deletes.discard(reg.key)
                else:
                    await self._delete(reg, lease)
                    self._pending_deletes.discard(reg.key)
        finally:
            try:
                await self._retire_if_idle()
            finally:
                done.set_result(None)
                self._detaching.discard(done)

    async def _delete(self, reg: M, lease: int) -> None:
        # Only touch the key if it is still ours: a restarted twin may own it now.
        owned = [Compare.lease(reg.key, "==", lease)]
        if not reg._leaving_announced():
            # A lease expiry and a deletion look the same in a watch (a DELETE event,
            # nothing else), so a graceful exit says "draining" first: a cache then
            # tells a planned departure from a crash, and only crashes count towards
            # mass-expiry protection. One extra write per exit; a put and a delete of
            # one key cannot share a txn.
            leaving = {**reg._metadata, "status": Status.DRAINING.value}
            value = encode_value(reg.address, leaving)
            await self._etcd.txn(owned, [Op.put(reg.key, value, lease=lease)])
        await self._etcd.txn(owned, [Op.delete(reg.key)])

    async def _retire_if_idle(self) -> None:
        """With nothing left to keep, stop and revoke the lease (its keys go with it,
        including any whose delete is still pending)."""
        if self._registrations or self._unwritten:
            return
        # Cleared before any await: an attach that comes in meanwhile grants afresh
        # instead of writing under a lease about to be revoked.
        lease, self.lease_id = self.lease_id, None
        self._pending_deletes.clear()
        await self._stop_task()
        if lease is not None:
            try:
                await self._etcd.lease_revoke(lease)
            except LeaseNotFoundError:
                pass
            except EtcdError as exc:
                # Nothing keeps it alive any more: it expires within its TTL.
                log.warning("could not revoke lease %x (%s); it expires by itself", lease, exc)

    async def close(self, timeout: float = 5.0) -> None:
        """Deregister everything and wait for deregistrations under way (bounded),
        then stop."""
        regs = list(self._registrations.values())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await asyncio.gather(
                    *(r.deregister(timeout) for r in regs),
                    *self._detaching,
                    return_exceptions=True,
                )
        self._closed = True
        await self._stop_task()

    # -- lease and writes ----------------------------------------------------------

    async def _grant(self) -> None:
        sent = time.monotonic()
        grant = await self._etcd.lease_grant(self.ttl)
        self.lease_id = grant.id
        self._last_ack = time.monotonic()
        self._expires_at = sent + grant.ttl
        self._next_round = sent + self._interval
        log.info("granted lease %x (ttl %ss)", grant.id, grant.ttl)

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
            if state is not RegistrationState.REGISTERED or reg._held:
                reg._set_state(state)

    async def _run(self) -> None:
        while self._registrations and not self._closed:
            try:
                if self.lease_id is None:
                    await self._heal()
                    continue
                delay = self._next_round - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await self._keep_alive()
                lease = self.lease_id
                if lease is not None:
                    # Repairs must not hold up the next keepalive: what does not fit
                    # before it is done in a later round.
                    budget = max(self._next_round - time.monotonic(), self._interval / 2)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(budget):
                            await self._reconcile(lease)
            except asyncio.CancelledError:
                if cancelling():
                    raise
                log.warning("lease keeper: a call was cancelled under it; continuing")
            except Exception:
                # The keeper must outlive any surprise: a dead keeper is a vanished service.
                log.exception("lease keeper round failed; continuing")
                await asyncio.sleep(self._retry.next_delay())

    async def _keep_alive(self) -> None:
        """One keepalive, retried on the next endpoint at once until etcd answers.

        Past the lease's expiry as counted here the registrations say ``lost``, yet
        the keeper goes on asking about the same lease rather than giving it up: etcd
        cannot expire a lease while it has no leader, and a new leader extends every
        lease, so after a loss of quorum the old lease (and its keys) is usually
        alive. Only etcd's own word that it is gone starts a re-registration; moving
        to a new lease on a guess would make every cache see the fleet leave and
        come back."""
        lease = self.lease_id
        presumed_lost = False
        while lease is not None and self.lease_id == lease:
            sent = time.monotonic()
            left = self._expires_at - sent
            if left <= 0 and not presumed_lost:
                presumed_lost = True
                log.warning(
                    "lease %x: no keepalive answered for %.1fs (ttl %ss); presumed expired",
                    lease,
                    sent - self._last_ack,
                    self.ttl,
                )
                self._set_all(RegistrationState.LOST)
            budget = self._attempt_timeout if presumed_lost else min(self._attempt_timeout, left)
            try:
                ttl = await self._stream.keepalive(lease, timeout=budget)
            except LeaseNotFoundError:
                log.warning("lease %x is gone; re-registering", lease)
                self._lose_lease()
                return
            except EtcdError as exc:
                if not presumed_lost:
                    self._set_all(RegistrationState.RECONNECTING)
                delay = self._retry.next_delay()
                if not presumed_lost:
                    delay = min(delay, max(self._expires_at - time.monotonic(), 0))
                log.debug("keepalive of lease %x failed (%s); again in %.2fs", lease, exc, delay)
                await asyncio.sleep(delay)
                continue
            if self.lease_id != lease:
                return
            if presumed_lost:
                log.info("lease %x is alive after all", lease)
            self._retry.reset()
            self._last_ack = time.monotonic()
            self._expires_at = sent + ttl
            self._next_round = sent + self._interval
            self.last_keepalive_latency = self._last_ack - sent
            self._set_all(RegistrationState.REGISTERED)
            return

    def _lose_lease(self) -> None:
        self._abandoned = self.lease_id
        self.lease_id = None
        for reg in self._registrations.values():
            reg._held = False
            reg._written_value = None
        self._set_all(RegistrationState.LOST)

    async def _heal(self) -> None:
        """Re-grant and re-put every registration; retries forever with backoff."""
        told: str | None = None
        while self._registrations and not self._closed:
            try:
                async with self._lock:
                    # attach() may have granted one meanwhile: reuse it.
                    if self.lease_id is None:
                        await self._grant()
                    lease = self.lease_id
                    assert lease is not None
                    await self._put_all(lease, self._abandoned)
                    self._set_all(RegistrationState.REGISTERED)
                    await self._revoke_abandoned()
            except asyncio.CancelledError:
                if cancelling():
                    raise
                delay = self._backoff.next_delay()
            except LeaseNotFoundError:
                # The new lease ran out while the heal retried (nothing refreshes it
                # meanwhile): whatever was put under it went with it. Start afresh.
                self.lease_id = None
                for reg in self._registrations.values():
                    reg._held = False
                delay = self._backoff.next_delay()
            except EtcdError as exc:
                delay = self._backoff.next_delay()
                # Said once per kind of failure: an outage can last, and a refusal
                # (permission denied) needs an operator, not a log line a second.
                kind = type(exc).__name__
                level = logging.ERROR if isinstance(exc, AuthError) else logging.WARNING
                if kind != told:
                    told = kind
                    log.log(level, "re-registering failed (%s); retrying with backoff", exc)
                log.debug("re-register failed (%s); retrying in %.2fs", exc, delay)
            except Exception:
                delay = self._backoff.next_delay()
                log.exception("re-register failed; retrying in %.2fs", delay)
            else:
                self._backoff.reset()
                held = sum(1 for reg in self._registrations.values() if reg._held)
                self._set_all(RegistrationState.REGISTERED)
                log.info("re-registered %d instance(s) under lease %x", held, self.lease_id)
                return
            await asyncio.sleep(delay)

    async def _put_all(self, lease: int, previous: int | None) -> None:
        """Put every registration not under ``lease`` yet, in txns of up to
        ``_MAX_BATCH_OPS``. A key moves over from ``previous`` (a lease given up for
        silence that may still live: moving, rather than revoking first, spares the
        caches a removal and a return) or is put where absent; a key held by any
        other lease belongs to a twin with the same id, and the keeper does not
        fight it."""
        todo = [reg for reg in self._registrations.values() if not reg._held and not reg._withdrawn]
        for start in range(0, len(todo), _MAX_BATCH_OPS):
            # Deregistered meanwhile (they do not need the lock to be forgotten): skip.
            batch = [r for r in todo[start : start + _MAX_BATCH_OPS] if self._owns(r)]
            if not batch:
                continue
            values = [reg.value for reg in batch]
            puts = [Op.put(reg.key, v, lease=lease) for reg, v in zip(batch, values, strict=True)]
            conditions = [[Compare.version(reg.key, "==", 0) for reg in batch]]
            if previous is not None:
                conditions.insert(0, [Compare.lease(reg.key, "==", previous) for reg in batch])
            for compare in conditions:
                result = await self._etcd.txn(compare, puts)
                if result.succeeded:
                    for reg, value in zip(batch, values, strict=True):
                        reg._wrote(value, result.revision)
                        reg._held = True
                        reg.re_registrations += 1
                    break
            else:
                for reg in batch:
                    await self._claim(reg, lease, previous)
        for reg in self._registrations.values():
            if reg._withdrawn:
                reg._held = True  # absent on purpose: nothing to put back

    def _owns(self, reg: M) -> bool:
        return self._registrations.get(reg.key) is reg

    async def _claim(self, reg: M, lease: int, previous: int | None = None) -> bool:
        """Put ``reg`` under ``lease`` where its key is absent or held by ``lease``
        or ``previous``; leave it to any other lease."""
        value = reg.value
        result = await self._etcd.txn(
            [Compare.version(reg.key, "==", 0)],
            [Op.put(reg.key, value, lease=lease)],
            [Op.get(reg.key)],
        )
        if not result.succeeded and result.kvs and result.kvs[0].lease in (lease, previous):
            # Ours already (a write whose answer was lost, or the lease given up): move
            # it over and bring the value up to date.
            result = await self._etcd.txn(
                [Compare.lease(reg.key, "==", result.kvs[0].lease)],
                [Op.put(reg.key, value, lease=lease)],
            )
        if result.succeeded:
            reg._wrote(value, result.revision)
            if not reg._held:
                reg._held = True
                reg.re_registrations += 1
            reg._conflict_logged = False
            return True
        if not reg._conflict_logged:
            reg._conflict_logged = True
            log.warning("%s is held by another lease (same instance id elsewhere?)", reg.key)
        return False

    async def _revoke_abandoned(self) -> None:
        """A lease given up for silence may still live (etcd keeps leases across its
        own restarts): revoke it rather than let it linger for a TTL."""
        old, self._abandoned = self._abandoned, None
        if old is not None and old != self.lease_id:
            try:
                await self._etcd.lease_revoke(old, timeout=1.0)
            except LeaseNotFoundError:
                pass
            except EtcdError:
                # It holds none of our keys now, and nobody refreshes it: it expires.
                log.debug("could not revoke abandoned lease %x", old)

    async def _reconcile(self, lease: int) -> None:
        """Make etcd hold exactly what the registrations say under ``lease``."""
        # Only keys written before the lookup can be judged by its answer: a
        # registration still waiting for its first write (a batch of register()
        # calls queued on the lock) is absent from it but about to be written.
        pending = RegistrationState.PENDING
        settled = [reg for reg in self._registrations.values() if reg.state is not pending]
        info = await self._etcd.lease_time_to_live(lease, keys=True)
        if self.lease_id != lease:
            return
        bound = {k.decode("utf-8", "replace") for k in info.keys}
        for key in bound:
            if key not in self._registrations and key not in self._unwritten:
                # Ours by lease, nobody's by registration: a write that landed after
                # its deregister. It must not live on with the lease.
                if key not in self._pending_deletes:
                    log.warning("%s is under lease %x but not registered; deleting it", key, lease)
                self._pending_deletes.add(key)
        for key in list(self._pending_deletes):
            async with self._lock:
                if self.lease_id != lease:
                    return
                if key not in self._registrations:
                    await self._etcd.txn([Compare.lease(key, "==", lease)], [Op.delete(key)])
                self._pending_deletes.discard(key)
        for reg in settled:
            async with self._lock:
                if self.lease_id != lease:
                    return
                if not self._owns(reg) or reg._withdrawn:
                    continue
                if reg.key not in bound:
                    # Deleted from outside (or never made it back): put back, unless a
                    # twin with the same id holds it.
                    was_held = reg._held
                    reg._held = False
                    if await self._claim(reg, lease):
                        if was_held:
                            log.warning("%s was deleted from outside; put it back", reg.key)
                    else:
                        reg._set_state(RegistrationState.LOST)
                elif reg._written_value != reg.value:
                    # An update or drain that etcd did not take: write it now.
                    await self._write_held(reg, lease)

    async def _write_held(self, reg: M, lease: int) -> None:
        value = reg.value
        result = await self._etcd.txn(
            [Compare.lease(reg.key, "==", lease)], [Op.put(reg.key, value, lease=lease)]
        )
        if result.succeeded:
            reg._wrote(value, result.revision)
            log.info("%s: wrote the value etcd had missed", reg.key)
