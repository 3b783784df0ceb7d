"""The pieces of the HTTP server side that need no server: request counting and the
readiness answer (ActivityMiddleware), what a registration refuses (ServeSpec), the
advertised host for a bind address, the workers' shared counters and the address lock."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

import pytest

from etcdisco import ConfigError, InvalidAddressError
from etcdisco._advertise import advertised_for_bind
from etcdisco._drain import DrainPolicy, quiet_step
from etcdisco.asgi import ActivityMiddleware, AddressLock, RequestActivity, ServeSpec
from etcdisco.uvicorn import SharedActivity


async def _call(app: Any, scope: dict[str, Any]) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


def _http(path: str, method: str = "GET") -> dict[str, Any]:
    return {"type": "http", "path": path, "method": method, "headers": []}


class _App:
    """An app that answers 204, optionally waiting for ``release`` first."""

    def __init__(self) -> None:
        self.calls = 0
        self.release: asyncio.Event | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.calls += 1
        if self.release is not None:
            await self.release.wait()
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})


async def test_requests_are_counted_while_in_flight() -> None:
    app, activity = _App(), RequestActivity()
    app.release = asyncio.Event()
    wrapped = ActivityMiddleware(app, activity)
    before = time.monotonic()
    task = asyncio.ensure_future(_call(wrapped, _http("/x")))
    await asyncio.sleep(0)
    assert (activity.arrivals, activity.in_flight) == (1, 1)
    assert activity.last_arrival >= before
    app.release.set()
    await task
    assert (activity.arrivals, activity.in_flight) == (1, 0)


async def test_a_failing_request_leaves_flight_too() -> None:
    activity = RequestActivity()

    async def broken(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        await _call(ActivityMiddleware(broken, activity), _http("/"))
    assert (activity.arrivals, activity.in_flight) == (1, 0)


@pytest.mark.parametrize(
    ("state", "status"),
    [("starting", 503), ("serving", 200), ("draining", 503), ("stopped", 503)],
)
async def test_the_health_path_answers_readiness_and_is_not_counted(
    state: str, status: int
) -> None:
    app, activity = _App(), RequestActivity()
    activity.state = state
    sent = await _call(ActivityMiddleware(app, activity, "/healthz"), _http("/healthz"))
    assert sent[0]["status"] == status
    assert sent[1]["body"] == f'{{"status": "{state}"}}'.encode()
    assert (app.calls, activity.arrivals) == (0, 0)
    head = await _call(ActivityMiddleware(app, activity, "/healthz"), _http("/healthz", "HEAD"))
    assert head[1]["body"] == b""


async def test_other_paths_and_websockets_count_lifespan_does_not() -> None:
    app, activity = _App(), RequestActivity()
    wrapped = ActivityMiddleware(app, activity, "/healthz")
    await _call(wrapped, _http("/healthz/deeper"))
    await _call(wrapped, {"type": "websocket", "path": "/ws", "headers": []})
    await _call(wrapped, {"type": "lifespan"})
    assert (app.calls, activity.arrivals) == (3, 2)


def test_health_path_must_be_a_path() -> None:
    with pytest.raises(ValueError, match="must start with '/'"):
        ActivityMiddleware(_App(), RequestActivity(), "healthz")


# -- what a registration refuses, before anything starts --------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"services": []}, ConfigError),
        ({"services": "bad name"}, ConfigError),
        ({"services": "ok", "host": "0.0.0.0"}, InvalidAddressError),
        ({"services": "ok", "address": "10.0.0.1:80", "host": "10.0.0.1"}, ConfigError),
        ({"services": "ok", "address": "10.0.0.1"}, InvalidAddressError),
        ({"services": "ok", "ttl": 1}, ConfigError),
        ({"services": "ok", "metadata": {"weight": "heavy"}}, ConfigError),
        ({"services": "ok", "on_failing": "panic"}, ConfigError),
    ],
)
def test_serve_spec_refuses(kwargs: dict[str, Any], error: type[Exception]) -> None:
    services = kwargs.pop("services")
    with pytest.raises(error):
        ServeSpec.of(services, **kwargs)


def test_serve_spec_advertises() -> None:
    assert ServeSpec.of("a").advertised(8000, "127.0.0.1") == "127.0.0.1:8000"
    assert ServeSpec.of("a").advertised(8000, "0.0.0.0") == advertised_for_bind(None, 8000)
    assert ServeSpec.of("a", host="10.1.2.3").advertised(8000, "0.0.0.0") == "10.1.2.3:8000"
    assert ServeSpec.of("a", address="Svc.Example:443").advertised(8000, None) == "svc.example:443"


@pytest.mark.parametrize("bind", ["0.0.0.0", "::", "", "[::]", None])
def test_a_wildcard_bind_advertises_the_primary_ip(bind: str | None) -> None:
    assert advertised_for_bind(bind, 8000) == advertised_for_bind(None, 8000)
    assert not advertised_for_bind(bind, 8000).startswith(("0.0.0.0", "[::]"))


def test_a_specific_bind_advertises_itself() -> None:
    assert advertised_for_bind("127.0.0.1", 8000) == "127.0.0.1:8000"
    assert advertised_for_bind("::1", 8000) == "[::1]:8000"
    assert advertised_for_bind("127.0.0.1", 8000, "10.0.0.7") == "10.0.0.7:8000"


# -- the workers' shared counters -------------------------------------------------------


def test_shared_activity_sums_the_workers_slots() -> None:
    shared = SharedActivity.create(multiprocessing.get_context("spawn"), 3)
    assert (shared.arrivals, shared.in_flight, shared.last_arrival) == (0, 0, float("-inf"))
    assert shared.state == "starting" and not shared.ready and not shared.closing
    a, b = shared.slot(0), shared.slot(2)
    a.enter()
    b.enter()
    b.enter()
    b.leave()
    assert (shared.arrivals, shared.in_flight) == (3, 2)
    assert shared.last_arrival <= time.monotonic()
    shared.state = "serving"
    assert a.ready and b.state == "serving"
    shared.forget_in_flight(0)  # worker 0 died with a request in flight
    assert shared.in_flight == 1
    shared.close_now()
    assert shared.closing


def test_a_drain_waits_on_the_shared_counters() -> None:
    shared = SharedActivity.create(multiprocessing.get_context("spawn"), 2)
    policy = DrainPolicy(quiet_period=1.0, drain_timeout=10.0)
    started = time.monotonic()
    assert isinstance(quiet_step(shared, policy, started, False), float)
    assert quiet_step(shared, policy, started - 2, False) is True
    shared.slot(1).enter()  # an arrival now restarts the quiet period
    assert isinstance(quiet_step(shared, policy, started - 2, False), float)
    assert quiet_step(shared, policy, started - 2, True) is False  # a second signal


# -- one registrant per address --------------------------------------------------------


def test_one_holder_per_address(tmp_path: Path) -> None:
    first = AddressLock("services", "127.0.0.1:8000", tmp_path / "locks")
    second = AddressLock("services", "127.0.0.1:8000", tmp_path / "locks")
    other = AddressLock("services", "127.0.0.1:8001", tmp_path / "locks")
    assert first.try_acquire() and first.try_acquire()
    assert not second.try_acquire()
    assert other.try_acquire()
    assert first.path.read_text() == f"{os.getpid()}\n"
    first.release()
    assert second.try_acquire()
    second.release()
    other.release()
    assert (tmp_path / "locks").stat().st_mode & 0o777 == 0o700


def test_a_lock_directory_others_may_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    with pytest.raises(ConfigError, match="writable by other users"):
        AddressLock("services", "127.0.0.1:8000", shared).try_acquire()
