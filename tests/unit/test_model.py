"""Unit tests for the model and the wire codec (DESIGN.md section 2)."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from etcdisco._address import normalize_address, parse_address, parse_listen
from etcdisco._errors import ConfigError, InvalidAddressError, MalformedValueError
from etcdisco._model import (
    DEFAULT_PREFIX,
    MAX_JSON_DEPTH,
    MAX_VALUE_SIZE,
    ChangeEvent,
    EventType,
    Instance,
    Status,
    decode_instance,
    decode_value,
    diff,
    encode_value,
    instance_key,
    service_prefix,
    split_key,
    validate_instance_id,
    validate_prefix,
    validate_service_name,
)

# --- names and keys ------------------------------------------------------------------


def test_default_prefix_has_no_slashes() -> None:
    # Go's resolver dialled with etcd:///services/echo reads "services/echo".
    assert DEFAULT_PREFIX == "services"


@pytest.mark.parametrize("name", ["echo", "echo-v2", "a", "Echo.Service_1", "x" * 253, "écho"])
def test_valid_service_names(name: str) -> None:
    assert validate_service_name(name) == name


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("", "empty"),
        ("a/b", "'/'"),
        ("/echo", "'/'"),
        ("echo ", "whitespace"),
        ("ec ho", "whitespace"),
        ("echo\t", "control"),
        ("echo\n", "control"),
        ("echo\x00", "control"),
        ("echo\u200b", "control"),  # zero-width space: invisible look-alike
        ("echo\u00a0", "whitespace"),
        ("echo\ud800", "control"),  # lone surrogate: cannot be encoded as UTF-8
        ("x" * 254, "254 characters"),
    ],
)
def test_invalid_service_names(name: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        validate_service_name(name)


def test_service_name_must_be_str() -> None:
    with pytest.raises(ConfigError, match="string"):
        validate_service_name(b"echo")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        ("services", "services"),
        ("services/", "services"),
        ("services//", "services"),
        ("/services", "/services"),
        ("/services/", "/services"),
        ("org/team/services", "org/team/services"),
    ],
)
def test_valid_prefixes(prefix: str, expected: str) -> None:
    assert validate_prefix(prefix) == expected


@pytest.mark.parametrize("prefix", ["", "/", "//", "serv ices", "services\n", 3])
def test_invalid_prefixes(prefix: Any) -> None:
    with pytest.raises(ConfigError):
        validate_prefix(prefix)


@pytest.mark.parametrize("instance_id", ["10.0.0.5:50051", "host-1234", "[::1]:80", "a b"])
def test_valid_instance_ids(instance_id: str) -> None:
    assert validate_instance_id(instance_id) == instance_id


@pytest.mark.parametrize("instance_id", ["", "a/b", "a\nb", "a\x7f", "a\u200e", None])
def test_invalid_instance_ids(instance_id: Any) -> None:
    with pytest.raises(ConfigError):
        validate_instance_id(instance_id)


def test_key_builders() -> None:
    assert service_prefix("services", "echo") == "services/echo/"
    assert service_prefix("services/", "echo") == "services/echo/"
    assert instance_key("services", "echo", "10.0.0.5:50051") == "services/echo/10.0.0.5:50051"
    assert instance_key("/a/b", "echo", "i1") == "/a/b/echo/i1"


@pytest.mark.parametrize(
    ("prefix", "service", "instance_id"),
    [("", "echo", "i"), ("services", "a/b", "i"), ("services", "echo", "a/b")],
)
def test_key_builders_validate(prefix: str, service: str, instance_id: str) -> None:
    with pytest.raises(ConfigError):
        instance_key(prefix, service, instance_id)


@pytest.mark.parametrize(
    ("prefix", "key", "expected"),
    [
        ("services", "services/echo/10.0.0.5:50051", ("echo", "10.0.0.5:50051")),
        ("services/", "services/echo/i1", ("echo", "i1")),
        ("/services", "/services/echo/i1", ("echo", "i1")),
        ("a/b", "a/b/echo/i1", ("echo", "i1")),
        ("services", "services/echo/[::1]:80", ("echo", "[::1]:80")),
        # not prefix/service/id
        ("services", "services/echo/", None),
        ("services", "services/echo", None),
        ("services", "services//i1", None),
        ("services", "services/echo/a/b", None),
        ("services", "services/echo/i1/", None),
        ("services", "servicesX/echo/i1", None),
        ("services", "other/echo/i1", None),
        ("services", "/services/echo/i1", None),
        ("/services", "services/echo/i1", None),
        ("services", "services", None),
        ("services", "", None),
    ],
)
def test_split_key(prefix: str, key: str, expected: tuple[str, str] | None) -> None:
    assert split_key(prefix, key) == expected


def test_split_key_inverts_instance_key() -> None:
    key = instance_key("services", "echo", "10.0.0.5:50051")
    assert split_key("services", key) == ("echo", "10.0.0.5:50051")


# --- addresses -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "host", "port", "normalized"),
    [
        ("10.0.0.5:50051", "10.0.0.5", 50051, "10.0.0.5:50051"),
        ("1.2.3.4:80", "1.2.3.4", 80, "1.2.3.4:80"),
        ("127.0.0.1:1", "127.0.0.1", 1, "127.0.0.1:1"),
        ("localhost:65535", "localhost", 65535, "localhost:65535"),
        ("Echo.Example.COM:443", "echo.example.com", 443, "echo.example.com:443"),
        ("example.com.:443", "example.com.", 443, "example.com.:443"),
        ("my-svc.ns.svc.cluster.local:8080", "my-svc.ns.svc.cluster.local", 8080, None),
        ("123host:80", "123host", 80, None),
        ("xn--bcher-kva.example:80", "xn--bcher-kva.example", 80, None),
        ("a" * 63 + ".com:80", "a" * 63 + ".com", 80, None),
        ("[::1]:50051", "::1", 50051, "[::1]:50051"),
        ("[2001:DB8:0:0:0:0:0:1]:80", "2001:db8::1", 80, "[2001:db8::1]:80"),
        ("[::ffff:10.0.0.1]:80", "::ffff:a00:1", 80, "[::ffff:a00:1]:80"),
        ("[fe80::1%eth0]:80", "fe80::1%eth0", 80, "[fe80::1%eth0]:80"),
    ],
)
def test_valid_addresses(address: str, host: str, port: int, normalized: str | None) -> None:
    assert parse_address(address) == (host, port)
    assert normalize_address(address) == (normalized or f"{host}:{port}")


@pytest.mark.parametrize(
    ("address", "fragment"),
    [
        ("", "empty address"),
        ("10.0.0.5", "missing port"),
        ("localhost", "missing port"),
        ("10.0.0.5:", "missing port"),
        ("[::1]", "missing port"),
        ("[::1]:", "missing port"),
        ("[::1]x", "unexpected"),
        ("10.0.0.5:0", "outside 1-65535"),
        ("10.0.0.5:65536", "outside 1-65535"),
        ("10.0.0.5:99999", "outside 1-65535"),
        ("10.0.0.5:123456", "not a number"),
        ("10.0.0.5:-1", "not a number"),
        ("10.0.0.5:http", "not a number"),
        ("10.0.0.5:\uff18\uff10", "not a number"),  # full-width digits pass str.isdigit()
        ("::1", "brackets"),
        ("::1:80", "brackets"),
        ("2001:db8::1:80", "brackets"),
        ("[::1", "without a closing"),
        ("[]:80", "empty host"),
        ("[1.2.3.4]:80", "IPv6 only"),
        ("[example.com]:80", "not an IPv6"),
        (":80", "empty host"),
        ("0.0.0.0:80", "unspecified"),
        ("[::]:80", "unspecified"),
        ("[0:0::0]:80", "unspecified"),
        ("[::ffff:0.0.0.0]:80", "unspecified"),
        ("256.1.1.1:80", "not a valid IPv4"),
        ("1.2.3:80", "not a valid IPv4"),
        ("01.2.3.4:80", "not a valid IPv4"),
        (" 10.0.0.5:80", "whitespace"),
        ("10.0.0.5:80 ", "whitespace"),
        ("10.0.0.5 :80", "whitespace"),
        ("10.0.0.5:80\n", "control"),
        ("http://10.0.0.5:80", "scheme"),
        ("dns:///echo:80", "scheme"),
        ("10.0.0.5:80/path", "'/'"),
        ("host/x:80", "'/'"),
        ("my_svc:80", "RFC 1123"),
        ("-host:80", "RFC 1123"),
        ("host-:80", "RFC 1123"),
        ("a..b:80", "empty label"),
        (".host:80", "empty label"),
        ("a" * 64 + ".com:80", "longer than 63"),
        (".".join(["a" * 63] * 4) + ":80", "limit is 253"),
        ("bücher.example:80", "punycode"),
        ("user@host:80", "RFC 1123"),
    ],
)
def test_invalid_addresses(address: str, fragment: str) -> None:
    with pytest.raises(InvalidAddressError, match=fragment) as info:
        parse_address(address)
    assert info.value.address == address
    assert fragment in info.value.reason
    with pytest.raises(InvalidAddressError):
        normalize_address(address)


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("0.0.0.0:8500", ("0.0.0.0", 8500)),  # the README's container probe address
        ("[::]:9100", ("::", 9100)),
        (":9100", ("0.0.0.0", 9100)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("Probe.Local:80", ("probe.local", 80)),
        ("[::1]:0", ("::1", 0)),
    ],
)
def test_listen_addresses_allow_any_host_and_port_zero(
    listen: str, expected: tuple[str, int]
) -> None:
    assert parse_listen(listen) == expected


@pytest.mark.parametrize("listen", ["8500", "host:", "host:http", "1.2.3.4:65536", "a_b:80"])
def test_bad_listen_addresses_are_refused(listen: str) -> None:
    with pytest.raises(ConfigError):
        parse_listen(listen)


def test_invalid_address_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        parse_address("nope")


def test_address_must_be_str() -> None:
    with pytest.raises(InvalidAddressError, match="string"):
        parse_address(None)  # type: ignore[arg-type]


# --- encoding ------------------------------------------------------------------------


def test_encode_exact_bytes() -> None:
    # The exact wire format: Go's resolver reads Addr; grpc-go must never see an object.
    assert encode_value("10.0.0.5:50051", {"zone": "a", "weight": 3}) == (
        b'{"Op":0,"Addr":"10.0.0.5:50051","Metadata":"{\\"weight\\":3,\\"zone\\":\\"a\\"}"}'
    )


@pytest.mark.parametrize("metadata", [None, {}])
def test_encode_without_metadata_writes_null(metadata: dict[str, Any] | None) -> None:
    assert encode_value("10.0.0.5:50051", metadata) == (
        b'{"Op":0,"Addr":"10.0.0.5:50051","Metadata":null}'
    )


def test_encode_keeps_non_ascii_as_utf8() -> None:
    data = encode_value("h:1", {"zone": "zürich"})
    assert data == '{"Op":0,"Addr":"h:1","Metadata":"{\\"zone\\":\\"zürich\\"}"}'.encode()


def test_encode_writes_address_as_given() -> None:
    assert json.loads(encode_value("Host.Example:80"))["Addr"] == "Host.Example:80"


def test_encoded_metadata_is_a_string_never_an_object() -> None:
    document = json.loads(encode_value("h:1", {"a": {"b": [1, 2]}, "c": None}))
    assert list(document) == ["Op", "Addr", "Metadata"]
    assert isinstance(document["Metadata"], str)
    assert json.loads(document["Metadata"]) == {"a": {"b": [1, 2]}, "c": None}


def test_encode_rejects_bad_address() -> None:
    with pytest.raises(InvalidAddressError):
        encode_value("0.0.0.0:80", {"zone": "a"})


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def _circular() -> dict[str, Any]:
    value: dict[str, Any] = {}
    value["self"] = value
    return value


@pytest.mark.parametrize(
    ("metadata", "fragment"),
    [
        ({"when": object()}, "not JSON-serializable"),
        ({"when": {1, 2}}, "not JSON-serializable"),
        ({"x": float("nan")}, "not JSON-serializable"),
        ({"x": float("inf")}, "not JSON-serializable"),
        (_circular(), "not JSON-serializable"),
        ({1: "a"}, "keys must be strings"),
        ({"a": {1: "x", "b": "y"}}, "not JSON-serializable"),  # mixed keys cannot be sorted
        ({"s": "\ud800"}, "not valid Unicode"),
        ({"big": "x" * MAX_VALUE_SIZE}, "limit is"),
        (_nested(MAX_JSON_DEPTH + 1), "nested deeper"),
        ([("a", 1)], "must be a mapping"),
    ],
)
def test_encode_rejects_bad_metadata(metadata: Any, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        encode_value("h:1", metadata)


def test_encode_accepts_metadata_at_the_depth_limit() -> None:
    metadata = _nested(MAX_JSON_DEPTH)
    assert decode_value("k", encode_value("h:1", metadata)) == ("h:1", metadata)


def test_encode_accepts_value_just_under_the_size_limit() -> None:
    overhead = len(encode_value("h:1", {"big": ""}))
    data = encode_value("h:1", {"big": "x" * (MAX_VALUE_SIZE - overhead)})
    assert len(data) == MAX_VALUE_SIZE
    assert decode_value("k", data)[1]["big"] == "x" * (MAX_VALUE_SIZE - overhead)


# --- decoding ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "metadata",
    [
        None,
        {"zone": "a"},
        {"weight": 3, "zone": "a", "status": "draining", "version": "1.2.3"},
        {"protocols": ["grpc", "http"], "nested": {"a": {"b": None}}, "f": 1.5, "t": True},
        {"ünïcode": "值", "quote": '"\\', "newline": "a\nb"},
    ],
)
@pytest.mark.parametrize("address", ["10.0.0.5:50051", "[::1]:80", "echo.example:443"])
def test_round_trip(address: str, metadata: dict[str, Any] | None) -> None:
    assert decode_value("k", encode_value(address, metadata)) == (address, metadata or {})


@pytest.mark.parametrize(
    ("value", "address", "metadata"),
    [
        # Go endpoints.Manager / endpoints.Endpoint
        (b'{"Op":0,"Addr":"10.0.0.5:50051","Metadata":null}', "10.0.0.5:50051", {}),
        (
            b'{"Op":0,"Addr":"1.2.3.4:80","Metadata":"{\\"zone\\":\\"a\\"}"}',
            "1.2.3.4:80",
            {"zone": "a"},
        ),
        (b'{"Op":0,"Addr":"1.2.3.4:80","Metadata":"v1"}', "1.2.3.4:80", {"value": "v1"}),
        (b'{"Op":0,"Addr":"1.2.3.4:80","Metadata":""}', "1.2.3.4:80", {"value": ""}),
        (b'{"Op":0,"Addr":"1.2.3.4:80","Metadata":"[1,2]"}', "1.2.3.4:80", {"value": "[1,2]"}),
        (b'{"Op":0,"Addr":"1.2.3.4:80","Metadata":"null"}', "1.2.3.4:80", {"value": "null"}),
        (b'{"Op":0,"Addr":"1.2.3.4:80","Metadata":"{bad"}', "1.2.3.4:80", {"value": "{bad"}),
        (
            b'{"Op":0,"Addr":"1.2.3.4:80","Metadata":"{\\"x\\":NaN}"}',
            "1.2.3.4:80",
            {"value": '{"x":NaN}'},
        ),
        (b'{"Op":0,"Addr":"1.2.3.4:80","Metadata":{"zone":"b"}}', "1.2.3.4:80", {"zone": "b"}),
        (b'{"Op":0,"Addr":"1.2.3.4:80","Metadata":7}', "1.2.3.4:80", {"value": 7}),
        (b'{"Op":0,"Addr":"1.2.3.4:80","Metadata":2.5}', "1.2.3.4:80", {"value": 2.5}),
        (b'{"Op":0,"Addr":"1.2.3.4:80","Metadata":true}', "1.2.3.4:80", {"value": True}),
        (b'{"Op":0,"Addr":"1.2.3.4:80","Metadata":[1]}', "1.2.3.4:80", {"value": [1]}),
        # grpcproxy writes the metadata object as a string too
        (
            b'{"Addr":"1.2.3.4:80","Metadata":"{\\"Protocol\\":\\"grpc\\"}"}',
            "1.2.3.4:80",
            {"Protocol": "grpc"},
        ),
        # etcdctl put services/echo/x '{"Addr":"1.2.3.4:80"}'
        (b'{"Addr":"1.2.3.4:80"}', "1.2.3.4:80", {}),
        (b'{"Addr":"1.2.3.4:80","Op":null}', "1.2.3.4:80", {}),
        (b' {\n  "Addr": "1.2.3.4:80"\n}\n', "1.2.3.4:80", {}),
        (b'{"Addr":"1.2.3.4:80","Extra":{"x":1}}', "1.2.3.4:80", {}),
        (b'{"Addr":"x:1","Addr":"1.2.3.4:80"}', "1.2.3.4:80", {}),  # last wins, as in Go
        (b'{"Addr":"Host.Example:80"}', "Host.Example:80", {}),  # kept as stored
        (b'{"Addr":"\\u0031.2.3.4:80"}', "1.2.3.4:80", {}),
    ],
)
def test_decode_foreign_formats(value: bytes, address: str, metadata: dict[str, Any]) -> None:
    assert decode_value("k", value) == (address, metadata)


def test_decode_accepts_bytearray() -> None:
    value = bytearray(b'{"Addr":"1.2.3.4:80"}')
    assert decode_value("k", value) == ("1.2.3.4:80", {})  # type: ignore[arg-type]


def _deep_array(depth: int) -> bytes:
    return b'{"Addr":"1.2.3.4:80","x":' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


def test_decode_accepts_nesting_at_the_limit() -> None:
    assert decode_value("k", _deep_array(MAX_JSON_DEPTH)) == ("1.2.3.4:80", {})


def test_decode_ignores_brackets_inside_strings() -> None:
    value = json.dumps({"Addr": "1.2.3.4:80", "x": "[{" * 100 + '\\"[' * 50}).encode()
    assert decode_value("k", value) == ("1.2.3.4:80", {})


def test_deep_metadata_string_is_kept_raw() -> None:
    inner = "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1)
    value = json.dumps({"Addr": "1.2.3.4:80", "Metadata": inner}).encode()
    assert decode_value("k", value) == ("1.2.3.4:80", {"value": inner})


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (b"", "not valid JSON"),
        (b"\xff\xfe", "not valid UTF-8"),
        (b'{"Addr":"1.2.3.4:80","x":"\xc3"}', "not valid UTF-8 at byte 26"),
        (b"\xef\xbb\xbf" + b'{"Addr":"1.2.3.4:80"}', "not valid JSON"),  # BOM, refused by Go too
        (b"1.2.3.4:80", "not valid JSON"),
        (b"{Addr: '1.2.3.4:80'}", "not valid JSON"),
        (b'{"Addr":"1.2.3.4:80"', "not valid JSON"),
        (b'{"Addr":"1.2.3.4:80"} x', "not valid JSON"),
        (b'{"Addr":"1.2.3.4:80","w":NaN}', "not valid JSON"),
        (b'{"Addr":"1.2.3.4:80","w":-Infinity}', "not valid JSON"),
        (b'{"Addr":"1.2.3.4:80","w":1e400}', "not valid JSON"),
        (b'{"Addr":"1.2.3.4:80","w":' + b"1" * 5000 + b"}", "not valid JSON"),
        (b"null", "null, not a JSON object"),
        (b'"1.2.3.4:80"', "a string, not a JSON object"),
        (b'["1.2.3.4:80"]', "an array, not a JSON object"),
        (b"42", "a number, not a JSON object"),
        (b"true", "a boolean, not a JSON object"),
        (b"{}", "no Addr"),
        (b'{"addr":"1.2.3.4:80"}', "no Addr"),
        (b'{"Metadata":"x"}', "no Addr"),
        (b'{"Addr":null}', "Addr is null"),
        (b'{"Addr":80}', "Addr is a number"),
        (b'{"Addr":["1.2.3.4:80"]}', "Addr is an array"),
        (b'{"Addr":{"host":"h"}}', "Addr is an object"),
        (b'{"Addr":""}', "Addr is empty"),
        (b'{"Addr":"1.2.3.4"}', "missing port"),
        (b'{"Addr":"0.0.0.0:80"}', "unspecified"),
        (b'{"Addr":"[::]:80"}', "unspecified"),
        (b'{"Addr":"::1:80"}', "brackets"),
        (b'{"Addr":"http://1.2.3.4:80"}', "scheme"),
        (b'{"Addr":"1.2.3.4:80\\n"}', "control"),
        (b'{"Addr":"\\ud800:80"}', "control"),
        (b'{"Op":1,"Addr":"1.2.3.4:80"}', "Op is 1"),
        (b'{"Op":"0","Addr":"1.2.3.4:80"}', "Op is '0'"),
        (b'{"Op":0.0,"Addr":"1.2.3.4:80"}', "Op is 0.0"),
        (b'{"Op":false,"Addr":"1.2.3.4:80"}', "Op is False"),
        (b'{"Op":-1,"Addr":"1.2.3.4:80"}', "Op is -1"),
        (_deep_array(MAX_JSON_DEPTH + 1), "nested deeper than 32"),
        (b"[" * 100_000, "nested deeper than 32"),
        (b'{"a":' * 10_000 + b"1" + b"}" * 10_000, "nested deeper than 32"),
        (b'{"Addr":"1.2.3.4:80","x":"' + b"y" * MAX_VALUE_SIZE + b'"}', "over the"),
        (b" " * (MAX_VALUE_SIZE + 1), "over the"),
    ],
)
def test_decode_rejects_malformed(value: bytes, fragment: str) -> None:
    with pytest.raises(MalformedValueError) as info:
        decode_value("services/echo/x", value)
    assert fragment in info.value.reason
    assert info.value.key == "services/echo/x"


def test_decode_rejects_non_bytes() -> None:
    with pytest.raises(MalformedValueError, match="not bytes"):
        decode_value("k", '{"Addr":"1.2.3.4:80"}')  # type: ignore[arg-type]


def test_size_limit_is_checked_before_parsing() -> None:
    # Not JSON at all, so only a size check that runs first can name the size.
    with pytest.raises(MalformedValueError, match="over the"):
        decode_value("k", b"\xff" * (MAX_VALUE_SIZE + 1))


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)

addresses = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["1.2.3.4:80", "[::1]:80", "0.0.0.0:80", "h:0", "h", "h:1"]),
)


def _assert_only_malformed(value: bytes) -> None:
    with contextlib.suppress(MalformedValueError):
        decode_value("k", value)


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_decode_never_raises_other_errors_on_bytes(value: bytes) -> None:
    _assert_only_malformed(value)


@settings(max_examples=500)
@given(json_values)
def test_decode_never_raises_other_errors_on_json(document: Any) -> None:
    _assert_only_malformed(json.dumps(document).encode())


@settings(max_examples=500)
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "Op": json_values,
            "Addr": st.one_of(addresses, json_values),
            "Metadata": st.one_of(json_values, json_values.map(json.dumps)),
        },
    )
)
def test_decode_never_raises_other_errors_on_near_valid_objects(document: Any) -> None:
    _assert_only_malformed(json.dumps(document, ensure_ascii=False).encode("utf-8", "replace"))


@settings(max_examples=200)
@given(st.dictionaries(st.text(max_size=8), json_values, max_size=5))
def test_round_trip_property(metadata: dict[str, Any]) -> None:
    assert decode_value("k", encode_value("1.2.3.4:80", metadata)) == ("1.2.3.4:80", metadata)


# --- decode_instance -----------------------------------------------------------------


def test_decode_instance() -> None:
    instance = decode_instance(
        "services",
        b"services/echo/10.0.0.5:50051",
        encode_value("10.0.0.5:50051", {"zone": "a"}),
        mod_revision=42,
        lease=0x1234,
    )
    assert instance == Instance(
        service="echo",
        id="10.0.0.5:50051",
        address="10.0.0.5:50051",
        metadata={"zone": "a"},
        key="services/echo/10.0.0.5:50051",
        revision=42,
        lease=0x1234,
    )


@pytest.mark.parametrize(
    ("key", "fragment"),
    [
        (b"services/echo", "not of the form services/<service>/<id>"),
        (b"services/echo/a/b", "not of the form"),
        (b"other/echo/i1", "not of the form"),
        (b"services/echo/\xff", "not valid UTF-8"),
    ],
)
def test_decode_instance_rejects_keys(key: bytes, fragment: str) -> None:
    with pytest.raises(MalformedValueError, match=fragment):
        decode_instance("services", key, b'{"Addr":"1.2.3.4:80"}', 1, 0)


def test_decode_instance_rejects_values() -> None:
    with pytest.raises(MalformedValueError, match="no Addr") as info:
        decode_instance("services", b"services/echo/i1", b"{}", 1, 0)
    assert info.value.key == "services/echo/i1"


# --- Instance ------------------------------------------------------------------------


def make(
    key_id: str = "i1",
    address: str = "10.0.0.5:50051",
    metadata: dict[str, Any] | None = None,
    revision: int = 1,
    lease: int = 0,
) -> Instance:
    return Instance(
        service="echo",
        id=key_id,
        address=address,
        metadata=metadata or {},
        key=f"services/echo/{key_id}",
        revision=revision,
        lease=lease,
    )


def test_instance_metadata_is_a_read_only_copy() -> None:
    source = {"zone": "a"}
    instance = make(metadata=source)
    source["zone"] = "b"
    assert instance.metadata["zone"] == "a"
    with pytest.raises(TypeError):
        instance.metadata["zone"] = "c"  # type: ignore[index]


def test_instance_is_frozen() -> None:
    with pytest.raises(AttributeError):
        make().address = "x:1"  # type: ignore[misc]


def test_instance_equality_and_hash() -> None:
    a = make(metadata={"zone": "a", "tags": ["x"]})
    b = make(metadata={"tags": ["x"], "zone": "a"})
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b}) == 1
    assert a != make(metadata={"zone": "b", "tags": ["x"]})
    assert a != make(metadata={"zone": "a", "tags": ["x"]}, revision=2)


@pytest.mark.parametrize(
    ("metadata", "status"),
    [
        ({}, Status.UP),
        ({"status": "up"}, Status.UP),
        ({"status": "draining"}, Status.DRAINING),
        ({"status": "unhealthy"}, Status.UNHEALTHY),
        ({"status": "DRAINING"}, Status.UP),
        ({"status": "maintenance"}, Status.UP),
        ({"status": 1}, Status.UP),
    ],
)
def test_instance_status(metadata: dict[str, Any], status: Status) -> None:
    instance = make(metadata=metadata)
    assert instance.status is status
    assert instance.healthy is (status is Status.UP)
    if "status" in metadata:
        assert instance.metadata["status"] == metadata["status"]


@pytest.mark.parametrize(
    ("metadata", "weight"),
    [
        ({}, 1),
        ({"weight": 0}, 0),
        ({"weight": 5}, 5),
        ({"weight": -1}, 1),
        ({"weight": "5"}, 1),
        ({"weight": 2.5}, 1),
        ({"weight": True}, 1),
        ({"weight": None}, 1),
    ],
)
def test_instance_weight(metadata: dict[str, Any], weight: int) -> None:
    assert make(metadata=metadata).weight == weight


@pytest.mark.parametrize(
    ("metadata", "zone"),
    [({}, None), ({"zone": "eu-1a"}, "eu-1a"), ({"zone": ""}, None), ({"zone": 3}, None)],
)
def test_instance_zone(metadata: dict[str, Any], zone: str | None) -> None:
    assert make(metadata=metadata).zone == zone


def test_instance_to_dict_is_json() -> None:
    instance = make(metadata={"zone": "a", "tags": ["x"]}, revision=7, lease=9)
    data = instance.to_dict()
    assert data == {
        "service": "echo",
        "id": "i1",
        "address": "10.0.0.5:50051",
        "metadata": {"zone": "a", "tags": ["x"]},
    }
    assert json.loads(json.dumps(data)) == data


def test_enums_are_strings() -> None:
    assert isinstance(Status.DRAINING, str)
    assert Status("draining") is Status.DRAINING
    assert str(Status.UNHEALTHY) == "unhealthy"
    assert [e.value for e in EventType] == ["added", "updated", "removed"]


# --- diff ----------------------------------------------------------------------------


def by_key(*instances: Instance) -> dict[str, Instance]:
    return {instance.key: instance for instance in instances}


def test_diff_empty() -> None:
    assert diff({}, {}) == []


def test_diff_identical() -> None:
    state = by_key(make("a"), make("b"))
    assert diff(state, dict(state)) == []


def test_diff_added_and_removed() -> None:
    a, b = make("a"), make("b")
    assert diff({}, by_key(a)) == [ChangeEvent(EventType.ADDED, a, None)]
    assert diff(by_key(a, b), by_key(b)) == [ChangeEvent(EventType.REMOVED, a, None)]


@pytest.mark.parametrize(
    "changed",
    [
        {"address": "10.0.0.6:50051"},
        {"metadata": {"status": "draining"}},
        {"metadata": {"zone": "a", "weight": 2}},
    ],
)
def test_diff_updated(changed: dict[str, Any]) -> None:
    old = make("a", metadata={"zone": "a"})
    fields: dict[str, Any] = {"metadata": {"zone": "a"}, "revision": 2, **changed}
    new = make("a", **fields)
    assert diff(by_key(old), by_key(new)) == [ChangeEvent(EventType.UPDATED, new, old)]


def test_diff_ignores_revision_and_lease_alone() -> None:
    old = make("a", metadata={"zone": "a"}, revision=1, lease=1)
    new = make("a", metadata={"zone": "a"}, revision=9, lease=2)
    assert diff(by_key(old), by_key(new)) == []


def test_diff_order() -> None:
    old = by_key(make("d"), make("b"), make("e"), make("c", address="1.1.1.1:1"), make("f"))
    new = by_key(
        make("f", address="2.2.2.2:2"),
        make("c", address="1.1.1.2:1"),
        make("z"),
        make("a"),
        make("e"),
    )
    events = [(event.type, event.instance.id) for event in diff(old, new)]
    assert events == [
        (EventType.REMOVED, "b"),
        (EventType.REMOVED, "d"),
        (EventType.UPDATED, "c"),
        (EventType.UPDATED, "f"),
        (EventType.ADDED, "a"),
        (EventType.ADDED, "z"),
    ]


def test_diff_removed_carries_last_known_instance() -> None:
    last = make("a", metadata={"status": "draining"}, revision=5)
    (event,) = diff(by_key(last), {})
    assert event.type is EventType.REMOVED
    assert event.instance is last
    assert event.previous is None


class _Slow(str):
    """A str subclass skips parse_address's IPv4 fast path: the reference to match."""


def _outcome(address: str) -> object:
    try:
        return parse_address(address)
    except InvalidAddressError as exc:
        return type(exc)


@given(
    st.lists(st.integers(0, 300), min_size=4, max_size=4),
    st.integers(0, 70000),
    st.lists(st.booleans(), min_size=5, max_size=5),
)
def test_the_ipv4_fast_path_agrees_with_the_full_check(
    octets: list[int], port: int, zeros: list[bool]
) -> None:
    parts = [("0" if pad else "") + str(o) for o, pad in zip(octets, zeros, strict=False)]
    address = ".".join(parts) + ":" + ("0" if zeros[4] else "") + str(port)
    assert _outcome(address) == _outcome(_Slow(address))


def _value_outcome(value: bytes | bytearray) -> object:
    try:
        address, metadata = decode_value("k", value)
    except MalformedValueError:
        return MalformedValueError
    return address, dict(metadata)


_TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=12) | st.sampled_from(
    ['"', "\\", "\\u0000", "\n", "é", "\x7f", 'a\\"b']
)


@given(
    st.sampled_from(["10.0.0.1:80", "localhost:8080", "[::1]:443", "x:0", "a b:1", "h:99999"]),
    st.none() | st.dictionaries(_TEXT, _TEXT | st.integers() | st.booleans(), max_size=3),
    st.integers(0, 120),
    st.binary(max_size=3),
)
@settings(max_examples=400)
def test_the_canonical_value_fast_path_agrees_with_the_general_one(
    address: str, metadata: dict[str, object] | None, at: int, junk: bytes
) -> None:
    """A bytearray takes the general path: every value, well-formed or damaged,
    must read the same both ways."""
    metadata_text = None if metadata is None else json.dumps(metadata, ensure_ascii=False)
    document = {"Op": 0, "Addr": address, "Metadata": metadata_text}
    value = json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()
    for candidate in (value, value[:at] + junk + value[at:]):
        assert _value_outcome(candidate) == _value_outcome(bytearray(candidate))
