"""A ``grpc.aio.Channel`` over every live instance of a service (asyncio).

The twin of ``_channel``: same pool, same placement and retry decisions (``_calls``),
on the event loop of the discovery cache. A unary call returns a call object that
retries behind one ``await``; streaming calls return grpc's own call objects, pinned
to one instance.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterable, Callable, Generator, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from .._async_client import AsyncClient
from .._errors import ConfigError
from .._model import ChangeEvent
from ..balancing import Picker, picker_from
from ..discovery import ServiceCache
from ..outlier import OutlierDetector
from ._calls import MethodRouter, PinnedUnaryStream, call_options, deadline_after
from ._channel_base import ChannelBase
from ._options import ChannelSettings, HashKey, detector_for, settings
from ._pool import Pool, SubChannel

log = logging.getLogger("etcdisco.grpc")

if TYPE_CHECKING:
    _UnaryUnaryBase = grpc.aio.UnaryUnaryMultiCallable[Any, Any]
    _UnaryStreamBase = grpc.aio.UnaryStreamMultiCallable[Any, Any]
    _StreamUnaryBase = grpc.aio.StreamUnaryMultiCallable[Any, Any]
    _StreamStreamBase = grpc.aio.StreamStreamMultiCallable[Any, Any]
    _UnaryUnaryCallBase = grpc.aio.UnaryUnaryCall[Any, Any]
else:
    _UnaryUnaryBase = grpc.aio.UnaryUnaryMultiCallable
    _UnaryStreamBase = grpc.aio.UnaryStreamMultiCallable
    _StreamUnaryBase = grpc.aio.StreamUnaryMultiCallable
    _StreamStreamBase = grpc.aio.StreamStreamMultiCallable
    _UnaryUnaryCallBase = grpc.aio.UnaryUnaryCall

AioSub = SubChannel[grpc.aio.Channel]


class _Transport:
    """Opens grpc.aio channels, follows their connectivity with one task each, and
    closes them; owns those tasks."""

    def __init__(self, settings: ChannelSettings) -> None:
        self._settings = settings
        self.pool: Pool[grpc.aio.Channel] | None = None
        self._watchers: dict[AioSub, asyncio.Task[None]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self.grace: float | None = None

    def open(self, address: str) -> grpc.aio.Channel:
        s = self._settings
        if s.credentials is not None:
            return grpc.aio.secure_channel(address, s.credentials, s.channel_options, s.compression)
        return grpc.aio.insecure_channel(address, s.channel_options, s.compression)

    def watch(self, sub: AioSub) -> None:
        self._watchers[sub] = asyncio.get_running_loop().create_task(
            self._follow(sub), name=f"etcdisco-subchannel-{sub.instance.address}"
        )

    async def _follow(self, sub: AioSub) -> None:
        assert self.pool is not None
        while True:
            # try_to_connect: connect new instances before their first call, and
            # reconnect idle ones, so that the pool's view stays current.
            state = sub.channel.get_state(try_to_connect=True)
            self.pool.state_changed(sub, state)
            await sub.channel.wait_for_state_change(state)

    def close(self, sub: AioSub) -> None:
        watcher = self._watchers.pop(sub, None)
        if watcher is not None:
            watcher.cancel()
        task = asyncio.get_running_loop().create_task(self._close(sub, watcher))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close(self, sub: AioSub, watcher: asyncio.Task[None] | None) -> None:
        if watcher is not None:
            # wait() does not raise the watcher's CancelledError, and lets ours through.
            await asyncio.wait([watcher])
        try:
            await sub.channel.close(self.grace)
        except Exception:
            log.exception("closing the channel to %s failed", sub.instance.address)

    async def wait_closed(self) -> None:
        while self._closing:
            await asyncio.gather(*list(self._closing), return_exceptions=True)


def _code_now(call: Any) -> grpc.StatusCode | None:
    """The status of a finished grpc.aio call, from a (synchronous) done callback.

    ``code()`` is a coroutine, but on a finished call it returns without waiting, so
    one step of it gives the answer; if it would wait, the status is not known yet.
    """
    step = call.code()
    try:
        step.send(None)
    except StopIteration as stop:
        return stop.value if isinstance(stop.value, grpc.StatusCode) else None
    except Exception:
        return None
    step.close()
    return None


class _BalancedCall(_UnaryUnaryCallBase):
    """A unary call that may take several attempts: ``await`` it for the response;
    the Call methods answer for the last attempt."""

    def __init__(
        self,
        method: _UnaryUnary,
        request: Any,
        timeout: float | None,
        options: dict[str, Any],
    ) -> None:
        self._method = method
        self._deadline = deadline_after(timeout)
        self._attempt: Any = None
        self._task = asyncio.get_running_loop().create_task(self._run(request, options))
        # A call nobody awaits must not log "exception was never retrieved".
        self._task.add_done_callback(_retrieve)

    async def _run(self, request: Any, options: dict[str, Any]) -> Any:
        retries = self._method._retries(request, self._deadline)
        while (attempt := retries.next()) is not None:
            try:
                self._attempt = attempt.multicallable(request, timeout=attempt.timeout, **options)
                return await self._attempt
            except grpc.aio.AioRpcError as exc:
                if not retries.retry_after(attempt, exc):
                    raise
            except asyncio.CancelledError:
                if self._attempt is not None:
                    self._attempt.cancel()
                raise
            finally:
                attempt.end()
        raise retries.exhausted()

    def __await__(self) -> Generator[Any, None, Any]:
        return self._task.__await__()

    async def _settled(self) -> None:
        await asyncio.wait([self._task])

    def cancel(self) -> bool:
        if self._task.done():
            return False
        if self._attempt is not None:
            self._attempt.cancel()
        return self._task.cancel()

    def cancelled(self) -> bool:
        return self._task.cancelled()

    def done(self) -> bool:
        return self._task.done()

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        self._task.add_done_callback(lambda _: callback(self))

    async def initial_metadata(self) -> Any:
        await self._settled()
        if self._attempt is None:
            return grpc.aio.Metadata()
        return await self._attempt.initial_metadata()

    async def trailing_metadata(self) -> Any:
        await self._settled()
        if self._attempt is None:
            return grpc.aio.Metadata()
        return await self._attempt.trailing_metadata()

    async def code(self) -> grpc.StatusCode:
        await self._settled()
        if self._task.cancelled():
            return grpc.StatusCode.CANCELLED
        exc = self._task.exception()
        if isinstance(exc, grpc.aio.AioRpcError):
            return exc.code()
        return grpc.StatusCode.OK if exc is None else grpc.StatusCode.UNKNOWN

    async def details(self) -> str:
        await self._settled()
        if self._task.cancelled():
            return "cancelled"
        exc = self._task.exception()
        if isinstance(exc, grpc.aio.AioRpcError):
            return exc.details() or ""
        return "" if exc is None else str(exc)

    async def wait_for_connection(self) -> None:
        """Waits for the whole call (retries make 'connected' a moving target)."""
        await self._settled()


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


class _UnaryUnary(MethodRouter[grpc.aio.Channel], _UnaryUnaryBase):
    def __call__(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> _BalancedCall:
        options = call_options(metadata, credentials, wait_for_ready, compression)
        return _BalancedCall(self, request, timeout, options)


class _UnaryStream(PinnedUnaryStream[grpc.aio.Channel], _UnaryStreamBase):
    pass


class _StreamingRequest(MethodRouter[grpc.aio.Channel]):
    """Both client-streaming kinds: pinned to one instance, request iterator as is."""

    def __call__(
        self,
        request_iterator: AsyncIterable[Any] | Iterable[Any] | None = None,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:
        options = call_options(metadata, credentials, wait_for_ready, compression)
        return self._pinned(None, lambda real: real(request_iterator, timeout=timeout, **options))


class _StreamUnary(_StreamingRequest, _StreamUnaryBase):
    pass


class _StreamStream(_StreamingRequest, _StreamStreamBase):
    pass


class AioBalancingChannel(ChannelBase[grpc.aio.Channel], grpc.aio.Channel):
    """A ``grpc.aio.Channel`` whose calls go to the live instances of one service.

    Build it with :func:`etcdisco.grpc.aio_channel`, on the loop of the cache.
    ``await close()`` (or ``async with``) closes every sub-channel, and the discovery
    cache when the channel opened it.
    """

    _multicallables = {
        "unary_unary": _UnaryUnary,
        "unary_stream": _UnaryStream,
        "stream_unary": _StreamUnary,
        "stream_stream": _StreamStream,
    }

    def __init__(
        self,
        cache: ServiceCache,
        picker: Picker,
        outlier: OutlierDetector | None,
        settings: ChannelSettings,
        *,
        owns_cache: bool,
    ) -> None:
        self._settings = settings
        self._cache = cache
        self._owns_cache = owns_cache
        self._transport = _Transport(settings)
        self._pool: Pool[grpc.aio.Channel] = Pool(
            settings.service, picker, outlier, self._transport, on_state=self._notify
        )
        self._transport.pool = self._pool
        self._changed = asyncio.Event()
        self._closed = False
        cache.add_listener(self._on_events)
        self._pool.update(cache.instances())

    def _on_events(self, events: list[ChangeEvent]) -> None:
        self._pool.update(self._cache.instances())

    # -- connectivity --------------------------------------------------------------

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        """READY when any sub-channel is, else CONNECTING, IDLE, TRANSIENT_FAILURE in
        that order (as grpc's round_robin); SHUTDOWN once closed."""
        return self._pool.state

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        while self._pool.state is last_observed_state:
            await self._changed.wait()

    async def channel_ready(self) -> None:
        """Wait until some sub-channel is READY."""
        while (state := self._pool.state) is not grpc.ChannelConnectivity.READY:
            if state is grpc.ChannelConnectivity.SHUTDOWN:
                raise grpc.aio.UsageError("channel is closed")
            await self.wait_for_state_change(state)

    def _notify(self) -> None:
        # Wake every waiter, then give later waiters a fresh event.
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    # -- what the shared multicallables ask of this flavour ------------------------

    def _no_instance(self, details: str) -> Exception:
        return grpc.aio.AioRpcError(
            grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details, None
        )

    @staticmethod
    def _finished_code(call: Any) -> grpc.StatusCode | None:
        return None if call.cancelled() else _code_now(call)

    # -- end -----------------------------------------------------------------------

    async def close(self, grace: float | None = None) -> None:
        """Close every sub-channel (calls still running get ``grace`` seconds, then
        are cancelled, as with any grpc.aio channel) and the discovery cache if this
        channel opened it."""
        if self._closed:
            return
        self._closed = True
        self._cache.remove_listener(self._on_events)
        if self._owns_cache:
            await self._cache.close()
        self._transport.grace = grace
        self._pool.close()
        await self._transport.wait_closed()

    async def __aenter__(self) -> AioBalancingChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<AioBalancingChannel {self.service} {self.get_state().name}>"


class _OpeningChannel:
    """``await aio_channel(...)`` or ``async with aio_channel(...) as ch``."""

    def __init__(self, open_: Callable[[], Any]) -> None:
        self._open = open_
        self._channel: AioBalancingChannel | None = None

    def __await__(self) -> Generator[Any, None, AioBalancingChannel]:
        result: Generator[Any, None, AioBalancingChannel] = self._open().__await__()
        return result

    async def __aenter__(self) -> AioBalancingChannel:
        self._channel = await self._open()
        return self._channel

    async def __aexit__(self, *exc: object) -> None:
        if self._channel is not None:
            await self._channel.close()


def aio_channel(
    source: AsyncClient | ServiceCache,
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
) -> _OpeningChannel:
    """A ``grpc.aio.Channel`` over the live instances of ``service``, for generated
    stubs: ``channel = await aio_channel(client, "echo")`` or ``async with``.

    ``source`` is an :class:`etcdisco.AsyncClient` (the channel opens a discovery
    cache, waits up to ``ready_timeout`` for its first list, and closes it with
    itself) or a :class:`etcdisco.ServiceCache` (used as is, left open). The other
    arguments are those of :func:`etcdisco.grpc.channel`.
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
    if not isinstance(source, AsyncClient | ServiceCache):
        raise ConfigError(
            "aio_channel() takes an etcdisco.AsyncClient or ServiceCache "
            "(Client and SyncServiceCache: channel())"
        )

    async def open_() -> AioBalancingChannel:
        if isinstance(source, ServiceCache):
            return AioBalancingChannel(source, picker, detector, config, owns_cache=False)
        cache = await source.discover(service)
        try:
            await cache.wait_ready(ready_timeout)
        except BaseException:
            await cache.close()
            raise
        return AioBalancingChannel(cache, picker, detector, config, owns_cache=True)

    return _OpeningChannel(open_)
