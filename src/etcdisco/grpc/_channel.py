"""A ``grpc.Channel`` over every live instance of a service (threads).

Generated stubs work on it unchanged. Each call is placed by the picker on one of the
instances the discovery cache knows (see ``_pool`` for the sub-channel lifecycle,
``_calls`` for the placement and retries both flavours share, and ``_options`` for the
retry rule). Usable from any thread.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import grpc

from .._errors import ConfigError, EtcdiscoError
from .._model import Instance
from ..balancing import Picker, picker_from
from ..outlier import OutlierDetector
from ..sync import Client, SyncServiceCache
from ._calls import (
    MethodRouter,
    PinnedUnaryStream,
    call_options,
    code_of,
    deadline_after,
)
from ._channel_base import ChannelBase
from ._options import ChannelSettings, HashKey, detector_for, settings
from ._pool import Pool, SubChannel

log = logging.getLogger("etcdisco.grpc")

if TYPE_CHECKING:
    _UnaryUnaryBase = grpc.UnaryUnaryMultiCallable[Any, Any]
    _UnaryStreamBase = grpc.UnaryStreamMultiCallable[Any, Any]
    _StreamUnaryBase = grpc.StreamUnaryMultiCallable[Any, Any]
    _StreamStreamBase = grpc.StreamStreamMultiCallable[Any, Any]
else:
    _UnaryUnaryBase = grpc.UnaryUnaryMultiCallable
    _UnaryStreamBase = grpc.UnaryStreamMultiCallable
    _StreamUnaryBase = grpc.StreamUnaryMultiCallable
    _StreamStreamBase = grpc.StreamStreamMultiCallable


class NoInstanceError(grpc.RpcError):
    """UNAVAILABLE raised by a balancing channel when no instance can take a call.
    It answers ``code()`` and ``details()`` like grpc's own errors."""

    def __init__(self, details: str) -> None:
        super().__init__(details)
        self._details = details

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return self._details

    def initial_metadata(self) -> tuple[()]:
        return ()

    def trailing_metadata(self) -> tuple[()]:
        return ()

    def debug_error_string(self) -> str:
        return f"UNAVAILABLE: {self._details}"

    def __str__(self) -> str:
        return f"<NoInstanceError UNAVAILABLE: {self._details}>"


class _Closer:
    """Closes retired channels on a thread of its own: a call's done callback runs on
    grpc's threads, where closing that call's own channel is not safe."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[grpc.Channel | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def close(self, channel: grpc.Channel) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._main, name="etcdisco-channel-closer", daemon=True
                )
                self._thread.start()
        self._queue.put(channel)

    def _main(self) -> None:
        while (channel := self._queue.get()) is not None:
            try:
                channel.close()
            except Exception:
                log.exception("closing a sub-channel failed")

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout)


class _Transport:
    def __init__(self, settings: ChannelSettings, closer: _Closer) -> None:
        self._settings = settings
        self._closer = closer
        self.pool: Pool[grpc.Channel] | None = None

    def open(self, address: str) -> grpc.Channel:
        s = self._settings
        if s.credentials is not None:
            return grpc.secure_channel(address, s.credentials, s.channel_options, s.compression)
        return grpc.insecure_channel(address, s.channel_options, s.compression)

    def watch(self, sub: SubChannel[grpc.Channel]) -> None:
        pool = self.pool
        assert pool is not None

        def changed(state: grpc.ChannelConnectivity) -> None:
            pool.state_changed(sub, state)

        # try_to_connect: a new instance is connected before its first call.
        sub.channel.subscribe(changed, try_to_connect=True)

    def close(self, sub: SubChannel[grpc.Channel]) -> None:
        self._closer.close(sub.channel)


class _Method(MethodRouter[grpc.Channel]):
    """The blocking ways through the shared placement: retried or single attempts."""

    def _with_retries(
        self, request: Any, timeout: float | None, invoke: Callable[[Any, float | None], Any]
    ) -> Any:
        """Blocking attempts, on another instance each, while the retry rule allows."""
        retries = self._retries(request, deadline_after(timeout))
        while (attempt := retries.next()) is not None:
            try:
                return invoke(attempt.multicallable, attempt.timeout)
            except grpc.RpcError as exc:
                if not retries.retry_after(attempt, exc):
                    raise
            finally:
                attempt.end()
        raise retries.exhausted()

    def _once(self, invoke: Callable[[Any], Any]) -> Any:
        """One blocking attempt (a client stream cannot be replayed)."""
        attempt = self._attempt(None)
        try:
            return invoke(attempt.multicallable)
        except grpc.RpcError as exc:
            attempt.note(code_of(exc))
            raise
        finally:
            attempt.end()


class _UnaryUnary(_Method, _UnaryUnaryBase):
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
        return self._with_retries(
            request, timeout, lambda real, left: real(request, timeout=left, **options)
        )

    def with_call(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> tuple[Any, grpc.Call]:
        options = call_options(metadata, credentials, wait_for_ready, compression)
        result: tuple[Any, grpc.Call] = self._with_retries(
            request, timeout, lambda real, left: real.with_call(request, timeout=left, **options)
        )
        return result

    def future(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        """One attempt, no retry (a future is the caller's to handle)."""
        options = call_options(metadata, credentials, wait_for_ready, compression)
        return self._pinned(request, lambda real: real.future(request, timeout=timeout, **options))


class _UnaryStream(PinnedUnaryStream[grpc.Channel], _UnaryStreamBase):
    pass


class _StreamUnary(_Method, _StreamUnaryBase):
    def __call__(
        self,
        request_iterator: Iterator[Any],
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        options = call_options(metadata, credentials, wait_for_ready, compression)
        return self._once(lambda real: real(request_iterator, timeout=timeout, **options))

    def with_call(
        self,
        request_iterator: Iterator[Any],
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> tuple[Any, grpc.Call]:
        options = call_options(metadata, credentials, wait_for_ready, compression)
        result: tuple[Any, grpc.Call] = self._once(
            lambda real: real.with_call(request_iterator, timeout=timeout, **options)
        )
        return result

    def future(
        self,
        request_iterator: Iterator[Any],
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        options = call_options(metadata, credentials, wait_for_ready, compression)
        return self._pinned(
            None, lambda real: real.future(request_iterator, timeout=timeout, **options)
        )


class _StreamStream(_Method, _StreamStreamBase):
    def __call__(
        self,
        request_iterator: Iterator[Any],
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        options = call_options(metadata, credentials, wait_for_ready, compression)
        return self._pinned(None, lambda real: real(request_iterator, timeout=timeout, **options))


class BalancingChannel(ChannelBase[grpc.Channel], grpc.Channel):
    """A ``grpc.Channel`` whose calls go to the live instances of one service.

    Build it with :func:`etcdisco.grpc.channel`. ``close()`` (or ``with``) closes every
    sub-channel, and the discovery cache when the channel opened it.
    """

    _multicallables = {
        "unary_unary": _UnaryUnary,
        "unary_stream": _UnaryStream,
        "stream_unary": _StreamUnary,
        "stream_stream": _StreamStream,
    }

    def __init__(
        self,
        cache: SyncServiceCache,
        picker: Picker,
        outlier: OutlierDetector | None,
        settings: ChannelSettings,
        *,
        owns_cache: bool,
    ) -> None:
        self._settings = settings
        self._cache = cache
        self._owns_cache = owns_cache
        self._closer = _Closer()
        self._transport = _Transport(settings, self._closer)
        self._pool: Pool[grpc.Channel] = Pool(
            settings.service, picker, outlier, self._transport, on_state=self._notify
        )
        self._transport.pool = self._pool
        self._subscribers: list[Callable[[grpc.ChannelConnectivity], None]] = []
        self._subscribers_lock = threading.Lock()
        self._closed = False
        # The first snapshot arrives before this returns; later ones with each change.
        cache.follow(self._on_snapshot)

    # -- discovery -----------------------------------------------------------------

    def _on_snapshot(self, instances: tuple[Instance, ...]) -> None:
        if not self._closed:
            self._pool.update(instances)

    # -- connectivity --------------------------------------------------------------

    def get_state(self) -> grpc.ChannelConnectivity:
        """READY when any sub-channel is, else CONNECTING, IDLE, TRANSIENT_FAILURE in
        that order (as grpc's round_robin); SHUTDOWN once closed."""
        return self._pool.state

    def subscribe(
        self,
        callback: Callable[[grpc.ChannelConnectivity], None],
        try_to_connect: bool = False,
    ) -> None:
        """Call ``callback(state)`` now and on every change of :meth:`get_state`
        (changes are reported from grpc's threads). Sub-channels always connect."""
        with self._subscribers_lock:
            self._subscribers.append(callback)
        callback(self.get_state())

    def unsubscribe(self, callback: Callable[[grpc.ChannelConnectivity], None]) -> None:
        with self._subscribers_lock:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

    def _notify(self) -> None:
        state = self._pool.state
        with self._subscribers_lock:
            callbacks = list(self._subscribers)
        for callback in callbacks:
            try:
                callback(state)
            except Exception:
                log.exception("connectivity callback failed")

    # -- what the shared multicallables ask of this flavour ------------------------

    def _no_instance(self, details: str) -> Exception:
        return NoInstanceError(details)

    _finished_code = staticmethod(code_of)

    # -- end -----------------------------------------------------------------------

    def close(self) -> None:
        """Close every sub-channel (calls still running are cancelled, as with any
        grpc channel) and the discovery cache if this channel opened it."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._owns_cache:
                self._cache.close()
            else:
                # The cache lives on with its owner: it must not keep this channel.
                self._cache.remove_listener(self._on_snapshot)
        except EtcdiscoError as exc:
            log.warning("%s: letting go of the discovery cache failed: %s", self.service, exc)
        self._pool.close()
        self._closer.stop()

    def __enter__(self) -> BalancingChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<BalancingChannel {self.service} {self.get_state().name}>"


def channel(
    source: Client | SyncServiceCache,
    service: str,
    policy: str | Picker = "round_robin",
    *,
    idempotent: bool | Iterable[str] = False,
    max_attempts: int = 3,
    outlier: OutlierDetector | bool = True,
    credentials: grpc.ChannelCredentials | None = None,
    channel_options: Sequence[tuple[str, Any]] = (),
    compression: grpc.Compression | None = None,
    hash_key: HashKey | None = None,
    ready_timeout: float | None = 10.0,
    **policy_options: Any,
) -> BalancingChannel:
    """A ``grpc.Channel`` over the live instances of ``service``, for generated stubs.

    ``source`` is an :class:`etcdisco.Client` (the channel opens a discovery cache and
    closes it with itself, after waiting up to ``ready_timeout`` for its first list)
    or a :class:`etcdisco.SyncServiceCache` (used as is, left open).
    ``policy`` is a policy name (``policy_options`` configure it, e.g. ``zone="a"``)
    or a Picker. ``idempotent``: True, or the methods ("/pkg.Svc/Method", "pkg.Svc",
    "Method") that may be retried on another instance after UNAVAILABLE; every call
    is retried when it never left the client. ``outlier``: True (defaults), False, or
    an OutlierDetector. ``hash_key(method, request)`` feeds ring_hash.
    ``credentials``, ``channel_options`` and ``compression`` apply to each sub-channel.
    """
    config = settings(
        service,
        idempotent=idempotent,
        max_attempts=max_attempts,
        credentials=credentials,
        channel_options=channel_options,
        compression=compression,
        hash_key=hash_key,
    )
    picker = picker_from(policy, policy_options, "policy")
    detector = detector_for(outlier)
    if isinstance(source, Client):
        cache = source.discover(service)
        try:
            cache.wait_ready(ready_timeout)
        except BaseException:
            cache.close()
            raise
        return BalancingChannel(cache, picker, detector, config, owns_cache=True)
    if isinstance(source, SyncServiceCache):
        return BalancingChannel(source, picker, detector, config, owns_cache=False)
    raise ConfigError(
        "channel() takes an etcdisco.Client or SyncServiceCache "
        "(AsyncClient and ServiceCache: aio_channel())"
    )
