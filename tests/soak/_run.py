"""The soak's timeline: set up, warm up, inject faults until the duration is spent,
check the end state, stop everything gracefully, tear down (always)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from etcdisco import EtcdError
from etcdisco._local_etcd import LocalEtcdCluster, LocalEtcdError

from ._children import Child, ChildError, ChildPaused
from ._etcd_view import EtcdView, Registry
from ._faults import FaultInjector, process_index
from ._invariants import (
    Ledger,
    Persistence,
    all_duplicate_problems,
    cache_mismatches,
    convergence_problems,
    lease_problems,
    registry_mismatches,
    stranger_problems,
)
from ._layout import INSTANCE_PROCESSES, WATCHER_PROCESSES, instances_of
from ._report import LeakRow, Results

# What a child may grow by between its baseline and the end without it counting as a
# leak. After failovers a child's gRPC channels may be connected to every etcd member
# (a socket each), and a stream may be between two attempts when measured; measured
# runs grew by at most one fd and one task. Anything that grows per fault exceeds this.
LEAK_SLACK = {"fds": 6, "os_threads": 4, "py_threads": 1, "tasks": 2}
CHILD_START_TIMEOUT = 60.0
CHILD_ANSWER_TIMEOUT = 10.0
SAMPLE_EVERY = 0.5
# The whole soak (setup to graceful stop) gets the duration plus this; teardown after.
TIME_BUDGET_MARGIN = 60.0


class SoakAborted(Exception):
    """Something that makes going on pointless (a child died, etcd did not restart)."""


@dataclasses.dataclass(frozen=True)
class Options:
    duration: float
    seed: int
    etcd: str | None = None
    ttl: int = 3


@dataclasses.dataclass
class Observation:
    registry: Registry
    statuses: dict[str, dict[str, Any]]
    snapshots: dict[str, dict[str, Any]]


class Soak:
    def __init__(self, options: Options) -> None:
        self.options = options
        self.ttl = options.ttl
        self.bound = 2.0 * options.ttl + 10.0
        self.began = time.monotonic()
        self.ledger = Ledger(self.began)
        self.rng = random.Random(options.seed)
        self.log_dir = Path(tempfile.mkdtemp(prefix="etcdisco-soak-"))
        self.cluster: LocalEtcdCluster
        self.view: EtcdView
        self.instances: list[Child] = []
        self.watchers: list[Child] = []
        self.injector = FaultInjector(self, self.rng)
        self.baselines: dict[str, dict[str, int]] = {}
        self._presence = Persistence(self.bound)
        self._caches = Persistence(self.bound)
        self.results = Results(
            duration=options.duration,
            seed=options.seed,
            ttl=options.ttl,
            bound=self.bound,
            ledger=self.ledger,
            faults=self.injector.records,
            log_dir=self.log_dir,
            leak_slack=LEAK_SLACK,
        )

    @property
    def children(self) -> list[Child]:
        return [*self.instances, *self.watchers]

    def note(self, message: str) -> None:
        print(f"[{self.ledger.now():7.1f}s] {message}", flush=True)

    # -- the timeline -------------------------------------------------------------------

    async def run(self) -> Results:
        try:
            await self._run_bounded()
        except asyncio.CancelledError:
            self.results.aborted = "interrupted (SIGINT/SIGTERM)"
            raise
        finally:
            self.results.wall_seconds = self.ledger.now()
            await self._teardown()
        return self.results

    async def _run_bounded(self) -> None:
        try:
            async with asyncio.timeout(self.options.duration + TIME_BUDGET_MARGIN):
                await self._setup()
                await self._warm_up()
                async with asyncio.TaskGroup() as tasks:
                    sampler = tasks.create_task(self._sample_forever())
                    await self._fault_phase()
                    await self._final_checks()
                    sampler.cancel()
                await self._graceful_stop()
        except* SoakAborted as group:
            self.results.aborted = "; ".join(str(exc) for exc in group.exceptions)
        except* EtcdError as group:
            self.results.aborted = "the supervisor's etcd call failed: " + "; ".join(
                str(exc) for exc in group.exceptions
            )
        except* TimeoutError:
            self.results.aborted = (
                f"the soak overran its time budget (duration + {TIME_BUDGET_MARGIN:.0f}s)"
            )
        except* Exception as group:
            # A fault in the soak itself still ends with a report and a teardown.
            self.results.aborted = "the soak itself failed:\n" + "".join(
                "".join(traceback.format_exception(exc)) for exc in group.exceptions
            )

    async def _setup(self) -> None:
        try:
            self.cluster = LocalEtcdCluster(3, binary=self.options.etcd)
        except LocalEtcdError as exc:
            raise SoakAborted(f"no etcd to run: {exc}") from None
        self.results.etcd_version = self.cluster.version
        self.results.etcd_binary = str(self.cluster.binary)
        self.note(f"starting 3 etcd {self.cluster.version} members ({self.cluster.binary})")
        try:
            await asyncio.to_thread(self.cluster.start)
        except LocalEtcdError as exc:
            raise SoakAborted(f"the etcd cluster did not start: {exc}") from None
        self.view = EtcdView(self.cluster)
        endpoints = ",".join(self.cluster.endpoints)
        self.instances = [
            Child(
                f"instance{p}",
                "instance",
                ["--endpoints", endpoints, "--ttl", str(self.ttl), "--process", str(p)],
                self.log_dir,
            )
            for p in range(INSTANCE_PROCESSES)
        ]
        self.watchers = [
            Child(
                f"watcher{w}",
                "watcher",
                ["--endpoints", endpoints, "--name", f"watcher{w}"],
                self.log_dir,
            )
            for w in range(WATCHER_PROCESSES)
        ]
        self.note(
            f"starting {len(self.instances)} instance processes "
            f"({len(instances_of(0))} instances each, ttl {self.ttl}s) and "
            f"{len(self.watchers)} watching processes; logs in {self.log_dir}"
        )
        await asyncio.gather(*(self.start_child(c) for c in self.children))

    async def start_child(self, child: Child) -> None:
        self.baselines.pop(child.name, None)
        try:
            await child.start(CHILD_START_TIMEOUT)
        except ChildError as exc:
            self.ledger.fail("children_alive", f"{child.name} did not start: {exc}")
            raise SoakAborted(f"{child.name} did not start") from None

    async def _warm_up(self) -> None:
        took = await self.converge("warm-up: every instance registered and cached", 60.0)
        if took is None:
            raise SoakAborted("the fleet never converged after start")
        # A few keepalive rounds and watch progress before anything counts as a baseline.
        await asyncio.sleep(self.ttl)
        await self._take_missing_baselines()
        self.results.watch_start = await self._watch_totals()
        self.results.leases_start = len(await self.view.leases())

    async def _fault_phase(self) -> None:
        deadline = time.monotonic() + self.options.duration
        self.note(f"injecting faults for {self.options.duration:.0f}s (seed {self.options.seed})")
        while True:
            # Quiet time between faults, for the sampler to look at a healthy system.
            await asyncio.sleep(self.rng.uniform(0.5, 2.0))
            if time.monotonic() >= deadline:
                return
            await self._take_missing_baselines()
            try:
                await self.injector.inject(self.injector.next_kind())
            except LocalEtcdError as exc:
                raise SoakAborted(f"etcd member could not be restarted: {exc}") from None

    async def _final_checks(self) -> None:
        self.note("final checks")
        await self._take_missing_baselines()
        # Leases of crashed processes count down their TTL; keepalives go on meanwhile.
        await asyncio.sleep(self.ttl + 1.0)
        converged = await self.converge("final state", self.bound) is not None
        await self._check_leaks()
        # Waiting for etcd to settle only makes sense when the fleet did: otherwise one
        # look is enough, and the run ends sooner.
        await self._check_watch_streams(15.0 if converged else 0.0)
        await self._check_leases(2 * self.ttl + 5.0 if converged else 0.0)

    async def _graceful_stop(self) -> None:
        self.note("SIGTERM to every child")
        problems: list[str] = []
        results = await asyncio.gather(
            *(c.terminate(15.0) for c in self.instances), return_exceptions=True
        )
        problems += [str(r) for r in results if isinstance(r, BaseException)]
        registry = await self.view.registry()
        problems += [
            f"left in etcd after graceful stop: {e.describe()}" for e in registry.entries.values()
        ]
        leases = await self.view.leases()
        problems += [f"lease {lease:x} left after graceful stop" for lease in sorted(leases)]
        results = await asyncio.gather(
            *(c.terminate(15.0) for c in self.watchers), return_exceptions=True
        )
        problems += [str(r) for r in results if isinstance(r, BaseException)]
        self.ledger.check("graceful_stop", problems)

    async def _teardown(self) -> None:
        for child in self.children:
            child.abort()
        for child in self.children:
            if child.proc is not None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(5.0):
                        await child.proc.wait()
        if hasattr(self, "view"):
            await self.view.close()
        if hasattr(self, "cluster"):
            failed = self.ledger.violated or self.results.aborted is not None
            if failed:
                for member in self.cluster.members:
                    with contextlib.suppress(OSError):
                        shutil.copy(member.log_path, self.log_dir / f"{member.name}.log")
            await asyncio.to_thread(self.cluster.close)
        if self.ledger.violated or self.results.aborted is not None:
            self.results.kept_logs = True
        else:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    # -- observing ----------------------------------------------------------------------

    def _check_children(self) -> None:
        for child in self.children:
            code = child.died_unexpectedly()
            if code is not None:
                detail = f"{child.name} exited with status {code}; log tail:\n{child.log_tail()}"
                self.ledger.fail("children_alive", detail)
                raise SoakAborted(f"{child.name} died (exit status {code})")
        self.ledger.ok("children_alive")

    async def _ask(self, child: Child) -> dict[str, Any] | None:
        command = "status" if child.kind == "instance" else "snapshot"
        try:
            return await child.request(command, CHILD_ANSWER_TIMEOUT)
        except ChildPaused:
            return None
        except ChildError as exc:
            if child.expected_exit or not child.ready:
                return None  # killed or being restarted by the injector meanwhile
            self.ledger.fail("children_alive", str(exc))
            raise SoakAborted(f"{child.name} stopped answering") from None

    async def _observe(self) -> Observation:
        self._check_children()
        registry = await self.view.registry()
        live = [c for c in self.children if c.live]
        replies = await asyncio.gather(*(self._ask(c) for c in live))
        statuses: dict[str, dict[str, Any]] = {}
        snapshots: dict[str, dict[str, Any]] = {}
        for child, reply in zip(live, replies, strict=True):
            if reply is not None:
                (statuses if child.kind == "instance" else snapshots)[child.name] = reply
        return Observation(registry, statuses, snapshots)

    def expected_keys(self) -> set[str]:
        return {
            spec.key
            for child in self.instances
            if child.live
            for spec in instances_of(process_index(child))
        }

    async def _sample_forever(self) -> None:
        while True:
            await asyncio.sleep(SAMPLE_EVERY)
            expected = self.expected_keys()
            try:
                obs = await self._observe()
            except EtcdError:
                self.results.samples_skipped += 1  # etcd busy electing: not a finding
                continue
            # A process stopped or killed meanwhile is not held to its keys.
            expected &= self.expected_keys()
            self.results.samples += 1
            self.ledger.check("lease_bound", lease_problems(obs.registry, obs.snapshots))
            self.ledger.check(
                "unique_instances", all_duplicate_problems(obs.registry, obs.snapshots)
            )
            self.ledger.check("known_keys", stranger_problems(obs.registry))
            now = time.monotonic()
            self.ledger.check(
                "presence",
                self._presence.update(now, registry_mismatches(obs.registry, expected)),
            )
            # A stopped watcher answers nothing: its episodes start again once it is back.
            for watcher in self.watchers:
                if watcher.name not in obs.snapshots:
                    self._caches.forget(f"{watcher.name} ")
            self.ledger.check(
                "caches_follow",
                self._caches.update(now, cache_mismatches(obs.registry, obs.snapshots)),
            )

    async def converge(self, what: str, bound: float) -> float | None:
        """Poll until etcd, registrations and caches agree on the live fleet; the
        seconds it took, or None (a violation) when ``bound`` passed first."""
        began = time.monotonic()
        while True:
            expected = self.expected_keys()
            try:
                obs = await self._observe()
                problems = convergence_problems(obs.registry, expected, obs.statuses, obs.snapshots)
            except EtcdError as exc:
                problems = [f"etcd read failed: {exc}"]
            took = time.monotonic() - began
            if not problems:
                self.ledger.ok("convergence")
                self.note(f"converged in {took:.1f}s: {what}")
                return took
            if took > bound:
                self.ledger.fail(
                    "convergence",
                    f"{what}: not converged within {bound:.0f}s; {len(problems)} problem(s): "
                    + "; ".join(problems[:8]),
                )
                return None
            await asyncio.sleep(0.2)

    # -- end-state checks ---------------------------------------------------------------

    async def _figures(self, child: Child) -> dict[str, int]:
        reply = await self._ask(child)
        if reply is None:
            raise SoakAborted(f"{child.name} cannot be measured")
        return {
            "fds": child.fd_count(),
            "os_threads": child.os_thread_count(),
            "py_threads": int(reply["threads"]),
            "tasks": int(reply["tasks"]),
        }

    async def _take_missing_baselines(self) -> None:
        for child in self.children:
            if child.name not in self.baselines and child.live:
                self.baselines[child.name] = await self._figures(child)

    async def _check_leaks(self) -> None:
        problems: list[str] = []
        for child in self.children:
            start = self.baselines.get(child.name)
            if start is None:
                continue
            end = await self._figures(child)
            for metric, allowed in LEAK_SLACK.items():
                row = LeakRow(child.name, metric, start[metric], end[metric], allowed)
                self.results.leaks.append(row)
                if not row.ok:
                    problems.append(
                        f"{child.name} {metric}: {row.start} after warm-up, {row.end} at the "
                        f"end (slack {allowed})"
                    )
        self.ledger.check("leaks", problems)

    async def _watch_totals(self) -> tuple[float, float]:
        metrics = await self.view.watch_metrics()
        streams = sum(
            m.get("etcd_debugging_mvcc_watch_stream_total", 0.0) for m in metrics.values()
        )
        watchers = sum(m.get("etcd_debugging_mvcc_watcher_total", 0.0) for m in metrics.values())
        return streams, watchers

    async def _check_watch_streams(self, patience: float) -> None:
        need = float(len([w for w in self.watchers if w.live]))  # one watch each
        began = time.monotonic()
        while True:
            streams, watchers = await self._watch_totals()
            if streams <= need and watchers <= need:
                break
            if time.monotonic() - began >= patience:
                break
            await asyncio.sleep(0.5)
        self.results.watch_end = (streams, watchers)
        problems = []
        if streams > need or watchers > need:
            per_member = await self.view.watch_metrics()
            problems.append(
                f"{streams:.0f} watch streams and {watchers:.0f} watchers open in etcd after "
                f"{patience:.0f}s, {need:.0f} needed; per member: {per_member}"
            )
        self.ledger.check("watch_streams", problems)

    async def _check_leases(self, patience: float) -> None:
        live = [c for c in self.instances if c.live]
        began = time.monotonic()
        while True:
            leases = await self.view.leases()
            held: set[int] = set()
            for child in live:
                status = await self._ask(child)
                if status is not None:
                    held |= {reg["lease"] for reg in status["regs"]}
            extra = leases - held
            if not extra and len(leases) <= len(live):
                break
            if time.monotonic() - began >= patience:
                break
            await asyncio.sleep(0.5)
        self.results.leases_end = len(leases)
        self.results.live_instance_processes = len(live)
        problems = []
        if extra or len(leases) > len(live):
            described = []
            for lease in sorted(extra):
                try:
                    info = await self.view.client.lease_time_to_live(lease, keys=True)
                    described.append(f"{lease:x} (ttl {info.ttl}s, keys {list(info.keys)})")
                except EtcdError as exc:
                    described.append(f"{lease:x} ({exc})")
            problems.append(
                f"{len(leases)} leases for {len(live)} live instance processes; not held by "
                f"any: {', '.join(described) or 'none'}"
            )
        self.ledger.check("leases", problems)
