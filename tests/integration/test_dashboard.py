"""The dashboard (``etcdisco ui``) in a real headless Chromium against a real etcd: the
page lists what etcd holds, shows registrations and crashes live (no reload), acts
for an operator who gives the admin token and for no one else, and keeps the last
known state under a banner when etcd stops."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
from playwright.async_api import expect

from etcdisco import AsyncClient, EventType, RoundRobin, Status

from .._util import wait_event
from ._cli_process import CliProcess
from ._dashboard import TOKEN, launched_browser, open_page, row, running_dashboard

# A page reload would reset this: its presence shows the page only updated itself.
_MARK = "window.__notReloaded = true"
_STILL_MARKED = "window.__notReloaded === true"


async def test_page_lists_the_registry_and_follows_it_live(etcd, tmp_path: Path) -> None:
    ep = etcd.endpoint
    async with AsyncClient(ep) as c:
        a = await c.register("orders", "127.0.0.1:7501", ttl=10, metadata={"zone": "eu-1"})
        b = await c.register("orders", "127.0.0.1:7502", ttl=10, metadata={"version": "2.1"})
        p = await c.register("payments", "127.0.0.1:7601", ttl=10)
        await c.set_override("orders", b.instance_id, disabled=True, reason="canary", by="ops")
        # A crashing instance: a process of its own, registered with a short lease.
        crashing = await CliProcess.start(
            "--endpoints", ep, "register", "payments", "127.0.0.1:7602", "--ttl", "2"
        )
        await crashing.line("registered")
        async with running_dashboard(ep, tmp_path) as ui, launched_browser() as browser:
            page = await open_page(browser, ui.url)
            await page.evaluate(_MARK)

            # What etcd holds, row for row, with the effective status and the override.
            keys = await page.eval_on_selector_all(
                "#instances tbody tr", "rows => rows.map(r => r.dataset.key)"
            )
            assert sorted(keys) == sorted([a.key, b.key, p.key, "services/payments/127.0.0.1:7602"])
            assert await page.inner_text(f"{row(a.key)} .status") == "up"
            assert "zone" not in await page.inner_text(f"{row(a.key)} .meta")  # its own column
            assert await page.inner_text(f"{row(b.key)} .status") == "disabled"
            override = await page.inner_text(f"{row(b.key)} .override")
            assert "disabled" in override and "by ops" in override and "canary" in override
            assert "version=2.1" in await page.inner_text(f"{row(b.key)} .meta")
            lease = await page.wait_for_selector(f"{row(a.key)} .lease .left:has-text('left')")
            assert lease is not None
            services = await page.eval_on_selector_all(
                "#services li.service:not(.all)", "items => items.map(i => i.dataset.service)"
            )
            assert services == ["orders", "payments"]

            # Registrations appear without a reload; the time to the row is measured.
            delays = []
            for n in range(5):
                reg = await c.register("search", f"127.0.0.1:{7700 + n}", ttl=10)
                start = time.monotonic()
                await page.wait_for_selector(row(reg.key), timeout=10_000)
                delays.append(time.monotonic() - start)
            print(
                "registry change -> row on the page: "
                + ", ".join(f"{d * 1000:.0f} ms" for d in delays)
                + f" (median {statistics.median(delays) * 1000:.0f} ms)"
            )
            assert await page.evaluate(_STILL_MARKED)

            # A crash: SIGKILL, the lease runs out, the row goes and the change is listed.
            await crashing.kill()
            gone = "services/payments/127.0.0.1:7602"
            await page.wait_for_selector(row(gone), state="detached", timeout=15_000)
            await page.wait_for_selector(
                f'#events li[data-key="{gone}"][data-type="removed"]', timeout=5_000
            )
            assert await page.evaluate(_STILL_MARKED)

            # Search narrows the rows to what matches (here: metadata).
            await page.fill("#search", "eu-1")
            # (expect, not wait_for_function: the page's CSP forbids evaluating strings)
            await expect(page.locator("#instances tbody tr")).to_have_count(1)
            assert await page.get_attribute("#instances tbody tr", "data-key") == a.key


async def test_a_disable_clicked_on_the_page_stops_a_clients_picks(etcd, tmp_path: Path) -> None:
    ep = etcd.endpoint
    async with (
        AsyncClient(ep) as server,
        AsyncClient(ep) as client,
        client.discover("orders") as cache,
    ):
        a = await server.register("orders", "127.0.0.1:7511", ttl=10)
        b = await server.register("orders", "127.0.0.1:7512", ttl=10)
        await cache.wait_ready(5)
        events = cache.events()
        async with (
            running_dashboard(ep, tmp_path, token=TOKEN) as ui,
            launched_browser() as browser,
        ):
            page = await open_page(browser, ui.url)
            await page.fill("#token", TOKEN)
            await page.fill("#actor", "alice")
            await page.click(f'{row(a.key)} button[data-action="disable"]')
            await page.fill('#action-form input[name="reason"]', "bad disk")
            await page.click("#action-ok")

            ev = await wait_event(events, EventType.UPDATED, a.key, 10)
            assert ev.instance.status is Status.DISABLED
            assert ev.instance.override is not None
            assert ev.instance.override.reason == "bad disk"
            assert ev.instance.override.by == "alice (dashboard, 127.0.0.1)"
            picker = RoundRobin()
            assert {picker.pick(cache.instances()).key for _ in range(4)} == {b.key}  # type: ignore[union-attr]
            # The page shows it, with an enable button in place of disable.
            await page.wait_for_selector(f'{row(a.key)}[data-status="disabled"]', timeout=10_000)
            await page.click(f'{row(a.key)} button[data-action="enable"]')
            await page.click("#action-ok")
            ev = await wait_event(events, EventType.UPDATED, a.key, 10)
            assert ev.instance.status is Status.UP and ev.instance.override is None


async def test_admin_actions_are_refused_without_the_token(etcd, tmp_path: Path) -> None:
    ep = etcd.endpoint
    async with AsyncClient(ep) as c:
        a = await c.register("orders", "127.0.0.1:7521", ttl=10)
        body = {"service": "orders", "id": a.instance_id, "reason": "x"}
        async with (
            running_dashboard(ep, tmp_path, token=TOKEN) as ui,
            launched_browser() as browser,
            httpx.AsyncClient(base_url=ui.url) as http,
        ):
            page = await open_page(browser, ui.url)
            # On the page, without the token, then with a wrong one.
            for typed, refusal in (("", "admin token required"), ("not-the-token-at-all", "wrong")):
                await page.fill("#token", typed)
                await page.click(f'{row(a.key)} button[data-action="disable"]')
                await page.fill('#action-form input[name="reason"]', "no right")
                await page.click("#action-ok")
                error = await page.wait_for_selector("#action-error:not([hidden])")
                assert error is not None
                assert (await error.inner_text()).startswith("refused: "), refusal
                assert refusal in await error.inner_text()
                await page.click("#action-cancel")
            # At the HTTP endpoint itself.
            url = "api/admin/disable"
            answer = await http.post(url, json=body)
            assert answer.status_code == 401, answer.text
            answer = await http.post(url, json=body, headers={"X-Etcdisco-Token": "wrong" * 5})
            assert answer.status_code == 403, answer.text
            # The token alone is not enough from a form: only JSON is accepted.
            answer = await http.post(
                url, content=json.dumps(body), headers={"X-Etcdisco-Token": TOKEN}
            )
            assert answer.status_code == 415, answer.text
            assert await c.list_overrides() == ()
            answer = await http.post(url, json=body, headers={"X-Etcdisco-Token": TOKEN})
            assert answer.status_code == 200, answer.text
            assert [o.instance_id for o in await c.list_overrides()] == [a.instance_id]

        # Started without a token: read-only, no actions on the page, 403 at the endpoint.
        async with (
            running_dashboard(ep, tmp_path) as ui,
            launched_browser() as browser,
            httpx.AsyncClient(base_url=ui.url) as http,
        ):
            page = await open_page(browser, ui.url)
            assert await page.inner_text("header .readonly") == "read-only"
            assert await page.query_selector("button[data-action]") is None
            answer = await http.post(
                "api/admin/enable", json=body, headers={"X-Etcdisco-Token": TOKEN}
            )
            assert answer.status_code == 403 and "read-only" in answer.json()["error"]
            assert [o.disabled for o in await c.list_overrides()] == [True]


async def test_stale_banner_while_etcd_is_down(etcd, tmp_path: Path) -> None:
    ep = etcd.endpoint
    async with AsyncClient(ep) as c:
        a = await c.register("orders", "127.0.0.1:7531", ttl=30)
        async with running_dashboard(ep, tmp_path) as ui, launched_browser() as browser:
            page = await open_page(browser, ui.url)
            assert await page.is_hidden("#banner")
            await asyncio.to_thread(etcd.stop)
            banner = await page.wait_for_selector(
                '#banner[data-kind="stale"]:not([hidden])', timeout=20_000
            )
            assert banner is not None
            assert "etcd is unreachable" in await banner.inner_text()
            assert "last known state" in await banner.inner_text()
            # The last known rows stay.
            assert await page.is_visible(row(a.key))
            assert await page.inner_text("#state") == "stale"
            await asyncio.to_thread(etcd.start)
            await page.wait_for_selector("#banner[hidden]", state="attached", timeout=30_000)
            assert await page.inner_text("#state") == "live"


async def test_screenshot_of_a_few_services(etcd, tmp_path: Path) -> None:
    """The README's picture, made by this browser: written to docs/images/dashboard.png
    when ETCDISCO_SCREENSHOT names that (or another) path."""
    ep = etcd.endpoint
    async with AsyncClient(ep) as c:
        fleet: list[tuple[str, str, dict[str, Any]]] = [
            ("orders", "10.0.1.11:8080", {"zone": "eu-west-1a", "version": "2.4.1", "weight": 2}),
            ("orders", "10.0.1.12:8080", {"zone": "eu-west-1b", "version": "2.4.1", "weight": 2}),
            ("orders", "10.0.1.13:8080", {"zone": "eu-west-1c", "version": "2.5.0-rc1"}),
            ("payments", "10.0.2.21:9090", {"zone": "eu-west-1a", "metrics_port": 9102}),
            ("payments", "10.0.2.22:9090", {"zone": "eu-west-1b", "metrics_port": 9102}),
            ("search", "10.0.3.31:7000", {"zone": "eu-west-1a"}),
            ("search", "10.0.3.32:7000", {"zone": "eu-west-1b", "status": "draining"}),
            ("users", "10.0.4.41:8000", {"zone": "eu-west-1c", "status": "unhealthy"}),
        ]
        regs = [await c.register(s, addr, ttl=600, metadata=md) for s, addr, md in fleet]
        await c.set_override(
            "orders", regs[2].instance_id, disabled=True, reason="canary error rate", by="alice",
            expires_in=7200,
        )  # fmt: skip
        async with (
            running_dashboard(ep, tmp_path, token=TOKEN) as ui,
            launched_browser() as browser,
        ):
            page = await open_page(browser, ui.url)
            await c.set_override("payments", regs[4].instance_id, weight=5, by="bob")
            await page.wait_for_selector(f"{row(regs[4].key)} .override", timeout=10_000)
            await page.wait_for_selector(".lease .left:has-text('left')")
            path = tmp_path / "dashboard.png"
            await page.screenshot(path=str(path), full_page=True)
            assert path.stat().st_size > 10_000
            wanted = os.environ.get("ETCDISCO_SCREENSHOT")
            if wanted:
                shutil.copyfile(path, wanted)


async def test_10000_instances_load_one_page_and_follow_changes(etcd, tmp_path: Path) -> None:
    """10,000 instances in 1,000 services: the page loads the first 100 rows (not all),
    the filter finds a service past them, and a change still reaches the screen. The
    time to the first rows (goal: 1 s from the navigation) is reported."""
    from etcdisco import encode_value
    from etcdisco.etcd import Op

    ep = etcd.endpoint
    async with AsyncClient(ep) as c:
        lease = (await c.etcd.lease_grant(600)).id
        ops = []
        for n in range(10_000):
            address = f"10.{n // 62500 % 256}.{n // 250 % 250}.{n % 250 + 1}:8080"
            meta = {"zone": f"zone-{n % 3}", "version": "1.4.2"}
            key = f"services/svc-{n % 1000:04d}/{address}"
            ops.append(Op.put(key, encode_value(address, meta), lease=lease))
            if len(ops) == 128:
                await c.etcd.txn([], ops)
                ops = []
        await c.etcd.txn([], ops)
        async with running_dashboard(ep, tmp_path) as ui, launched_browser() as browser:
            async with httpx.AsyncClient(base_url=ui.url) as http:
                await http.get("api/services")  # the server's cache is listed (503 before)
                timings = {}
                for path in ("api/services", "api/instances?limit=100", "prometheus/targets"):
                    start = time.monotonic()
                    answer = await http.get(path)
                    timings[path] = time.monotonic() - start
                    assert answer.status_code == 200
            page = await browser.new_page(viewport={"width": 1400, "height": 900})
            start = time.monotonic()
            await page.goto(ui.url)
            await page.wait_for_selector('body[data-state="synced"][data-first-rendered-at]')
            first_page = time.monotonic() - start
            # From the navigation's start to the rows drawn, by the browser's own clock
            # (the harness's round trips and the new renderer process left out).
            in_page = await page.evaluate(
                "() => (Number(document.body.dataset.firstRenderedAt) - performance.timeOrigin)"
                " / 1000"
            )
            assert await page.locator("#instances tbody tr").count() == 100
            assert await page.inner_text("#range") == "1\u2013100 of 10000"
            # A thousand services: the list shows the first ones, the filter finds the rest.
            await page.fill("#service-filter", "svc-0999")
            await page.click('#services li[data-service="svc-0999"]')
            await expect(page.locator("#instances tbody tr")).to_have_count(10)
            reg = await c.register("svc-0999", "10.99.0.1:8080", ttl=30)
            start = time.monotonic()
            await page.wait_for_selector(row(reg.key), timeout=10_000)
            change = time.monotonic() - start
            print(
                f"10,000 instances: first page {in_page * 1000:.0f} ms in the page "
                f"({first_page * 1000:.0f} ms seen by the test), change -> row "
                f"{change * 1000:.0f} ms, "
                + ", ".join(f"{p} {t * 1000:.0f} ms" for p, t in timings.items())
            )
            # The 1 s goal is a figure to report (a loaded CI machine is not the place to
            # judge it); the ceiling only catches a page gone wrong.
            assert in_page < 5.0, (in_page, first_page)
