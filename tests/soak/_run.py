"""The soak's timeline: set up, warm up, inject faults until the duration is spent,
check the end state, stop everything gracefully, tear down (always)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import secrets
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from etcdisco import EtcdError, ExpiryProtection
from etcdisco.testing import Credentials, LocalEtcdCluster, LocalEtcdError

from ._children import Child, ChildError, ChildPaused
from ._etcd_view import EtcdView, Registry
from ._faults import ALL_CLOCKS, FaultInjector, process_index
from ._invariants import (
    Ledger,
    Persistence,
    all_duplicate_problems,
    cache_mismatches,
    convergence_problems,
    held_suspect,
    lease_problems,
    metadata_mismatches,
    registry_mismatches,
    stranger_problems,
    synced_mismatches,
)
from ._layout import (
    INSTANCE_PROCESSES,
    PREFIX,
    WATCHER_PROCESSES,
    instances_of,
    service_prefixes,
)
from ._ops import OpsBook
from ._report import LeakRow, Results
from ._workers import PASSWORD_ENV

# What a child may grow by between its baseline and the end without it counting as a
# leak. After failovers a child's gRPC channels may be connected to every etcd member
# (a socket each), and a stream may be between two attempts when measured; measured
# runs grew by at most one fd and one task. Anything that grows per fault exceeds this.
LEAK_SLACK = {"fds": 6, "os_threads": 4, "py_threads": 1, "tasks": 2}
CHILD_START_TIMEOUT = 60.0
CHILD_ANSWER_TIMEOUT = 10.0
SAMPLE_EVERY = 0.5
# The whole soak (setup to graceful stop) gets the duration plus this; teardown after.
# A fault that starts just before the end and then waits out its bounds, and the final
# checks after it, can take this long when the library misbehaves.
TIME_BUDGET_MARGIN = 120.0
# With --auth (README, "Least privilege"): registrants may write their services' keys
# only, watchers may read the registry only; the supervisor is root.
REGISTRANT_USER = "soak-registrant"
READER_USER = "soak-reader"


class SoakAborted(Exception):
    """Something that makes going on pointless (a child died, etcd did not restart)."""


@dataclasses.dataclass(frozen=True)
class Options:
    duration: float
    seed: int
    etcd: str | None = None
    ttl: int = 3
    auth: bool = False
    kinds: tuple[str, ...] | None = None


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
        self.ops = OpsBook(self.ledger, self.bound, self.began)
        self.injector = FaultInjector(self, self.rng, options.kinds, options.auth)
        self.baselines: dict[str, dict[str, int]] = {}
        # The sampled promises: a difference may come and go while faults play out,
        # one that lasts longer than the bound is a violation (see Persistence).
        self.clocks = {name: Persistence(self.bound) for name in ALL_CLOCKS}
        self.clocks["held_suspects"] = Persistence(ExpiryProtection().hold + self.bound)
        self.results = Results(
            duration=options.duration,
            seed=options.seed,
            ttl=options.ttl,
            bound=self.bound,
            ledger=self.ledger,
            faults=self.injector.records,
            log_dir=self.log_dir,
            leak_slack=LEAK_SLACK,
            auth=options.auth,
            operations=self.ops.operations,
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
            # Peer proxies make partitions possible (see LocalEtcdCluster.partition).
            self.cluster = LocalEtcdCluster(3, binary=self.options.etcd, peer_proxies=True)
        except LocalEtcdError as exc:
            raise SoakAborted(f"no etcd to run: {exc}") from None
        self.results.etcd_version = self.cluster.version
        self.results.etcd_binary = str(self.cluster.binary)
        self.note(f"starting 3 etcd {self.cluster.version} members ({self.cluster.binary})")
        try:
            await asyncio.to_thread(self.cluster.start)
        except LocalEtcdError as exc:
            raise SoakAborted(f"the etcd cluster did not start: {exc}") from None
        root: Credentials | None = None
        users: dict[str, tuple[list[str], dict[str, str]]] = {
            "instance": ([], {}),
            "watcher": ([], {}),
        }
        if self.options.auth:
            root, users = await asyncio.to_thread(self._setup_auth)
            self.note(f"auth on: children run as {REGISTRANT_USER} / {READER_USER}")
        self.view = EtcdView(self.cluster, root)
        endpoints = ",".join(self.cluster.endpoints)
        args, env = users["instance"]
        self.instances = [
            Child(
                f"instance{p}",
                "instance",
                ["--endpoints", endpoints, "--ttl", str(self.ttl), "--process", str(p), *args],
                self.log_dir,
                env,
            )
            for p in range(INSTANCE_PROCESSES)
        ]
        args, env = users["watcher"]
        self.watchers = [
            Child(
                f"watcher{w}",
                "watcher",
                ["--endpoints", endpoints, "--name", f"watcher{w}", *args],
                self.log_dir,
                env,
            )
            for w in range(WATCHER_PROCESSES)
        ]
        self.note(
            f"starting {len(self.instances)} instance processes "
            f"({len(instances_of(0))} instances each, ttl {self.ttl}s) and "
            f"{len(self.watchers)} watching processes; logs in {self.log_dir}"
        )
        await asyncio.gather(*(self.start_child(c) for c in self.children))

    def _setup_auth(self) -> tuple[Credentials, dict[str, tuple[list[str], dict[str, str]]]]:
        """Root for the supervisor; the README's least-privilege roles for the children."""
        cluster = self.cluster
        root = cluster.enable_auth(secrets.token_urlsafe(12))
        passwords = {user: secrets.token_urlsafe(12) for user in (REGISTRANT_USER, READER_USER)}
        grants = {
            REGISTRANT_USER: [("readwrite", prefix) for prefix in service_prefixes()],
            READER_USER: [("read", PREFIX + "/")],
        }
        for user, permissions in grants.items():
            cluster.etcdctl("role", "add", user)
            for permission, prefix in permissions:
                cluster.etcdctl(
                    "role", "grant-permission", user, permission, prefix, "--prefix=true"
                )
            cluster.etcdctl(
                "user", "add", user, f"--new-user-password={passwords[user]}",
                "--interactive=false",
            )  # fmt: skip
            cluster.etcdctl("user", "grant-role", user, user)
        return root, {
            kind: (["--user", user], {PASSWORD_ENV: passwords[user]})
            for kind, user in (("instance", REGISTRANT_USER), ("watcher", READER_USER))
        }

    async def start_child(self, child: Child) -> None:
        self.baselines.pop(child.name, None)
        try:
            await child.start(CHILD_START_TIMEOUT)
        except ChildError as exc:
            self.ledger.fail("children_alive", f"{child.name} did not start: {exc}")
            raise SoakAborted(f"{child.name} did not start") from None
        # Started at all only because the worker tried again: a register raised while
        # etcd was up (a start happens with quorum, after any outage has healed).
        failures = child.ready_reply.get("failures") or []
        if failures:
            self.ledger.fail(
                "ops_finish",
                f"{child.name} start: register raised {len(failures)} time(s) before it "
                f"worked: " + "; ".join(failures[:3]),
            )
        elif child.kind == "instance":
            self.ledger.ok("ops_finish")

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
            await self._register_withdrawn()
            kind = self.injector.next_kind(deadline - time.monotonic())
            if kind is None:
                return
            await self._take_missing_baselines()
            try:
                await self.injector.inject(kind)
            except LocalEtcdError as exc:
                raise SoakAborted(f"etcd member could not be restarted: {exc}") from None

    async def _register_withdrawn(self) -> None:
        """Deregistered keys whose absence has been checked join the fleet again."""
        children = {c.name: c for c in self.instances}
        operations = []
        for withdrawal in self.ops.due():
            child = self.instances[withdrawal.process]
            if child.live:
                operations.append(await self.ops.register_again(withdrawal, child))
        if operations:
            self.note(f"registering {len(operations)} deregistered key(s) again")
            await self.ops.wait(children, operations, time.monotonic() + 15.0)

    async def _final_checks(self) -> None:
        self.note("final checks")
        await self._take_missing_baselines()
        # Leases of crashed processes count down their TTL; keepalives go on meanwhile.
        await asyncio.sleep(self.ttl + 1.0)
        converged = await self.converge("final state", self.bound) is not None
        snapshots = (await self._ask_all())[1]
        self.results.expiry_protections = sum(
            int(s["expiry_protections"]) for s in snapshots.values()
        )
        await self._wait_withdrawals_checked()
        self.ops.check_finished(time.monotonic())
        await self._check_leaks()
        # Waiting for etcd to settle only makes sense when the fleet did: otherwise one
        # look is enough, and the run ends sooner.
        await self._check_watch_streams(15.0 if converged else 0.0)
        await self._check_leases(2 * self.ttl + 5.0 if converged else 0.0)

    async def _wait_withdrawals_checked(self) -> None:
        """The last faults' deregistrations have deadlines too: let the sampler look
        past them (bounded by their deadlines, which the bound caps)."""
        pending = [w for w in self.ops.withdrawals.values() if not w.checked]
        deadlines = [w.deadline for w in pending if w.deadline is not None]
        if not deadlines:
            return
        until = max(deadlines) + 2 * SAMPLE_EVERY + 1.0
        while any(not w.checked for w in pending) and time.monotonic() < until:
            self.ops.looked.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(until - time.monotonic()):
                    await self.ops.looked.wait()

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
        statuses, snapshots = await self._ask_all()
        return Observation(registry, statuses, snapshots)

    async def _ask_all(self) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
        live = [c for c in self.children if c.live]
        replies = await asyncio.gather(*(self._ask(c) for c in live))
        statuses: dict[str, dict[str, Any]] = {}
        snapshots: dict[str, dict[str, Any]] = {}
        for child, reply in zip(live, replies, strict=True):
            if reply is not None:
                (statuses if child.kind == "instance" else snapshots)[child.name] = reply
        for name, status in statuses.items():
            self.ops.absorb(name, status["ops"])
        return statuses, snapshots

    async def statuses(self) -> dict[str, dict[str, Any]]:
        """What every live instance process reports now."""
        return (await self._ask_all())[0]

    def expected_keys(self) -> set[str]:
        """The keys etcd must hold: every live process's, less the withdrawn ones."""
        return {
            spec.key
            for child in self.instances
            if child.live
            for spec in instances_of(process_index(child))
        } - self.ops.withdrawn_keys()

    async def _sample_forever(self) -> None:
        while True:
            await asyncio.sleep(SAMPLE_EVERY)
            expected = self.expected_keys()
            read_started = time.monotonic()
            try:
                obs = await self._observe()
            except EtcdError:
                self.results.samples_skipped += 1  # etcd busy electing: not a finding
                continue
            # A process stopped or killed meanwhile is not held to its keys.
            expected &= self.expected_keys()
            self.results.samples += 1
            self._sample_checks(obs, expected, read_started)

    def _sample_checks(self, obs: Observation, expected: set[str], read_started: float) -> None:
        self.ledger.check("lease_bound", lease_problems(obs.registry, obs.snapshots))
        self.ledger.check("unique_instances", all_duplicate_problems(obs.registry, obs.snapshots))
        self.ledger.check("known_keys", stranger_problems(obs.registry))
        self.ops.check_gone(obs.registry, read_started)
        self.ops.check_finished(time.monotonic())
        now = time.monotonic()
        withdrawn = self.ops.withdrawn_keys()
        clocks = self.clocks
        self.ledger.check(
            "presence",
            clocks["presence"].update(now, registry_mismatches(obs.registry, expected, withdrawn)),
        )
        # A stopped watcher answers nothing: its episodes start again once it is back.
        for watcher in self.watchers:
            if watcher.name not in obs.snapshots:
                for name in ("caches_follow", "held_suspects", "synced_truthful"):
                    clocks[name].forget(f"{watcher.name} ")
        mismatches = cache_mismatches(obs.registry, obs.snapshots)
        suspects = {i: t for i, t in mismatches.items() if held_suspect(i)}
        others = {i: t for i, t in mismatches.items() if not held_suspect(i)}
        self.ledger.check(
            "caches_follow",
            clocks["caches_follow"].update(now, others)
            + clocks["held_suspects"].update(now, suspects),
        )
        self.ledger.check(
            "synced_truthful",
            clocks["synced_truthful"].update(now, synced_mismatches(obs.registry, obs.snapshots)),
        )
        # A process stopped meanwhile reports nothing; its episodes start over.
        for child in self.instances:
            if child.name not in obs.statuses:
                for spec in instances_of(process_index(child)):
                    clocks["metadata_matches"].forget(f"meta {spec.key}")
        self.ledger.check(
            "metadata_matches",
            clocks["metadata_matches"].update(now, metadata_mismatches(obs.registry, obs.statuses)),
        )

    async def converge(self, what: str, bound: float) -> float | None:
        """Poll until etcd, registrations and caches agree on the live fleet; the
        seconds it took, or None (a violation) when ``bound`` passed first."""
        began = time.monotonic()
        while True:
            expected = self.expected_keys()
            try:
                obs = await self._observe()
                problems = convergence_problems(
                    obs.registry, expected, obs.statuses, obs.snapshots, self.ops.withdrawn_keys()
                )
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
        # Two watches each: the instances, and the operators' overrides under their own
        # prefix (etcdisco/overrides/...), which every cache folds in.
        need = 2.0 * len([w for w in self.watchers if w.live])
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
