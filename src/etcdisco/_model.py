"""Instances, change events and the wire codec shared with etcd's Go naming package.

Key layout: ``<prefix>/<service>/<instance-id>``. Value layout (see DESIGN.md section 2)::

    {"Op":0,"Addr":"10.0.0.5:50051","Metadata":"{\\"zone\\":\\"a\\"}"}

``Metadata`` is written as a JSON-encoded *string* because grpc-go's round_robin panics on
a JSON object there (etcd-io/etcd#19700); readers accept null, a string, an object or a
number, since other writers (Go's endpoints.Manager, etcdctl, grpcproxy) differ.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from ._address import bad_char, parse_address
from ._errors import ConfigError, InvalidAddressError, MalformedValueError

__all__ = [
    "DEFAULT_PREFIX",
    "MAX_JSON_DEPTH",
    "MAX_VALUE_SIZE",
    "ChangeEvent",
    "EventType",
    "Instance",
    "Override",
    "Status",
    "decode_instance",
    "decode_value",
    "diff",
    "encode_value",
    "instance_key",
    "service_prefix",
    "split_key",
    "validate_instance_id",
    "validate_prefix",
    "validate_service_name",
]

# No leading slash: Go's resolver dialled with etcd:///services/echo strips one "/" and
# reads "services/echo", so this is the prefix both sides agree on by default.
DEFAULT_PREFIX = "services"

# Well under etcd's 1.5 MiB request limit, leaving room for the key and the txn around it.
MAX_VALUE_SIZE = 1024 * 1024

# Legitimate values are a few levels deep; the limit keeps hostile values from costing
# stack depth or CPU in every reader.
MAX_JSON_DEPTH = 32

_MAX_NAME_LENGTH = 253


def validate_service_name(name: str) -> str:
    """Return ``name`` if it can be a service name, else raise ConfigError."""
    if not isinstance(name, str):
        raise ConfigError(f"service name must be a string, not {type(name).__name__}")
    if not name:
        raise ConfigError("service name is empty")
    if "/" in name:
        raise ConfigError(f"service name {name!r} contains '/', which separates key parts")
    problem = bad_char(name, allow_whitespace=False)
    if problem is not None:
        raise ConfigError(f"service name {name!r} contains {problem}")
    if len(name) > _MAX_NAME_LENGTH:
        raise ConfigError(
            f"service name is {len(name)} characters long; the limit is {_MAX_NAME_LENGTH}"
        )
    return name


@functools.lru_cache(maxsize=64)
def validate_prefix(prefix: str) -> str:
    """Return the prefix without trailing slashes, or raise ConfigError.

    A leading "/" is kept as given because it is part of the etcd key; Go's resolver
    strips one "/" from its dial target, so Go clients need an extra "/" to reach it.
    """
    if not isinstance(prefix, str):
        raise ConfigError(f"prefix must be a string, not {type(prefix).__name__}")
    stripped = prefix.rstrip("/")
    if not stripped:
        raise ConfigError(f"prefix {prefix!r} is empty once trailing '/' are removed")
    problem = bad_char(stripped, allow_whitespace=False)
    if problem is not None:
        raise ConfigError(f"prefix {prefix!r} contains {problem}")
    return stripped


def validate_instance_id(instance_id: str) -> str:
    """Return ``instance_id`` if it can be the last key part, else raise ConfigError."""
    if not isinstance(instance_id, str):
        raise ConfigError(f"instance id must be a string, not {type(instance_id).__name__}")
    if not instance_id:
        raise ConfigError("instance id is empty")
    if "/" in instance_id:
        raise ConfigError(f"instance id {instance_id!r} contains '/', which separates key parts")
    problem = bad_char(instance_id, allow_whitespace=True)
    if problem is not None:
        raise ConfigError(f"instance id {instance_id!r} contains {problem}")
    return instance_id


def service_prefix(prefix: str, service: str) -> str:
    """The key prefix holding every instance of ``service``, with its trailing "/".

    The trailing "/" keeps ``echo`` from matching ``echo-canary/...``.
    """
    return f"{validate_prefix(prefix)}/{validate_service_name(service)}/"


def instance_key(prefix: str, service: str, instance_id: str) -> str:
    """The etcd key of one instance."""
    return service_prefix(prefix, service) + validate_instance_id(instance_id)


def split_key(prefix: str, key: str) -> tuple[str, str] | None:
    """Split ``<prefix>/<service>/<id>`` into ``(service, id)``; None for any other shape."""
    head = validate_prefix(prefix) + "/"
    if not key.startswith(head):
        return None
    service, sep, instance_id = key[len(head) :].partition("/")
    if not sep or not service or not instance_id or "/" in instance_id:
        return None
    return service, instance_id


class Status(StrEnum):
    """An instance's own word on itself (metadata ``status``): only ``up`` is picked."""

    UP = "up"
    DRAINING = "draining"
    UNHEALTHY = "unhealthy"
    DISABLED = "disabled"
    """Taken out of rotation by an operator's override (never written by instances)."""


_STATUS_VALUES = frozenset(status.value for status in Status)


@dataclass(frozen=True, slots=True)
class Override:
    """An operator's word on a service or one of its instances, kept in etcd apart
    from the instances' own keys (see ``etcdisco._overrides`` for the layout).

    ``disabled`` takes the instance(s) out of rotation; ``weight`` replaces the
    instance's own. ``expires_at`` (Unix time) ends it by itself; ``reason`` and
    ``by`` say why and who. ``instance_id`` None: the whole service."""

    service: str
    instance_id: str | None = None
    disabled: bool = False
    weight: int | None = None
    reason: str = ""
    by: str = ""
    expires_at: float | None = None
    created_at: float = 0.0
    key: str = ""
    revision: int = 0

    def expired(self, now: float | None = None) -> bool:
        return self.expires_at is not None and self.expires_at <= (
            time.time() if now is None else now
        )

    def merged_with(self, service_wide: Override | None) -> Override:
        """This instance override over a service-wide one: disabled if either says
        so, the instance's weight before the service's."""
        if service_wide is None:
            return self
        return dataclasses.replace(
            self,
            disabled=self.disabled or service_wide.disabled,
            weight=self.weight if self.weight is not None else service_wide.weight,
            reason=self.reason or service_wide.reason,
            by=self.by or service_wide.by,
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"service": self.service, "disabled": self.disabled}
        if self.instance_id is not None:
            out["id"] = self.instance_id
        if self.weight is not None:
            out["weight"] = self.weight
        for name in ("reason", "by"):
            if getattr(self, name):
                out[name] = getattr(self, name)
        if self.expires_at is not None:
            out["expires_at"] = self.expires_at
        return out


@dataclass(frozen=True, slots=True)
class Instance:
    """One registered instance as read from etcd.

    ``metadata`` is a read-only copy; nested containers in it are shared, not copied.
    Equality compares every field, metadata by content; the hash uses (key, revision),
    which equal instances always share.
    """

    service: str
    id: str
    address: str
    metadata: Mapping[str, Any]
    key: str
    revision: int
    lease: int = 0
    suspect: bool = False
    """Gone from etcd through lease expiry during a mass expiry, and kept by the cache
    for a bounded time (see ``ExpiryProtection``). A suspect is not ``healthy``, so a
    picker that only knows ``healthy`` never sends it traffic; pickers that filter with
    :func:`usable` fall back to suspects when nothing live is left."""
    override: Override | None = None
    """The operator's override in force for this instance (its own merged with the
    service's), as the cache that produced this instance saw it."""

    def __post_init__(self) -> None:
        # Copy so that a caller mutating its dict cannot change a cached instance; a
        # read-only mapping made by the decoder (possibly shared) is kept as is.
        if type(self.metadata) is not MappingProxyType:
            object.__setattr__(self, "metadata", MappingProxyType(dict(self.metadata)))

    def __hash__(self) -> int:
        return hash((self.key, self.revision))

    @property
    def disabled(self) -> bool:
        """Taken out of rotation by an operator's override still in force."""
        o = self.override
        return o is not None and o.disabled and not o.expired()

    @property
    def status(self) -> Status:
        """The status every reader acts on: ``disabled`` under an operator's override,
        else the instance's own word (metadata ``status``)."""
        if self.disabled:
            return Status.DISABLED
        # Unknown statuses (from newer or foreign writers) count as UP so that an
        # instance is never dropped over a word this version does not know; the raw
        # value stays readable in metadata.
        raw = self.metadata.get("status")
        if isinstance(raw, str) and raw in _STATUS_VALUES:
            return Status(raw)
        return Status.UP

    @property
    def weight(self) -> int:
        """The operator's override weight if one is in force, else metadata ``weight``
        (default 1)."""
        o = self.override
        if o is not None and o.weight is not None and not o.expired():
            return o.weight
        raw = self.metadata.get("weight")
        if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 0:
            return raw
        return 1

    @property
    def zone(self) -> str | None:
        raw = self.metadata.get("zone")
        return raw if isinstance(raw, str) and raw else None

    @property
    def healthy(self) -> bool:
        """Up by its own account and still in etcd (not a suspect)."""
        return self.status is Status.UP and not self.suspect

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "service": self.service,
            "id": self.id,
            "address": self.address,
            "metadata": dict(self.metadata),
        }
        if self.suspect:
            out["suspect"] = True
        if self.override is not None and not self.override.expired():
            out["override"] = self.override.to_dict()
        return out


def usable(instances: Iterable[Instance]) -> tuple[Instance, ...]:
    """The instances a picker may choose from: the healthy ones, or, when none is
    left, the suspects kept after a mass expiry whose last word was "up"."""
    items = list(instances)
    healthy = tuple(i for i in items if i.healthy)
    if healthy:
        return healthy
    return tuple(i for i in items if i.suspect and i.status is Status.UP)


# One token per escape pair, quote or bracket: escapes are consumed whole so that \" never
# ends a string, and nothing else needs a look.
_JSON_TOKENS = re.compile(r'\\.|["\[\]{}]', re.DOTALL)


def _too_deep(text: str, limit: int) -> bool:
    if text.count("[") + text.count("{") <= limit:
        return False
    depth = 0
    in_string = False
    for match in _JSON_TOKENS.finditer(text):
        token = match.group()
        if in_string:
            if token == '"':
                in_string = False
        elif token == '"':
            in_string = True
        elif token in "[{":
            depth += 1
            if depth > limit:
                return True
        elif token in "]}":
            depth -= 1
    return False


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    # Python turns 1e400 into inf, which Go refuses and json.dumps cannot write back.
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


# Built once: json.loads with options makes a new decoder per call, which at a hundred
# thousand values costs more than the parsing itself.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)


def _loads(text: str) -> Any:
    """Parse strict JSON no deeper than MAX_JSON_DEPTH; ValueError carries the reason."""
    if _too_deep(text, MAX_JSON_DEPTH):
        raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return _DECODER.decode(text)
    except RecursionError:
        # Only reachable when the caller is already deep in its own stack.
        raise ValueError("JSON nested too deeply to parse") from None
    except ValueError as exc:
        raise ValueError(f"not valid JSON: {exc}") from None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def encode_value(address: str, metadata: Mapping[str, Any] | None = None) -> bytes:
    """The etcd value for an instance, in the format Go's naming resolver reads.

    ``address`` is validated and written as given; metadata goes in as a JSON string with
    sorted keys, or null when empty. Raises ConfigError (InvalidAddressError for the
    address) when the value cannot be written.
    """
    parse_address(address)
    metadata_text: str | None = None
    if metadata:
        if not isinstance(metadata, Mapping):
            raise ConfigError(f"metadata must be a mapping, not {type(metadata).__name__}")
        for name in metadata:
            if not isinstance(name, str):
                # json.dumps would silently turn 1 into "1" and a reader would not match.
                raise ConfigError(f"metadata keys must be strings, got {name!r}")
        try:
            metadata_text = json.dumps(
                dict(metadata),
                separators=(",", ":"),
                sort_keys=True,
                ensure_ascii=False,
                allow_nan=False,
            )
        except (TypeError, ValueError, RecursionError) as exc:
            raise ConfigError(f"metadata is not JSON-serializable: {exc}") from None
        if _too_deep(metadata_text, MAX_JSON_DEPTH):
            raise ConfigError(f"metadata is nested deeper than {MAX_JSON_DEPTH} levels")
    document = {"Op": 0, "Addr": address, "Metadata": metadata_text}
    try:
        data = json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ConfigError(f"metadata holds text that is not valid Unicode: {exc}") from None
    if len(data) > MAX_VALUE_SIZE:
        raise ConfigError(
            f"encoded value is {len(data)} bytes; the limit is {MAX_VALUE_SIZE} bytes"
        )
    return data


_EMPTY: Mapping[str, Any] = MappingProxyType({})
# Fleets repeat their metadata (same zone, version, weight): one read-only mapping per
# distinct metadata text serves every instance that carries it, saving the parse and
# the memory. Bounded: a registry of all-distinct metadata only loses the sharing.
_SHARED_METADATA: dict[str, Mapping[str, Any]] = {}
_SHARED_LIMIT = 8192


def _decode_metadata(raw: Any) -> Mapping[str, Any]:
    if raw is None:
        return _EMPTY
    if isinstance(raw, dict):
        return MappingProxyType(raw)
    if isinstance(raw, str):
        shared = _SHARED_METADATA.get(raw)
        if shared is not None:
            return shared
        try:
            parsed = _loads(raw)
        except ValueError:
            return MappingProxyType({"value": raw})
        if not isinstance(parsed, dict):
            return MappingProxyType({"value": raw})
        metadata: Mapping[str, Any] = MappingProxyType(parsed)
        if len(_SHARED_METADATA) >= _SHARED_LIMIT:
            _SHARED_METADATA.clear()
        _SHARED_METADATA[raw] = metadata
        return metadata
    return MappingProxyType({"value": raw})


# The exact shape encode_value and Go's naming package write, with an address that
# needs no unescaping and metadata null or a JSON string: read without a JSON parse
# of the whole value (half the cost of warming a large cache). Anything else takes
# the general path below, which gives the same answer more slowly.
_CANONICAL = re.compile(
    rb'\{"Op":0,"Addr":"([!#-\[\]-~]+)","Metadata":'
    rb'(null|"[^"\\\x00-\x1f]*(?:\\.[^"\\\x00-\x1f]*)*")\}',
    re.DOTALL,
)
_SHARED_LITERALS: dict[bytes, Mapping[str, Any]] = {}


def _decode_canonical(value: bytes) -> tuple[str, Mapping[str, Any]] | None:
    match = _CANONICAL.fullmatch(value)
    if match is None or len(value) > MAX_VALUE_SIZE:
        return None
    address = match.group(1).decode("ascii")
    try:
        parse_address(address)
    except InvalidAddressError:
        return None  # the general path says why
    literal = match.group(2)
    if literal == b"null":
        return address, _EMPTY
    shared = _SHARED_LITERALS.get(literal)
    if shared is None:
        try:
            raw = _DECODER.decode(literal.decode("utf-8"))
        except ValueError:  # bad UTF-8 or escape: the general path reports it
            return None
        shared = _decode_metadata(raw)
        if len(_SHARED_LITERALS) >= _SHARED_LIMIT:
            _SHARED_LITERALS.clear()
        _SHARED_LITERALS[literal] = shared
    return address, shared


def decode_value(key: str, value: bytes) -> tuple[str, Mapping[str, Any]]:
    """Read ``(address, metadata)`` from a value; any unusable value raises
    MalformedValueError and nothing else."""
    if type(value) is bytes and (canonical := _decode_canonical(value)) is not None:
        return canonical
    if not isinstance(value, bytes | bytearray):
        raise MalformedValueError(key, f"value is {type(value).__name__}, not bytes")
    if len(value) > MAX_VALUE_SIZE:
        raise MalformedValueError(
            key, f"value is {len(value)} bytes, over the {MAX_VALUE_SIZE}-byte limit"
        )
    try:
        text = bytes(value).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedValueError(key, f"not valid UTF-8 at byte {exc.start}") from None
    try:
        document = _loads(text)
    except ValueError as exc:
        raise MalformedValueError(key, str(exc)) from None
    if not isinstance(document, dict):
        raise MalformedValueError(key, f"value is {_json_type(document)}, not a JSON object")
    op = document.get("Op")
    if op is not None and not (type(op) is int and op == 0):
        raise MalformedValueError(key, f"Op is {op!r}; a stored value must be an add (Op 0)")
    if "Addr" not in document:
        raise MalformedValueError(key, "no Addr field")
    address = document["Addr"]
    if not isinstance(address, str):
        raise MalformedValueError(key, f"Addr is {_json_type(address)}, not a string")
    if not address:
        raise MalformedValueError(key, "Addr is empty")
    try:
        parse_address(address)
    except InvalidAddressError as exc:
        raise MalformedValueError(key, f"Addr {address!r}: {exc.reason}") from None
    return address, _decode_metadata(document.get("Metadata"))


def decode_instance(
    prefix: str, key: bytes, value: bytes, mod_revision: int, lease: int
) -> Instance:
    """Build an Instance from one etcd key-value; MalformedValueError if either is unusable."""
    try:
        key_text = key.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedValueError(
            key.decode("utf-8", "backslashreplace"), "key is not valid UTF-8"
        ) from None
    parts = split_key(prefix, key_text)
    if parts is None:
        raise MalformedValueError(
            key_text, f"key is not of the form {validate_prefix(prefix)}/<service>/<id>"
        )
    address, metadata = decode_value(key_text, value)
    service, instance_id = parts
    return Instance(
        service=sys.intern(service),
        # Ids default to the address: one string serves both.
        id=address if instance_id == address else instance_id,
        address=address,
        metadata=metadata,
        key=key_text,
        revision=mod_revision,
        lease=lease,
    )


class EventType(StrEnum):
    """What a :class:`ChangeEvent` reports about its instance."""

    ADDED = "added"
    UPDATED = "updated"
    REMOVED = "removed"


@dataclass(frozen=True, slots=True)
class ChangeEvent:
    """One change to the set of instances.

    ADDED: ``previous`` is None. UPDATED: ``previous`` is the instance it replaces.
    REMOVED: ``instance`` is the last one known and ``previous`` is None.
    """

    type: EventType
    instance: Instance
    previous: Instance | None = field(default=None)


def same_content(a: Instance, b: Instance) -> bool:
    """Nothing a client acts on differs (revision and lease aside)."""
    return (
        a.address == b.address
        and a.metadata == b.metadata
        and a.suspect == b.suspect
        and a.override == b.override
    )


def diff(old: Mapping[str, Instance], new: Mapping[str, Instance]) -> list[ChangeEvent]:
    """Events turning ``old`` into ``new`` (both keyed by etcd key): removals, then
    updates, then additions, each in key order. A new revision or lease with the same
    address and metadata is not an update: clients have nothing to act on."""
    removed = [ChangeEvent(EventType.REMOVED, old[key]) for key in sorted(old.keys() - new.keys())]
    updated = [
        ChangeEvent(EventType.UPDATED, new[key], old[key])
        for key in sorted(old.keys() & new.keys())
        if not same_content(old[key], new[key])
    ]
    added = [ChangeEvent(EventType.ADDED, new[key]) for key in sorted(new.keys() - old.keys())]
    return removed + updated + added
