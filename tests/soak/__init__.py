"""A soak of etcdisco under faults: `python -m tests.soak --duration SECONDS`.

A 3-member etcd cluster, instance processes that register a fixed fleet, and watching
processes that each follow the whole registry, all real and on loopback. One fault at
a time (etcd member crash, stalled member, partitioned member, stopped registrant, key
deleted from outside, compaction, crashed registrant, operations issued during an
outage, or two of these at once) is injected and healed; after each heal the registry
and every cache must converge to the expected state within a stated bound, and a
sampler checks invariants meanwhile. See ``_run`` for the timeline, ``_faults`` for the
faults, ``_ops`` for operations and their promises and ``_invariants`` for the checks.
"""
