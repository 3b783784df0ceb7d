#!/usr/bin/env bash
# The full check, as CI runs it: setup, lint, type check, tests, soaks under faults
# (tests/soak: 2 minutes on the newest etcd, 1 on 3.4, 1 with auth on) and a quick run
# of every benchmark.
# Extra arguments go to pytest (e.g. scripts/test.sh -k etcd3.5 -x).
# Every step runs even when an earlier one fails, so one run shows every problem;
# the exit status is non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh || { echo "test.sh: setup failed" >&2; exit 1; }

failed=()
step() {
    local name=$1
    shift
    printf '\n==== %s: %s\n' "$name" "$*"
    if ! "$@"; then
        failed+=("$name")
    fi
}

step ruff .venv/bin/ruff check .
step ruff-format .venv/bin/ruff format --check .
step mypy .venv/bin/mypy
# The documentation site: pages, API reference (docstrings) and CLI reference (the click
# tree) must build without a warning. NO_MKDOCS_2_WARNING: mkdocs-material's banner.
step docs env NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet \
    --site-dir "${TMPDIR:-/tmp}/etcdisco-site"
step pytest .venv/bin/pytest -q -p no:cacheprovider "$@"
# The whole-system runs belong to the full check only; a narrowed run
# (scripts/test.sh -k ...) is for iterating on tests.
if [ "$#" -eq 0 ]; then
    step soak .venv/bin/python -m tests.soak --duration 120
    step soak-etcd3.4 .venv/bin/python -m tests.soak --duration 60 --etcd 3.4
    step soak-auth .venv/bin/python -m tests.soak --duration 60 --auth
    step benchmarks-quick .venv/bin/python benchmarks/run_all.py --quick \
        --out "${TMPDIR:-/tmp}/etcdisco-bench-quick.md"
fi

if [ "${#failed[@]}" -gt 0 ]; then
    printf '\ntest.sh: FAILED: %s\n' "${failed[*]}" >&2
    exit 1
fi
printf '\ntest.sh: all steps passed\n'
