"""The sync facade: same features, callbacks never on the loop thread."""

from __future__ import annotations

import os
import queue
import signal
import socket
import threading
import time

import pytest

from etcdisco import Client, ClosedError, EtcdTimeoutError, EventType, RegistrationState, Status
from etcdisco.health import CheckResult, TcpCheck


def test_sync_round_trip_and_callbacks_off_the_loop(etcd) -> None:
    seen_threads: list[str] = []
    got = threading.Event()
    with Client(etcd.endpoint) as server, Client(etcd.endpoint) as client:
        cache = client.discover("echo")
        cache.wait_ready(5)

        def on_events(events: list) -> None:
            seen_threads.append(threading.current_thread().name)
            got.set()

        cache.add_listener(on_events)
        first = cache.next_event(timeout=0)  # start collecting events
        assert first is None
        reg = server.register("echo", "127.0.0.1:8001", metadata={"zone": "a"}, ttl=5)
        assert reg.state is RegistrationState.REGISTERED
        ev = cache.next_event(timeout=5)
        assert ev is not None and ev.type is EventType.ADDED
        assert [i.address for i in cache.instances()] == ["127.0.0.1:8001"]
        assert got.wait(5), "listener was not called"
        assert seen_threads and all(name != "etcdisco-loop" for name in seen_threads)
        reg.drain()
        ev = cache.next_event(timeout=5)
        assert ev is not None and ev.type is EventType.UPDATED
        reg.deregister()
        ev = cache.next_event(timeout=5)
        assert ev is not None and ev.type is EventType.REMOVED
        cache.close()


def test_sync_list_instances(etcd) -> None:
    with Client(etcd.endpoint) as c:
        c.register("a", "127.0.0.1:8101", ttl=5)
        c.register("b", "127.0.0.1:8102", ttl=5)
        assert [i.address for i in c.list_instances("a")] == ["127.0.0.1:8101"]
        assert [i.service for i in c.list_instances()] == ["a", "b"]


def test_sync_registration_reports_health_on_the_dispatcher(etcd) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    address = f"127.0.0.1:{listener.getsockname()[1]}"
    changes: queue.SimpleQueue[tuple[CheckResult, str]] = queue.SimpleQueue()
    check = TcpCheck(interval=0.1, timeout=0.5, rise=1, fall=1, jitter=0)
    with Client(etcd.endpoint) as c, c.discover("db") as cache:
        cache.wait_ready(5)
        assert cache.next_event(timeout=0) is None  # start collecting events
        reg = c.register("db", address, ttl=5, checks=[check])
        assert reg.health is CheckResult.PASSING and reg.health_failures == ()
        reg.add_health_listener(
            lambda r, health: changes.put((health, threading.current_thread().name))
        )
        listener.close()
        health, thread = changes.get(timeout=5)
        assert health is CheckResult.FAILING and thread != "etcdisco-loop"
        assert reg.health is CheckResult.FAILING and reg.health_failures
        assert not reg.withdrawn and reg.re_registrations == 0 and reg.ttl == 5
        events = [cache.next_event(timeout=5), cache.next_event(timeout=5)]
        statuses = [ev.instance.status if ev else None for ev in events]
        assert statuses == [Status.UP, Status.UNHEALTHY], statuses
        assert cache.suspects() == ()


def test_sync_keeps_the_cores_error_messages(etcd) -> None:
    with Client(etcd.endpoint, timeout=1.0) as c:
        etcd.pause()
        try:
            with pytest.raises(EtcdTimeoutError) as info:
                c.list_instances()
        finally:
            etcd.resume()
        assert "etcd call timed out" in str(info.value), str(info.value)
        assert etcd.endpoint in str(info.value)


def test_calls_on_a_closed_client_raise_closed_error(etcd) -> None:
    c = Client(etcd.endpoint)
    cache = c.discover("echo")
    c.close()
    for call in (c.list_instances, lambda: c.register("echo", "127.0.0.1:8002"), cache.close):
        with pytest.raises(ClosedError):
            call()


def test_a_forked_child_fails_at_once(etcd) -> None:
    """The loop thread does not survive fork(): a call in the child must say so
    instead of waiting forever for a loop that is not running."""
    with Client(etcd.endpoint) as c:
        c.list_instances()
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report what the call did, then leave at once
            code = 1
            try:
                c.list_instances()
            except ClosedError as exc:
                os.write(write_end, str(exc).encode())
                code = 0
            except BaseException as exc:
                os.write(write_end, repr(exc).encode())
            os._exit(code)
        os.close(write_end)
        deadline = time.monotonic() + 10
        while (status := os.waitpid(pid, os.WNOHANG))[0] == 0:
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise AssertionError("a call in the forked child hung")
            time.sleep(0.05)
        said = os.read(read_end, 4096).decode()
        os.close(read_end)
        assert os.waitstatus_to_exitcode(status[1]) == 0, said
        assert "fork" in said


def test_follow_pushes_whole_snapshots_built_on_the_loop(etcd) -> None:
    """The first snapshot before follow() returns, then one per change on the
    dispatcher thread: the full state each time, never an older one after a newer."""
    seen: queue.SimpleQueue[tuple[str, tuple[str, ...]]] = queue.SimpleQueue()
    with Client(etcd.endpoint) as server, Client(etcd.endpoint) as client:
        first = server.register("echo", "127.0.0.1:8101", ttl=5)
        cache = client.discover("echo")
        cache.wait_ready(5)

        def on_snapshot(instances: tuple) -> None:
            seen.put((threading.current_thread().name, tuple(i.address for i in instances)))

        cache.follow(on_snapshot)
        assert seen.get_nowait() == (threading.current_thread().name, ("127.0.0.1:8101",))
        second = server.register("echo", "127.0.0.1:8102", ttl=5)
        thread, addresses = seen.get(timeout=5)
        assert thread == "etcdisco-callbacks"
        assert addresses == ("127.0.0.1:8101", "127.0.0.1:8102")
        cache.remove_listener(on_snapshot)
        second.deregister()
        first.deregister()
        with pytest.raises(queue.Empty):
            seen.get(timeout=0.5)
        cache.close()


def test_events_collect_from_the_call_and_end_with_the_cache(etcd) -> None:
    with Client(etcd.endpoint) as server, Client(etcd.endpoint) as client:
        cache = client.discover("echo")
        cache.wait_ready(5)
        events = cache.events()  # subscribed now: what follows is not missed
        reg = server.register("echo", "127.0.0.1:8201", ttl=5)
        first = events.get(timeout=5)
        assert first is not None and first.type is EventType.ADDED
        assert first.instance.key == reg.key
        ended = threading.Event()

        def drain() -> None:
            for _ in events:
                pass
            ended.set()

        threading.Thread(target=drain, daemon=True).start()
        cache.close()
        assert ended.wait(5), "iteration did not end when the cache closed"
        assert events.get(timeout=0) is None
