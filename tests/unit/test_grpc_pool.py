"""The balancing channels' pure parts: sub-channel lifecycle, choice, retry rule."""

from __future__ import annotations

import socket
from typing import Any

import grpc
import pytest

from etcdisco import ConfigError, make_picker
from etcdisco.grpc._options import never_sent, settings
from etcdisco.grpc._pool import Pool, SubChannel, aggregate
from etcdisco.outlier import OutlierDetector

from ._factories import inst

C = grpc.ChannelConnectivity


class FakeTransport:
    """Records what the pool asks of it; the 'channel' is just the address."""

    def __init__(self) -> None:
        self.opened: list[str] = []
        self.closed: list[str] = []
        self.watched: list[SubChannel[str]] = []

    def open(self, address: str) -> str:
        self.opened.append(address)
        return address

    def watch(self, sub: SubChannel[str]) -> None:
        self.watched.append(sub)

    def close(self, sub: SubChannel[str]) -> None:
        self.closed.append(sub.channel)


def make_pool(outlier: OutlierDetector | None = None) -> tuple[Pool[str], FakeTransport]:
    transport = FakeTransport()
    return Pool("echo", make_picker("round_robin"), outlier, transport), transport


def picks(pool: Pool[Any], n: int) -> list[str]:
    out = []
    for _ in range(n):
        picked = pool.acquire()
        assert picked is not None
        sub, chosen = picked
        pool.release(sub, chosen, 0.001, True)
        out.append(chosen.address)
    return out


def test_one_subchannel_per_instance_of_the_service() -> None:
    pool, transport = make_pool()
    pool.update([inst(1), inst(2), inst(3, service="other")])
    assert transport.opened == ["10.0.0.1:80", "10.0.0.2:80"]
    assert len(transport.watched) == 2
    pool.update([inst(1), inst(2)])  # nothing new: nothing opened
    assert len(transport.opened) == 2
    assert sorted(picks(pool, 4)) == ["10.0.0.1:80"] * 2 + ["10.0.0.2:80"] * 2


def test_draining_instance_keeps_its_channel_but_gets_no_calls() -> None:
    pool, transport = make_pool()
    pool.update([inst(1), inst(2)])
    pool.update([inst(1, status="draining"), inst(2)])
    assert transport.opened == ["10.0.0.1:80", "10.0.0.2:80"]
    assert transport.closed == []
    assert set(picks(pool, 6)) == {"10.0.0.2:80"}


def test_removed_instance_is_closed_only_after_its_last_call() -> None:
    pool, transport = make_pool()
    pool.update([inst(1)])
    first = pool.acquire()
    second = pool.acquire()
    assert first is not None and second is not None
    pool.update([])
    assert transport.closed == []
    assert [(i.address, i.retired, i.in_flight) for i in pool.info()] == [("10.0.0.1:80", True, 2)]
    assert pool.acquire() is None  # retired: never picked again
    pool.release(*first, 0.01, True)
    assert transport.closed == []
    pool.release(*second, 0.01, True)
    assert transport.closed == ["10.0.0.1:80"]
    assert pool.info() == ()


def test_idle_removed_instance_is_closed_at_once_and_a_moved_one_reopened() -> None:
    pool, transport = make_pool()
    pool.update([inst(1), inst(2)])
    pool.update([inst(1, address="10.0.1.1:80")])
    assert transport.closed == ["10.0.0.1:80", "10.0.0.2:80"]
    assert transport.opened[-1] == "10.0.1.1:80"
    assert picks(pool, 2) == ["10.0.1.1:80"] * 2


def test_transient_failure_is_avoided_while_others_can_take_calls() -> None:
    pool, transport = make_pool()
    pool.update([inst(1), inst(2)])
    one, two = sorted(transport.watched, key=lambda s: s.instance.key)
    pool.state_changed(one, C.TRANSIENT_FAILURE)
    pool.state_changed(two, C.READY)
    assert pool.state is C.READY
    assert set(picks(pool, 4)) == {"10.0.0.2:80"}
    pool.state_changed(two, C.TRANSIENT_FAILURE)
    assert pool.state is C.TRANSIENT_FAILURE
    assert set(picks(pool, 4)) == {"10.0.0.1:80", "10.0.0.2:80"}  # nothing better left


def test_unreachable_results_eject_and_retries_exclude_tried_instances() -> None:
    pool, _ = make_pool(OutlierDetector(consecutive_failures=2, max_ejected_fraction=0.5))
    pool.update([inst(1), inst(2)])
    for _ in range(2):
        picked = pool.acquire(exclude=frozenset({"services/echo/i2"}))
        assert picked is not None and picked[1].id == "i1"
        pool.release(*picked, 0.01, False)
    assert set(picks(pool, 4)) == {"10.0.0.2:80"}
    assert pool.acquire(exclude=frozenset({"services/echo/i2"})) is None


def test_close_closes_everything_and_reports_shutdown() -> None:
    pool, transport = make_pool()
    pool.update([inst(1), inst(2)])
    held = pool.acquire()
    assert held is not None
    pool.close()
    assert sorted(transport.closed) == ["10.0.0.1:80", "10.0.0.2:80"]
    assert pool.state is C.SHUTDOWN
    pool.release(*held, 0.01, True)  # a late release closes nothing twice
    pool.update([inst(3)])  # nor does a late update open anything
    assert len(transport.closed) == 2 and len(transport.opened) == 2


def test_aggregate_state_follows_round_robin() -> None:
    assert aggregate([]) is C.TRANSIENT_FAILURE
    assert aggregate([C.TRANSIENT_FAILURE, C.IDLE]) is C.IDLE
    assert aggregate([C.IDLE, C.CONNECTING]) is C.CONNECTING
    assert aggregate([C.CONNECTING, C.READY, C.TRANSIENT_FAILURE]) is C.READY


def _settings(idempotent: Any) -> Any:
    return settings(
        "echo",
        idempotent=idempotent,
        max_attempts=3,
        credentials=None,
        channel_options=(),
        compression=None,
        hash_key=None,
    )


def test_idempotent_methods_by_path_service_or_name() -> None:
    method = "/etcdisco.test.Echo/Say"
    assert _settings(True).is_idempotent(method)
    assert not _settings(False).is_idempotent(method)
    for name in (method, "etcdisco.test.Echo/Say", "etcdisco.test.Echo", "Say"):
        assert _settings([name]).is_idempotent(method), name
    assert not _settings(["Count", "other.Svc"]).is_idempotent(method)
    with pytest.raises(ConfigError):
        _settings("Say")


def test_retry_rule() -> None:
    unavailable, internal = grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL
    s = _settings(False)
    assert s.retryable(True, unavailable, "Socket closed")
    assert not s.retryable(False, unavailable, "Socket closed")  # may have reached the server
    assert s.retryable(False, unavailable, "failed to connect to all addresses; last error: ...")
    assert not s.retryable(True, internal, "failed to connect to all addresses")
    assert not s.retryable(True, grpc.StatusCode.DEADLINE_EXCEEDED, "")


def test_grpc_reports_a_call_that_never_left_as_such() -> None:
    # The rule keys on grpc-core's wording; check it against the installed grpcio.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.unary_unary("/x.Y/Z", _registered_method=True)
        with pytest.raises(grpc.RpcError) as err:
            call(b"", timeout=5)
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    assert never_sent(err.value.details())
