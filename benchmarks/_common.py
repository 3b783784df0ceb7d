"""What every benchmark script shares: percentiles, the load figure, the command line a
section names, and writing the section (the --out contract run_all.py relies on)."""

from __future__ import annotations

import contextlib
import math
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1) of a non-empty sequence."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def load_average() -> float:
    """The 1-minute load average: printed with each table, since 2 cores are shared."""
    return os.getloadavg()[0]


def command_line(script: str) -> str:
    """How this run was started, as a user would type it from the repository root;
    without ``--out``, which says where the section went, not what was measured."""
    python = Path(os.path.normpath(sys.executable))
    with contextlib.suppress(ValueError):
        python = python.relative_to(ROOT)
    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--out":
            skip = True
        elif not arg.startswith("--out="):
            args.append(arg)
    return shlex.join([str(python), f"benchmarks/{script}", *args])


def write_section(text: str, out: Path | None) -> None:
    """Write the section to ``out`` (for run_all.py) or print it."""
    if out is None:
        print(text)
        return
    out.write_text(text)
    print(f"wrote {out}", file=sys.stderr)
