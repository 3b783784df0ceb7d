"""HTTP servers through a rolling restart: failed requests per restart, drain-first
(etcdisco.uvicorn) against lifespan-only (the registration removed in the app's
lifespan teardown, which uvicorn runs after closing its listeners).

    .venv/bin/python benchmarks/bench_http_server.py [--quick] [--out PATH]

Servers: 3 uvicorn processes of the test app (tests/asgi_apps/app.py), each started as

- drain-first: ``etcdisco serve hello --app tests.asgi_apps.app:app --quiet-period 0.5``;
- lifespan-only: ``uvicorn tests.asgi_apps.app:app`` with ``etcdisco.asgi.lifespan`` in
  the app.

Load: 4 callers on one loop, each a GET then a POST /orders (not idempotent) and so on,
10 ms apart, through ``etcdisco.http.AsyncClient``, with no retry (``max_attempts=1``,
what most HTTP clients do) and with its default retries (a request that never reached
an instance goes to another; a POST that did is never sent again). A rolling restart:
SIGTERM to each server in turn, a replacement started once it has exited; a request
fails when it raised or did not answer 200. Failures are counted per restart (the
requests started between one SIGTERM and the next).

Prints the markdown section, or writes it to --out. Not a test: numbers only (the
tests hold drain-first to zero: tests/integration/test_asgi_servers.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn

import etcdisco
from etcdisco.testing import LocalEtcd

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from _common import command_line, load_average, write_section  # noqa: E402

from tests.asgi_apps.fleet import (  # noqa: E402
    Fleet,
    Load,
    Registry,
    http_client,
    names,
    rolling_restart,
)

SERVICE = "hello"
SERVERS = 3
MODES = ("drain-first", "lifespan")
CLIENTS = {"no retry": {"max_attempts": 1}, "etcdisco.http retries": {}}


@dataclass
class Result:
    mode: str
    client: str
    failed_per_restart: list[int] = field(default_factory=list)
    requests: int = 0
    failed_get: int = 0
    failed_post: int = 0
    errors: Counter[str] = field(default_factory=Counter)


async def one_round(endpoint: str, mode: str, options: dict[str, int], result: Result) -> None:
    async with etcdisco.AsyncClient(endpoint) as client, client.discover(SERVICE) as cache:
        await cache.wait_ready(10)
        registry = Registry(cache)
        fleet = Fleet(endpoint, SERVICE, registry, mode)
        try:
            servers = [await fleet.start(name) for name in names(SERVERS)]
            async with http_client(client, SERVICE, **options) as http:
                load = Load(http, SERVICE)
                load.start()
                try:
                    for server in servers:
                        await load.served_by(server.name)
                    restart = await rolling_restart(fleet, load, servers)
                finally:
                    await load.stop()
            for server in fleet.servers:
                if server.proc.proc.returncode is None:
                    await fleet.stop(server)
        finally:
            await fleet.close()
    result.failed_per_restart += restart.failed_per_restart
    result.requests += len(load.records)
    for record in load.failures():
        if record.method == "POST":
            result.failed_post += 1
        else:
            result.failed_get += 1
        result.errors[(record.error or "?").split(":")[0]] += 1


async def measure(endpoint: str, rounds: int) -> list[Result]:
    results = []
    for mode in MODES:
        for label, options in CLIENTS.items():
            result = Result(mode, label)
            for _ in range(rounds):
                await one_round(endpoint, mode, options, result)
            results.append(result)
            print(f"{mode}, {label}: {result.failed_per_restart}", file=sys.stderr, flush=True)
    return results


def run(args: argparse.Namespace) -> str:
    load = load_average()
    rounds = 1 if args.quick else 3
    with LocalEtcd() as member:
        results = asyncio.run(measure(member.endpoint, rounds))
        version = member.version

    rows = []
    for r in results:
        per = r.failed_per_restart
        errors = ", ".join(f"{kind} {n}" for kind, n in r.errors.most_common()) or "-"
        rows.append(
            f"| {r.mode} | {r.client} | {len(per)} | {r.requests:,} | {r.failed_get} "
            f"| {r.failed_post} | **{statistics.mean(per):.1f}** / {max(per)} "
            f"| {' '.join(map(str, per))} | {errors} |"
        )
    drain_first = [r for r in results if r.mode == "drain-first"]
    metrics = {
        "http_server": {
            "drain_first_failed": sum(sum(r.failed_per_restart) for r in drain_first),
            "drain_first_restarts": sum(len(r.failed_per_restart) for r in drain_first),
            "lifespan_failed_per_restart": {
                r.client: round(statistics.mean(r.failed_per_restart), 2)
                for r in results
                if r.mode == "lifespan"
            },
        }
    }
    smoke = " (smoke run)" if args.quick else ""
    lines = [
        "## HTTP servers through a rolling restart",
        "",
        f"Command: `{command_line('bench_http_server.py')}`{smoke}; etcd {version}, 1-min "
        f"load {load:.2f} before; uvicorn {uvicorn.__version__}. {SERVERS} uvicorn processes "
        f"restarted one after the other, {rounds} round(s) per row; 4 callers through "
        "`etcdisco.http.AsyncClient`, alternating GET and POST (not idempotent), 10 ms "
        "apart. Drain-first: `etcdisco serve` (status `draining`, no request for 0.5 s, "
        "then uvicorn closes its listeners, then deregister). Lifespan-only: plain uvicorn, "
        "`etcdisco.asgi.lifespan` deregistering in its teardown (after the listeners "
        "closed).",
        "",
        "| path | client | restarts | requests | failed GET | failed POST "
        "| failed per restart (mean / max) | per restart | errors |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"<!-- etcdisco-metrics {json.dumps(metrics)} -->",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: one round")
    parser.add_argument("--out", type=Path, help="write the markdown section here")
    args = parser.parse_args()
    os.environ.setdefault("NO_PROXY", "*")
    write_section(run(args), args.out)


if __name__ == "__main__":
    main()
