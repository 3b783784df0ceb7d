#!/usr/bin/env python3
"""Regenerate (or check) the Python modules for etcdisco's etcd v3 API subset.

Input:   src/etcdisco/etcd/_proto/rpc.proto
Outputs: src/etcdisco/etcd/_proto/rpc_pb2.py, rpc_pb2_grpc.py, rpc_pb2.pyi

    python scripts/gen_proto.py            # regenerate in place
    python scripts/gen_proto.py --check    # exit 1 if the committed files are stale

protoc runs with ``-I src`` on ``etcdisco/etcd/_proto/rpc.proto`` so the
generated gRPC module imports its messages absolutely
(``from etcdisco.etcd._proto import rpc_pb2``).

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
from pathlib import Path

REQUIRED_GRPC_TOOLS_SERIES = "1.66."

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
PACKAGE_DIR = Path("etcdisco", "etcd", "_proto")
PROTO = PACKAGE_DIR / "rpc.proto"
GENERATED = ("rpc_pb2.py", "rpc_pb2_grpc.py", "rpc_pb2.pyi")


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


def _generate(out_root: Path) -> None:
    """Run protoc, writing the modules under ``out_root/etcdisco/etcd/_proto``."""
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{SRC}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        str(SRC / PROTO),
    ]
    result = subprocess.run(cmd, check=False)
    if result.returncode != 0:
        sys.exit(f"gen_proto: protoc failed with exit code {result.returncode}")
    missing = [name for name in GENERATED if not (out_root / PACKAGE_DIR / name).is_file()]
    if missing:
        sys.exit(f"gen_proto: protoc did not produce {', '.join(missing)}")


def _check() -> int:
    committed_dir = SRC / PACKAGE_DIR
    with tempfile.TemporaryDirectory(prefix="etcdisco-gen-proto-") as tmp:
        fresh_dir = Path(tmp) / PACKAGE_DIR
        fresh_dir.mkdir(parents=True)
        _generate(Path(tmp))
        stale = [
            name
            for name in GENERATED
            if not (committed_dir / name).is_file()
            or not filecmp.cmp(fresh_dir / name, committed_dir / name, shallow=False)
        ]
    if stale:
        for name in stale:
            print(f"stale: {(SRC / PACKAGE_DIR / name).relative_to(ROOT)}", file=sys.stderr)
        print(
            f"gen_proto: generated code does not match {PROTO.as_posix()}; "
            "run `python scripts/gen_proto.py` and commit the result.",
            file=sys.stderr,
        )
        return 1
    print(f"gen_proto: {', '.join(GENERATED)} are up to date.")
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
    _generate(SRC)
    for name in GENERATED:
        print(f"wrote {(SRC / PACKAGE_DIR / name).relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
