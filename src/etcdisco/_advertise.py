"""The address a server advertises in the registry (gRPC and HTTP servers alike).

A server usually binds a wildcard (``[::]:0``) and must advertise something else: a
wildcard in the registry is an address no client can dial. So the advertised host is
given, or this host's primary IP, never 0.0.0.0 or [::].
"""

from __future__ import annotations

import ipaddress
import socket

from ._address import join_address, normalize_address

__all__ = ["advertised_address", "advertised_for_bind", "primary_ip"]

# Documentation-only networks (RFC 5737, RFC 3849): connecting a UDP socket to them
# asks the kernel for the route to the outside and sends nothing.
_PROBE_V4 = "192.0.2.1"
_PROBE_V6 = "2001:db8::1"

_WILDCARDS = ("", "0.0.0.0", "::")


def primary_ip() -> str:
    """The IP this host uses to reach other hosts (its default route's source), or
    127.0.0.1 when it has none that is not loopback."""
    for family, probe in ((socket.AF_INET, _PROBE_V4), (socket.AF_INET6, _PROBE_V6)):
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                sock.connect((probe, 9))
                host = str(sock.getsockname()[0])
        except OSError:
            continue
        ip = ipaddress.ip_address(host.split("%", 1)[0])
        if not (ip.is_loopback or ip.is_unspecified or ip.is_link_local):
            return ip.compressed
    return "127.0.0.1"


def advertised_address(port: int, host: str | None = None) -> str:
    """``host:port`` to advertise for a server listening on ``port`` (on a wildcard).

    ``host`` defaults to :func:`primary_ip`. Raises ``InvalidAddressError`` for a
    wildcard host, a bad port or a malformed name.
    """
    host = primary_ip() if host is None else host.strip("[]")
    return normalize_address(join_address(host, port))


def advertised_for_bind(bind_host: str | None, port: int, host: str | None = None) -> str:
    """``host:port`` to advertise for a server bound to ``bind_host:port``: ``host``
    if given; else the bound host itself when it is one address (``127.0.0.1`` stays
    ``127.0.0.1``: advertising another IP would name a port nobody listens on); else,
    for a wildcard, :func:`primary_ip`."""
    if host is None and bind_host is not None and bind_host.strip("[]") not in _WILDCARDS:
        host = bind_host
    return advertised_address(port, host)
