"""Instances for pure tests: ``inst(n)`` is ``i{n}`` of service ``echo`` at 10.0.0.n:80."""

from __future__ import annotations

from etcdisco import Instance


def inst(
    n: int, *, status: str | None = None, address: str | None = None, service: str = "echo"
) -> Instance:
    return Instance(
        service=service,
        id=f"i{n}",
        address=address or f"10.0.0.{n}:80",
        metadata={"status": status} if status else {},
        key=f"services/{service}/i{n}",
        revision=n,
    )
