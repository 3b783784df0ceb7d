"""``etcdisco agent``, and the health-check and probe options it shares with
``etcdisco register`` (:func:`health_options`, :func:`probe_options`).

Both build checks with :func:`etcdisco.health.parse_check` and register through
``AsyncClient.register(checks=...)``: the one-service shortcut and the agent are the
same code path. The agent connects with the invocation's ClientSettings, reloads its
file on SIGHUP and deregisters everything on SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click

from .._address import parse_listen
from .._async_client import AsyncClient
from .._errors import ConfigError
from ..agent import Agent, ConfigFileError, ProbeServer, ReadyFile, load_config
from ..health import (
    DEFAULT_FALL,
    DEFAULT_INTERVAL,
    DEFAULT_RISE,
    DEFAULT_TIMEOUT,
    SPEC_HELP,
    Check,
    parse_check,
)
from ._common import GlobalOptions, command, log_to_stderr, run_until_signal
from ._metrics import Listen, exposing_metrics, metrics_option

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class HealthOptions:
    """What ``register --check ...`` asked for."""

    checks: tuple[Check, ...]
    on_failing: str


def health_options(command: F) -> F:
    """Add ``--check`` (repeatable), its timing and ``--on-failing`` to a command,
    handed to it as one ``health: HealthOptions`` argument."""

    @functools.wraps(command)
    def wrapper(
        *args: Any,
        check: tuple[str, ...],
        check_interval: float,
        check_timeout: float,
        rise: int,
        fall: int,
        on_failing: str,
        **kwargs: Any,
    ) -> Any:
        timing = {"interval": check_interval, "timeout": check_timeout, "rise": rise, "fall": fall}
        try:
            checks = tuple(parse_check(spec, **timing) for spec in check)
        except ConfigError as exc:
            raise click.BadParameter(str(exc), param_hint="--check") from None
        return command(*args, health=HealthOptions(checks, on_failing), **kwargs)

    options = [
        click.option(
            "--check", multiple=True, metavar="SPEC", help=f"Health check; repeatable: {SPEC_HELP}."
        ),
        click.option(
            "--check-interval",
            type=float,
            default=DEFAULT_INTERVAL,
            show_default=True,
            help="Seconds between probes.",
        ),
        click.option(
            "--check-timeout",
            type=float,
            default=DEFAULT_TIMEOUT,
            show_default=True,
            help="Seconds one probe may take.",
        ),
        click.option(
            "--rise",
            type=int,
            default=DEFAULT_RISE,
            show_default=True,
            help="Passes in a row to become healthy again.",
        ),
        click.option(
            "--fall",
            type=int,
            default=DEFAULT_FALL,
            show_default=True,
            help="Failures in a row to become unhealthy.",
        ),
        click.option(
            "--on-failing",
            type=click.Choice(["mark", "withdraw"]),
            default="mark",
            show_default=True,
            help="While failing: mark the instance unhealthy, or withdraw its key.",
        ),
    ]
    decorated: Callable[..., Any] = wrapper
    for option in reversed(options):
        decorated = option(decorated)
    return decorated  # type: ignore[return-value]


def _listen_address(text: str) -> tuple[str, int]:
    try:
        return parse_listen(text)
    except ConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="--health-listen") from None


def _check_ready_file(path: str) -> None:
    """Refuse at startup a ready file that could never be written: readiness that
    never comes is found at once, not when a probe gives up."""
    where = Path(path).absolute().parent
    if not where.is_dir():
        raise click.BadParameter(f"directory {where} does not exist", param_hint="--ready-file")
    if not os.access(where, os.W_OK | os.X_OK):
        raise click.BadParameter(f"directory {where} is not writable", param_hint="--ready-file")


@dataclass(frozen=True)
class ProbeOptions:
    """What ``--ready-file`` and ``--health-listen`` asked for."""

    ready_file: str | None
    listen: tuple[str, int] | None


def probe_options(command: F) -> F:
    """Add ``--ready-file`` and ``--health-listen`` (container readiness probes) to a
    command, handed to it as one ``probes: ProbeOptions`` argument."""

    @functools.wraps(command)
    def wrapper(
        *args: Any, ready_file: str | None, health_listen: str | None, **kwargs: Any
    ) -> Any:
        if ready_file:
            _check_ready_file(ready_file)
        listen = _listen_address(health_listen) if health_listen else None
        return command(*args, probes=ProbeOptions(ready_file, listen), **kwargs)

    decorated: Callable[..., Any] = click.option(
        "--health-listen",
        metavar="HOST:PORT",
        help="Serve GET /ready (200/503) and /live for container probes (port 0: any).",
    )(wrapper)
    decorated = click.option(
        "--ready-file",
        type=click.Path(dir_okay=False),
        help="A file that exists exactly while every registration is live.",
    )(decorated)
    return decorated  # type: ignore[return-value]


@command("agent")
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="Services to register (YAML or TOML); reloaded on SIGHUP.",
)
@probe_options
@click.option("--check-config", is_flag=True, help="Validate the config file and exit.")
@metrics_option
def agent_cmd(
    options: GlobalOptions,
    config_path: str,
    probes: ProbeOptions,
    check_config: bool,
    metrics_listen: Listen | None,
) -> None:
    """Register the services of a config file with their checks and keep them alive.

    SIGHUP reloads the file, changing only the registrations that changed; SIGTERM
    or SIGINT deregisters everything and exits 0.
    """
    try:
        specs = load_config(config_path)
    except ConfigError as exc:
        # Every error of the file, one line each.
        for message in _config_errors(exc):
            click.echo(f"etcdisco: error: {message}", err=True)
        sys.exit(2)
    if check_config:
        click.echo(f"{config_path}: {len(specs)} service(s), valid")
        return
    ready_file, listen = probes.ready_file, probes.listen
    log_to_stderr(logging.INFO)

    def say(event: str, **fields: Any) -> None:
        if options.json:
            click.echo(json.dumps({"event": event, **fields}, sort_keys=True))
        else:
            detail = " ".join(f"{k}={v}" for k, v in fields.items())
            click.echo(f"agent: {event}" + (f" {detail}" if detail else ""))

    async def main(stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        reload = asyncio.Event()
        loop.add_signal_handler(signal.SIGHUP, reload.set)
        marker = ReadyFile(ready_file) if ready_file else None
        if marker is not None:
            marker.update(False)  # one left by an earlier run must not say ready
        was_ready = False
        told: dict[str, str] = {}  # refusals already reported, by key
        try:
            settings = options.settings
            async with (
                AsyncClient(settings=settings) as client,
                exposing_metrics(metrics_listen, client),
            ):
                agent: Agent

                def changed() -> None:
                    nonlocal was_ready
                    ready = agent.ready
                    if marker is not None:
                        marker.update(ready)
                    failures = agent.failures()
                    for key, error in failures.items():
                        if told.get(key) != error:
                            say("failed", key=key, error=error)
                    told.clear()
                    told.update(failures)
                    if ready != was_ready:
                        was_ready = ready
                        say("ready" if ready else "not-ready")

                agent = Agent(client, on_change=changed, timeout=settings.timeout)
                probe = ProbeServer(agent.status, *listen) if listen else None
                if probe is not None:
                    await probe.start()
                    say("listening", host=listen[0] if listen else "", port=probe.port)
                try:
                    changes = await agent.apply(specs)
                    say("applied", config=config_path, changes=changes.summary())
                    await _serve(stop, reload, agent, config_path, say)
                finally:
                    count = len(agent.keys)
                    await agent.close()
                    say("deregistered", count=count)
                    if probe is not None:
                        await probe.close()
        finally:
            loop.remove_signal_handler(signal.SIGHUP)
            if marker is not None:
                marker.update(False)

    run_until_signal(main)


async def _serve(
    stop: asyncio.Event,
    reload: asyncio.Event,
    agent: Agent,
    config_path: str,
    say: Callable[..., None],
) -> None:
    while True:
        stopping = asyncio.ensure_future(stop.wait())
        reloading = asyncio.ensure_future(reload.wait())
        try:
            await asyncio.wait({stopping, reloading}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            reloading.cancel()
        if stop.is_set():
            return
        reload.clear()
        try:
            specs = load_config(config_path)
        except ConfigError as exc:
            # A bad edit must not take running services out of discovery.
            errors = _config_errors(exc)
            say("reload-failed", error="; ".join(errors), kept=len(agent.keys))
            continue
        changes = await agent.apply(specs)
        say("reloaded", changes=changes.summary())


def _config_errors(exc: ConfigError) -> tuple[str, ...]:
    return exc.errors if isinstance(exc, ConfigFileError) else (str(exc),)
