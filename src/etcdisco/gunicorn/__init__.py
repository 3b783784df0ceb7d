"""gunicorn with uvicorn workers: the master registers each listening address once,
and drains it before gunicorn closes its listeners.

Needs the ``gunicorn`` extra (``pip install 'etcdisco[gunicorn]'``: gunicorn and the
``uvicorn-worker`` package's ``UvicornWorker``).

In your ``gunicorn.conf.py``::

    import etcdisco.gunicorn

    worker_class = "uvicorn_worker.UvicornWorker"
    globals().update(etcdisco.gunicorn.hooks("users", health_path="/healthz"))

or, without a config file of your own (settings from ``ETCDISCO_*`` variables, see
:mod:`etcdisco.gunicorn.conf`)::

    ETCDISCO_SERVICES=users gunicorn -c python:etcdisco.gunicorn.conf app:app -b 0.0.0.0:8000

What happens:

- once the listeners are bound (``when_ready``) a registrar process starts (the
  master forks workers, and the etcd client's gRPC must not be forked); it registers
  every TCP listener (``host:port``; a wildcard bind advertises this host's primary
  IP) once the first worker's app has started, so once per address, however many
  workers serve it;
- SIGTERM to the master: the instance turns ``draining`` in etcd and ``health_path``
  answers 503 in every worker; once no request has arrived in any worker for
  ``quiet_period`` (at most ``drain_timeout``), gunicorn does what it always does
  (closes the listeners, stops the workers within ``graceful_timeout``), then
  ``on_exit`` deregisters. A second SIGTERM ends the quiet wait. SIGINT / SIGQUIT
  (gunicorn's quick shutdown) deregister at once, then stop quickly;
- a worker dies (crash, SIGKILL, ``max_requests``, gunicorn's timeout): gunicorn
  starts another; the registration stays, untouched: the address still accepts
  (the master holds the listening socket) and the other workers serve;
- the master dies (SIGKILL): the registrar sees it go and deregisters; if the
  registrar dies as well, the lease expires within its TTL;
- the app's own :func:`etcdisco.asgi.lifespan`, if it has one, stands down in the
  workers (the master registers) and ``request.app.state.etcdisco`` is a read-only
  view of the registration (services, address, state).

Send SIGTERM to the master only (systemd: ``KillMode=mixed``): a worker that gets it
closes its listener at once, as it would without etcdisco. ``gunicorn --reload`` and
the USR2 binary upgrade are not supported (the new master would register the same
address).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from .._drain import DrainPolicy
from .._errors import ConfigError
from .._settings import ClientSettings
from ..asgi import ServeSpec
from ..health import Check
from ._hooks import Hooks

__all__ = ["Hooks", "from_environment", "hooks"]


def hooks(
    services: str | Sequence[str],
    *,
    settings: ClientSettings | None = None,
    address: str | None = None,
    advertise_host: str | None = None,
    instance_id: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    ttl: int = 10,
    checks: Sequence[Check] = (),
    on_failing: str = "mark",
    quiet_period: float = 1.0,
    drain_timeout: float = 10.0,
    health_path: str | None = None,
) -> Hooks:
    """The gunicorn server hooks that register the server under ``services`` (see the
    module docstring): a mapping of hook name to function, for
    ``globals().update(...)`` in a gunicorn config file.

    ``settings``: how to reach etcd (default: ``$ETCDISCO_ENDPOINTS``). The advertised
    address is ``address`` (one listener only), else ``advertise_host`` (default:
    the bound host, this host's primary IP for a wildcard) with the bound port.
    ``health_path``: a readiness endpoint answered in the workers (200 while
    serving, 503 before and while draining). Raises :class:`etcdisco.ConfigError`
    for a bad value, when the config file is read."""
    spec = ServeSpec.of(
        services,
        address=address,
        host=advertise_host,
        instance_id=instance_id,
        metadata=metadata,
        ttl=ttl,
        checks=checks,
        on_failing=on_failing,
    )
    policy = DrainPolicy(quiet_period=quiet_period, drain_timeout=drain_timeout)
    return Hooks(spec, policy, settings=settings, health_path=health_path)


def _number(environ: Mapping[str, str], name: str, default: float) -> float:
    raw = environ.get(name)
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"${name} must be a number, not {raw!r}") from None


def from_environment(environ: Mapping[str, str] | None = None) -> Hooks:
    """:func:`hooks` configured from environment variables: ``ETCDISCO_SERVICES``
    (required; comma-separated), ``ETCDISCO_ADDRESS``, ``ETCDISCO_ADVERTISE_HOST``,
    ``ETCDISCO_TTL``, ``ETCDISCO_HEALTH_PATH``, ``ETCDISCO_QUIET_PERIOD``,
    ``ETCDISCO_DRAIN_TIMEOUT``; etcd from ``ETCDISCO_ENDPOINTS``."""
    env = os.environ if environ is None else environ
    services = [s.strip() for s in env.get("ETCDISCO_SERVICES", "").split(",") if s.strip()]
    if not services:
        raise ConfigError("set $ETCDISCO_SERVICES to the service names to register")
    return hooks(
        services,
        address=env.get("ETCDISCO_ADDRESS") or None,
        advertise_host=env.get("ETCDISCO_ADVERTISE_HOST") or None,
        ttl=int(_number(env, "ETCDISCO_TTL", 10)),
        health_path=env.get("ETCDISCO_HEALTH_PATH") or None,
        quiet_period=_number(env, "ETCDISCO_QUIET_PERIOD", 1.0),
        drain_timeout=_number(env, "ETCDISCO_DRAIN_TIMEOUT", 10.0),
    )
