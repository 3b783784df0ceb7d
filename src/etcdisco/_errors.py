"""The exception tree of etcdisco.

    EtcdiscoError
    ├── ConfigError                 bad input given by the caller; nothing was written
    │   └── InvalidAddressError     an address that is not host:port
    ├── MalformedValueError         a value under the prefix that is not etcd's naming format
    ├── EtcdError                   talking to etcd failed
    │   ├── UnavailableError        no endpoint answered (carries the endpoints tried)
    │   ├── EtcdTimeoutError        a call ran past its deadline
    │   ├── AuthError               bad credentials or permission denied
    │   ├── CompactedError          a watch asked for history etcd has compacted away
    │   ├── LeaseNotFoundError      the lease expired or was revoked
    │   └── ClosedError             the client was closed
    └── RegistrationError           a registration could not be made or kept

Callers catch ``EtcdiscoError`` for everything, or one leaf for a specific reaction.
"""

from __future__ import annotations

from collections.abc import Sequence


class EtcdiscoError(Exception):
    """Base of every error raised by etcdisco."""


class ConfigError(EtcdiscoError, ValueError):
    """The caller gave input that cannot be used; nothing was written to etcd."""


class InvalidAddressError(ConfigError):
    """An address is not ``host:port`` (IPv6 hosts go in brackets)."""

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(f"invalid address {address!r}: {reason}")
        self.address = address
        self.reason = reason


class MalformedValueError(EtcdiscoError, ValueError):
    """A value under the registry prefix is not in etcd's naming format."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"malformed value at {key!r}: {reason}")
        self.key = key
        self.reason = reason


class EtcdError(EtcdiscoError):
    """A call to etcd failed."""


class UnavailableError(EtcdError):
    """No etcd endpoint could serve the call."""

    def __init__(self, message: str, endpoints: Sequence[str] = ()) -> None:
        tried = f" (endpoints tried: {', '.join(endpoints)})" if endpoints else ""
        super().__init__(f"{message}{tried}")
        self.endpoints = tuple(endpoints)


class EtcdTimeoutError(EtcdError, TimeoutError):
    """A call to etcd ran past its deadline."""


class AuthError(EtcdError):
    """etcd refused the credentials or the permission."""


class CompactedError(EtcdError):
    """A revision below etcd's compaction point: a watch started there, or a
    compaction asked for one already compacted (``compact_revision`` 0: not known)."""

    def __init__(self, compact_revision: int, message: str | None = None) -> None:
        super().__init__(message or f"revision compacted; oldest available is {compact_revision}")
        self.compact_revision = compact_revision


class LeaseNotFoundError(EtcdError):
    """The lease does not exist any more (expired or revoked)."""

    def __init__(self, lease_id: int) -> None:
        super().__init__(f"lease {lease_id:x} not found")
        self.lease_id = lease_id


class ClosedError(EtcdError):
    """The client was closed."""


class RegistrationError(EtcdiscoError):
    """A registration could not be made or kept."""
