"""A gunicorn config file for the tests, as a user would write one: uvicorn workers
and ``etcdisco.gunicorn.hooks`` (``gunicorn -c tests/asgi_apps/gunicorn_conf.py``).

``APP_SERVICE`` (default ``hello``), ``APP_NAME`` (registered as metadata ``name``),
``APP_TTL`` and ``APP_QUIET_PERIOD`` configure it; etcd is ``$ETCDISCO_ENDPOINTS``.
"""

import os

import etcdisco.gunicorn

worker_class = "uvicorn_worker.UvicornWorker"
accesslog = None
loglevel = "info"

globals().update(
    etcdisco.gunicorn.hooks(
        os.environ.get("APP_SERVICE", "hello"),
        metadata={"name": os.environ.get("APP_NAME", "app")},
        ttl=int(os.environ.get("APP_TTL", "5")),
        quiet_period=float(os.environ.get("APP_QUIET_PERIOD", "0.5")),
        health_path="/healthz",
    )
)
