"""What both balancing channels share (etcdisco.grpc._calls): placing attempts, the
retry decisions, pinning and the bookkeeping around each call. No network: the
sub-channels are fakes that record the multicallables asked of them."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import pytest

from etcdisco import Instance, make_picker
from etcdisco.grpc._calls import MethodRouter, PinnedUnaryStream, code_of
from etcdisco.grpc._channel_base import ChannelBase
from etcdisco.grpc._options import settings
from etcdisco.grpc._pool import Pool, SubChannel
from etcdisco.outlier import OutlierDetector

from ._factories import inst

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
NEVER_SENT = "failed to connect to all addresses; last error: ..."
METHOD = "/etcdisco.test.Echo/Say"


class Failure(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class FakeCall:
    """A started call: ``finish(code)`` runs its done callbacks as grpc would."""

    def __init__(self, address: str, request: Any) -> None:
        self.address, self.request = address, request
        self.status: grpc.StatusCode | None = None
        self.callbacks: list[Callable[[Any], None]] = []

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        self.callbacks.append(callback)

    def finish(self, code: grpc.StatusCode) -> None:
        self.status = code
        for callback in self.callbacks:
            callback(self)

    def code(self) -> grpc.StatusCode | None:
        return self.status


class FakeRealMulticallable:
    """A sub-channel's own multicallable: answers or fails as its channel is told."""

    def __init__(self, channel: FakeSubChannel, method: str) -> None:
        self.channel, self.method = channel, method

    def __call__(self, request: Any, timeout: float | None = None, **options: Any) -> Any:
        channel = self.channel
        channel.calls.append((request, timeout))
        scripted = channel.script.pop(0) if channel.script else None
        failure = channel.fail_with or scripted
        if failure is not None:
            raise failure
        return FakeCall(channel.address, request)


class FakeSubChannel:
    def __init__(self, address: str, script: list[BaseException | None]) -> None:
        self.address = address
        self.script = script  # outcomes of the next calls on any sub-channel
        self.built: list[tuple[str, str]] = []  # (kind, method) per multicallable built
        self.calls: list[tuple[Any, float | None]] = []
        self.fail_with: BaseException | None = None

    def _build(self, kind: str, method: str, **kwargs: Any) -> FakeRealMulticallable:
        assert kwargs["_registered_method"] is True
        self.built.append((kind, method))
        return FakeRealMulticallable(self, method)

    def unary_unary(self, method: str, **kwargs: Any) -> FakeRealMulticallable:
        return self._build("unary_unary", method, **kwargs)

    def unary_stream(self, method: str, **kwargs: Any) -> FakeRealMulticallable:
        return self._build("unary_stream", method, **kwargs)

    def stream_stream(self, method: str, **kwargs: Any) -> FakeRealMulticallable:
        return self._build("stream_stream", method, **kwargs)


class FakeTransport:
    def __init__(self) -> None:
        self.channels: dict[str, FakeSubChannel] = {}
        self.closed: list[str] = []
        self.script: list[BaseException | None] = []

    def open(self, address: str) -> FakeSubChannel:
        self.channels[address] = FakeSubChannel(address, self.script)
        return self.channels[address]

    def watch(self, sub: SubChannel[FakeSubChannel]) -> None:
        pass

    def close(self, sub: SubChannel[FakeSubChannel]) -> None:
        self.closed.append(sub.instance.address)


class RecordingPicker:
    """A round robin that records what the pool tells pickers."""

    def __init__(self) -> None:
        self._inner = make_picker("round_robin")
        self.starts: list[str] = []
        self.ends: list[tuple[str, bool]] = []

    def pick(self, instances: Sequence[Instance], key: str | None = None) -> Instance | None:
        return self._inner.pick(instances, key)

    def started(self, instance: Instance) -> None:
        self.starts.append(instance.address)

    def finished(self, instance: Instance, latency: float, ok: bool) -> None:
        assert latency >= 0
        self.ends.append((instance.address, ok))


class Unary(MethodRouter[FakeSubChannel]):
    """A unary multicallable driving UnaryRetries the way both flavours do."""

    def __call__(self, request: Any, timeout: float | None = None) -> Any:
        retries = self._retries(request, None if timeout is None else time.monotonic() + timeout)
        while (attempt := retries.next()) is not None:
            try:
                return attempt.multicallable(request, timeout=attempt.timeout)
            except grpc.RpcError as exc:
                if not retries.retry_after(attempt, exc):
                    raise
            finally:
                attempt.end()
        raise retries.exhausted()


class Streaming(MethodRouter[FakeSubChannel]):
    def __call__(self, request_iterator: Any) -> Any:
        return self._pinned(None, lambda real: real(request_iterator))


class FakeChannel(ChannelBase[FakeSubChannel]):
    _multicallables = {
        "unary_unary": Unary,
        "unary_stream": PinnedUnaryStream,
        "stream_stream": Streaming,
    }

    def __init__(self, n: int, *, picker: Any = None, outlier: Any = None, **options: Any) -> None:
        self.transport = FakeTransport()
        self.picker = picker or RecordingPicker()
        self._settings = settings(
            "echo",
            idempotent=options.pop("idempotent", False),
            max_attempts=options.pop("max_attempts", 3),
            credentials=None,
            channel_options=(),
            compression=None,
            hash_key=options.pop("hash_key", None),
        )
        assert not options
        self._pool = Pool("echo", self.picker, outlier, self.transport)
        self._pool.update([inst(i) for i in range(1, n + 1)])

    def _no_instance(self, details: str) -> Exception:
        return Failure(UNAVAILABLE, details)

    _finished_code = staticmethod(code_of)

    def fail(self, address: str, error: BaseException | None) -> None:
        self.transport.channels[address].fail_with = error

    def in_flight(self) -> int:
        return sum(info.in_flight for info in self._pool.info())


# -- retries -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("idempotent", "code", "details", "retried"),
    [
        (True, UNAVAILABLE, "Socket closed", True),
        (False, UNAVAILABLE, "Socket closed", False),  # it may have reached the server
        (False, UNAVAILABLE, NEVER_SENT, True),  # it never left the client
        (True, grpc.StatusCode.INTERNAL, NEVER_SENT, False),
        (True, grpc.StatusCode.DEADLINE_EXCEEDED, "", False),
        (True, grpc.StatusCode.RESOURCE_EXHAUSTED, "", False),
    ],
)
def test_retry_decision_table(
    idempotent: bool, code: grpc.StatusCode, details: str, retried: bool
) -> None:
    channel = FakeChannel(2, idempotent=idempotent)
    channel.transport.script.append(Failure(code, details))  # the first attempt fails
    say = channel.unary_unary(METHOD)
    if retried:
        call = say("hello")
        first, second = channel.picker.starts
        assert call.address == second != first
        assert (channel._pool.picks, channel._pool.retries) == (2, 1)
    else:
        with pytest.raises(Failure) as err:
            say("hello")
        assert err.value.code() is code
        assert (channel._pool.picks, channel._pool.retries) == (1, 0)
    # Only UNAVAILABLE counts against the instance, retried or not.
    assert channel.picker.ends[0] == (channel.picker.starts[0], code is not UNAVAILABLE)
    assert channel.in_flight() == 0


def test_retries_stop_at_max_attempts_and_raise_the_last_failure() -> None:
    channel = FakeChannel(5, idempotent=True, max_attempts=3)
    for n in range(1, 6):
        channel.fail(inst(n).address, Failure(UNAVAILABLE, inst(n).address))
    with pytest.raises(Failure) as err:
        channel.unary_unary(METHOD)("hello")
    assert len(set(channel.picker.starts)) == len(channel.picker.starts) == 3
    assert err.value.details() == channel.picker.starts[-1]
    assert channel.in_flight() == 0


def test_retries_never_try_an_instance_twice() -> None:
    channel = FakeChannel(2, idempotent=True, max_attempts=5)
    for n in (1, 2):
        channel.fail(inst(n).address, Failure(UNAVAILABLE, inst(n).address))
    with pytest.raises(Failure) as err:
        channel.unary_unary(METHOD)("hello")
    assert sorted(channel.picker.starts) == [inst(1).address, inst(2).address]
    # The last failure, not "no available instance", once every instance was tried.
    assert err.value.details() == channel.picker.starts[-1]


def test_no_instance_is_the_flavours_unavailable() -> None:
    channel = FakeChannel(0)
    with pytest.raises(Failure) as err:
        channel.unary_unary(METHOD)("hello")
    assert err.value.code() is UNAVAILABLE
    assert err.value.details() == "no available instance of 'echo'"
    with pytest.raises(Failure, match="no available instance"):
        channel.stream_stream(METHOD)(iter(()))


def test_attempts_share_the_callers_deadline() -> None:
    channel = FakeChannel(2, idempotent=True)
    channel.transport.script.append(Failure(UNAVAILABLE, "down"))
    channel.unary_unary(METHOD)("hello", timeout=5.0)
    first, second = (channel.transport.channels[a].calls[0][1] for a in channel.picker.starts)
    assert first is not None and second is not None
    assert 0 < second <= first <= 5.0
    with pytest.raises(Failure, match="no available instance"):
        channel.unary_unary(METHOD)("hello", timeout=0.0)  # no time left: no attempt
    assert channel._pool.picks == 2


def test_a_failure_that_is_no_rpc_error_ends_its_attempt_as_a_success() -> None:
    channel = FakeChannel(1, idempotent=True)
    channel.fail(inst(1).address, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        channel.unary_unary(METHOD)("hello")
    assert channel.picker.ends == [(inst(1).address, True)]
    assert channel.in_flight() == 0


def test_unavailable_results_feed_the_outlier_detector() -> None:
    detector = OutlierDetector(consecutive_failures=2, max_ejected_fraction=0.5)
    channel = FakeChannel(2, idempotent=True, outlier=detector)
    channel.fail(inst(1).address, Failure(UNAVAILABLE, "down"))
    say = channel.unary_unary(METHOD)
    for _ in range(4):
        assert say("hello").address == inst(2).address
    assert detector.is_ejected(inst(1).key)
    assert channel.picker.ends.count((inst(1).address, False)) == 2  # then never picked


# -- multicallables and pinning ----------------------------------------------------


def test_real_multicallables_are_built_once_per_subchannel_and_method() -> None:
    channel = FakeChannel(2)
    say, other = channel.unary_unary(METHOD), channel.unary_unary("/etcdisco.test.Echo/Other")
    for _ in range(4):
        say("hello")
    other("hello")
    channel.unary_unary(METHOD)("hello")  # a new stub for the same method shares them
    built = [b for c in channel.transport.channels.values() for b in c.built]
    assert sorted(built) == [
        ("unary_unary", "/etcdisco.test.Echo/Other"),
        ("unary_unary", METHOD),
        ("unary_unary", METHOD),
    ]


def test_factories_make_the_flavours_multicallables_and_ignore_grpcs_extras() -> None:
    channel = FakeChannel(1)
    stream = channel.unary_stream(METHOD, None, None, _registered_method=True)
    assert isinstance(stream, PinnedUnaryStream)
    assert isinstance(channel.stream_stream(METHOD), Streaming)
    assert FakeChannel.unary_unary.__name__ == "unary_unary"


def test_pinned_call_holds_its_instance_until_it_finishes() -> None:
    channel = FakeChannel(2)
    call = channel.unary_stream(METHOD)("hello")
    assert channel.in_flight() == 1
    others = [inst(n) for n in (1, 2) if inst(n).address != call.address]
    channel._pool.update(others)  # its instance leaves while the call runs
    assert channel.transport.closed == []
    call.finish(UNAVAILABLE)
    assert channel.in_flight() == 0
    assert channel.transport.closed == [call.address]  # closed after its last call
    assert channel.picker.ends == [(call.address, False)]


def test_pinned_call_that_fails_to_start_ends_its_attempt() -> None:
    channel = FakeChannel(1)
    channel.fail(inst(1).address, Failure(UNAVAILABLE, "refused"))
    with pytest.raises(Failure):
        channel.unary_stream(METHOD)("hello")
    assert channel.picker.ends == [(inst(1).address, True)]
    assert channel.in_flight() == 0


def test_streams_key_on_their_request_only_when_it_is_known() -> None:
    keys: list[Any] = []

    def hash_key(method: str, request: Any) -> str | None:
        keys.append(request)
        return None if request is None else str(request)

    channel = FakeChannel(3, picker=make_picker("ring_hash"), hash_key=hash_key)
    stream = channel.unary_stream(METHOD)
    for user in ("alice", "bob"):
        assert len({stream(user).address for _ in range(5)}) == 1  # a user stays put
    channel.stream_stream(METHOD)(iter(["not", "read"]))
    assert keys == ["alice"] * 5 + ["bob"] * 5 + [None]  # placed before its requests exist
