"""Checks written as one word or URL: the command line's ``--check`` and the
agent's short form."""

from __future__ import annotations

import shlex
from typing import Any
from urllib.parse import urlsplit

from .._errors import ConfigError
from ._check import Check
from ._command import CommandCheck
from ._grpc import GrpcCheck
from ._http import HttpCheck
from ._tcp import TcpCheck

SPEC_HELP = (
    "tcp | tcp://HOST:PORT | grpc | grpc://HOST:PORT[/SERVICE] | grpc:///SERVICE | "
    "http(s)://HOST:PORT/PATH | exec:COMMAND ARGS"
)


def parse_check(spec: str, **timing: Any) -> Check:
    """Build a check from ``spec`` (see SPEC_HELP); ``timing`` holds interval,
    timeout, rise, fall, jitter. A check without a host probes the registration's
    own address."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"a check must be one of: {SPEC_HELP}; got {spec!r}")
    text = spec.strip()
    if text.startswith("exec:"):
        try:
            argv = shlex.split(text[len("exec:") :])
        except ValueError as exc:
            raise ConfigError(f"check {spec!r}: {exc}") from None
        return CommandCheck(tuple(argv), **timing)
    if text in ("tcp", "grpc"):
        return TcpCheck(**timing) if text == "tcp" else GrpcCheck(**timing)
    parts = urlsplit(text)
    if parts.scheme in ("http", "https"):
        return HttpCheck(text, **timing)
    if parts.scheme == "tcp":
        if parts.path or parts.query or not parts.netloc:
            raise ConfigError(f"check {spec!r}: write tcp://HOST:PORT")
        return TcpCheck(parts.netloc, **timing)
    if parts.scheme == "grpc":
        service = parts.path.lstrip("/")
        if parts.query or "/" in service:
            raise ConfigError(f"check {spec!r}: write grpc://HOST:PORT[/SERVICE]")
        return GrpcCheck(parts.netloc or None, service=service, **timing)
    raise ConfigError(f"unknown check {spec!r}; write one of: {SPEC_HELP}")
