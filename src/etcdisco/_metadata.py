"""The metadata keys etcdisco gives a meaning to, with their types, checked on writing.

Readers stay lenient (a value written by another tool or a newer version is read as
best it can be: an unknown status counts as up, a bad weight as 1), but a writer that
gets a reserved key wrong is told so before anything is written, instead of its
instance silently behaving as if the key were absent. Every other key is free.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ._errors import ConfigError

__all__ = [
    "LB_POLICIES",
    "RESERVED_METADATA",
    "RING_HASH",
    "ROUND_ROBIN",
    "ReservedKey",
    "check_metadata",
    "parse_metadata_text",
    "validate_hash_header",
]

ROUND_ROBIN = "round_robin"
RING_HASH = "ring_hash"
LB_POLICIES = (ROUND_ROBIN, RING_HASH)
STATUSES = ("up", "draining", "unhealthy")

_HEADER_NAME = re.compile(r"[0-9a-z_.-]+", re.ASCII)


def validate_hash_header(name: str) -> str:
    """A gRPC metadata key that a ring hash may hash on, lower-cased."""
    header = name.strip().lower()
    if not header or not _HEADER_NAME.fullmatch(header):
        raise ConfigError(f"hash header {name!r} is not a valid gRPC metadata key")
    if header.endswith("-bin") or header.startswith("grpc-"):
        raise ConfigError(f"hash header {name!r}: binary and grpc- headers cannot be hashed")
    return header


def _weight(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("an integer >= 0")
    return value


def _text(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("a non-empty string")
    return value


def _one_of(*choices: str) -> Callable[[object], str]:
    def check(value: object) -> str:
        if value not in choices:
            raise ValueError("one of " + ", ".join(repr(c) for c in choices))
        return str(value)

    return check


def _header(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("a gRPC metadata key (a string)")
    try:
        return validate_hash_header(value)
    except ConfigError:
        raise ValueError("a gRPC metadata key: lower-case letters, digits, '_', '.', '-'") from None


def _int_from_text(text: str) -> object:
    try:
        return int(text)
    except ValueError:
        return text  # left for the check to refuse, naming the key


@dataclass(frozen=True)
class ReservedKey:
    """One key with a meaning: its type as documented, and what it does."""

    name: str
    kind: str
    meaning: str
    check: Callable[[object], object]
    from_text: Callable[[str], object] = str


RESERVED_METADATA: Mapping[str, ReservedKey] = {
    key.name: key
    for key in (
        ReservedKey(
            "status",
            "'up', 'draining' or 'unhealthy'",
            "draining and unhealthy instances are never picked; set by drain() and by "
            "failing health checks, which win over a value given here",
            _one_of(*STATUSES),
        ),
        ReservedKey(
            "weight",
            "integer >= 0 (default 1)",
            "share of calls under weighted_round_robin, and the locality weight in xDS; "
            "0: never picked while any instance has a weight",
            _weight,
            _int_from_text,
        ),
        ReservedKey(
            "zone",
            "non-empty string",
            "zone_aware picks this zone first; one xDS locality per zone",
            _text,
        ),
        ReservedKey(
            "lb",
            "'round_robin' or 'ring_hash'",
            "the xDS control plane's policy for the service (the newest instance wins)",
            _one_of(*LB_POLICIES),
        ),
        ReservedKey(
            "hash_header",
            "gRPC metadata key",
            "with lb=ring_hash: the request header the xDS ring hashes on",
            _header,
        ),
    )
}


def check_metadata(metadata: Mapping[str, Any]) -> None:
    """Refuse a reserved key with a value of the wrong type, naming the key."""
    for name, key in RESERVED_METADATA.items():
        if name in metadata:
            value = metadata[name]
            try:
                key.check(value)
            except ValueError as exc:
                raise ConfigError(
                    f"metadata {name!r} must be {exc}, not {json.dumps(value, default=repr)}"
                ) from None


def parse_metadata_text(name: str, text: str) -> object:
    """A metadata value typed on a command line: a string, except for the reserved keys
    whose type is not a string (``weight=5`` is the integer 5)."""
    key = RESERVED_METADATA.get(name)
    return text if key is None else key.from_text(text)
