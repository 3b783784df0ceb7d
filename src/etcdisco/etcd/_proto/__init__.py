"""Generated etcd v3 API modules; regenerate with scripts/gen_proto.py."""
