"""The sync and async surfaces cannot drift apart: same parameters, same members.

The flavours are written by hand (they are not line-for-line twins), so this is what
keeps a new option from landing on one of them only, as ``expiry_protection`` once did.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest

import etcdisco
import etcdisco.grpc

# Members of an async class that its sync twin does not have, and why.
ASYNC_ONLY = {
    "AsyncClient": {
        # Objects that live on the loop: from sync code reach them through
        # Client.async_client (as etcdisco.metrics does).
        "lease_keepers",
        "watchers",
    },
}


def _parameters(fn: Callable[..., Any]) -> list[tuple[str, str, object]]:
    return [
        (p.name, p.kind.name, p.default)
        for p in inspect.signature(fn).parameters.values()
        if p.name != "self"
    ]


@pytest.mark.parametrize(
    ("sync", "aio"),
    [
        (etcdisco.Client.__init__, etcdisco.AsyncClient.__init__),
        (etcdisco.Client.register, etcdisco.AsyncClient.register),
        (etcdisco.Client.discover, etcdisco.AsyncClient.discover),
        (etcdisco.Client.list_instances, etcdisco.AsyncClient.list_instances),
        (etcdisco.grpc.channel, etcdisco.grpc.aio_channel),
        (etcdisco.grpc.serve_registered, etcdisco.grpc.aio_serve_registered),
        # Not grpc.server()/aio_server(): they mirror grpc.server and grpc.aio.server,
        # whose own parameters differ (a thread pool against a migration pool).
    ],
    ids=lambda fn: fn.__qualname__,
)
def test_same_parameters(sync: Callable[..., Any], aio: Callable[..., Any]) -> None:
    assert _parameters(sync) == _parameters(aio)


@pytest.mark.parametrize(
    ("sync", "aio"),
    [
        (etcdisco.Client, etcdisco.AsyncClient),
        (etcdisco.SyncRegistration, etcdisco.Registration),
        (etcdisco.SyncServiceCache, etcdisco.ServiceCache),
    ],
    ids=lambda cls: cls.__name__,
)
def test_same_members(sync: type, aio: type) -> None:
    public = {name for name in dir(aio) if not name.startswith("_")}
    missing = public - set(dir(sync)) - ASYNC_ONLY.get(aio.__name__, set())
    assert not missing, f"{sync.__name__} lacks {sorted(missing)}"
