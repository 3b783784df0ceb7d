"""Endpoint health as sent to xDS clients: suspects are a last resort."""

from __future__ import annotations

from etcdisco import Instance, Status
from etcdisco.grpc.xds._resources import endpoint_specs


def inst(n: int, *, suspect: bool = False, **meta: object) -> Instance:
    addr = f"10.0.0.{n}:80"
    return Instance("echo", addr, addr, dict(meta), f"services/echo/{addr}", n, suspect=suspect)


def test_suspects_are_unhealthy_while_a_live_instance_remains() -> None:
    specs, problems = endpoint_specs([inst(1), inst(2, suspect=True)])
    assert problems == []
    assert {s.ip: s.status for s in specs} == {"10.0.0.1": Status.UP, "10.0.0.2": Status.UNHEALTHY}


def test_suspects_serve_when_nothing_live_is_left() -> None:
    specs, _ = endpoint_specs([inst(1, suspect=True), inst(2, status="draining")])
    assert {s.ip: s.status for s in specs} == {"10.0.0.1": Status.UP, "10.0.0.2": Status.DRAINING}
