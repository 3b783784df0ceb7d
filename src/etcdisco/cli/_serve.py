"""``etcdisco serve SERVICE --app module:app``: an ASGI app served by uvicorn,
registered once it listens, drained before it stops listening (``etcdisco.uvicorn``).

Why ``--app`` and not a wrapper around any command (``etcdisco serve SERVICE --
uvicorn app:app``): a wrapper sees neither the requests (so no quiet period, only a
fixed wait) nor the moment its child closes its listeners, and a Ctrl-C or systemd's
default ``KillMode=control-group`` signals the child too, which then closes its
listeners before the wrapper has drained anything. Serving the app in-process puts
the drain where it must be: before uvicorn closes its sockets. For servers that are
not uvicorn (or not Python), ``etcdisco register`` or the sidecar agent register an
address from the outside.

stdout carries etcdisco's lines only (uvicorn's access log goes to stderr, with its
other logs): ``registered``, ``draining``, ``drained``, ``deregistered`` (JSON lines
with ``--json``). The exit code: 0 after a drain, 1 when registering fails, uvicorn's
own (3) when the server cannot start.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path
from typing import Any

import click

from ._agent import HealthOptions, health_options
from ._common import GlobalOptions, command, errors, fail, metadata_options, parse_meta, say


def _uvicorn_log_config(access_log: bool) -> dict[str, Any]:
    """uvicorn's logging, with the access log on stderr: stdout is ours."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["handlers"]["access"]["stream"] = "ext://sys.stderr"
    if not access_log:
        config["loggers"]["uvicorn.access"]["handlers"] = []
        config["loggers"]["uvicorn.access"]["propagate"] = False
    return config


def _check_app(app: str, app_dir: str) -> None:
    """Refuse an APP that is not ``module:attribute``, or whose module cannot be found,
    before anything listens or registers (the module itself is imported by the
    server, in each worker)."""
    module, sep, attr = app.partition(":")
    if not sep or not module or not attr:
        raise click.BadParameter(f"{app!r} is not MODULE:ATTRIBUTE", param_hint="--app")
    sys.path.insert(0, str(Path(app_dir).resolve()))
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError) as exc:
        raise click.BadParameter(f"cannot import {module}: {exc}", param_hint="--app") from None
    if found is None:
        raise click.BadParameter(
            f"no module named {module!r} (looked in --app-dir {app_dir} and sys.path)",
            param_hint="--app",
        )


@command("serve")
@click.argument("service")
@click.option(
    "--app",
    "app",
    required=True,
    metavar="MODULE:APP",
    help="The ASGI application, as uvicorn takes it (main:app).",
)
@click.option("--factory", is_flag=True, help="APP is a function that returns the application.")
@click.option(
    "--app-dir",
    default=".",
    show_default=True,
    help="Directory put first on sys.path to find MODULE.",
)
@click.option(
    "--host",
    "bind_host",
    default="127.0.0.1",
    show_default=True,
    help="Address to bind (0.0.0.0 or :: for every interface).",
)
@click.option(
    "--port",
    default=8000,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port to bind (0: any free port; the registry tells clients).",
)
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    help="Worker processes; one registration for all, held by the master.",
)
@click.option(
    "--advertise-host",
    help="Host to register (default: --host when it is one address, else this host's primary IP).",
)
@click.option("--address", help="Register this HOST:PORT as is (behind NAT, a DNS name).")
@click.option("--id", "instance_id", help="Instance id (default: the address).")
@metadata_options
@click.option(
    "--ttl", default=10, show_default=True, help="Lease TTL in seconds (2 to 9,000,000,000)."
)
@health_options
@click.option(
    "--health-path",
    metavar="PATH",
    help="Answer readiness at PATH: 200 while registered and serving, 503 before and "
    "while draining (not counted as traffic).",
)
@click.option(
    "--quiet-period",
    default=1.0,
    show_default=True,
    type=click.FloatRange(0),
    help="On SIGTERM: stop listening once no request arrived for this long (s).",
)
@click.option(
    "--drain-timeout",
    default=10.0,
    show_default=True,
    type=click.FloatRange(0),
    help="Longest wait for that quiet (s).",
)
@click.option(
    "--grace",
    default=5.0,
    show_default=True,
    type=click.FloatRange(0),
    help="Then, how long requests still running may take (s).",
)
@click.option("--access-log/--no-access-log", default=True, help="uvicorn's access log (stderr).")
def serve_cmd(
    options: GlobalOptions,
    service: str,
    app: str,
    factory: bool,
    app_dir: str,
    bind_host: str,
    port: int,
    workers: int,
    advertise_host: str | None,
    address: str | None,
    instance_id: str | None,
    meta: tuple[str, ...],
    meta_json: tuple[str, ...],
    ttl: int,
    health: HealthOptions,
    health_path: str | None,
    quiet_period: float,
    drain_timeout: float,
    grace: float,
    access_log: bool,
) -> None:
    """Serve an ASGI APP with uvicorn as SERVICE: registered once it listens; on
    SIGTERM/SIGINT, draining in etcd, then (no request for --quiet-period) stop
    listening, finish requests, deregister. A second signal skips the rest of the
    wait."""
    metadata = parse_meta(meta, meta_json)
    _check_app(app, app_dir)
    if health_path is not None and not health_path.startswith("/"):
        raise click.BadParameter("must start with '/'", param_hint="--health-path")
    try:
        from ..asgi import ServerRegistration, ServeSpec
        from ..uvicorn import run
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        fail(f"etcdisco serve needs uvicorn ({exc}): pip install 'etcdisco[http]'")
    with errors():
        # What the registration would refuse, refused before anything listens.
        ServeSpec.of(
            service,
            address=address,
            host=advertise_host,
            instance_id=instance_id,
            metadata=metadata,
            ttl=ttl,
            checks=health.checks,
            on_failing=health.on_failing,
        )
        settings = options.settings

    def on_event(event: str, reg: ServerRegistration) -> None:
        if event == "registered":
            keys = [r.key for r in reg.registrations]
            say(
                options,
                "registered",
                f"registered {', '.join(keys)} -> {reg.address}",
                keys=keys,
                address=reg.address,
            )
        elif event == "draining":
            say(options, "draining", f"draining {reg.address}", address=reg.address)
        elif event == "drained" and reg.drain_report is not None:
            report = reg.drain_report
            say(
                options,
                "drained",
                f"drained in {report.waited:.2f}s ("
                f"{'quiet' if report.quiet else 'drain timeout reached'}, "
                f"{report.requests_while_draining} requests while draining)",
                quiet=report.quiet,
                waited=round(report.waited, 3),
                requests=report.requests_while_draining,
            )
        elif event == "deregistered":
            say(options, "deregistered", f"deregistered {reg.address}", address=reg.address)

    level = (options.log_level or "info").lower()
    with errors():
        run(
            app,
            service,
            host=bind_host,
            port=port,
            workers=workers,
            settings=settings,
            address=address,
            advertise_host=advertise_host,
            instance_id=instance_id,
            metadata=metadata,
            ttl=ttl,
            checks=health.checks,
            on_failing=health.on_failing,
            quiet_period=quiet_period,
            drain_timeout=drain_timeout,
            grace=grace,
            health_path=health_path,
            listeners=[on_event],
            factory=factory,
            log_config=_uvicorn_log_config(access_log),
            log_level=level,
            access_log=access_log,
        )
