"""The web dashboard in a real headless Chromium against a live server running real KOALA rounds.

Stack: DemoRun (the `koala demo` launcher) = private Mosquitto + ServerServices (registry, MQTT
ingestion, RoundOrchestrator) inside the FastAPI app under uvicorn + 2 device agent processes
training LiteRT models on sklearn digits. The page must show the fleet and the finished round;
clicking "Start round" (token typed into the page) must start round 1, which the page then follows
live to completion. Screenshot: test-artifacts/dashboard.png.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("KOALA_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]  # fmt: skip
TOKEN = "browser-test-token-0123456789"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"

if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
    pytest.skip(f"chromium not installed at {CHROMIUM} (scripts/setup.sh installs it with apt-get)", allow_module_level=True)
playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory):
    from server_app.demo.launcher import DemoConfig, DemoRun
    from server_app.policy import KoalaPolicy

    cfg = DemoConfig(run_dir=str(tmp_path_factory.mktemp("browser-demo")), dataset="digits", devices=2, proxy_size=200,
                     train_size=600, test_size=300, policy=KoalaPolicy(rounds=1, deadline_s=90), api_token=TOKEN)  # fmt: skip
    for attempt in (1, 2):  # DemoRun picks a free port, then binds it: another process can win that race once
        demo = DemoRun(cfg)
        try:
            demo.start()
            break
        except RuntimeError:
            demo.stop()
            if attempt == 2:
                raise
    try:
        # the demo's own access settings (no override): its token, reads open on loopback
        assert demo.api_token == TOKEN and (demo.run_dir / "api_token").read_text().strip() == TOKEN
        assert demo.wait(240, progress=False), "the first round did not finish"
        yield demo, f"http://127.0.0.1:{demo.http_port}"
    finally:
        demo.stop()


def test_dashboard_shows_fleet_and_rounds_and_starts_a_round(live_server):
    demo, base = live_server
    ARTIFACTS.mkdir(exist_ok=True)
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(base + "/")
            assert page.url.endswith("/dashboard/")
            expect = playwright_api.expect

            # fleet: both agents online, live from the SSE stream
            expect(page.locator("#conn")).to_have_text("live", timeout=15_000)
            for dev in ("dev000", "dev001"):
                expect(page.locator(f'#fleet tr[data-device="{dev}"] .pill')).to_have_text("online", timeout=15_000)
            # the finished round: rounds table, current-round card, accuracy point, bytes bars
            expect(page.locator('#rounds tr[data-round="0"]')).to_have_attribute("data-state", "completed", timeout=15_000)
            expect(page.locator("#round-state")).to_have_text("completed")
            expect(page.locator('#acc-chart circle.p-large[data-round="0"]')).to_have_count(1)
            expect(page.locator('#bytes-chart rect.b-up[data-round="0"]')).to_have_count(1)
            acc = page.locator('#rounds tr[data-round="0"] td').nth(5).inner_text()
            assert re.fullmatch(r"\d+\.\d%", acc), acc

            # without a token the button explains itself; with it, round 1 starts
            page.evaluate("localStorage.removeItem('koala.token')")
            page.click("#btn-start")
            expect(page.locator("#action-msg")).to_contain_text("token")
            page.fill("#token", TOKEN)
            page.click("#btn-token")
            assert page.evaluate("localStorage.getItem('koala.token')") == TOKEN
            page.click("#btn-start")
            expect(page.locator("#action-msg")).to_have_text("round 1 starting", timeout=10_000)
            expect(page.locator("#round-id")).to_have_text("1", timeout=30_000)  # pushed by the live stream
            expect(page.locator("#round-state")).to_have_text(re.compile("created|collecting|aggregating|completed"))
            expect(page.locator("#round-state")).to_have_text("completed", timeout=150_000)
            expect(page.locator('#rounds tr[data-round="1"]')).to_have_attribute("data-state", "completed", timeout=15_000)
            expect(page.locator('#acc-chart circle.p-large[data-round="1"]')).to_have_count(1, timeout=15_000)
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
            assert not errors, errors
        finally:
            browser.close()
    # what the page showed is what the registry holds
    from server_app.registry import crud

    r1 = demo.services.registry.run(crud.get_round, 1)
    assert r1.state == "completed" and set(r1.participants) == {"dev000", "dev001"}
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000


def test_docs_and_redoc_render_offline(live_server):
    """Swagger UI and ReDoc render from this server alone: every request the page makes goes to it."""
    _demo, base = live_server
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page()
            elsewhere: list[str] = []
            page.on("request", lambda r: None if r.url.startswith((base, "data:", "blob:")) else elsewhere.append(r.url))
            expect = playwright_api.expect
            page.goto(base + "/docs")
            expect(page.locator(".swagger-ui .info .title")).to_contain_text("KOALA Edge server", timeout=20_000)
            expect(page.locator(".opblock").first).to_be_visible(timeout=10_000)
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "docs-offline.png"), full_page=True)
            page.goto(base + "/redoc")
            expect(page.locator("h1").first).to_contain_text("KOALA Edge server", timeout=20_000)
            assert not elsewhere, elsewhere
        finally:
            browser.close()


def test_dashboard_takes_the_token_from_the_printed_url(live_server):
    """`koala demo` prints /dashboard/#token=...: the page keeps the token and clears the address bar."""
    _demo, base = live_server
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page()
            page.goto(f"{base}/dashboard/#token={TOKEN}")
            playwright_api.expect(page.locator("#token")).to_have_value(TOKEN, timeout=10_000)
            assert page.evaluate("localStorage.getItem('koala.token')") == TOKEN
            assert "#token" not in page.url
        finally:
            browser.close()
