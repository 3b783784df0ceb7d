"""How a balancing channel places each call: what the sync and aio channels share.

Both flavours make the same decisions and differ only in how they wait for a call (a
thread blocks on it, a task awaits it). So the decisions live here, and nothing here
waits. The accounting and the retry structure are ``etcdisco._routing``'s, shared
with the HTTP transports; this module adds what is gRPC's:

- an :class:`Attempt` is one call on one sub-channel, with the real multicallable
  that carries it; it is counted in the pool from its placement until ``end()``;
- :meth:`MethodRouter._pinned` starts a call that stays on its instance (a stream, a
  future) and ends its attempt when the call finishes, on whatever thread reports it;
- :class:`UnaryRetries` hands out the attempts of one unary call under the retry rule
  of ``_options`` (a status code sorted into a routing ``Outcome``); the flavour makes
  each attempt and tells it how the attempt failed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import grpc

from .. import _routing
from .._model import Instance
from ._options import outcome_of, unreachable
from ._pool import Pool, SubChannel

if TYPE_CHECKING:
    from ._channel_base import ChannelBase

log = logging.getLogger("etcdisco.grpc")

C = TypeVar("C")

Serializer = Callable[[Any], bytes]
Deserializer = Callable[[bytes], Any]


def code_of(call: Any) -> grpc.StatusCode | None:
    """The status code of a finished call or of an ``RpcError``; None when it has none
    to give (not every RpcError is a call)."""
    try:
        code = call.code()
    except Exception:
        return None
    return code if isinstance(code, grpc.StatusCode) else None


def details_of(error: Any) -> str | None:
    """An error's details, when it has the method (an RpcError need not)."""
    return error.details() if callable(getattr(error, "details", None)) else None


def deadline_after(timeout: float | None) -> float | None:
    """The monotonic deadline of a call given ``timeout``; retries share it."""
    return None if timeout is None else time.monotonic() + timeout


def call_options(
    metadata: Any, credentials: Any, wait_for_ready: bool | None, compression: Any
) -> dict[str, Any]:
    """A call's options other than its request and timeout, passed on as they came."""
    return {
        "metadata": metadata,
        "credentials": credentials,
        "wait_for_ready": wait_for_ready,
        "compression": compression,
    }


class Attempt(_routing.Attempt[C]):
    """One call placed on one sub-channel. ``end()`` when the call has ended; ``ok``
    stays True unless the outcome says the instance is unreachable."""

    __slots__ = ("multicallable",)

    def __init__(
        self, pool: Pool[C], sub: SubChannel[C], instance: Instance, timeout: float | None
    ) -> None:
        super().__init__(pool, sub, instance, timeout)
        self.multicallable: Any = None

    def note(self, code: grpc.StatusCode | None) -> None:
        """The attempt ended with ``code`` (None: unknown)."""
        self.ok = not unreachable(code)


class MethodRouter(Generic[C]):
    """One method of a balancing channel: where its calls go, and the real
    multicallables that carry them. The base of both flavours' multicallables."""

    def __init__(
        self,
        channel: ChannelBase[C],
        kind: str,
        method: str,
        serializer: Serializer | None,
        deserializer: Deserializer | None,
    ) -> None:
        # Held like grpc's own multicallables hold theirs: a stub keeps its channel.
        self._channel = channel
        self._pool = channel._pool
        self._settings = channel._settings
        self._no_instance = channel._no_instance
        self._finished_code = channel._finished_code
        self._kind = kind
        self._method = method
        self._serializer = serializer
        self._deserializer = deserializer
        self._cache_key = (kind, method, serializer, deserializer)
        self._idempotent = self._settings.is_idempotent(method)

    def _real(self, sub: SubChannel[C]) -> Any:
        """The sub-channel's own multicallable for this method, built once per
        sub-channel (building one costs far more than the lookup)."""
        found = sub.callables.get(self._cache_key)
        if found is None:
            factory = getattr(sub.channel, self._kind)
            found = sub.callables[self._cache_key] = factory(
                self._method,
                request_serializer=self._serializer,
                response_deserializer=self._deserializer,
                _registered_method=True,
            )
        return found

    def _hash_key(self, request: Any) -> str | None:
        hash_key = self._settings.hash_key
        return hash_key(self._method, request) if hash_key is not None else None

    def _no_instance_error(self) -> Exception:
        return self._no_instance(f"no available instance of {self._settings.service!r}")

    def _place(
        self, key: str | None, exclude: frozenset[str], timeout: float | None
    ) -> Attempt[C] | None:
        picked = self._pool.acquire(key, exclude)
        if picked is None:
            return None
        attempt = Attempt(self._pool, picked[0], picked[1], timeout)
        try:
            attempt.multicallable = self._real(attempt.sub)
        except BaseException:
            attempt.end()
            raise
        return attempt

    def _attempt(self, key_request: Any) -> Attempt[C]:
        """One attempt, keyed on ``key_request`` (None for client streams, whose
        requests are not known yet); raises the flavour's UNAVAILABLE when no
        instance can take it."""
        attempt = self._place(self._hash_key(key_request), frozenset(), None)
        if attempt is None:
            raise self._no_instance_error()
        return attempt

    def _pinned(self, key_request: Any, start: Callable[[Any], Any]) -> Any:
        """Start a call on one instance with ``start(multicallable)``; its attempt
        ends when the call does (a future, a stream: ``add_done_callback``)."""
        attempt = self._attempt(key_request)
        try:
            call = start(attempt.multicallable)
        except BaseException:
            attempt.end()
            raise

        def done(_: Any) -> None:
            attempt.note(self._finished_code(call))
            attempt.end()

        call.add_done_callback(done)
        return call

    def _retries(self, request: Any, deadline: float | None) -> UnaryRetries[C]:
        return UnaryRetries(self, self._hash_key(request), deadline)


class PinnedUnaryStream(MethodRouter[C]):
    """A unary-request, streaming-response call: the same in both flavours, since the
    call starts without waiting and is pinned to its instance (keyed on the request)."""

    def __call__(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        options = call_options(metadata, credentials, wait_for_ready, compression)
        return self._pinned(request, lambda real: real(request, timeout=timeout, **options))


class UnaryRetries(_routing.Retries[Attempt[C]]):
    """The attempts of one unary call. The flavour runs them in this loop, blocking
    on or awaiting each call::

        while (attempt := retries.next()) is not None:
            try:
                return <the call on attempt.multicallable, timeout=attempt.timeout>
            except <the flavour's RpcError> as exc:
                if not retries.retry_after(attempt, exc):
                    raise
            finally:
                attempt.end()
        raise retries.exhausted()
    """

    __slots__ = ("_router",)

    def __init__(self, router: MethodRouter[C], key: str | None, deadline: float | None) -> None:
        super().__init__(
            router._place,
            key,
            max_attempts=router._settings.max_attempts,
            deadline=deadline,
            no_instance=router._no_instance_error,
        )
        self._router = router

    def retry_after(self, attempt: Attempt[C], error: BaseException) -> bool:
        """``attempt`` failed with ``error``: note the outcome for its instance, and
        say whether another instance may be tried (``_options``' retry rule)."""
        code, details = code_of(error), details_of(error)
        router = self._router
        if not self.decide(attempt, error, outcome_of(code, details), router._idempotent):
            return False
        log.debug(
            "%s on %s: %s; trying another instance",
            router._method,
            attempt.instance.address,
            details,
        )
        return True
