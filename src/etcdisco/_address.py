"""Addresses: parsing and normalizing ``host:port`` for instances and listeners.

Used wherever an address is read: registration, health checks, the gRPC helpers, the
metrics and xDS listeners, the command line. Errors say what to change.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata

from ._errors import ConfigError, InvalidAddressError

__all__ = ["bad_char", "join_address", "normalize_address", "parse_address", "parse_listen"]

_MAX_NAME_LENGTH = 253

# Cf (zero-width and bidi marks) is invisible and makes look-alike names; Cs (lone
# surrogates) cannot be encoded as UTF-8 and would fail only when the key is written.
_CONTROL_CATEGORIES = frozenset({"Cc", "Cf", "Cs"})


def bad_char(text: str, *, allow_whitespace: bool) -> str | None:
    """What makes ``text`` unfit for a name or an address, or None."""
    # Fast path for the usual case: printable ASCII has no Cc/Cf/Cs character, and
    # its only whitespace is the space.
    if text.isascii() and text.isprintable() and (allow_whitespace or " " not in text):
        return None
    for index, char in enumerate(text):
        if unicodedata.category(char) in _CONTROL_CATEGORIES:
            return f"control or invisible character {char!r} at position {index}"
        if not allow_whitespace and char.isspace():
            return f"whitespace {char!r} at position {index}"
    return None


# RFC 1123 label: letters, digits, hyphen; a leading digit is allowed, hyphens are not
# allowed at either end.
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", re.ASCII)
_PORT = re.compile(r"[0-9]{1,5}", re.ASCII)
_DOTTED_DIGITS = re.compile(r"[0-9.]+", re.ASCII)

_EXAMPLE = "e.g. '10.0.0.5:50051' or '[::1]:50051'"
_UNSPECIFIED = (
    "{host} is the unspecified address, which no client can dial; "
    "advertise this host's reachable IP or DNS name"
)


def _parse_port(address: str, text: str) -> int:
    if not text:
        raise InvalidAddressError(address, f"missing port after ':'; {_EXAMPLE}")
    if not _PORT.fullmatch(text):
        raise InvalidAddressError(address, f"port {text!r} is not a number from 1 to 65535")
    port = int(text)
    if not 1 <= port <= 65535:
        raise InvalidAddressError(address, f"port {port} is outside 1-65535")
    return port


def _parse_bracketed(address: str) -> tuple[str, str]:
    end = address.find("]")
    if end < 0:
        raise InvalidAddressError(address, f"'[' without a closing ']'; {_EXAMPLE}")
    text = address[1:end]
    rest = address[end + 1 :]
    if not text:
        raise InvalidAddressError(address, "empty host between '[' and ']'")
    if not rest.startswith(":"):
        reason = "missing port after ']'" if not rest else f"unexpected {rest!r} after ']'"
        raise InvalidAddressError(address, f"{reason}; {_EXAMPLE}")
    try:
        ip = ipaddress.IPv6Address(text)
    except ValueError:
        if _DOTTED_DIGITS.fullmatch(text):
            reason = f"brackets are for IPv6 only; write an IPv4 host as {text}:port"
        else:
            reason = f"{text!r} in brackets is not an IPv6 address"
        raise InvalidAddressError(address, reason) from None
    if ip.is_unspecified or (ip.ipv4_mapped is not None and ip.ipv4_mapped.is_unspecified):
        raise InvalidAddressError(address, _UNSPECIFIED.format(host=f"[{text}]"))
    return ip.compressed, rest[1:]


def _check_host(address: str, text: str) -> str:
    if not text:
        raise InvalidAddressError(address, "empty host; advertise a reachable IP or DNS name")
    if _DOTTED_DIGITS.fullmatch(text):
        try:
            ipv4 = ipaddress.IPv4Address(text)
        except ValueError:
            raise InvalidAddressError(address, f"{text!r} is not a valid IPv4 address") from None
        if ipv4.is_unspecified:
            raise InvalidAddressError(address, _UNSPECIFIED.format(host=text))
        return str(ipv4)
    if not text.isascii():
        raise InvalidAddressError(
            address, f"host {text!r} is not ASCII; use its punycode ('xn--') form"
        )
    name = text.lower()
    # A trailing dot marks a fully qualified name and is kept: it changes DNS search.
    bare = name[:-1] if name.endswith(".") else name
    if len(bare) > _MAX_NAME_LENGTH:
        raise InvalidAddressError(
            address, f"host name is {len(bare)} characters long; the limit is 253"
        )
    for label in bare.split("."):
        if not label:
            raise InvalidAddressError(address, f"host {text!r} has an empty label ('..')")
        if len(label) > 63:
            raise InvalidAddressError(
                address, f"host label {label[:20]!r}... is longer than 63 characters"
            )
        if not _LABEL.fullmatch(label):
            raise InvalidAddressError(
                address,
                f"host label {label!r} may hold only letters, digits and '-' (RFC 1123), "
                "and may not start or end with '-'",
            )
    return name


# The usual address, canonical dotted IPv4 and a port, matched in one step: readers
# check every value they list, and a hundred thousand of them through the ipaddress
# module cost seconds. Anything else takes the full path below.
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_FAST_IPV4 = re.compile(rf"((?:{_OCTET}\.){{3}}{_OCTET}):([1-9][0-9]{{0,4}})", re.ASCII)


def parse_address(address: str) -> tuple[str, int]:
    """Split ``host:port`` into a canonical host (lower case; IPv6 compressed, without
    brackets) and a port, or raise InvalidAddressError saying what to change."""
    if type(address) is str and (fast := _FAST_IPV4.fullmatch(address)):
        host, port = fast.group(1), int(fast.group(2))
        if port <= 65535 and host != "0.0.0.0":
            return host, port
    if not isinstance(address, str):
        raise InvalidAddressError(repr(address), "an address must be a string")
    if not address:
        raise InvalidAddressError(address, f"empty address; {_EXAMPLE}")
    problem = bad_char(address, allow_whitespace=False)
    if problem is not None:
        raise InvalidAddressError(address, f"contains {problem}")
    if "://" in address:
        raise InvalidAddressError(address, f"has a URL scheme; give host:port only, {_EXAMPLE}")
    if "/" in address:
        raise InvalidAddressError(address, f"contains '/'; give host:port only, {_EXAMPLE}")
    if address.startswith("["):
        host, port_text = _parse_bracketed(address)
        return host, _parse_port(address, port_text)
    colons = address.count(":")
    if colons == 0:
        raise InvalidAddressError(address, f"missing port; {_EXAMPLE}")
    if colons > 1:
        raise InvalidAddressError(
            address, "an IPv6 host must be in brackets with a port after, e.g. '[::1]:50051'"
        )
    host_text, _, port_text = address.partition(":")
    host = _check_host(address, host_text)
    return host, _parse_port(address, port_text)


def join_address(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def normalize_address(address: str) -> str:
    """The canonical text of ``address``: lower-case host, compressed IPv6 in brackets."""
    return join_address(*parse_address(address))


def parse_listen(listen: str) -> tuple[str, int]:
    """A ``host:port`` to listen on: unlike an instance address, the port may be 0 (any
    free port) and the host unspecified (``0.0.0.0``, ``::``, or empty for 0.0.0.0)."""
    head, sep, port_text = listen.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(f"listen address {listen!r} is not HOST:PORT (port 0 picks a free one)")
    host = head[1:-1] if head.startswith("[") and head.endswith("]") else head
    if host in ("", "0.0.0.0", "::"):
        return host or "0.0.0.0", int(port_text)
    parsed, _ = parse_address(join_address(host, 1))
    return parsed, int(port_text)
