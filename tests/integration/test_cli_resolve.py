"""``etcdisco resolve``, run as a user runs it: a subprocess against a real etcd."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections import Counter

from etcdisco import AsyncClient

ADDRESSES = ("127.0.0.1:7101", "127.0.0.1:7102", "127.0.0.1:7103")


async def resolve(endpoint: str, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "etcdisco", "--endpoints", endpoint, *args]
    return await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, timeout=30)


async def test_resolve_picks_registered_instances(etcd) -> None:
    ep = etcd.endpoint
    async with AsyncClient(ep) as client:
        regs = [
            await client.register("echo", address, metadata={"zone": zone}, ttl=10)
            for address, zone in zip(ADDRESSES, ("a", "b", "b"), strict=True)
        ]

        hashed = [
            await resolve(ep, "resolve", "echo", "--policy", "ring_hash", "--hash-key", "user-1")
            for _ in range(2)
        ]
        assert all(r.returncode == 0 for r in hashed), [r.stderr for r in hashed]
        assert hashed[0].stdout == hashed[1].stdout
        assert hashed[0].stdout.strip() in ADDRESSES

        spread = await resolve(ep, "resolve", "echo", "--count", "30")
        assert spread.returncode == 0, spread.stderr
        assert Counter(spread.stdout.split()) == {address: 10 for address in ADDRESSES}

        zoned = await resolve(ep, "--json", "resolve", "echo", "--zone", "a", "--count", "5")
        assert zoned.returncode == 0, zoned.stderr
        rows = [json.loads(line) for line in zoned.stdout.splitlines()]
        assert len(rows) == 5
        assert all(
            row["address"] == ADDRESSES[0] and row["metadata"] == {"zone": "a"} for row in rows
        )

        # A draining instance is never picked; the zone spills over to the others.
        await regs[0].drain()
        after = await resolve(ep, "resolve", "echo", "--zone", "a", "--count", "20")
        assert after.returncode == 0, after.stderr
        assert set(after.stdout.split()) == set(ADDRESSES[1:])

        for reg in regs:
            await reg.deregister()


async def test_resolve_without_instances_fails_with_one_line(etcd) -> None:
    ep = etcd.endpoint
    async with AsyncClient(ep) as client:
        # Another service's instance must not count.
        reg = await client.register("other", "127.0.0.1:7200", ttl=10)
        res = await resolve(ep, "resolve", "echo")
        assert res.returncode == 1
        assert res.stderr == "etcdisco: error: no healthy instance of echo\n"
        assert res.stdout == ""
        await reg.deregister()


async def test_key_is_the_tls_key_and_the_hash_key_is_hash_key() -> None:
    res = await resolve("127.0.0.1:1", "resolve", "echo", "--policy", "ring_hash", "--key", "u1")
    assert res.returncode == 2
    assert "the ring_hash key is --hash-key" in res.stderr, res.stderr
