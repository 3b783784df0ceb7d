"""The README's reserved-metadata table says what the code enforces."""

from __future__ import annotations

import re
from pathlib import Path

from etcdisco import RESERVED_METADATA

README = Path(__file__).resolve().parents[2] / "README.md"


def test_reserved_metadata_table_matches_the_code() -> None:
    text = README.read_text()
    section = text.split("## Metadata", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| ([^|]+) \|", section, re.M)
    assert {name for name, _ in rows} == set(RESERVED_METADATA)
    for name, kind in rows:
        assert kind.strip().replace("`", "") == RESERVED_METADATA[name].kind, name
