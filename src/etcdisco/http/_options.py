"""What every HTTP flavour (httpx sync and async, requests) is configured with, and
the retry rule's HTTP half.

Which hosts are services: exactly the ones configured. ``services=["users"]`` routes
``http://users/...`` (any scheme, any port in the URL, which is ignored) to the live
instances of service ``users``; ``services={"users.internal": "users"}`` routes
``http://users.internal/...`` there. Every other host (``example.com``, ``localhost``,
an IP address) is left alone, whatever it looks like: a transport never guesses.

Retry rule, for each attempt (``etcdisco._routing``'s structure):

- not connected (connection refused, connect timeout, TLS handshake failure): the
  request never reached the instance, so it goes to another one, whatever its method
  (``NOT_SENT``);
- the connection broke after the request was sent (reset, closed without an answer),
  or the answer's status is one of ``failure_statuses`` (502, 503, 504 by default):
  the instance may have acted on it, so it goes to another one only when it is
  idempotent (``FAILED``);
- anything else, a timeout waiting for the answer included, is the answer (``DONE``).

Idempotent: a method of ``idempotent`` (GET, HEAD, OPTIONS, TRACE, PUT and DELETE by
default, RFC 9110 section 9.2.2), or a request that carries an ``Idempotency-Key``
header; and only when its body can be sent again (bytes, text, a form, JSON; not an
iterator). ``NOT_SENT`` and ``FAILED`` count against the instance in outlier
detection; both retries come out of the retry budget.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .._checks import check_float, check_int
from .._errors import ConfigError
from .._model import validate_service_name
from .._routing import DEFAULT_RETRY_BUDGET, Outcome, RetryBudget

DEFAULT_IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
DEFAULT_FAILURE_STATUSES = frozenset({502, 503, 504})
IDEMPOTENCY_KEY = "idempotency-key"

# What a URL host can be (lower case, as httpx and requests normalise it).
_HOST = re.compile(r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?)*")
_METHOD = re.compile(r"[A-Za-z!#$%&'*+.^_`|~0-9-]+")

HashKey = Callable[[Any], "str | None"]


@dataclass(frozen=True)
class HttpSettings:
    """An HTTP transport's settings, validated on creation (see :func:`settings`)."""

    hosts: tuple[tuple[str, str], ...]  # (URL host, service), in the order given
    idempotent: frozenset[str] | bool = DEFAULT_IDEMPOTENT_METHODS
    failure_statuses: frozenset[int] = DEFAULT_FAILURE_STATUSES
    max_attempts: int = 3
    retry_budget: RetryBudget | None = DEFAULT_RETRY_BUDGET
    server_name: str | None = None
    host_header: str | None = None
    hash_header: str | None = None
    hash_key: HashKey | None = None
    ready_timeout: float | None = 10.0

    def is_idempotent(self, method: str, headers: Any) -> bool:
        """``headers``: the request's, case-insensitive (httpx's or requests')."""
        idempotent = self.idempotent
        if idempotent is True:
            return True
        if idempotent is not False and method in idempotent:
            return True
        return IDEMPOTENCY_KEY in headers

    def outcome_of_status(self, status: int) -> Outcome:
        return Outcome.FAILED if status in self.failure_statuses else Outcome.DONE

    def name_for(self, template: str | None, host: str, service: str) -> str | None:
        return None if template is None else template.format(service=service, host=host)


def _hosts(services: Iterable[str] | Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    if isinstance(services, str):
        raise ConfigError(f"services takes a list of service names, not a string ({services!r})")
    if isinstance(services, Mapping):
        pairs = [(host, service) for host, service in services.items()]
    else:
        try:
            pairs = [(name, name) for name in services]
        except TypeError:
            raise ConfigError(
                f"services must be service names or a {{host: service}} mapping, not {services!r}"
            ) from None
    if not pairs:
        raise ConfigError("services is empty: name the services to route")
    out: dict[str, str] = {}
    for host, service in pairs:
        validate_service_name(service)
        if not isinstance(host, str) or not _HOST.fullmatch(host.lower()):
            raise ConfigError(
                f"{host!r} cannot be a URL host; route the service with a mapping of a host to "
                f"it, e.g. services={{'users.svc': {service!r}}}"
            )
        if host.lower() in out:
            raise ConfigError(f"host {host.lower()!r} is given twice in services")
        out[host.lower()] = service
    return tuple(out.items())


def _template(name: str, value: str | None) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{name} must be a non-empty string, not {value!r}")
    try:
        value.format(service="s", host="h")
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(
            f"{name} {value!r}: only {{service}} and {{host}} can be filled in ({exc})"
        ) from None
    return value


def settings(
    services: Iterable[str] | Mapping[str, str],
    *,
    idempotent: bool | Iterable[str] = DEFAULT_IDEMPOTENT_METHODS,
    failure_statuses: Iterable[int] = DEFAULT_FAILURE_STATUSES,
    max_attempts: int = 3,
    retry_budget: RetryBudget | None = DEFAULT_RETRY_BUDGET,
    server_name: str | None = None,
    host_header: str | None = None,
    hash_header: str | None = None,
    hash_key: HashKey | None = None,
    ready_timeout: float | None = 10.0,
) -> HttpSettings:
    """Validate what a transport was given; raise ConfigError saying what to change."""
    if isinstance(idempotent, str):
        raise ConfigError("idempotent takes True/False or a list of methods, not a string")
    methods: frozenset[str] | bool
    if isinstance(idempotent, bool):
        methods = idempotent
    else:
        listed = list(idempotent)
        for method in listed:
            if not isinstance(method, str) or not _METHOD.fullmatch(method):
                raise ConfigError(f"idempotent: {method!r} is not an HTTP method")
        methods = frozenset(m.upper() for m in listed)
    statuses = list(failure_statuses)
    for status in statuses:
        if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
            raise ConfigError(f"failure_statuses: {status!r} is not an HTTP status code")
    if retry_budget is not None and not isinstance(retry_budget, RetryBudget):
        raise ConfigError(f"retry_budget must be a RetryBudget or None, not {retry_budget!r}")
    if hash_header is not None and hash_key is not None:
        raise ConfigError("give hash_header or hash_key, not both")
    if hash_header is not None and (not isinstance(hash_header, str) or not hash_header):
        raise ConfigError(f"hash_header must be a header name, not {hash_header!r}")
    if hash_key is not None and not callable(hash_key):
        raise ConfigError("hash_key must be a callable (request) -> str | None")
    if ready_timeout is not None:
        ready_timeout = check_float("http", "ready_timeout", ready_timeout, positive=False)
    return HttpSettings(
        hosts=_hosts(services),
        idempotent=methods,
        failure_statuses=frozenset(statuses),
        max_attempts=check_int("http", "max_attempts", max_attempts, 1),
        retry_budget=retry_budget,
        server_name=_template("server_name", server_name),
        host_header=_template("host_header", host_header),
        hash_header=hash_header,
        hash_key=hash_key,
        ready_timeout=ready_timeout,
    )
