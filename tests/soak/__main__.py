"""``python -m tests.soak --duration SECONDS [--seed N] [--etcd PATH] [--auth]
[--kinds K,K]``: exit 0 only when no invariant was violated."""

from __future__ import annotations

import argparse
import asyncio
import secrets
import signal
import sys

from etcdisco.testing import find_etcd_binaries

from ._faults import FAULT_KINDS
from ._report import render
from ._run import Options, Soak


async def _main(options: Options) -> int:
    soak = Soak(options)
    task = asyncio.current_task()
    assert task is not None
    # SIGTERM (a CI timeout) gets the same clean teardown as Ctrl-C.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        results = await soak.run()
    except asyncio.CancelledError:
        # The program's outermost task: report what was seen, then end.
        soak.results.aborted = "interrupted (SIGINT/SIGTERM)"
        results = soak.results
    print(render(results), flush=True)
    return 0 if results.passed else 1


def _etcd_binary(wanted: str, parser: argparse.ArgumentParser) -> str:
    if "/" in wanted:
        return wanted
    found = find_etcd_binaries()
    matches = [path for version, path in found.items() if version.startswith(f"{wanted}.")]
    if not matches:
        parser.error(f"--etcd {wanted}: no such etcd here; found {', '.join(found) or 'none'}")
    return str(matches[-1])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__)
    parser.add_argument("--duration", type=float, required=True, help="seconds of faults")
    parser.add_argument("--seed", type=int, default=None, help="default: a random one")
    parser.add_argument(
        "--etcd",
        default=None,
        help="etcd binary, or a version found on this machine such as 3.4 (default: newest)",
    )
    parser.add_argument("--ttl", type=int, default=3, help="instance lease TTL in seconds")
    parser.add_argument(
        "--auth",
        action="store_true",
        help="etcd auth on: children as least-privilege users (README), the supervisor as root",
    )
    parser.add_argument(
        "--kinds",
        default=None,
        help="only these fault kinds, comma-separated, in this order first (for debugging); "
        f"of: {', '.join(FAULT_KINDS)}",
    )
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    etcd = _etcd_binary(args.etcd, parser) if args.etcd else None
    kinds = None
    if args.kinds:
        kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
        unknown = sorted(set(kinds) - set(FAULT_KINDS))
        if unknown or not kinds:
            parser.error(f"--kinds: unknown {', '.join(unknown) or '(none given)'}")
    options = Options(
        duration=args.duration,
        seed=seed,
        etcd=etcd,
        ttl=args.ttl,
        auth=args.auth,
        kinds=kinds,
    )
    try:
        code = asyncio.run(_main(options))
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
