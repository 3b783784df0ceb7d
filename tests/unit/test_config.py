"""etcd connection settings: parsed and validated before any connection is made."""

from __future__ import annotations

from pathlib import Path

import pytest

from etcdisco import AsyncClient, ClientSettings, ConfigError
from etcdisco.etcd import EtcdConfig, TlsConfig, parse_endpoints
from etcdisco.testing import TlsFiles, make_test_certs


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


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_test_certs(tmp_path_factory.mktemp("certs"))


def test_good_tls_files_are_accepted(certs: TlsFiles) -> None:
    TlsConfig(ca=str(certs.ca), cert=str(certs.client_cert), key=str(certs.client_key))


@pytest.mark.parametrize(
    ("which", "content", "fragment"),
    [
        ("ca", b"not a certificate\n", "holds no PEM certificate"),
        ("ca", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "ca file"),
        ("cert", b"junk", "holds no PEM certificate"),
        ("key", b"junk", "holds no PEM private key"),
    ],
)
def test_junk_tls_files_are_named_at_once(
    certs: TlsFiles, tmp_path: Path, which: str, content: bytes, fragment: str
) -> None:
    junk = tmp_path / f"junk-{which}.pem"
    junk.write_bytes(content)
    files = {"ca": str(certs.ca), "cert": str(certs.client_cert), "key": str(certs.client_key)}
    files[which] = str(junk)
    with pytest.raises(ConfigError, match=fragment) as info:
        TlsConfig(**files)
    assert str(junk) in str(info.value)


def test_a_key_of_another_certificate_is_refused(certs: TlsFiles) -> None:
    with pytest.raises(ConfigError, match="do not make a pair"):
        TlsConfig(ca=str(certs.ca), cert=str(certs.client_cert), key=str(certs.server_key))


def test_client_settings_check_tls_files_before_any_connection(tmp_path: Path) -> None:
    junk = tmp_path / "ca.pem"
    junk.write_text("hello")
    with pytest.raises(ConfigError, match=r"ca\.pem"):
        ClientSettings(endpoints=("127.0.0.1:1",), cacert=str(junk))


@pytest.mark.parametrize("ttl", [1, 9_000_000_001, 2**70, 2.5, True])
async def test_ttl_out_of_range_is_a_config_error(ttl: object) -> None:
    async with AsyncClient("127.0.0.1:1") as client:
        with pytest.raises(ConfigError, match="ttl must be an integer from 2 to 9,000,000,000"):
            client.register("echo", "127.0.0.1:1", ttl=ttl)  # type: ignore[arg-type]
