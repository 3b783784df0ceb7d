"""Every benchmark, one after the other, into one markdown file.

    .venv/bin/python benchmarks/run_all.py [--quick] [--out PATH]

Runs propagation.py, scale.py, registry_size.py, bench_pickers.py, bench_health.py,
bench_stalls.py, bench_grpc.py, bench_xds_fanout.py, bench_http.py and
bench_http_server.py, each in a process of its own (with --quick when quick, and --out a
temporary file), then writes one file: a header (date, machine, Python, etcd, load, the
command), every script's section in order, and the project's goals with the measured
values. A script that fails or is missing is reported in the file and makes the exit
status 1; the others still run.

--out defaults to benchmarks/RESULTS.md for a full run. A quick run (a smoke test, as in
scripts/test.sh) never writes that file by default: without --out it writes a temporary
file and prints its path.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import registry_size
from _common import command_line, load_average

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SCRIPTS = (
    "propagation.py",
    "scale.py",
    "registry_size.py",
    "bench_pickers.py",
    "bench_health.py",
    "bench_stalls.py",
    "bench_grpc.py",
    "bench_xds_fanout.py",
    "bench_http.py",
    "bench_http_server.py",
)
METRICS = re.compile(r"<!-- etcdisco-metrics (.*?) -->")
# Generous: a hung script must not hang CI, a slow machine must not fail a full run
# (bench_grpc alone may first wait up to 10 minutes for a quiet machine).
TIME_LIMIT = {True: 300.0, False: 3600.0}
GOAL_RATIO = 2.0  # propagation p50 within 2x of the raw etcd floor
GOAL_PICK_NS = 5000.0  # round robin pick under 5 us (median) at 1,000 instances
GOAL_HTTP_RATIO = 0.9  # etcdisco.http requests/s at least 0.9x a plain httpx client's


@dataclass
class Outcome:
    script: str
    status: str = "not run"
    seconds: float = 0.0
    section: str = ""
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=40))

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def run_script(script: str, quick: bool, out: Path) -> Outcome:
    outcome = Outcome(script)
    path = HERE / script
    if not path.exists():
        outcome.status = "missing"
        return outcome
    argv = [sys.executable, str(path), *(["--quick"] if quick else []), "--out", str(out)]
    print(f"\n==== {shlex.join(argv)}", flush=True)
    started = time.monotonic()
    # A session of its own: on a timeout the whole group (etcd, workers) goes.
    proc = subprocess.Popen(
        argv,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def tee() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace")
            outcome.tail.append(line.rstrip("\n"))
            sys.stdout.write(f"  {line}")
            sys.stdout.flush()

    reader = threading.Thread(target=tee, daemon=True)
    reader.start()
    try:
        rc = proc.wait(TIME_LIMIT[quick])
    except subprocess.TimeoutExpired:
        rc = None
        stop_group(proc)
    finally:
        if proc.poll() is None:  # interrupted: take the script's processes along
            stop_group(proc)
    reader.join(10)
    outcome.seconds = time.monotonic() - started
    text = out.read_text() if out.exists() else ""
    if rc is None:
        outcome.status = f"timed out after {TIME_LIMIT[quick]:.0f} s"
    elif rc != 0:
        outcome.status = f"failed (exit status {rc})"
    elif not text.strip():
        outcome.status = "failed (wrote no section)"
    else:
        outcome.status = "ok"
        outcome.section = text.strip()
    return outcome


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
            return


def etcd_versions(outcomes: list[Outcome]) -> str:
    used = sorted({v for o in outcomes for v in re.findall(r"etcd (\d+\.\d+\.\d+)", o.section)})
    try:
        from etcdisco.testing import default_etcd_binary, etcd_version

        default = f"etcd {etcd_version(default_etcd_binary())} (default binary)"
    except Exception as exc:  # the header must not cost the results
        default = f"default etcd binary not found: {exc}"
    return (", ".join(f"etcd {v}" for v in used) + " in the sections; " if used else "") + default


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def header(quick: bool, load: float, outcomes: list[Outcome], started: str) -> list[str]:
    lines = [
        "# etcdisco benchmarks" + (" (smoke run)" if quick else ""),
        "",
        f"- Date: {started}",
        f"- Machine: {os.cpu_count()} cores ({cpu_model()}), {platform.platform()}",
        f"- Python {platform.python_version()} ({platform.python_implementation()})",
        f"- etcd: {etcd_versions(outcomes)}",
        f"- 1-min load average before: {load:.2f}",
        f"- Command: `{command_line('run_all.py')}` (each script runs alone, one after the other)",
    ]
    if quick:
        lines.append("- A smoke run: counts too small to read much into.")
    lines += ["", "| script | status | seconds |", "|---|---|---|"]
    lines += [f"| {o.script} | {o.status} | {o.seconds:.0f} |" for o in outcomes]
    return [*lines, ""]


def failed_section(o: Outcome) -> str:
    lines = [f"## {o.script}: {o.status.upper()}", ""]
    if o.status == "missing":
        lines.append(f"benchmarks/{o.script} does not exist.")
    if o.tail:
        lines += ["Last lines of its output:", "", "```", *o.tail, "```"]
    return "\n".join(lines)


def metrics(outcomes: list[Outcome]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for o in outcomes:
        for blob in METRICS.findall(o.section):
            with contextlib.suppress(ValueError):
                merged.update(json.loads(blob))
    return merged


def goals(found: dict[str, Any]) -> list[str]:
    lines = ["## Goals", ""]
    prop = found.get("propagation")
    if not prop:
        lines.append("- Propagation p50 within 2x of the raw etcd floor: NOT MEASURED")
    else:
        parts, met = [], True
        for k, m in prop.items():
            thin = m["etcdisco_p50_ms"] / m["thin_p50_ms"]
            ctl = m["etcdisco_p50_ms"] / m["etcdctl_p50_ms"]
            met = met and max(thin, ctl) <= GOAL_RATIO
            text = (
                f"K={k}: {m['etcdisco_p50_ms']:.2f} ms, {thin:.2f}x the thin-client floor "
                f"({m['thin_p50_ms']:.2f} ms), {ctl:.2f}x the etcdctl floor "
                f"({m['etcdctl_p50_ms']:.2f} ms)"
            )
            if "etcdisco_all_k_p50_ms" in m:
                own = m["etcdisco_all_k_p50_ms"]
                text += (
                    f"; until all K have it: {own:.2f} ms, "
                    f"{own / m['thin_all_k_p50_ms']:.2f}x / "
                    f"{own / m['etcdctl_all_k_p50_ms']:.2f}x"
                )
            parts.append(text)
        lines.append(
            f"- Propagation p50 (register -> visible, per watcher) within {GOAL_RATIO:g}x "
            f"of the raw etcd floor, both floors, every K: **{'PASS' if met else 'MISS'}**"
        )
        lines += [f"  - {part}" for part in parts]
    pick = found.get("pickers", {}).get("round_robin ns/pick @1000")
    if pick is None:
        lines.append("- Round-robin pick under 5 us (median) at 1,000 instances: NOT MEASURED")
    else:
        verdict = "PASS" if pick < GOAL_PICK_NS else "MISS"
        lines.append(
            f"- Round-robin pick under {GOAL_PICK_NS / 1000:g} us (median) at 1,000 "
            f"instances: **{verdict}** ({pick / 1000:.3f} us)"
        )
    http = found.get("http")
    if not http:
        lines.append(
            f"- HTTP through the registry >= {GOAL_HTTP_RATIO:g}x plain httpx requests/s "
            "(sync and async): NOT MEASURED"
        )
    else:
        sync, aio = http["sync_ratio"], http["async_ratio"]
        verdict = "PASS" if min(sync, aio) >= GOAL_HTTP_RATIO else "MISS"
        lines.append(
            f"- HTTP through the registry >= {GOAL_HTTP_RATIO:g}x plain httpx requests/s "
            f"(sync and async): **{verdict}** (sync {sync:.2f}x, async {aio:.2f}x; client CPU "
            f"{http['sync_cpu_overhead_us']:+.0f} / {http['async_cpu_overhead_us']:+.0f} us "
            "per request)"
        )
    server = found.get("http_server")
    if not server:
        lines.append(
            "- HTTP servers: 0 failed requests through a drain-first rolling restart: NOT MEASURED"
        )
    else:
        failed, restarts = server["drain_first_failed"], server["drain_first_restarts"]
        lifespan = ", ".join(
            f"{client} {mean:g}" for client, mean in server["lifespan_failed_per_restart"].items()
        )
        lines.append(
            "- HTTP servers: 0 failed requests through a drain-first rolling restart: "
            f"**{'PASS' if failed == 0 else 'MISS'}** ({failed} in {restarts} restarts; "
            f"lifespan-only, failed per restart: {lifespan})"
        )
    size = found.get("registry_size")
    if not size:
        lines.append("- Registry size (100,000 instances) next to etcd's own tools: NOT MEASURED")
    else:
        lines.append("- Registry size, next to etcd's own tools (see its section):")
        lines += [f"  {line}" for line in registry_size.goal_lines(size)]
    fanout = found.get("xds_fanout")
    if not fanout:
        lines.append(
            "- xDS: every one of 500 ADS streams has an etcd change within 2x one stream's "
            "time + 100 ms: NOT MEASURED"
        )
    else:
        one, many, plane = fanout["one"], fanout["many"], fanout["control_plane"]
        limit = 2 * one["max_ms"] + 100
        lines.append(
            f"- xDS: every one of {many['streams']} ADS streams has an etcd change within 2x "
            f"one stream's time + 100 ms: **{'PASS' if many['max_ms'] <= limit else 'MISS'}** "
            f"({many['max_ms']:.0f} ms, limit {limit:.0f} ms; control plane "
            f"{plane['rss_all_streams_mib']:g} MiB RSS with every stream, "
            f"{many['cpu_ms']:.0f} ms CPU per change)"
        )
    return [*lines, ""]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every script's smoke run")
    parser.add_argument(
        "--out", type=Path, help="the file to write (full: benchmarks/RESULTS.md; quick: a temp)"
    )
    args = parser.parse_args()
    out: Path = args.out
    if out is None:
        if args.quick:
            fd, name = tempfile.mkstemp(prefix="etcdisco-bench-quick-", suffix=".md")
            os.close(fd)
            out = Path(name)
        else:
            out = HERE / "RESULTS.md"
    started = time.strftime("%Y-%m-%d %H:%M %Z")
    load = load_average()
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="etcdisco-bench-") as tmp:
        for script in SCRIPTS:
            section_file = Path(tmp) / f"{Path(script).stem}.md"
            outcomes.append(run_script(script, args.quick, section_file))
    parts = header(args.quick, load, outcomes, started)
    for o in outcomes:
        parts += [o.section if o.ok else failed_section(o), ""]
    parts += goals(metrics(outcomes))
    out.write_text("\n".join(parts).rstrip("\n") + "\n")
    failed = [o for o in outcomes if not o.ok]
    print(f"\nrun_all: wrote {out}")
    for o in outcomes:
        print(f"run_all: {o.script}: {o.status} ({o.seconds:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
