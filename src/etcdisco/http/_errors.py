"""The error raised when a service has no instance that can take a request.

    etcdisco.EtcdiscoError
    └── NoInstanceError                 .service names the service
        ├── HttpxNoInstanceError        also an httpx.ConnectError (httpx transports)
        └── RequestsNoInstanceError     also a requests.ConnectionError (requests adapter)

The concrete classes live with their library (``_httpx``, ``_requests``), so that this
module, like the base, imports neither.
"""

from __future__ import annotations

from .._errors import EtcdiscoError


class NoInstanceError(EtcdiscoError):
    """No live instance of ``service`` can take the request: none is registered, every
    one is draining, unhealthy or ejected, or the registry did not answer in time.

    Raised instead of a DNS failure for a host called like the service. The transports
    raise a subclass that is also their library's connection error, so code that
    handles those (``except httpx.ConnectError``, ``except httpx.TransportError``,
    ``except requests.ConnectionError``) handles this one too.
    """

    service: str
    """The service that had no instance."""
