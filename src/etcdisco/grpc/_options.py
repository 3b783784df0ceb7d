"""What both balancing channels share: their settings and the retry rule.

Retry rule (unary-request, unary-response calls only; a stream is pinned to the
instance it started on and never replayed):

- only a call that failed with UNAVAILABLE is tried again, on another instance;
- a call the user marked idempotent is retried whatever happened to it;
- any other call is retried only when it never left the client: grpc's pick found no
  connection ("failed to connect to all addresses"), so the server never saw it;
- at most ``max_attempts`` attempts, all within the caller's deadline.

Outlier detection hears only about failures that say the instance is unreachable
(UNAVAILABLE); an application error from a healthy server is a success for it.

In the terms of ``etcdisco._routing`` (the rule's structure, shared with HTTP): a call
that never left is ``NOT_SENT``, any other UNAVAILABLE is ``FAILED``, every other
outcome is ``DONE``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from .._errors import ConfigError
from .._routing import Outcome, may_retry
from ..outlier import OutlierDetector

# grpc-core's status detail when the call found no connection to send it on.
_NEVER_SENT = "failed to connect to all addresses"

HashKey = Callable[[str, Any], "str | None"]


def never_sent(details: str | None) -> bool:
    return bool(details) and _NEVER_SENT in str(details)


def unreachable(code: grpc.StatusCode | None) -> bool:
    """Does this outcome count against the instance (outlier detection, pickers)?"""
    return code is grpc.StatusCode.UNAVAILABLE


def outcome_of(code: grpc.StatusCode | None, details: str | None) -> Outcome:
    """A call's status, sorted for the routing rule."""
    if code is not grpc.StatusCode.UNAVAILABLE:
        return Outcome.DONE
    return Outcome.NOT_SENT if never_sent(details) else Outcome.FAILED


@dataclass(frozen=True)
class ChannelSettings:
    """A balancing channel's settings, validated on creation."""

    service: str
    idempotent: bool | frozenset[str] = False
    max_attempts: int = 3
    credentials: grpc.ChannelCredentials | None = None
    channel_options: tuple[tuple[str, Any], ...] = ()
    compression: grpc.Compression | None = None
    hash_key: HashKey | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.service, str) or not self.service:
            raise ConfigError("service must be a non-empty string")
        if (
            not isinstance(self.max_attempts, int)
            or isinstance(self.max_attempts, bool)
            or self.max_attempts < 1
        ):
            raise ConfigError(f"max_attempts must be an integer >= 1, not {self.max_attempts!r}")
        if self.hash_key is not None and not callable(self.hash_key):
            raise ConfigError("hash_key must be a callable (method, request) -> str | None")

    def is_idempotent(self, method: str) -> bool:
        """``method`` is the full path ("/pkg.Service/Method"); a name in the set may be
        that path, "pkg.Service/Method", "pkg.Service" (every method) or "Method"."""
        if isinstance(self.idempotent, bool):
            return self.idempotent
        path = method.lstrip("/")
        service, _, name = path.rpartition("/")
        return bool({method, path, service, name} & self.idempotent)

    def retryable(
        self, method_idempotent: bool, code: grpc.StatusCode | None, details: Any
    ) -> bool:
        return may_retry(outcome_of(code, details), method_idempotent)


def settings(
    service: str,
    *,
    idempotent: bool | Iterable[str],
    max_attempts: int,
    credentials: grpc.ChannelCredentials | None,
    channel_options: Sequence[tuple[str, Any]],
    compression: grpc.Compression | None,
    hash_key: HashKey | None,
) -> ChannelSettings:
    if isinstance(idempotent, str):
        raise ConfigError("idempotent takes True/False or a list of method names, not a string")
    return ChannelSettings(
        service=service,
        idempotent=idempotent if isinstance(idempotent, bool) else frozenset(idempotent),
        max_attempts=max_attempts,
        credentials=credentials,
        channel_options=tuple(channel_options),
        compression=compression,
        hash_key=hash_key,
    )


def detector_for(outlier: OutlierDetector | bool) -> OutlierDetector | None:
    if outlier is True:
        return OutlierDetector()
    if outlier is False:
        return None
    if isinstance(outlier, OutlierDetector):
        return outlier
    raise ConfigError(f"outlier must be True, False or an OutlierDetector, not {outlier!r}")
