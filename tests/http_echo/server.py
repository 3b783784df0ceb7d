"""A small HTTP/1.1 echo server for the HTTP client tests: in-process (threads), or as
a subprocess that registers itself in etcd.

    python -m tests.http_echo.server --endpoints EP --service users --name s1 [--ttl 10]

Every answer is JSON naming the server, so a test sees which instance answered, with
the method, path, Host header and body it saw. Paths:

- ``/hold/TAG``: the request waits until the test calls ``release(TAG)`` (it can wait
  for the request to arrive with ``wait_arrived(TAG)``);
- ``/drop``: the connection is closed after the request was read, without an answer
  (the request reached the server, which then vanished);
- ``/status/CODE``: answers CODE;
- anything else: 200, or ``server.status`` when a test sets one; with ``server.drop``
  set, every request is read and its connection closed without an answer.

The subprocess prints one JSON line once registered ({"name", "address", "port"}) and
deregisters on SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import ssl
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

WAIT = 30.0  # the longest a held request waits for its release


class EchoServer:
    """An echo server on 127.0.0.1 (a free port), served by threads."""

    def __init__(self, name: str, *, tls: ssl.SSLContext | None = None) -> None:
        self.name = name
        self.status = 200
        self.drop = False
        self.seen: Counter[str] = Counter()  # requests by method
        self.hosts: list[str] = []
        self.sni: list[str | None] = []
        self._lock = threading.Condition()
        self._arrived: set[str] = set()
        self._released: set[str] = set()
        self.connections = 0  # open now
        self.connections_total = 0
        if tls is not None:
            tls.sni_callback = self._on_sni
        self._httpd = _Server(("127.0.0.1", 0), _Handler, self, tls)
        self.port = int(self._httpd.server_address[1])
        self.address = f"127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name=f"echo-{name}", daemon=True
        )

    def start(self) -> EchoServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self.release_all()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(10)

    def __enter__(self) -> EchoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what tests wait for and steer ---------------------------------------------

    def wait_arrived(self, tag: str, timeout: float = 10.0) -> None:
        with self._lock:
            if not self._lock.wait_for(lambda: tag in self._arrived, timeout):
                raise AssertionError(f"{self.name}: request {tag!r} did not arrive in {timeout}s")

    def release(self, tag: str) -> None:
        with self._lock:
            self._released.add(tag)
            self._lock.notify_all()

    def release_all(self) -> None:
        with self._lock:
            self._released.add("*")
            self._lock.notify_all()

    def wait_connections(self, count: int, timeout: float = 10.0) -> None:
        """Wait until exactly ``count`` client connections are open."""
        with self._lock:
            if not self._lock.wait_for(lambda: self.connections == count, timeout):
                raise AssertionError(
                    f"{self.name}: {self.connections} connections open, not {count}, "
                    f"after {timeout}s"
                )

    # -- called by the handler -----------------------------------------------------

    def _on_sni(self, sock: Any, name: str | None, context: Any) -> None:
        self.sni.append(name)

    def _connected(self, delta: int) -> None:
        with self._lock:
            self.connections += delta
            if delta > 0:
                self.connections_total += 1
            self._lock.notify_all()

    def _hold(self, tag: str) -> None:
        with self._lock:
            self._arrived.add(tag)
            self._lock.notify_all()
            self._lock.wait_for(lambda: tag in self._released or "*" in self._released, WAIT)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        echo: EchoServer,
        tls: ssl.SSLContext | None,
    ) -> None:
        self.echo = echo
        self.tls = tls
        super().__init__(address, handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = super().get_request()
        if self.tls is not None:
            # The handshake happens in the handler's thread (do_handshake_on_connect
            # would do it here, in the accept loop).
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        # Headers and body go out in two writes: without this, Nagle and the client's
        # delayed ACK hold the body back 40 ms.
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(10)
            self.request.do_handshake()
        super().setup()
        self.server.echo._connected(+1)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.echo._connected(-1)

    def log_message(self, format: str, *args: Any) -> None:
        return None

    def _answer(self) -> None:
        echo = self.server.echo
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        host = self.headers.get("Host", "")
        with echo._lock:
            echo.seen[self.command] += 1
            echo.hosts.append(host)
        path = self.path
        if path == "/drop" or echo.drop:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if path.startswith("/hold/"):
            echo._hold(path.removeprefix("/hold/"))
        status = echo.status
        if path.startswith("/status/"):
            status = int(path.removeprefix("/status/"))
        payload = json.dumps(
            {
                "server": echo.name,
                "method": self.command,
                "path": path,
                "host": host,
                "body": body.decode("utf-8", "replace"),
            }
        ).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_OPTIONS = do_PATCH = _answer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--endpoints", required=True)
    parser.add_argument("--service", default="users")
    parser.add_argument("--name", required=True)
    parser.add_argument("--ttl", type=int, default=10)
    args = parser.parse_args()

    import etcdisco

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with (
        EchoServer(args.name) as server,
        etcdisco.Client(args.endpoints) as client,
        client.register(args.service, server.address, ttl=args.ttl),
    ):
        print(json.dumps({"name": args.name, "address": server.address, "port": server.port}))
        sys.stdout.flush()
        stop.wait()


if __name__ == "__main__":
    main()
