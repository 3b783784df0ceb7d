"""Prometheus HTTP service discovery (``GET /prometheus/targets`` of ``etcdisco ui``):
the JSON checked against Prometheus' documented ``http_sd_configs`` format, then read
by a real Prometheus (Debian's ``prometheus`` package) configured with the README's
recipe, which discovers a registered instance and scrapes it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import socket
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from etcdisco import AsyncClient

from .._util import eventually
from ._dashboard import running_dashboard

README = Path(__file__).resolve().parents[2] / "README.md"
PROMETHEUS = os.environ.get("ETCDISCO_PROMETHEUS", "/usr/bin/prometheus")
# https://prometheus.io/docs/prometheus/latest/http_sd/ : label names as in the data model.
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
METRIC = "etcdisco_sd_test_requests_total"


def check_http_sd_format(document: Any) -> None:
    """What Prometheus' http_sd documentation requires, and nothing else: a JSON list
    of objects with ``targets`` (a list of ``host:port`` strings) and optional
    ``labels`` (string to string, label names valid)."""
    assert isinstance(document, list), document
    for group in document:
        assert isinstance(group, dict) and set(group) <= {"targets", "labels"}, group
        targets = group["targets"]
        assert isinstance(targets, list) and targets, group
        for target in targets:
            assert isinstance(target, str) and re.fullmatch(r"[^/\s]+:\d+", target), target
        labels = group.get("labels", {})
        assert isinstance(labels, dict), group
        for name, value in labels.items():
            assert isinstance(name, str) and LABEL_NAME.fullmatch(name), name
            assert isinstance(value, str), (name, value)


def readme_recipe() -> dict[str, Any]:
    section = README.read_text().split("## Operating etcdisco\n", 1)[1].split("\n## ", 1)[0]
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", section, re.S) if "http_sd" in b]
    assert len(blocks) == 1, "the README's Prometheus recipe is missing"
    config: dict[str, Any] = yaml.safe_load(blocks[0])
    return config


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Metrics(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path != "/custom/metrics":
            self.send_error(404)
            return
        body = f"# TYPE {METRIC} counter\n{METRIC} 42\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def metrics_server() -> Iterator[int]:
    """An HTTP endpoint serving ``/custom/metrics`` (not /metrics: the path comes from
    the instance's metadata); its port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Metrics)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@contextlib.asynccontextmanager
async def prometheus(config: dict[str, Any], tmp_path: Path) -> AsyncIterator[str]:
    """A real Prometheus with ``config``, on a free port with its own data dir; its URL."""
    if not os.access(PROMETHEUS, os.X_OK):
        message = f"no Prometheus at {PROMETHEUS}: run scripts/setup.sh (Debian's prometheus)"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={path}",
            f"--storage.tsdb.path={tmp_path / 'prometheus-data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url, timeout=5) as http:

            async def ready() -> bool:
                assert proc.poll() is None, "prometheus exited:\n" + read_log(tmp_path)
                with contextlib.suppress(httpx.TransportError):
                    return (await http.get("/-/ready")).status_code == 200
                return False

            # Prometheus has no readiness signal other than its endpoint.
            await eventually(ready, 60, "prometheus never became ready")
        yield url
    finally:
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, 20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(tmp_path / "prometheus-data", ignore_errors=True)


def read_log(tmp_path: Path) -> str:
    return (tmp_path / "prometheus.log").read_text()[-3000:]


async def test_targets_follow_the_documented_format(etcd, tmp_path: Path) -> None:
    async with AsyncClient(etcd.endpoint) as c:
        await c.register(
            "orders",
            "127.0.0.1:7801",
            ttl=10,
            metadata={
                "zone": "eu-1",
                "build.version": "2.4.1",
                "metrics_port": 9102,
                "metrics_path": "/custom/metrics",
                "canary": True,
            },
        )
        b = await c.register("orders", "[::1]:7802", ttl=10)
        await c.register("payments", "127.0.0.1:7901", ttl=10)
        await c.set_override("orders", b.instance_id, disabled=True, reason="r")
        async with (
            running_dashboard(etcd.endpoint, tmp_path) as ui,
            httpx.AsyncClient(base_url=ui.url) as http,
        ):
            answer = await http.get("prometheus/targets")
            assert answer.status_code == 200
            assert answer.headers["content-type"] == "application/json"
            document = answer.json()
            check_http_sd_format(document)
            assert [g["targets"] for g in document] == [
                ["127.0.0.1:9102"],
                ["[::1]:7802"],
                ["127.0.0.1:7901"],
            ]
            first = document[0]["labels"]
            assert first == {
                "__meta_etcdisco_service": "orders",
                "__meta_etcdisco_id": "127.0.0.1:7801",
                "__meta_etcdisco_address": "127.0.0.1:7801",
                "__meta_etcdisco_port": "7801",
                "__meta_etcdisco_zone": "eu-1",
                "__meta_etcdisco_status": "up",
                "__meta_etcdisco_health": "healthy",
                "__meta_etcdisco_weight": "1",
                "__meta_etcdisco_metadata_zone": "eu-1",
                "__meta_etcdisco_metadata_build_version": "2.4.1",
                "__meta_etcdisco_metadata_metrics_port": "9102",
                "__meta_etcdisco_metadata_metrics_path": "/custom/metrics",
                "__meta_etcdisco_metadata_canary": "true",
                "__metrics_path__": "/custom/metrics",
            }
            disabled = document[1]["labels"]
            assert disabled["__meta_etcdisco_status"] == "disabled"
            assert disabled["__meta_etcdisco_health"] == "healthy"  # its own word
            only = (await http.get("prometheus/targets", params={"service": "payments"})).json()
            assert [g["labels"]["__meta_etcdisco_service"] for g in only] == ["payments"]
            none = await http.get("prometheus/targets", params={"service": "nothing"})
            assert none.status_code == 200 and none.json() == []


async def test_prometheus_discovers_and_scrapes_a_registered_instance(
    etcd, tmp_path: Path, metrics_server: int
) -> None:
    async with AsyncClient(etcd.endpoint) as c:
        scraped = await c.register(
            "orders",
            "127.0.0.1:7811",  # the service's port; its metrics are elsewhere
            ttl=30,
            metadata={
                "zone": "eu-1",
                "metrics_port": metrics_server,
                "metrics_path": "/custom/metrics",
            },
        )
        opted_out = await c.register(
            "orders", "127.0.0.1:7812", ttl=30, metadata={"scrape": "false"}
        )
        async with running_dashboard(etcd.endpoint, tmp_path) as ui:
            config = readme_recipe()
            config["global"] = {"scrape_interval": "1s", "scrape_timeout": "1s"}
            (job,) = config["scrape_configs"]
            (sd,) = job["http_sd_configs"]
            assert sd["url"] == "http://127.0.0.1:8500/prometheus/targets"
            sd["url"] = ui.url + "prometheus/targets"
            sd["refresh_interval"] = "1s"
            async with prometheus(config, tmp_path) as url, httpx.AsyncClient(base_url=url) as api:

                async def targets() -> dict[str, Any]:
                    answer = await api.get("/api/v1/targets")
                    data: dict[str, Any] = answer.json()["data"]
                    return data

                async def up() -> bool:
                    active = (await targets())["activeTargets"]
                    return any(t["labels"].get("instance") == scraped.instance_id
                               and t["health"] == "up" for t in active)  # fmt: skip

                # Prometheus polls both the SD endpoint and the target: no event to await.
                await eventually(up, 60, "prometheus never scraped the registered instance")
                data = await targets()
                (target,) = data["activeTargets"]
                assert target["scrapeUrl"] == f"http://127.0.0.1:{metrics_server}/custom/metrics"
                assert target["labels"]["service"] == "orders"
                assert target["labels"]["zone"] == "eu-1"
                assert target["discoveredLabels"]["__meta_etcdisco_id"] == scraped.instance_id
                # The recipe's relabeling dropped the instance that opted out.
                dropped = [t["discoveredLabels"].get("__meta_etcdisco_id")
                           for t in data["droppedTargets"]]  # fmt: skip
                assert opted_out.instance_id in dropped

                async def sample() -> bool:
                    answer = await api.get("/api/v1/query", params={"query": METRIC})
                    return bool(answer.json()["data"]["result"])

                await eventually(sample, 30, f"no {METRIC} sample stored")
                answer = await api.get("/api/v1/query", params={"query": METRIC})
                (series,) = answer.json()["data"]["result"]
                assert series["metric"]["service"] == "orders"
                assert series["metric"]["instance"] == scraped.instance_id
                assert series["value"][1] == "42"

                # Deregistered: gone from Prometheus' targets at its next refresh.
                await scraped.deregister()

                async def gone() -> bool:
                    return not (await targets())["activeTargets"]

                await eventually(gone, 30, "the deregistered instance stayed a target")
