"""The operator's dashboard and Prometheus service discovery, served by
``etcdisco ui`` (or mounted in an ASGI server of your own).

Needs the ``ui`` extra (``pip install 'etcdisco[ui]'``: Starlette, uvicorn and
Jinja2). The page is rendered from the package's template and served with its own
script and style sheet: no build step, nothing fetched from the internet.

- :func:`create_app`: the Starlette app of one client's registry: every service with
  its instance counts by status, search and filters, each instance with its override,
  metadata and lease, the recent changes, all updated live from one
  ``discover_all()`` cache over server-sent events; the last known state stays shown
  (with a banner) while etcd is unreachable. Admin actions (disable, enable, weight,
  deregister) only with an admin token, sent by the page's script in a header.
- :func:`prometheus_targets`: the registry as Prometheus HTTP SD target groups
  (``GET /prometheus/targets``), with ``__meta_etcdisco_*`` labels.
- :class:`Dashboard`: the state behind the app (``app.state.dashboard``).

    async with AsyncClient() as client:
        app = create_app(client, admin_token=None)   # read-only
        await uvicorn.Server(uvicorn.Config(app, port=8500)).serve()
"""

from ._app import TOKEN_HEADER, create_app
from ._state import STATUSES, Dashboard, instance_row
from ._targets import health_word, instance_target, prometheus_targets, sanitize_label

__all__ = [
    "STATUSES",
    "TOKEN_HEADER",
    "Dashboard",
    "create_app",
    "health_word",
    "instance_row",
    "instance_target",
    "prometheus_targets",
    "sanitize_label",
]
