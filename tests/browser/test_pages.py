"""The website in a real browser: Debian's chromium driven by Playwright (sync API, in a
worker thread; the gateway runs on the trio thread). Screenshots land in
``test-artifacts/``."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.clients import chat
from tests.fakes import Knobs
from tests.servers import start_network

pytestmark = pytest.mark.e2e

ARTIFACTS = Path(os.environ.get("ROUTECAT_ARTIFACTS", "test-artifacts"))
CHROMIUM = os.environ.get("ROUTECAT_CHROMIUM", "/usr/bin/chromium")
EVIL = "<img src=x onerror=alert(1)>"


def expect(locator: Any) -> Any:
    # Imported here: the default (non-e2e) session collects this file without playwright.
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(locator)


def in_browser(script: Callable[[Any], None], *, phone: bool = False) -> None:
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is required (apt-get install chromium)"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            size = {"width": 390, "height": 844} if phone else {"width": 1280, "height": 900}
            page = browser.new_page(viewport=size)
            dialogs: list[str] = []
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            script(page)
            assert dialogs == [], f"a script ran: {dialogs}"
            assert not [e for e in errors if "Content Security Policy" in e], errors
        finally:
            browser.close()


async def run_in_browser(script: Callable[[Any], None], **kwargs: Any) -> None:
    await trio.to_thread.run_sync(lambda: in_browser(script, **kwargs))


async def test_account_key_and_live_topup(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(90):
        net = await start_network(nursery, tmp_path, nodes=0, credit_sats=0)
        gw = net.gateway.gw

        def script(page: Any) -> None:
            page.goto(net.url + "/")
            page.get_by_label("Name").fill("browser app")
            page.get_by_role("button", name="Create API key").click()
            page.locator("#new-key").wait_for(state="visible")
            key = page.locator("#new-key-value").inner_text()
            assert re.fullmatch(r"rc_[A-Za-z0-9]{40}", key)
            assert page.get_by_text("It is shown once").is_visible()
            page.screenshot(path=str(ARTIFACTS / "account-key.png"), full_page=True)
            page.evaluate("window.__same_page = true")
            page.get_by_role("button", name="Show balance").click()
            page.locator("#balance-sats").wait_for(state="visible")
            assert page.locator("#balance-sats").inner_text() == "0"
            assert page.locator("#free-remaining").inner_text() == "10"
            page.get_by_label("Amount (sats)").fill("500")
            page.get_by_role("button", name="Create invoice").click()
            page.locator("#invoice").wait_for(state="visible")
            invoice = page.locator("#invoice-text").inner_text()
            assert invoice.startswith("lnbcrt5u")
            qr = page.get_by_alt_text("QR code of the Lightning invoice")
            qr.wait_for(state="visible")
            expect(qr).to_have_attribute("src", re.compile(r"^/qr\.svg\?data="))
            assert qr.evaluate("img => img.complete && img.naturalWidth") > 0
            assert page.locator("#invoice-status").inner_text() == "pending"
            page.screenshot(path=str(ARTIFACTS / "account-invoice.png"), full_page=True)
            # The payer pays (the dev wallet, from the trio side).
            trio.from_thread.run(gw.lightning.settle_own, invoice)  # type: ignore[attr-defined]
            expect(page.locator("#invoice-status")).to_have_text("paid", timeout=15_000)
            expect(page.locator("#balance-sats")).to_have_text("500", timeout=15_000)
            assert page.evaluate("window.__same_page") is True  # no reload happened
            assert key not in page.url
            assert page.evaluate("localStorage.length") == 0  # not remembered unless asked
            page.screenshot(path=str(ARTIFACTS / "account-paid.png"), full_page=True)
            page.reload()
            assert key not in page.content()  # shown once

        await run_in_browser(script)
        async with net.gateway.client(headers={"Authorization": f"Bearer {net.key}"}) as c:
            assert (await c.get("/v1/stats")).status_code == 200


async def test_pricing_and_hostile_model_name(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(90):
        net = await start_network(nursery, tmp_path, knobs=Knobs(models=["llama3.1:8b", EVIL]))

        def script(page: Any) -> None:
            page.goto(net.url + "/pricing")
            rows = page.locator("tbody tr")
            assert rows.count() == 2
            cells = page.locator("td.model").all_inner_texts()
            assert EVIL in cells and "llama3.1:8b" in cells  # shown as text
            assert page.locator("main img").count() == 0  # not as markup
            assert (
                page.locator("tbody tr", has_text="llama3.1:8b").locator("td").nth(5).inner_text()
                == "1"
            )
            page.screenshot(path=str(ARTIFACTS / "pricing.png"), full_page=True)
            page.goto(net.url + "/docs")
            assert EVIL in page.locator("code.model").all_inner_texts()
            assert page.locator("#base-url").inner_text() == net.url + "/v1"
            page.screenshot(path=str(ARTIFACTS / "docs.png"), full_page=True)

        await run_in_browser(script)


async def test_provider_lookup_network_and_audit(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(120):
        net = await start_network(nursery, tmp_path)
        async with net.client() as c:
            for i in range(30):
                r = await c.post(
                    "/v1/chat/completions", json=chat(f"page job {i}", max_tokens=2000)
                )
                assert r.status_code == 200
        node = net.nodes[0]

        def script(page: Any) -> None:
            page.goto(net.url + "/providers")
            assert "owlrun --gateway " + net.url in page.locator("pre").first.inner_text()
            page.get_by_label("Node id").fill(node.id)
            page.get_by_role("button", name="Look up").click()
            assert page.locator("#node-jobs").inner_text() == "30"
            assert page.locator("#history").count() == 0  # per-job history needs the secret
            page.get_by_label("Node secret").fill("wrong secret")
            page.get_by_role("button", name="Show my jobs").click()
            assert page.get_by_text("does not match").is_visible()
            page.get_by_label("Node secret").fill(node.agent.identity.secret)
            page.get_by_role("button", name="Show my jobs").click()
            assert page.locator("#history tbody tr").count() == 30
            assert node.agent.identity.secret not in page.url
            page.screenshot(path=str(ARTIFACTS / "providers.png"), full_page=True)
            page.goto(net.url + "/audit")
            assert page.locator("#audit-table tbody tr").count() == 25
            assert page.get_by_text("Page 1 of 2").is_visible()
            page.get_by_role("link", name="Older").click()
            assert page.locator("#audit-table tbody tr").count() == 5
            assert page.get_by_text("Page 2 of 2").is_visible()
            page.screenshot(path=str(ARTIFACTS / "audit.png"), full_page=True)
            page.goto(net.url + "/network")
            assert page.locator("#jobs-24h").inner_text() == "30"
            assert page.locator("svg.chart").count() == 4
            assert page.locator("svg.chart rect").count() == 2 * 24 + 2 * 7
            # Axes with values and gridlines; time labels every third hour, every day.
            assert page.locator("svg.chart text.tick").count() >= 4 * 2
            assert page.locator("svg.chart line.grid").count() >= 4 * 2
            assert page.locator("svg.chart text.when").count() == 2 * 8 + 2 * 7
            page.screenshot(path=str(ARTIFACTS / "network.png"), full_page=True)

        await run_in_browser(script)

        def phone(page: Any) -> None:
            for path in ("/", "/pricing", "/network", "/audit", "/providers", "/docs"):
                page.goto(net.url + path)
                width = page.evaluate("document.documentElement.scrollWidth")
                assert width <= 390 + 1, f"{path} scrolls sideways on a phone ({width}px)"
                name = path.strip("/") or "account"
                page.screenshot(path=str(ARTIFACTS / f"phone-{name}.png"), full_page=True)

        await run_in_browser(phone, phone=True)
