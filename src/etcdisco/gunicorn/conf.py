"""A gunicorn config module: ``gunicorn -c python:etcdisco.gunicorn.conf app:app``.

Uvicorn workers (``uvicorn_worker.UvicornWorker``) and the etcdisco hooks, configured
from the environment (see :func:`etcdisco.gunicorn.from_environment`):
``ETCDISCO_SERVICES`` (required), ``ETCDISCO_ENDPOINTS``, ``ETCDISCO_HEALTH_PATH``,
``ETCDISCO_QUIET_PERIOD``, ... Every other gunicorn setting comes from the command
line (``-b``, ``-w``, ...) or ``GUNICORN_CMD_ARGS``.
"""

from __future__ import annotations

from . import from_environment

worker_class = "uvicorn_worker.UvicornWorker"

_hooks = from_environment()
when_ready = _hooks["when_ready"]
pre_fork = _hooks["pre_fork"]
post_worker_init = _hooks["post_worker_init"]
child_exit = _hooks["child_exit"]
on_exit = _hooks["on_exit"]
