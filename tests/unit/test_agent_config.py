"""The agent's config files: YAML and TOML alike, errors that name file, line, field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from etcdisco import ConfigError
from etcdisco.agent import ConfigFileError, ServiceSpec, load_config
from etcdisco.health import CommandCheck, GrpcCheck, HttpCheck, OnFailing, TcpCheck

YAML = """\
defaults:
  ttl: 6
  interval: 2
services:
  - name: web
    address: 127.0.0.1:8080
    metadata: {zone: a, weight: 2}
    on_failing: withdraw
    checks:
      - http: http://127.0.0.1:8080/healthz
        status: [200, 299]
        fall: 2
      - tcp
  - name: db
    address: 127.0.0.1:5432
    id: db-1
    ttl: 10
    checks:
      - exec: [pg_isready, -q]
      - grpc:
        service: db
"""

TOML = """\
[defaults]
ttl = 6
interval = 2

[[services]]
name = "web"
address = "127.0.0.1:8080"
metadata = { zone = "a", weight = 2 }
on_failing = "withdraw"

[[services.checks]]
http = "http://127.0.0.1:8080/healthz"
status = [200, 299]
fall = 2

[[services.checks]]
tcp = ""

[[services]]
name = "db"
address = "127.0.0.1:5432"
id = "db-1"
ttl = 10
checks = [{ exec = "pg_isready -q" }, { grpc = "", service = "db" }]
"""

EXPECTED = (
    ServiceSpec(
        "web",
        "127.0.0.1:8080",
        None,
        6,
        {"zone": "a", "weight": 2},
        (
            HttpCheck("http://127.0.0.1:8080/healthz", status=(200, 299), fall=2, interval=2),
            TcpCheck(interval=2),
        ),
        OnFailing.WITHDRAW,
    ),
    ServiceSpec(
        "db",
        "127.0.0.1:5432",
        "db-1",
        10,
        {},
        (CommandCheck(("pg_isready", "-q"), interval=2), GrpcCheck(service="db", interval=2)),
    ),
)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("name,text", [("a.yaml", YAML), ("a.yml", YAML), ("a.toml", TOML)])
def test_yaml_and_toml_give_the_same_specs(tmp_path: Path, name: str, text: str) -> None:
    assert load_config(write(tmp_path, name, text)) == EXPECTED


def test_an_empty_file_registers_nothing(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "a.yaml", "")) == ()
    assert load_config(write(tmp_path, "a.toml", "")) == ()


def test_key_and_metadata_only_change() -> None:
    web = EXPECTED[0]
    assert web.key("services") == "services/web/127.0.0.1:8080"
    assert EXPECTED[1].key("p") == "p/db/db-1"
    moved = ServiceSpec(**{**web.__dict__, "metadata": {"zone": "b"}})
    assert web.only_metadata_differs(moved)
    assert not web.only_metadata_differs(web)
    assert not web.only_metadata_differs(ServiceSpec(**{**moved.__dict__, "ttl": 7}))


@pytest.mark.parametrize(
    "text,message",
    [
        ("services:\n  - name: web\n    address: nope\n", "a.yaml:3: services[0].address: invalid"),
        ("services:\n  - name: web\n", "a.yaml:2: services[0]: missing field 'address'"),
        (
            "services:\n  - name: a\n    address: 1.2.3.4:5\n    checks:\n"
            "      - tcp:\n        intervall: 3\n",
            "a.yaml:6: services[0].checks[0].intervall: unknown field",
        ),
        (
            "services:\n  - name: a\n    address: 1.2.3.4:5\n    checks:\n"
            "      - tcp:\n        interval: -1\n",
            "a.yaml:6: services[0].checks[0].interval: interval must be > 0",
        ),
        (
            "services:\n  - name: a\n    address: 1.2.3.4:5\n    checks: [udp]\n",
            "a.yaml:4: services[0].checks[0]: unknown check 'udp'",
        ),
        (
            "services:\n  - name: a\n    address: 1.2.3.4:5\n    checks:\n"
            "      - {tcp: , http: x}\n",
            "a.yaml:5: services[0].checks[0]: needs exactly one of",
        ),
        ("defaults:\n  ttl: 1\nservices:\n  - {name: a, address: 1.2.3.4:5}\n", "a.yaml:2: "),
        (
            "services:\n  - {name: a, address: 1.2.3.4:5}\n  - {name: a, address: 1.2.3.4:5}\n",
            "a.yaml:3: services[1]: registers the same instance as services[0]",
        ),
        ("services:\n  - {name: a/b, address: 1.2.3.4:5}\n", "services[0].name: service name"),
        ("services: [\n", "a.yaml:2: invalid YAML"),
        ("service: []\n", "a.yaml:1: service: unknown field"),
        (
            "services:\n  - {name: a, address: 1.2.3.4:5, on_failing: drop}\n",
            "services[0].on_failing: must be 'mark' or 'withdraw'",
        ),
    ],
)
def test_errors_name_file_line_and_field(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "a.yaml", text))
    assert message in str(info.value)


def test_toml_errors_name_the_field(tmp_path: Path) -> None:
    bad = '[[services]]\nname = "a"\naddress = "1.2.3.4:5"\nttl = "x"\n'
    with pytest.raises(ConfigError, match=r"a\.toml: services\[0\]\.ttl: ttl must be"):
        load_config(write(tmp_path, "a.toml", bad))
    with pytest.raises(ConfigError, match=r"a\.toml: invalid TOML"):
        load_config(write(tmp_path, "a.toml", "[[services]\n"))


def test_unknown_formats_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"name the file \.yaml"):
        load_config(write(tmp_path, "a.json", "{}"))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_every_error_of_a_file_is_reported(tmp_path: Path) -> None:
    text = (
        "defaults:\n  ttl: 1\n"  # 2
        "services:\n"
        "  - name: a\n    address: nope\n"  # 5
        "  - name: b\n    address: 1.2.3.4:5\n    intervall: 3\n"  # 8
        "    checks:\n      - udp\n"  # 10
        "  - {name: c, address: 1.2.3.4:6, metadata: {weight: heavy}}\n"  # 11
    )
    with pytest.raises(ConfigFileError) as info:
        load_config(write(tmp_path, "a.yaml", text))
    errors = info.value.errors
    expected = [
        "a.yaml:5: services[0].address: invalid",
        "a.yaml:8: services[1].intervall: unknown field",
        "a.yaml:10: services[1].checks[0]: unknown check 'udp'",
        "a.yaml:11: services[2].metadata.weight: metadata 'weight' must be an integer >= 0",
    ]
    for message in expected:
        assert any(message in error for error in errors), (message, errors)
    # The defaults' TTL is wrong for every service that uses it: said once.
    assert sum("a.yaml:2: defaults.ttl: ttl must be" in error for error in errors) == 1
    assert len(errors) == 5
    assert str(info.value) == "\n".join(errors)


def test_exec_is_the_check_name_of_the_command_line_too(tmp_path: Path) -> None:
    text = "services:\n  - name: a\n    address: 1.2.3.4:5\n    checks:\n"
    forms = (
        "      - exec: [pg_isready, -q]\n      - exec: pg_isready -q\n      - exec:pg_isready -q\n"
    )
    (spec,) = load_config(write(tmp_path, "a.yaml", text + forms))
    assert spec.checks == (CommandCheck(("pg_isready", "-q")),) * 3
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "a.yaml", text + "      - command: [pg_isready]\n"))
    assert "a.yaml:5: services[0].checks[0].command: unknown check; it is called 'exec'" in str(
        info.value
    )


@pytest.mark.parametrize(
    "metadata,message",
    [
        ("{weight: 2.5}", "services[0].metadata.weight: metadata 'weight' must be an integer"),
        ("{weight: -1}", "services[0].metadata.weight: metadata 'weight' must be an integer"),
        ("{status: gone}", "services[0].metadata.status: metadata 'status' must be one of"),
        ("{lb: random}", "services[0].metadata.lb: metadata 'lb' must be one of"),
    ],
)
def test_reserved_metadata_is_checked_when_validating(
    tmp_path: Path, metadata: str, message: str
) -> None:
    """As registering checks it: --check-config must not pass what etcdisco refuses."""
    text = f"services:\n  - name: a\n    address: 1.2.3.4:5\n    metadata: {metadata}\n"
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(write(tmp_path, "a.yaml", text))


def test_a_ttl_above_etcds_maximum_is_refused(tmp_path: Path) -> None:
    text = "services:\n  - {name: a, address: 1.2.3.4:5, ttl: 9000000001}\n"
    with pytest.raises(ConfigError, match=r"a\.yaml:2: services\[0\]\.ttl: ttl must be an integer"):
        load_config(write(tmp_path, "a.yaml", text))
    ok = "services:\n  - {name: a, address: 1.2.3.4:5, ttl: 9000000000}\n"
    assert load_config(write(tmp_path, "a.yaml", ok))[0].ttl == 9_000_000_000
