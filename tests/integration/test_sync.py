"""The sync facade: same features, callbacks never on the loop thread."""

from __future__ import annotations

import threading

from etcdisco import Client, EventType, RegistrationState


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
