"""A soak of etcdisco under faults: `python -m tests.soak --duration SECONDS`.

A 3-member etcd cluster, instance processes that register a fixed fleet, and watching
processes that each follow the whole registry, all real and on loopback. One fault at
a time (etcd member crash, stopped registrant, key deleted from outside, compaction,
crashed registrant) is injected and healed; after each heal the registry and every
cache must converge to the expected state within a stated bound, and a sampler checks
invariants meanwhile. See ``_run`` for the timeline and ``_invariants`` for the checks.
"""
