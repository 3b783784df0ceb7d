"""TCP connect check: passing when the target accepts a connection."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from dataclasses import dataclass

from .._address import normalize_address, parse_address
from .._errors import ConfigError
from ._check import Check, os_reason
from ._result import Outcome


@dataclass(frozen=True)
class TcpCheck(Check):
    """Connects to ``address`` (``host:port``; default: the registration's address)."""

    address: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.address is not None:
            object.__setattr__(self, "address", normalize_address(self.address))

    def bind(self, address: str) -> TcpCheck:
        return self if self.address is not None else dataclasses.replace(self, address=address)

    def describe(self) -> str:
        return f"tcp://{self.address or '<registration address>'}"

    async def probe(self) -> Outcome:
        if self.address is None:
            raise ConfigError("TcpCheck has no address: give one or attach it to a registration")
        host, port = parse_address(self.address)
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError as exc:
            return Outcome.failing(f"connect to {self.address}: {os_reason(exc)}")
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return Outcome.passing(f"connected to {self.address}")
