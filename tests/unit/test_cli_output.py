"""``instances_json`` (the fast path of ``etcdisco --json list``) writes exactly what
``instance_json`` writes for every kind of instance."""

from __future__ import annotations

import dataclasses
import json

from etcdisco._model import Override, decode_instance, encode_value
from etcdisco.cli._common import instance_json, instances_json


def test_fast_listing_is_the_same_text_as_one_instance_at_a_time() -> None:
    values = [
        ("svc-a", "10.0.0.1:80", {"zone": "z1", "version": "1.0"}),
        ("svc-a", "10.0.0.2:80", {"zone": "z1", "version": "1.0"}),  # shared metadata
        ("svc-b", "[::1]:81", {"naïve": "✓", "quote": 'a"b', "n": 1.5, "flag": True}),
        ("svc-b", "10.0.0.3:82", {"status": "draining", "weight": 3}),
        ("svc-c", "10.0.0.4:83", {}),
    ]
    instances = [
        decode_instance("services", f"services/{s}/{a}".encode(), encode_value(a, md), 5, 7)
        for s, a, md in values
    ]
    instances.append(dataclasses.replace(instances[0], suspect=True))
    instances.append(
        dataclasses.replace(
            instances[1],
            override=Override(service="svc-a", instance_id="10.0.0.2:80", disabled=True),
        )
    )
    fast = list(instances_json(instances))
    assert fast == [instance_json(i) for i in instances]
    assert [json.loads(line)["status"] for line in fast] == [
        "up", "up", "up", "draining", "up", "suspect", "disabled",
    ]  # fmt: skip
