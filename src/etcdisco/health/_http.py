"""HTTP(S) GET check: passing when the status code falls in a range.

A minimal HTTP/1.1 client on asyncio streams: a health check only needs the status
line, and a client of its own keeps the check cancellable at every await and free of
dependencies. Redirects are not followed; 3xx counts by the default range, as in
Kubernetes probes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

from .._errors import ConfigError
from ._check import Check, os_reason
from ._result import Outcome


@dataclass(frozen=True)
class HttpCheck(Check):
    """GETs ``url``; passing when ``status[0] <= code <= status[1]`` (default 200-399).

    ``ca`` is a PEM bundle to trust instead of the system's; ``verify_tls=False``
    accepts any certificate (a sidecar often probes a local port whose certificate
    names the public host).
    """

    url: str
    status: tuple[int, int] = (200, 399)
    verify_tls: bool = True
    ca: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.url, str):
            raise ConfigError(f"url must be a string, not {self.url!r}")
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https"):
            raise ConfigError(f"url {self.url!r} must start with http:// or https://")
        try:
            port = parts.port
        except ValueError:
            raise ConfigError(f"url {self.url!r} has an invalid port") from None
        if not parts.hostname:
            raise ConfigError(f"url {self.url!r} has no host")
        del port
        status = self.status
        if (
            not isinstance(status, tuple | list)
            or len(status) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in status)
            or not 100 <= status[0] <= status[1] <= 599
        ):
            raise ConfigError(f"status must be a range [low, high] within 100-599, not {status!r}")
        object.__setattr__(self, "status", (status[0], status[1]))
        if not isinstance(self.verify_tls, bool):
            raise ConfigError(f"verify_tls must be true or false, not {self.verify_tls!r}")
        if self.ca is not None and not isinstance(self.ca, str):
            raise ConfigError(f"ca must be the path of a PEM file, not {self.ca!r}")

    def describe(self) -> str:
        return self.url

    async def probe(self) -> Outcome:
        parts = urlsplit(self.url)
        secure = parts.scheme == "https"
        host = parts.hostname or ""
        port = parts.port or (443 if secure else 80)
        context: ssl.SSLContext | None = None
        if secure:
            try:
                context = ssl.create_default_context(cafile=self.ca)
            except (OSError, ssl.SSLError) as exc:
                return Outcome.failing(f"cannot load CA {self.ca}: {exc}")
            if not self.verify_tls:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host_header = parts.netloc.rpartition("@")[2]
        try:
            reader, writer = await asyncio.open_connection(
                host, port, ssl=context, server_hostname=host if context else None
            )
        except ssl.SSLError as exc:
            return Outcome.failing(f"TLS handshake with {host}:{port}: {exc.reason or exc}")
        except OSError as exc:
            return Outcome.failing(f"connect to {host}:{port}: {os_reason(exc)}")
        try:
            writer.write(
                f"GET {target} HTTP/1.1\r\nHost: {host_header}\r\n"
                "User-Agent: etcdisco-health\r\nAccept: */*\r\nConnection: close\r\n\r\n".encode(
                    "ascii", "replace"
                )
            )
            await writer.drain()
            line = await reader.readline()
        except OSError as exc:
            return Outcome.failing(f"request to {host}:{port}: {os_reason(exc)}")
        finally:
            if secure:
                # A TLS close waits for the peer's close_notify; a probe has no use for it.
                writer.transport.abort()
            else:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
        fields = line.split(None, 2)
        if len(fields) < 2 or not fields[0].startswith(b"HTTP/") or not fields[1].isdigit():
            return Outcome.failing(f"not an HTTP response: {line[:60]!r}")
        code = int(fields[1])
        low, high = self.status
        if low <= code <= high:
            return Outcome.passing(f"HTTP {code}")
        return Outcome.failing(f"HTTP {code}")
