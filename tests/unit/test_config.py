"""etcd connection settings: parsed and validated before any connection is made."""

from __future__ import annotations

import pytest

from etcdisco import ConfigError
from etcdisco.etcd import EtcdConfig, TlsConfig, parse_endpoints


def test_endpoints_are_split_deduplicated_and_stripped_of_scheme() -> None:
    cfg = EtcdConfig(endpoints=parse_endpoints(" a:2379, http://b:2379/ ,a:2379,"))
    assert cfg.endpoints == ("a:2379", "b:2379")
    assert cfg.tls is None


def test_https_turns_tls_on() -> None:
    cfg = EtcdConfig(endpoints=("https://a:2379",))
    assert cfg.tls == TlsConfig()


@pytest.mark.parametrize(
    ("endpoints", "fragment"),
    [
        ((), "at least one"),
        (("a",), "host:port"),
        (("a:x",), "host:port"),
        (("ftp://a:1",), "scheme"),
    ],
)
def test_bad_endpoints_are_refused(endpoints: tuple[str, ...], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        EtcdConfig(endpoints=endpoints)


def test_user_and_password_go_together() -> None:
    with pytest.raises(ConfigError, match="together"):
        EtcdConfig(username="root")


def test_password_is_not_in_repr() -> None:
    assert "s3cret" not in repr(EtcdConfig(username="root", password="s3cret"))


def test_tls_files_must_exist(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        TlsConfig(ca=str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match="together"):
        TlsConfig(cert=str(tmp_path / "c.pem"))
