"""Discovery against a real etcd: formats written by others, garbage, discover_all."""

from __future__ import annotations

from etcdisco import AsyncClient, EventType

from .._util import eventually, wait_event

# Values as other writers leave them: etcd's Go endpoints.Manager (Metadata null,
# a string, an object), etcd's grpcproxy (a JSON string), and plain etcdctl.
FOREIGN = {
    "services/echo/go-null": '{"Op":0,"Addr":"10.0.0.1:80","Metadata":null}',
    "services/echo/go-object": '{"Op":0,"Addr":"10.0.0.2:80","Metadata":{"zone":"b"}}',
    "services/echo/proxy": '{"Op":0,"Addr":"10.0.0.3:80","Metadata":"{\\"zone\\":\\"c\\"}"}',
    "services/echo/1.2.3.4:80": '{"Addr":"1.2.3.4:80"}',
}
GARBAGE = {
    "services/echo/not-json": "hello",
    "services/echo/no-addr": '{"Op":0}',
    "services/echo/delete-op": '{"Op":1,"Addr":"10.0.0.9:80"}',
    "services/echo/bad-addr": '{"Addr":"nohost"}',
    "services/echo/deep": "[" * 5000 + "]" * 5000,
    # Addresses that try to smuggle something into a dialer or a log line.
    "services/echo/newline": '{"Addr":"10.0.0.9:80\\nINFO fake log line"}',
    "services/echo/scheme": '{"Addr":"unix:///var/run/docker.sock"}',
    "services/echo/list": '{"Addr":"10.0.0.9:80,10.0.0.10:80"}',
    "services/echo/shell": '{"Addr":"$(reboot):80"}',
}


async def test_reads_foreign_formats_and_skips_garbage(etcd) -> None:
    for key, value in {**FOREIGN, **GARBAGE}.items():
        etcd.etcdctl("put", key, value)
    async with AsyncClient(etcd.endpoint) as c, c.discover("echo") as cache:
        await cache.wait_ready(5)
        got = {i.key: i for i in cache.instances()}
        assert set(got) == set(FOREIGN)
        assert got["services/echo/go-object"].zone == "b"
        assert got["services/echo/proxy"].zone == "c"
        assert got["services/echo/go-null"].metadata == {}
        assert cache.malformed == len(GARBAGE)

        # Garbage arriving through the watch is skipped too, and a key that turns to
        # garbage stops naming an instance.
        events = cache.events()
        await c.etcd.put("services/echo/late", b"\xff\xfe\x00")
        # Over the 1 MiB limit, though etcd (1.5 MiB per request) stores it.
        huge = '{"Addr":"10.0.0.8:80","Metadata":"' + "x" * 1_400_000 + '"}'
        await c.etcd.put("services/echo/huge", huge)
        await c.etcd.put("services/echo/1.2.3.4:80", "{}")
        ev = await wait_event(events, EventType.REMOVED, "services/echo/1.2.3.4:80", 5)
        assert ev.instance.address == "1.2.3.4:80"
        assert cache.malformed == len(GARBAGE) + 3
        assert {i.key for i in cache.instances()} == set(FOREIGN) - {ev.instance.key}


async def test_keys_outside_the_layout_are_ignored(etcd) -> None:
    etcd.etcdctl("put", "services/echo/a/b", '{"Addr":"10.0.0.1:80"}')
    etcd.etcdctl("put", "services/echo-canary/x", '{"Addr":"10.0.0.2:80"}')
    async with AsyncClient(etcd.endpoint) as c, c.discover("echo") as cache:
        await cache.wait_ready(5)
        assert cache.instances() == ()


async def test_discover_all_sees_every_service(etcd) -> None:
    async with AsyncClient(etcd.endpoint) as c:
        await c.register("a", "127.0.0.1:1001", ttl=5)
        await c.register("b", "127.0.0.1:1002", ttl=5)
        async with c.discover_all() as cache:
            await cache.wait_ready(5)
            assert set(cache.services()) == {"a", "b"}
            events = cache.events()
            await c.register("c", "127.0.0.1:1003", ttl=5)
            await wait_event(events, EventType.ADDED, "services/c/127.0.0.1:1003", 5)


async def test_custom_prefix_with_leading_slash(etcd) -> None:
    async with AsyncClient(etcd.endpoint, prefix="/corp/svc") as c:
        reg = await c.register("echo", "127.0.0.1:1001", ttl=5)
        assert reg.key == "/corp/svc/echo/127.0.0.1:1001"
        async with c.discover("echo") as cache:
            await cache.wait_ready(5)
            await eventually(lambda: len(cache.instances()) == 1, 5, "instance not seen")
