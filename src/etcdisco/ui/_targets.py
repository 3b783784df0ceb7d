"""Prometheus HTTP service discovery: the registry as scrape targets (pure, no I/O).

Prometheus (>= 2.28) reads ``http_sd_configs``: a GET answered 200 with
``application/json``, a list of target groups, the whole list every time::

    [{"targets": ["10.0.0.5:9100"], "labels": {"__meta_etcdisco_service": "echo", ...}}]

One group per instance, so each target keeps its own labels:

- ``__meta_etcdisco_service``, ``_id``, ``_address`` (the registered address), ``_zone``
  (empty without one), ``_status`` (the effective status: ``up``, ``draining``,
  ``unhealthy`` or ``disabled``, the last under an operator's override), ``_health``
  (the instance's own word: ``healthy``, ``unhealthy``, ``draining``; ``suspect`` for
  one held after a mass expiry), ``_weight``, and ``__meta_etcdisco_metadata_<key>``
  for every metadata entry (the key sanitized to ``[a-zA-Z0-9_]``; a value that is not
  a string in its JSON spelling).
- The target is the registered host with metadata ``metrics_port`` when there is one
  (an integer, or digits), else the registered address; metadata ``metrics_path``
  (starting with ``/``) becomes ``__metrics_path__``.

Disabled instances are listed like the others, so that a relabeling rule decides
whether to scrape them; ``__meta_*`` labels are dropped after relabeling.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from .._address import join_address, parse_address
from .._errors import InvalidAddressError
from .._model import Instance, Status

__all__ = ["META", "health_word", "instance_target", "prometheus_targets", "sanitize_label"]

META = "__meta_etcdisco_"

_INVALID = re.compile(r"[^a-zA-Z0-9_]")


def sanitize_label(name: str) -> str:
    """A metadata key as the tail of a label name: every character other than
    ``[a-zA-Z0-9_]`` becomes ``_`` (as Consul's SD does)."""
    return _INVALID.sub("_", name)


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=True)


def health_word(inst: Instance) -> str:
    """The instance's own word on itself, whatever an operator's override says:
    ``healthy``, ``draining``, ``unhealthy``, or ``suspect`` (gone from etcd in a mass
    expiry and held by the cache)."""
    if inst.suspect:
        return "suspect"
    raw = inst.metadata.get("status")
    if raw == Status.UNHEALTHY.value:
        return "unhealthy"
    if raw == Status.DRAINING.value:
        return "draining"
    return "healthy"


def _metrics_port(metadata: Mapping[str, Any]) -> int | None:
    raw = metadata.get("metrics_port")
    if isinstance(raw, str) and raw.isdigit():
        raw = int(raw)
    if isinstance(raw, int) and not isinstance(raw, bool) and 0 < raw < 65536:
        return raw
    return None


def instance_target(inst: Instance) -> dict[str, Any] | None:
    """The target group of one instance (None for an address that cannot be parsed)."""
    try:
        host, port = parse_address(inst.address)
    except InvalidAddressError:
        return None
    metrics_port = _metrics_port(inst.metadata)
    target = join_address(host, metrics_port) if metrics_port is not None else inst.address
    labels: dict[str, str] = {}
    for name, value in sorted(inst.metadata.items()):
        label = f"{META}metadata_{sanitize_label(name)}"
        labels.setdefault(label, _text(value))  # two keys that sanitize alike: the first
    labels.update(
        {
            f"{META}service": inst.service,
            f"{META}id": inst.id,
            f"{META}address": inst.address,
            f"{META}port": str(port),
            f"{META}zone": inst.zone or "",
            f"{META}status": inst.status.value,
            f"{META}health": health_word(inst),
            f"{META}weight": str(inst.weight),
        }
    )
    path = inst.metadata.get("metrics_path")
    if isinstance(path, str) and path.startswith("/"):
        labels["__metrics_path__"] = path
    return {"targets": [target], "labels": labels}


def prometheus_targets(
    instances: Iterable[Instance], services: Iterable[str] = ()
) -> list[dict[str, Any]]:
    """The target groups of ``instances`` (of ``services`` only, when given), in the
    order given; ``[]`` when there is none."""
    wanted = set(services)
    groups = []
    for inst in instances:
        if wanted and inst.service not in wanted:
            continue
        group = instance_target(inst)
        if group is not None:
            groups.append(group)
    return groups
