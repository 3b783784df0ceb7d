"""ASGI applications (Starlette, FastAPI, any ASGI app) that register in etcd.

Needs the ``http`` extra (``pip install 'etcdisco[http]'``).

- :func:`lifespan`: registration from the app's lifespan, for any server. It
  registers once the server accepts connections and deregisters in the lifespan's
  teardown, which servers run after closing their listeners: too late to spare
  callers errors (measured: see ``_lifespan``). Workers of one server elect one
  registrant per address with a lock file.
- :mod:`etcdisco.uvicorn`: the server that drains first (status ``draining``,
  readiness 503, wait for quiet, then close the listeners, then deregister).
- :class:`ServerRegistration`: what either exposes to the app
  (``request.app.state.etcdisco``, ``request.state.etcdisco``);
  :class:`ServeSpec`: what to register; :class:`ActivityMiddleware` /
  :class:`RequestActivity`: the request counting a drain reads, and the readiness
  endpoint.

A Starlette app registered as ``hello`` (run it with ``uvicorn app:app --port 8000``)::

    app = Starlette(routes=[...], lifespan=etcdisco.asgi.lifespan("hello", port=8000))
"""

from .._drain import DrainPolicy, DrainReport
from ._activity import ActivityMiddleware, RequestActivity, Tracker
from ._lifespan import lifespan
from ._lock import AddressLock
from ._registration import Listener, ServerRegistration, ServeSpec

__all__ = [
    "ActivityMiddleware",
    "AddressLock",
    "DrainPolicy",
    "DrainReport",
    "Listener",
    "RequestActivity",
    "ServeSpec",
    "ServerRegistration",
    "Tracker",
    "lifespan",
]
