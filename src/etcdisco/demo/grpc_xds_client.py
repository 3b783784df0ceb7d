"""The xDS caller of ``etcdisco demo --grpc``, run as a process of its own.

    python -m etcdisco.demo.grpc_xds_client --endpoints EP --service demo-echo

gRPC reads its xDS bootstrap once per process, so the demo calls through xDS from a
process of its own: this one embeds a control plane fed by the registry
(:func:`etcdisco.grpc.xds.install`), then calls ``xds:///<service>`` with a plain
grpcio channel at a steady pace until its stdin closes. Its stdout carries one JSON
line per call: ``{"server": NAME}`` or ``{"error": "CODE: details"}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading

import grpc

from ..grpc import xds
from .grpc_server import METHOD


def _close_on_eof(stop: threading.Event) -> None:
    # The demo ends the calls by closing stdin, and a demo that died closes it too.
    sys.stdin.read()
    stop.set()


def call_until_stopped(service: str, pace: float, stop: threading.Event) -> None:
    with grpc.insecure_channel(f"xds:///{service}") as channel:
        who = channel.unary_unary(METHOD, None, None)  # raw bytes both ways
        while not stop.is_set():
            try:
                line = {"server": who(b"", timeout=5).decode()}
            except grpc.RpcError as exc:
                line = {"error": f"{exc.code().name}: {exc.details()}"}
            print(json.dumps(line), flush=True)
            stop.wait(pace)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--endpoints", required=True)
    parser.add_argument("--service", default="demo-echo")
    parser.add_argument("--pace", type=float, default=0.02, help="seconds between calls")
    args = parser.parse_args()
    stop = threading.Event()
    threading.Thread(target=_close_on_eof, args=(stop,), daemon=True).start()
    with xds.install(args.endpoints):
        call_until_stopped(args.service, args.pace, stop)


if __name__ == "__main__":
    main()
