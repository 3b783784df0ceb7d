"""What every command of the command line shares; it imports no command module.

- The global options, defined once (:func:`global_options`): the group takes them
  before the command and every command (made with :func:`command`) takes them again
  after its name, so ``etcdisco list --json`` and ``etcdisco --json list`` mean the
  same; a value given after the command wins over one given before it.
- :class:`GlobalOptions`, what they say, handed to each command as its first
  argument: the connection options become one :class:`~etcdisco.ClientSettings`
  (``settings``), the command line's own (``--json``, ``--log-level``) stay here.
- :func:`fail` (one ``etcdisco: error:`` line and an exit code), :func:`errors` (the
  wrapper that turns an :class:`~etcdisco.EtcdiscoError` into that line),
  :func:`run_until_signal` (a command's coroutine until SIGINT/SIGTERM),
  :func:`log_to_stderr` and :func:`report_crash` (any other exception: one line, and
  the traceback with ``--log-level debug``).
- :func:`metadata_options` and :func:`parse_meta`: ``--meta`` / ``--meta-json``.
- Output: :func:`say` (a JSON line or a text line), :func:`instance_json` /
  :func:`instances_json` / :func:`instance_dict`, :func:`instance_line` (a table row under
  :data:`INSTANCE_HEADER`), :func:`write_lines` (many lines at once), :func:`event_json`,
  :func:`override_text` and :func:`until_text`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import socket
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from functools import cached_property
from typing import Any, NoReturn, TypeVar

import click
from click.core import ParameterSource

from .._address import join_address
from .._errors import ConfigError, EtcdiscoError
from .._metadata import parse_metadata_text
from .._model import ChangeEvent, Instance, Override
from .._operator import format_duration, status_word
from .._settings import ClientSettings
from .._signals import StopSignals
from ..etcd import DEFAULT_ENDPOINT, parse_endpoints

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

PASSWORD_ENV = "ETCDISCO_PASSWORD"
"""Where ``--user``'s password comes from (never from the command line, which ``ps``
shows to every user)."""


class GlobalOption(click.Option):
    """One of the global options: a command's help lists them in a section of their own."""


_GLOBAL_OPTIONS: tuple[Callable[[F], F], ...] = (
    click.option(
        "--endpoints",
        cls=GlobalOption,
        envvar="ETCDISCO_ENDPOINTS",
        default=DEFAULT_ENDPOINT,
        show_default=True,
        help="Comma-separated etcd endpoints (env ETCDISCO_ENDPOINTS).",
    ),
    click.option(
        "--prefix",
        cls=GlobalOption,
        default="services",
        show_default=True,
        help="Registry key prefix.",
    ),
    click.option(
        "--cacert",
        cls=GlobalOption,
        type=click.Path(dir_okay=False),
        help="CA bundle for TLS to etcd.",
    ),
    click.option(
        "--cert",
        cls=GlobalOption,
        type=click.Path(dir_okay=False),
        help="Client certificate (mutual TLS).",
    ),
    click.option(
        "--key", cls=GlobalOption, type=click.Path(dir_okay=False), help="Client key (mutual TLS)."
    ),
    click.option(
        "--user", cls=GlobalOption, help=f"etcd user; the password is read from {PASSWORD_ENV}."
    ),
    click.option(
        "--timeout",
        cls=GlobalOption,
        default=5.0,
        show_default=True,
        help="Deadline of one etcd call (s).",
    ),
    click.option(
        "--json",
        "as_json",
        cls=GlobalOption,
        is_flag=True,
        help="Machine-readable output (JSON lines).",
    ),
    click.option(
        "--log-level",
        cls=GlobalOption,
        envvar="ETCDISCO_LOG_LEVEL",
        type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
        help="Log to stderr at this level (env ETCDISCO_LOG_LEVEL).",
    ),
)


def global_options(command: F) -> F:
    """Add the global options (``--endpoints``, ``--json``, ...) to a command or group;
    the one place they are defined."""
    for option in reversed(_GLOBAL_OPTIONS):
        command = option(command)
    return command


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

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> GlobalOptions:
        """From the global options' parameter values (every one of them)."""
        return _DEFAULTS.overridden(values)

    def overridden(self, values: dict[str, Any]) -> GlobalOptions:
        """These options with some replaced, by parameter name (``endpoints``, ...,
        ``as_json``, ``log_level``)."""
        connection = {f.name: values[f.name] for f in fields(ConnectionOptions) if f.name in values}
        top = {"json": values["as_json"]} if "as_json" in values else {}
        if "log_level" in values:
            top["log_level"] = values["log_level"]
        return replace(self, connection=replace(self.connection, **connection), **top)


# Every field is overridden by from_values: these values are never seen.
_DEFAULTS = GlobalOptions(ConnectionOptions("", "", None, None, None, None, 0.0))


def log_to_stderr(level: str | int) -> None:
    """Log records at ``level`` to stderr, unless logging is set up already."""
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"etcdisco: error: {message}", err=True)
    sys.exit(code)


# Set once the log level of the invocation is known: --log-level debug shows the
# traceback of an unexpected exception (report_crash).
_show_tracebacks = False


def _use_log_level(level: str | None) -> None:
    global _show_tracebacks
    if level:
        log_to_stderr(level.upper())
        _show_tracebacks = level.lower() == "debug"


def report_crash(exc: BaseException) -> NoReturn:
    """An exception nothing expected: one line (the traceback too with
    ``--log-level debug``), exit 1."""
    text = str(exc).strip().splitlines()
    what = type(exc).__name__ + (f": {text[0]}" if text else "")
    if _show_tracebacks:
        traceback.print_exception(exc, file=sys.stderr)
        fail(f"unexpected {what}")
    fail(f"unexpected {what} (rerun with --log-level debug for the traceback)")


class Command(click.Command):
    """A command whose help lists the global options apart from its own."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        own: list[tuple[str, str]] = []
        shared: list[tuple[str, str]] = []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None and not isinstance(param, click.Argument):
                (shared if isinstance(param, GlobalOption) else own).append(record)
        if own:
            with formatter.section("Options"):
                formatter.write_dl(own)
        if shared:
            with formatter.section("Global options (before or after the command)"):
                formatter.write_dl(shared)


def group_options(ctx: click.Context, values: dict[str, Any]) -> None:
    """The group's callback: its global options become ``ctx.obj``."""
    ctx.obj = GlobalOptions.from_values(values)


def command(name: str | None = None, **attrs: Any) -> Callable[[Callable[..., Any]], click.Command]:
    """``click.command`` for an etcdisco command: it takes the global options after its
    name too, and gets what they say (:class:`GlobalOptions`) as its first argument.

    An option given after the command wins over the same option given before it; one
    not given there keeps the group's value (which the environment variable or the
    default already filled in)."""

    def decorator(function: Callable[..., Any]) -> click.Command:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            ctx = click.get_current_context()
            names = [p.name for p in ctx.command.params if isinstance(p, GlobalOption)]
            values = {name: kwargs.pop(name) for name in names if name is not None}
            before = ctx.find_object(GlobalOptions)
            if before is None:  # invoked on its own, without the group
                options = GlobalOptions.from_values(values)
            else:
                given = {
                    name: value
                    for name, value in values.items()
                    if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE
                }
                options = before.overridden(given)
            _use_log_level(options.log_level)
            return function(options, *args, **kwargs)

        return click.command(name, cls=Command, **attrs)(global_options(wrapper))

    return decorator


def metadata_options(command: F) -> F:
    """Add ``--meta K=V`` and ``--meta-json K=JSON`` (both repeatable) to a command;
    :func:`parse_meta` makes them one mapping."""
    command = click.option(
        "--meta-json",
        multiple=True,
        metavar="K=JSON",
        help='Metadata entry with a JSON value (true, 1.5, null, "text"); repeatable.',
    )(command)
    return click.option(
        "--meta",
        multiple=True,
        metavar="K=V",
        help="Metadata entry, a string (a reserved key takes its own type: weight=2 is a "
        "number); repeatable.",
    )(command)


def parse_meta(texts: tuple[str, ...], jsons: tuple[str, ...]) -> dict[str, Any]:
    """``--meta K=V`` (a string, except for the reserved keys whose type is not a
    string: ``weight=5`` is the integer 5) and ``--meta-json K=JSON``."""
    meta: dict[str, Any] = {}
    for hint, items in (("--meta", texts), ("--meta-json", jsons)):
        for item in items:
            name, sep, raw = item.partition("=")
            if not sep or not name:
                raise click.BadParameter(f"{item!r} is not key=value", param_hint=hint)
            if name in meta:
                raise click.BadParameter(f"metadata key {name!r} given twice", param_hint=hint)
            meta[name] = (
                parse_metadata_text(name, raw) if hint == "--meta" else _meta_json(item, raw)
            )
    return meta


def _meta_json(item: str, raw: str) -> Any:
    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} is not JSON")

    try:
        return json.loads(raw, parse_constant=refuse)
    except ValueError as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise click.BadParameter(
            f"{item!r}: the value is not JSON ({reason}); a string is written "
            f"with quotes ('K=\"text\"') or with --meta",
            param_hint="--meta-json",
        ) from None


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


def check_port_free(host: str, port: int) -> None:
    """Raise ConfigError naming ``host:port`` when nothing may listen there (taken by
    another process, or not an address of this host); port 0 is always free."""
    if port == 0:
        return
    where = join_address(host, port)
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, proto) as sock:
            # As servers bind: connections in TIME_WAIT do not make a port busy.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {where}: {exc.strerror or exc}") from None


def say(options: GlobalOptions, event: str, text: str, **fields: Any) -> None:
    """``{"event": event, **fields}`` with ``--json``, else ``text``."""
    if options.json:
        click.echo(json.dumps({"event": event, **fields}, sort_keys=True))
    else:
        click.echo(text)


def instance_dict(inst: Instance) -> dict[str, Any]:
    """An instance as ``--json`` prints it: ``Instance.to_dict()`` (with the override
    in force) and the effective ``status`` (``disabled`` under an override)."""
    return {**inst.to_dict(), "status": status_word(inst)}


# One encoder for every line: json.dumps with an option builds a new one per call,
# which shows at 100,000 instances.
_JSON_LINE = json.JSONEncoder(sort_keys=True)


def instance_json(inst: Instance) -> str:
    return _JSON_LINE.encode(instance_dict(inst))


def instances_json(instances: Iterable[Instance]) -> Iterator[str]:
    """:func:`instance_json` of each instance, the same text, faster for a listing:
    the decoder shares one metadata mapping among the instances that carry the same
    metadata (a fleet's zone and version), so each mapping is encoded once, and the
    common case (no override, not a suspect) is joined from escaped strings."""
    esc = json.encoder.encode_basestring_ascii  # what json.dumps uses by default
    # id -> (mapping, text): the mapping is held so that its id cannot be reused.
    encoded: dict[int, tuple[Any, str]] = {}
    for inst in instances:
        if inst.suspect or inst.override is not None:
            yield instance_json(inst)
            continue
        md = inst.metadata
        known = encoded.get(id(md))
        if known is None or known[0] is not md:
            known = encoded[id(md)] = (md, _JSON_LINE.encode(dict(md)))
        # The keys in sorted order, as sort_keys writes them.
        yield (
            f'{{"address": {esc(inst.address)}, "id": {esc(inst.id)}, "metadata": {known[1]}, '
            f'"service": {esc(inst.service)}, "status": {esc(status_word(inst))}}}'
        )


_LINES_PER_WRITE = 4096


def write_lines(lines: Iterable[str]) -> None:
    """Print ``lines`` to stdout, a few thousand per write: ``click.echo`` per line
    (a write, a flush check and a terminal check each) costs more than the rest of a
    100,000-instance ``list``."""
    out = sys.stdout
    batch: list[str] = []
    for line in lines:
        batch.append(line)
        if len(batch) == _LINES_PER_WRITE:
            out.write("\n".join(batch) + "\n")
            batch.clear()
    if batch:
        out.write("\n".join(batch) + "\n")
    out.flush()


def metadata_text(value: Any) -> str:
    """A metadata value as the table shows it: a string as is, anything else in its
    JSON spelling (``true``, ``null``, ``1.5``), as ``--meta-json`` takes it."""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=True)


def until_text(expires_at: float | None, now: float | None = None) -> str:
    """``until 2026-12-03 14:05:00Z (29m left)``, or ``no expiry``."""
    if expires_at is None:
        return "no expiry"
    left = expires_at - (time.time() if now is None else now)
    stamp = datetime.fromtimestamp(expires_at, tz=UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    return f"until {stamp} ({format_duration(left)} left)"


def override_text(o: Override) -> str:
    """An override in a few words: ``disabled, weight 5, by ops, until ... : reason``."""
    what = []
    if o.disabled:
        what.append("disabled")
    if o.weight is not None:
        what.append(f"weight {o.weight}")
    if o.instance_id is None:
        what.append("service-wide")
    if o.by:
        what.append(f"by {o.by}")
    what.append(until_text(o.expires_at))
    text = ", ".join(what)
    return f"{text}: {o.reason}" if o.reason else text


INSTANCE_HEADER = f"{'SERVICE':<20} {'ID':<28} {'ADDRESS':<24} {'STATUS':<10} METADATA [OVERRIDE]"


def instance_line(inst: Instance) -> str:
    """One row of the instance table (``list``, ``watch``): the effective status, the
    metadata, and the operator's override in force, in brackets."""
    meta = ",".join(f"{k}={metadata_text(v)}" for k, v in sorted(inst.metadata.items()))
    line = f"{inst.service:<20} {inst.id:<28} {inst.address:<24} {status_word(inst):<10} {meta}"
    o = inst.override
    if o is not None and not o.expired():
        line += f" [{override_text(o)}]"
    return line


def event_json(ev: ChangeEvent) -> str:
    return json.dumps({"event": ev.type.value, **instance_dict(ev.instance)}, sort_keys=True)
