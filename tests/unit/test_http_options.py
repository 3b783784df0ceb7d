"""etcdisco.http's pure parts: which hosts are services, the retry rule's HTTP half
(outcomes of errors and statuses, idempotency), the no-instance errors, and how an
instance is dialled whatever the URL says."""

from __future__ import annotations

import socket
import ssl
import threading

import httpcore
import httpx
import pytest
import requests
import urllib3.exceptions

import etcdisco
import etcdisco.http
from etcdisco import ConfigError
from etcdisco._routing import Outcome
from etcdisco.http import _httpx, _requests
from etcdisco.http._options import settings
from etcdisco.http._route import build_routes


def test_services_are_exactly_the_hosts_given() -> None:
    assert settings(["users", "Orders"]).hosts == (("users", "users"), ("orders", "Orders"))
    assert settings({"users.internal": "users"}).hosts == (("users.internal", "users"),)
    for bad in ("users", [], ["a/b"], ["bad host"], {"x y": "users"}, ["users", "USERS"]):
        with pytest.raises(ConfigError):
            settings(bad)


def test_options_are_validated() -> None:
    for bad in (
        {"idempotent": "GET"},
        {"idempotent": ["GET", "no such"]},
        {"failure_statuses": [600]},
        {"max_attempts": 0},
        {"hash_header": "x", "hash_key": lambda r: None},
        {"server_name": "{nope}.internal"},
        {"ready_timeout": -1},
        {"retry_budget": 0.2},
    ):
        with pytest.raises(ConfigError):
            settings(["users"], **bad)  # type: ignore[arg-type]
    one = settings(["users", "orders"])
    with pytest.raises(ConfigError, match="one service"):
        build_routes(one, etcdisco.RoundRobin(), None, True, lambda h, s: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(ConfigError, match="zone"):
        build_routes(one, "zone_aware", {}, True, lambda h, s: None)  # type: ignore[arg-type,return-value]


def test_idempotent_requests() -> None:
    default = settings(["users"])
    headers = httpx.Headers()
    assert [m for m in ("GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE", "POST", "PATCH")
            if default.is_idempotent(m, headers)] == ["GET", "HEAD", "OPTIONS", "TRACE", "PUT",
                                                       "DELETE"]  # fmt: skip
    assert default.is_idempotent("POST", httpx.Headers({"Idempotency-Key": "k1"}))
    assert default.is_idempotent(
        "POST", requests.structures.CaseInsensitiveDict({"idempotency-key": "1"})
    )
    assert settings(["users"], idempotent=["post"]).is_idempotent("POST", headers)
    assert not settings(["users"], idempotent=False).is_idempotent("GET", headers)
    assert settings(["users"], idempotent=True).is_idempotent("PATCH", headers)


def test_failure_statuses() -> None:
    default = settings(["users"])
    assert [
        s for s in (200, 404, 500, 502, 503, 504) if default.outcome_of_status(s) is Outcome.FAILED
    ] == [502, 503, 504]
    assert settings(["users"], failure_statuses=[500]).outcome_of_status(503) is Outcome.DONE


def test_names_are_filled_in_per_service() -> None:
    config = settings(
        {"u": "users"}, server_name="{service}.internal", host_header="{host}.example"
    )
    assert config.name_for(config.server_name, "u", "users") == "users.internal"
    assert config.name_for(config.host_header, "u", "users") == "u.example"


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (httpx.ConnectError("refused"), Outcome.NOT_SENT),
        (httpx.ConnectTimeout("slow"), Outcome.NOT_SENT),
        (httpx.ReadError("reset"), Outcome.FAILED),
        (httpx.WriteError("reset"), Outcome.FAILED),
        (httpx.RemoteProtocolError("closed without a response"), Outcome.FAILED),
        (httpx.ReadTimeout("slow answer"), Outcome.DONE),
        (httpx.PoolTimeout("pool full"), Outcome.DONE),
        (httpx.LocalProtocolError("bad request"), Outcome.DONE),
    ],
)
def test_httpx_errors_sorted_for_the_retry_rule(error: Exception, outcome: Outcome) -> None:
    assert _httpx.outcome_of_error(error) is outcome


def test_httpcore_errors_become_httpx_errors() -> None:
    for raw, expected in (
        (httpcore.ConnectError("x"), httpx.ConnectError),
        (httpcore.ReadTimeout("x"), httpx.ReadTimeout),
        (httpcore.RemoteProtocolError("x"), httpx.RemoteProtocolError),
    ):
        mapped = _httpx.map_error(raw)
        assert type(mapped) is expected and mapped.__cause__ is raw
    handshake = ssl.SSLCertVerificationError("certificate verify failed")  # old httpcore
    assert type(_httpx.map_error(handshake)) is httpx.ConnectError
    other = ValueError("x")
    assert _httpx.map_error(other) is other


def _refused() -> urllib3.exceptions.MaxRetryError:
    reason = urllib3.exceptions.NewConnectionError(None, "refused")  # type: ignore[arg-type]
    return urllib3.exceptions.MaxRetryError(None, "/", reason)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (requests.ConnectionError(_refused()), Outcome.NOT_SENT),
        (requests.ConnectTimeout("slow"), Outcome.NOT_SENT),
        (requests.exceptions.SSLError("bad certificate"), Outcome.NOT_SENT),
        (requests.ConnectionError(urllib3.exceptions.ProtocolError("aborted")), Outcome.FAILED),
        (requests.exceptions.ChunkedEncodingError("cut"), Outcome.FAILED),
        (requests.ReadTimeout("slow answer"), Outcome.DONE),
        (requests.exceptions.InvalidURL("x"), Outcome.DONE),
    ],
)
def test_requests_errors_sorted_for_the_retry_rule(error: Exception, outcome: Outcome) -> None:
    assert _requests.outcome_of_error(error) is outcome


def test_no_instance_errors_are_their_librarys_connection_errors() -> None:
    httpx_error = etcdisco.http.HttpxNoInstanceError("users", "no instance of 'users'")
    requests_error = etcdisco.http.RequestsNoInstanceError("users", "no instance of 'users'")
    for error, library_error in (
        (httpx_error, httpx.ConnectError),
        (requests_error, requests.ConnectionError),
    ):
        assert isinstance(error, library_error)
        assert isinstance(error, etcdisco.http.NoInstanceError)
        assert isinstance(error, etcdisco.EtcdiscoError)
        assert error.service == "users" and str(error) == "no instance of 'users'"


def test_replayable_bodies() -> None:
    assert _httpx.replayable(httpx.Request("PUT", "http://u/", content=b"x").stream)
    assert _httpx.replayable(httpx.Request("PUT", "http://u/", json={"a": 1}).stream)
    assert not _httpx.replayable(httpx.Request("PUT", "http://u/", content=iter([b"x"])).stream)


def test_pinned_backend_dials_the_instance_whatever_the_url_names() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        accepted: list[object] = []
        thread = threading.Thread(target=lambda: accepted.append(listener.accept()))
        thread.start()
        stream = _httpx.PinnedBackend(address).connect_tcp("users", 80, timeout=5)
        thread.join(5)
        stream.close()
    assert accepted
    with pytest.raises(httpcore.ConnectError, match="invalid address"):
        _httpx.PinnedBackend("not an address").connect_tcp("users", 80)


def test_one_tls_context_for_every_instance() -> None:
    context = ssl.create_default_context()
    options = _httpx.PoolOptions(
        verify=context, cert=None, trust_env=True, http1=True, http2=False, limits=httpx.Limits()
    )
    assert options.pool_kwargs()["ssl_context"] is context
