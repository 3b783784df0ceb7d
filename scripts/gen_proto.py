#!/usr/bin/env python3
"""Regenerate (or check) the committed protobuf modules.

Targets (each proto's modules are written next to it):
  src/etcdisco/etcd/_proto/rpc.proto   etcdisco's etcd v3 API subset
  tests/grpc_echo/echo.proto           the echo service of the gRPC tests

    python scripts/gen_proto.py            # regenerate in place
    python scripts/gen_proto.py --check    # exit 1 if the committed files are stale

protoc runs with ``-I`` at the root the package is imported from (``src`` for
etcdisco, the repository for the tests) so each generated gRPC module imports its
messages absolutely (``from etcdisco.etcd._proto import rpc_pb2``,
``from tests.grpc_echo import echo_pb2``).

Why grpcio-tools is pinned to 1.66.x: the generated code embeds the versions
of the generator and checks them at import time. grpcio-tools 1.66.x bundles
protoc 27.2, whose ``*_pb2.py`` output imports with protobuf 5.29 (our runtime
floor) as well as 6.x and 7.x, and whose ``*_pb2_grpc.py`` output needs only
grpcio >= 1.66.2 (also our floor). Any newer grpcio-tools would emit code
that refuses to import on older protobuf/grpcio runtimes, silently raising
the dependency floors in pyproject.toml. So this script refuses to run with
any other grpcio-tools version; bump the pin and the floors together, on
purpose.
"""

from __future__ import annotations

import argparse
import filecmp
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REQUIRED_GRPC_TOOLS_SERIES = "1.66."

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"


@dataclass(frozen=True)
class Target:
    include: Path  # the -I root, which is also where the outputs land
    proto: Path  # relative to ``include``

    @property
    def outputs(self) -> tuple[Path, ...]:
        stem = self.proto.with_suffix("")
        return tuple(
            stem.with_name(stem.name + suffix) for suffix in ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")
        )


TARGETS = (
    Target(SRC, Path("etcdisco", "etcd", "_proto", "rpc.proto")),
    Target(ROOT, Path("tests", "grpc_echo", "echo.proto")),
)


def _grpc_tools_version() -> str | None:
    try:
        from grpc_tools import grpc_version  # type: ignore[import-untyped]
    except ImportError:
        return None
    return str(grpc_version.VERSION)


PROTOGEN_VENV = ROOT / ".venv-protogen"
PROTOGEN_PIN = "grpcio-tools==1.66.2"


def _require_grpc_tools() -> None:
    """Run under grpcio-tools 1.66.x, bootstrapping a private venv when needed.

    The project's own environment runs the newest protobuf; grpcio-tools 1.66 pins
    protobuf < 6, so the generator lives in a venv of its own (.venv-protogen).
    """
    version = _grpc_tools_version()
    if version is not None and version.startswith(REQUIRED_GRPC_TOOLS_SERIES):
        return
    python = PROTOGEN_VENV / "bin" / "python"
    if Path(sys.executable).absolute() == python.absolute():
        sys.exit(
            f"gen_proto: {PROTOGEN_VENV} has grpcio-tools {version}, not "
            f"{REQUIRED_GRPC_TOOLS_SERIES}x; delete that folder and run again."
        )
    if not python.exists():
        print(f"gen_proto: creating {PROTOGEN_VENV} with {PROTOGEN_PIN}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(PROTOGEN_VENV)], check=True)
        subprocess.run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                PROTOGEN_PIN,
            ],
            check=True,
        )
    result = subprocess.run([str(python), __file__, *sys.argv[1:]], check=False)
    sys.exit(result.returncode)


def _generate(target: Target, out_root: Path) -> None:
    """Run protoc on ``target``, writing its modules under ``out_root``."""
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{target.include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        str(target.include / target.proto),
    ]
    result = subprocess.run(cmd, check=False)
    if result.returncode != 0:
        sys.exit(f"gen_proto: protoc failed with exit code {result.returncode}")
    missing = [str(name) for name in target.outputs if not (out_root / name).is_file()]
    if missing:
        sys.exit(f"gen_proto: protoc did not produce {', '.join(missing)}")


def _stale(target: Target) -> list[Path]:
    with tempfile.TemporaryDirectory(prefix="etcdisco-gen-proto-") as tmp:
        _generate(target, Path(tmp))
        return [
            target.include / name
            for name in target.outputs
            if not (target.include / name).is_file()
            or not filecmp.cmp(Path(tmp) / name, target.include / name, shallow=False)
        ]


def _check() -> int:
    stale = [path for target in TARGETS for path in _stale(target)]
    if stale:
        for path in stale:
            print(f"stale: {path.relative_to(ROOT)}", file=sys.stderr)
        print(
            "gen_proto: generated code does not match its .proto; "
            "run `python scripts/gen_proto.py` and commit the result.",
            file=sys.stderr,
        )
        return 1
    print("gen_proto: every generated module is up to date.")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="generate into a temp dir and compare byte-for-byte with the committed files",
    )
    args = parser.parse_args(argv)
    _require_grpc_tools()
    if args.check:
        return _check()
    for target in TARGETS:
        _generate(target, target.include)
        for name in target.outputs:
            print(f"wrote {(target.include / name).relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
