"""The fleet: which process registers which instances, under fixed ids.

Each instance process holds one instance of every service, so losing one process
takes a fifth of each service: well under the share at which a cache's mass-expiry
protection would hold vanished instances as suspects. With that layout the caches
must follow etcd exactly, and a suspect at a convergence point is a finding.
"""

from __future__ import annotations

import dataclasses
from typing import Any

SERVICES = ("alpha", "beta", "gamma", "delta")
INSTANCE_PROCESSES = 5
WATCHER_PROCESSES = 5
PREFIX = "services"
_ADDRESS_BASE = 20000


@dataclasses.dataclass(frozen=True)
class InstanceSpec:
    service: str
    instance_id: str
    address: str
    zone: str

    @property
    def key(self) -> str:
        return f"{PREFIX}/{self.service}/{self.instance_id}"

    def to_json(self) -> dict[str, str]:
        return dataclasses.asdict(self)


def instances_of(process: int) -> tuple[InstanceSpec, ...]:
    """The fixed instances of instance process ``process``: a restarted process
    re-registers exactly the same keys. Addresses are never dialled: a documentation
    range (192.0.2.0/24) keeps them from meaning anything."""
    return tuple(
        InstanceSpec(
            service=service,
            instance_id=f"p{process}-{service}",
            address=f"192.0.2.{process + 1}:{_ADDRESS_BASE + index}",
            zone=f"z{process % 2}",
        )
        for index, service in enumerate(SERVICES)
    )


def all_keys() -> frozenset[str]:
    return frozenset(spec.key for p in range(INSTANCE_PROCESSES) for spec in instances_of(p))


def initial_metadata(spec: InstanceSpec, process: int) -> dict[str, Any]:
    """What an instance registers with (and re-registers with after a restart)."""
    return {"zone": spec.zone, "process": process}


def service_prefixes() -> tuple[str, ...]:
    """The key prefixes the soak's registrant user may write (with ``--auth``)."""
    return tuple(f"{PREFIX}/{service}/" for service in SERVICES)
