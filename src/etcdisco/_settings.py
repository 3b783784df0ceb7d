"""ClientSettings: every connection argument of a client, validated once, in one place.

``AsyncClient``, ``Client``, the command line, the sidecar agent and
``etcdisco.grpc.xds.install`` all take their endpoints, TLS files, credentials,
timeout, prefix and expiry protection from this one frozen object, so a default or a
check cannot differ between them (they did: the sync client once had no
``expiry_protection`` and its own idea of the default prefix).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from ._errors import ConfigError
from ._expiry import DEFAULT_EXPIRY_PROTECTION, ExpiryProtection
from ._model import DEFAULT_PREFIX, validate_prefix
from .etcd import DEFAULT_ENDPOINT, EtcdConfig, TlsConfig, parse_endpoints

ENDPOINTS_ENV = "ETCDISCO_ENDPOINTS"
"""Where the endpoints come from when none are given."""


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """How to reach etcd and where the registry lives.

    ``endpoints`` is ``"a:2379,b:2379"`` or a sequence; by default
    ``$ETCDISCO_ENDPOINTS``, else ``127.0.0.1:2379``. ``cacert`` alone verifies etcd's
    certificate; ``cert`` with ``key`` adds a client certificate. ``username`` and
    ``password`` go together. ``timeout`` bounds one call to etcd (every attempt on
    every endpoint). ``expiry_protection`` applies to every cache of the client (None
    turns it off)."""

    endpoints: tuple[str, ...] = ()
    prefix: str = DEFAULT_PREFIX
    cacert: str | None = None
    cert: str | None = None
    key: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout: float = 5.0
    expiry_protection: ExpiryProtection | None = DEFAULT_EXPIRY_PROTECTION
    etcd: EtcdConfig = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        given: str | Sequence[str] = self.endpoints
        if not given:
            given = os.environ.get(ENDPOINTS_ENV) or DEFAULT_ENDPOINT
        object.__setattr__(self, "prefix", validate_prefix(self.prefix))
        timeout = self.timeout
        if isinstance(timeout, bool) or not isinstance(timeout, int | float):
            raise ConfigError(f"timeout must be a number of seconds, not {timeout!r}")
        if not math.isfinite(timeout) or timeout <= 0:
            raise ConfigError(f"timeout must be > 0 seconds, not {timeout!r}")
        if self.expiry_protection is not None and not isinstance(
            self.expiry_protection, ExpiryProtection
        ):
            raise ConfigError(
                "expiry_protection must be an ExpiryProtection or None, "
                f"not {self.expiry_protection!r}"
            )
        tls = (
            TlsConfig(ca=self.cacert, cert=self.cert, key=self.key)
            if (self.cacert or self.cert or self.key)
            else None
        )
        config = EtcdConfig(
            endpoints=parse_endpoints(given),
            tls=tls,
            username=self.username,
            password=self.password,
            timeout=float(timeout),
        )
        object.__setattr__(self, "endpoints", config.endpoints)
        object.__setattr__(self, "etcd", config)

    def replace(self, **changes: object) -> ClientSettings:
        """A copy with ``changes`` applied (and validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def settings_from(
    endpoints: str | Sequence[str] | None,
    *,
    prefix: str,
    cacert: str | None,
    cert: str | None,
    key: str | None,
    username: str | None,
    password: str | None,
    timeout: float,
    expiry_protection: ExpiryProtection | None,
    settings: ClientSettings | None,
) -> ClientSettings:
    """The settings a client constructor was given: ``settings`` itself, or one made of
    the separate arguments (giving both is refused, since one would silently lose)."""
    if settings is None:
        return ClientSettings(
            endpoints=parse_endpoints(endpoints) if endpoints else (),
            prefix=prefix,
            cacert=cacert,
            cert=cert,
            key=key,
            username=username,
            password=password,
            timeout=timeout,
            expiry_protection=expiry_protection,
        )
    if not isinstance(settings, ClientSettings):
        raise ConfigError(f"settings must be a ClientSettings, not {settings!r}")
    separate = {
        "endpoints": endpoints,
        "cacert": cacert,
        "cert": cert,
        "key": key,
        "username": username,
        "password": password,
    }
    clashing = [name for name, value in separate.items() if value]
    if prefix != DEFAULT_PREFIX:
        clashing.append("prefix")
    if timeout != 5.0:
        clashing.append("timeout")
    if expiry_protection is not DEFAULT_EXPIRY_PROTECTION:
        clashing.append("expiry_protection")
    if clashing:
        raise ConfigError(
            f"give either settings= or {', '.join(clashing)}, not both "
            "(settings.replace(...) makes a changed copy)"
        )
    return settings
