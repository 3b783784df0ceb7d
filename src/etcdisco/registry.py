"""Registration of service instances: what the user asked for, kept in etcd.

A :class:`Registration` holds an instance's address, metadata and status (draining,
unhealthy while its checks fail) and owns its health checks. What etcd holds for it,
and every write, belongs to the :class:`~etcdisco._lease.LeaseKeeper` of its TTL,
shared by every registration of that TTL on the client (one lease and one keepalive
stream per process, however many services it registers); ``_lease`` describes the
states, the keepalive and the repairs.

A registration given health checks owns a :class:`~etcdisco.health.HealthGuard`:
while its checks fail the value says ``status: unhealthy`` (or the key is withdrawn),
always under the same lease, so a flapping check never causes a re-grant.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from ._address import normalize_address
from ._errors import (
    ConfigError,
    EtcdError,
    EtcdTimeoutError,
    RegistrationError,
)
from ._lease import LeaseKeeper, RegistrationState
from ._metadata import check_metadata
from ._model import Status, encode_value, instance_key, validate_instance_id, validate_service_name
from .health import Check, CheckResult
from .health._guard import HealthGuard, OnFailing, validate_checks

__all__ = [
    "MAX_TTL",
    "MIN_TTL",
    "LeaseKeeper",
    "Registration",
    "RegistrationState",
    "make_registration",
    "validate_ttl",
]

log = logging.getLogger("etcdisco.registry")

MIN_TTL = 2  # etcd's minimum with the default election timeout
MAX_TTL = 9_000_000_000  # etcd's MaxLeaseTTL: a grant above it fails "too large lease TTL"


StateListener = Callable[["Registration", RegistrationState], None]
HealthListener = Callable[["Registration", CheckResult], None]


class Registration:
    """One service instance in etcd. Use ``async with`` to deregister on exit."""

    def __init__(
        self,
        keeper: LeaseKeeper[Registration],
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
        self._draining = False  # drain() was called: written as status "draining"
        self._withdrawn = False  # key deleted on purpose while the lease lives on
        self._value = b""
        self._status: Any = None  # the status _value carries
        self._written_value: bytes | None = None  # what etcd holds for us, as far as known
        self._written_status: Any = None  # the status of our latest write
        self._held = False  # our key is bound to our live lease (or withdrawn on purpose)
        self._encode()
        self._state = RegistrationState.PENDING
        self._listeners: list[StateListener] = []
        self._health_listeners: list[HealthListener] = []
        self._guard = (
            HealthGuard(
                self.key,
                address,
                checks,
                on_failing,
                apply=self._apply_health,
                on_change=self._health_changed,
            )
            if checks
            else None
        )
        self._conflict_logged = False
        self.revision = 0
        """mod_revision of our latest write."""
        self.re_registrations = 0

    # -- read-only views -----------------------------------------------------------

    @property
    def metadata(self) -> Mapping[str, Any]:
        """The metadata given to ``register()`` or the latest ``update()``."""
        return MappingProxyType(self._metadata)

    @property
    def status(self) -> str | None:
        """The status the value carries: ``draining`` after ``drain()``, ``unhealthy``
        while checks fail, else whatever the metadata says (None: up)."""
        status = self._status
        return None if status is None else str(status)

    @property
    def in_sync(self) -> bool:
        """Whether etcd is known to hold the current value. False after an
        ``update()`` or ``drain()`` that could not reach etcd, until the keeper has
        written it (each round after a keepalive, for as long as the client lives)."""
        return self._withdrawn or self._written_value == self._value

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
    def last_keepalive(self) -> float:
        """``time.monotonic()`` when etcd last granted or refreshed this
        registration's lease (shared with its siblings of the same TTL)."""
        return self._keeper.last_ack

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
        # A draining instance stays draining, whatever a later update() says: the
        # status belongs to the registration. Leaving also outranks being unwell.
        if self._draining:
            meta = {**meta, "status": Status.DRAINING.value}
        elif self._failing and meta.get("status") != Status.DRAINING.value:
            meta = {**meta, "status": Status.UNHEALTHY.value}
        self._value = encode_value(self.address, meta)
        self._status = meta.get("status")

    def _wrote(self, value: bytes, revision: int) -> None:
        """etcd took ``value`` at ``revision`` (the value may be older than ours)."""
        self._written_value = value
        self.revision = revision
        if value == self._value:
            self._written_status = self._status

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
        """Write the checks' verdict under the current lease (the guard's ``apply``)."""
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
        """Replace the metadata (kept across re-registrations).

        The new metadata is this registration's from now on, whatever happens to the
        write: when etcd cannot be reached the call raises an :class:`EtcdError`, and
        the keeper writes the value as soon as etcd answers again (see ``in_sync``).
        A drained instance stays draining."""
        self._check_open()
        check_metadata(metadata)
        encode_value(self.address, metadata)  # validate before changing anything
        self._metadata = dict(metadata)
        self._encode()
        await self._keeper.write(self)

    async def drain(self, wait: float = 0.0) -> None:
        """Mark the instance ``draining`` so clients stop picking it; then wait
        ``wait`` seconds for them to notice before the caller stops serving.

        Draining is for good: it survives ``update()`` and re-registration. Like
        ``update()``, a write etcd did not take is retried in the background."""
        self._check_open()
        self._draining = True
        self._encode()
        await self._keeper.write(self)
        if wait > 0:
            await asyncio.sleep(wait)

    async def deregister(self, timeout: float = 5.0) -> None:
        """Mark the instance ``draining`` (unless it already is), delete the key, then
        revoke the lease if no other registration uses it.

        The registration is closed whatever happens. When etcd cannot be reached the
        call raises an :class:`EtcdError`, and the key is still removed: the keeper
        deletes it once etcd answers (while sibling registrations keep the lease
        alive), or it expires with the lease."""
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


def make_registration(
    keeper: LeaseKeeper[Registration],
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
    check_metadata(metadata or {})
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
    if not isinstance(ttl, int) or isinstance(ttl, bool) or not MIN_TTL <= ttl <= MAX_TTL:
        raise ConfigError(
            f"ttl must be an integer from {MIN_TTL} to {MAX_TTL:,} seconds, got {ttl!r}"
        )
    return ttl
