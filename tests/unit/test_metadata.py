"""Reserved metadata keys: refused with their name when a writer gets the type wrong."""

from __future__ import annotations

from typing import Any

import pytest

from etcdisco import RESERVED_METADATA, AsyncClient, ConfigError
from etcdisco._metadata import check_metadata, parse_metadata_text


@pytest.mark.parametrize(
    "metadata",
    [
        {"weight": 0},
        {"weight": 7},
        {"zone": "eu-1"},
        {"status": "draining"},
        {"lb": "ring_hash", "hash_header": "X-User"},
        {"version": 1.10, "flag": True, "anything": None},
    ],
)
def test_good_values_pass(metadata: dict[str, Any]) -> None:
    check_metadata(metadata)


@pytest.mark.parametrize(
    ("metadata", "fragment"),
    [
        ({"weight": 2.5}, "'weight' must be an integer >= 0, not 2.5"),
        ({"weight": "heavy"}, "'weight' must be an integer >= 0, not \"heavy\""),
        ({"weight": -1}, "'weight' must be an integer >= 0, not -1"),
        ({"weight": True}, "'weight' must be an integer >= 0, not true"),
        ({"zone": ""}, "'zone' must be a non-empty string"),
        ({"zone": 3}, "'zone' must be a non-empty string"),
        ({"status": "gone"}, "'status' must be one of 'up', 'draining', 'unhealthy'"),
        ({"lb": "maglev"}, "'lb' must be one of 'round_robin', 'ring_hash'"),
        ({"hash_header": "grpc-x"}, "'hash_header' must be a gRPC metadata key"),
    ],
)
def test_wrong_types_are_refused_by_name(metadata: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_metadata(metadata)
    assert fragment in str(info.value)


async def test_register_refuses_before_writing() -> None:
    # An unreachable endpoint: had anything been written, the call would fail there.
    async with AsyncClient("127.0.0.1:1", timeout=0.5) as client:
        with pytest.raises(ConfigError, match="'weight'"):
            await client.register("echo", "127.0.0.1:9000", metadata={"weight": "heavy"})


def test_command_line_text_is_a_string_except_typed_reserved_keys() -> None:
    assert parse_metadata_text("version", "1.10") == "1.10"
    assert parse_metadata_text("flag", "true") == "true"
    assert parse_metadata_text("weight", "5") == 5
    assert parse_metadata_text("weight", "heavy") == "heavy"  # refused by the check


def test_every_reserved_key_is_documented() -> None:
    for key in RESERVED_METADATA.values():
        assert key.kind and key.meaning
