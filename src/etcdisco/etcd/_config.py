"""Connection settings for the etcd client, validated once on creation."""

from __future__ import annotations

import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field

from .._errors import ConfigError

DEFAULT_ENDPOINT = "127.0.0.1:2379"


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """Files for TLS to etcd. ``cert``/``key`` are needed for mutual TLS."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ConfigError("TLS client certificate and key must be given together")
        for name in ("ca", "cert", "key"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise ConfigError(f"TLS {name} file not found: {path}")
        # Checked now: gRPC would only fail at the first connection, after a timeout,
        # with its own log lines and no file named.
        if self.ca is not None:
            _check_pem(self.ca, "ca", b"CERTIFICATE")
            try:
                ssl.create_default_context(cafile=self.ca)
            except (ssl.SSLError, ValueError) as exc:
                raise ConfigError(
                    f"TLS ca file {self.ca}: not a usable CA certificate ({exc})"
                ) from None
        if self.cert is not None and self.key is not None:
            _check_pem(self.cert, "cert", b"CERTIFICATE")
            _check_pem(self.key, "key", b"PRIVATE KEY")
            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(self.cert, self.key)
            except (ssl.SSLError, ValueError) as exc:
                raise ConfigError(
                    f"TLS cert {self.cert} and key {self.key} do not make a pair ({exc})"
                ) from None

    def read(self) -> tuple[bytes | None, bytes | None, bytes | None]:
        def load(path: str | None) -> bytes | None:
            if path is None:
                return None
            with open(path, "rb") as f:
                return f.read()

        return load(self.ca), load(self.key), load(self.cert)


def _check_pem(path: str, name: str, kind: bytes) -> None:
    """Refuse a file that holds no PEM block of ``kind``, naming it."""
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 20)
    except OSError as exc:
        raise ConfigError(f"TLS {name} file {path} cannot be read: {exc.strerror}") from None
    begin = data.find(b"-----BEGIN ")
    if begin < 0 or kind not in data[begin : data.find(b"\n", begin)]:
        what = "certificate" if kind == b"CERTIFICATE" else "private key"
        raise ConfigError(f"TLS {name} file {path} holds no PEM {what}")


@dataclass(frozen=True, slots=True)
class EtcdConfig:
    """Everything needed to reach etcd.

    ``endpoints`` are ``host:port`` (a ``http://`` or ``https://`` scheme is accepted
    and stripped; ``https`` turns TLS on with the system roots when ``tls`` is unset).
    """

    endpoints: tuple[str, ...] = (DEFAULT_ENDPOINT,)
    tls: TlsConfig | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout: float = 5.0
    """Deadline of one call (all attempts on all endpoints together)."""
    connect_timeout: float = 3.0

    def __post_init__(self) -> None:
        if isinstance(self.endpoints, str):
            object.__setattr__(self, "endpoints", parse_endpoints(self.endpoints))
        if not self.endpoints:
            raise ConfigError("at least one etcd endpoint is needed")
        cleaned: list[str] = []
        wants_tls = False
        for ep in self.endpoints:
            host_port, tls = _strip_scheme(ep)
            wants_tls = wants_tls or tls
            cleaned.append(host_port)
        object.__setattr__(self, "endpoints", tuple(dict.fromkeys(cleaned)))
        if wants_tls and self.tls is None:
            object.__setattr__(self, "tls", TlsConfig())
        if (self.username is None) != (self.password is None):
            raise ConfigError("etcd username and password must be given together")
        if self.timeout <= 0 or self.connect_timeout <= 0:
            raise ConfigError("timeouts must be positive")


def parse_endpoints(text: str | Sequence[str]) -> tuple[str, ...]:
    """Split ``"a:2379,b:2379"`` (or a list) into endpoints."""
    items = text.split(",") if isinstance(text, str) else list(text)
    return tuple(item.strip() for item in items if item.strip())


def _strip_scheme(endpoint: str) -> tuple[str, bool]:
    tls = False
    rest = endpoint
    if "://" in endpoint:
        scheme, rest = endpoint.split("://", 1)
        if scheme not in ("http", "https"):
            raise ConfigError(f"etcd endpoint {endpoint!r}: scheme must be http or https")
        tls = scheme == "https"
    rest = rest.rstrip("/")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"etcd endpoint {endpoint!r} is not host:port")
    return rest, tls
