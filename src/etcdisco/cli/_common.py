"""What every command of the command line shares; it imports no command module.

- :class:`GlobalOptions`, the group's options handed to each command (``ctx.obj``):
  the connection options become one :class:`~etcdisco.ClientSettings` (``settings``),
  the command line's own (``--json``, ``--log-level``) stay here.
- :func:`fail` (one ``etcdisco: error:`` line and an exit code), :func:`errors` (the
  wrapper that turns an :class:`~etcdisco.EtcdiscoError` into that line),
  :func:`run_until_signal` (a command's coroutine until SIGINT/SIGTERM) and
  :func:`log_to_stderr`.
- Output: :func:`say` (a JSON line or a text line), :func:`instance_json`,
  :func:`instance_line` (a table row) and :func:`event_json`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any, NoReturn, TypeVar

import click

from .._errors import EtcdiscoError
from .._model import ChangeEvent, Instance
from .._settings import ClientSettings
from .._signals import StopSignals
from ..etcd import parse_endpoints

T = TypeVar("T")

PASSWORD_ENV = "ETCDISCO_PASSWORD"
"""Where ``--user``'s password comes from (never from the command line, which ``ps``
shows to every user)."""


@dataclass(frozen=True)
class ConnectionOptions:
    """The global options that say how to reach etcd, as typed."""

    endpoints: str
    prefix: str
    cacert: str | None
    cert: str | None
    key: str | None
    user: str | None
    timeout: float

    def client_settings(self) -> ClientSettings:
        """These options as settings (raises ConfigError, or UsageError when ``--user``
        has no password in the environment)."""
        password = os.environ.get(PASSWORD_ENV) if self.user else None
        if self.user and password is None:
            raise click.UsageError(f"--user needs the password in the {PASSWORD_ENV} variable")
        return ClientSettings(
            # Empty: $ETCDISCO_ENDPOINTS, else the default, as AsyncClient("") does.
            endpoints=parse_endpoints(self.endpoints) if self.endpoints else (),
            prefix=self.prefix,
            cacert=self.cacert,
            cert=self.cert,
            key=self.key,
            username=self.user,
            password=password,
            timeout=self.timeout,
        )


@dataclass(frozen=True)
class GlobalOptions:
    """What ``etcdisco [OPTIONS] COMMAND`` asked for, handed to every command.

    ``settings`` is made on first use, once per invocation: a command reads it where it
    opens its client, inside :func:`run_until_signal`, so a bad endpoint or TLS file is
    one ``etcdisco: error:`` line, and commands that never reach etcd (``--help``,
    ``agent --check-config``, ``xds --print-bootstrap``, ``etcd``, ``demo``) never
    check the connection options at all."""

    connection: ConnectionOptions
    json: bool = False
    log_level: str | None = None

    @cached_property
    def settings(self) -> ClientSettings:
        return self.connection.client_settings()


def log_to_stderr(level: str | int) -> None:
    """Log records at ``level`` to stderr, unless logging is set up already."""
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"etcdisco: error: {message}", err=True)
    sys.exit(code)


@contextmanager
def errors() -> Iterator[None]:
    """An etcdisco error becomes one line on stderr and exit 1; Ctrl-C exits 130."""
    try:
        yield
    except EtcdiscoError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        sys.exit(130)


def run_until_signal(main: Callable[[asyncio.Event], Awaitable[T]]) -> T:
    """Run ``main(stop)`` where ``stop`` is set on SIGINT or SIGTERM."""

    async def runner() -> T:
        stop = asyncio.Event()
        with StopSignals(lambda signum: stop.set(), asyncio.get_running_loop()):
            return await main(stop)

    with errors():
        return asyncio.run(runner())
    raise AssertionError("unreachable")


def say(options: GlobalOptions, event: str, text: str, **fields: Any) -> None:
    """``{"event": event, **fields}`` with ``--json``, else ``text``."""
    if options.json:
        click.echo(json.dumps({"event": event, **fields}, sort_keys=True))
    else:
        click.echo(text)


def instance_json(inst: Instance) -> str:
    return json.dumps(inst.to_dict(), sort_keys=True)


def instance_line(inst: Instance) -> str:
    """One row of the instance table (``list``, ``watch``)."""
    meta = ",".join(f"{k}={v}" for k, v in sorted(inst.metadata.items()))
    return f"{inst.service:<20} {inst.id:<28} {inst.address:<24} {meta}"


def event_json(ev: ChangeEvent) -> str:
    return json.dumps({"event": ev.type.value, **ev.instance.to_dict()}, sort_keys=True)
