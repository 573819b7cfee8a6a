"""The dashboard (GET /) in a real headless Chromium (Debian's chromium + chromium-driver,
driven by Selenium): no console errors, a write through the API shows up within a second, the
chart renders, and a screenshot for the README (docs/dashboard.png)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import debian
import pytest
from conftest import ROOT

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# The README's picture is refreshed only when asked (XRATES_TEST_SCREENSHOT=1): a test run must
# not change tracked files. Otherwise the screenshot goes to the test's own directory.
README_SCREENSHOT = ROOT / "docs" / "dashboard.png"


def _ensure_chromium() -> str | None:
    """None if Chromium and its driver are there (installed from Debian's packages when
    missing and we are root), else why not."""
    if Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists():
        return None
    reason = debian.ensure(["chromium", "chromium-driver"],
                           lambda: Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists())
    if reason:
        return f"chromium could not be installed: {reason}"
    return None if Path(CHROMEDRIVER).exists() else "chromium-driver not installed"


@pytest.fixture(scope="module")
def chromium() -> None:
    reason = _ensure_chromium()
    if reason:
        pytest.skip(reason)


def _driver():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--window-size=1280,900"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


async def test_dashboard_shows_live_writes_and_a_chart(db_url, start_api, chromium,
                                                     tmp_path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    api = await start_api(db_url)
    for pair, rate in (("USD/EUR", "0.9213"), ("GBP/USD", "1.2702"), ("EUR/JPY", "160.25")):
        assert (await api.client.put(f"/v1/rates/{pair}", json={"rate": rate})).status_code == 201
    await api.client.post("/v1/updates", json={"sources": ["demo"]})  # a queued run to show
    driver = await asyncio.to_thread(_driver)
    try:
        await asyncio.to_thread(driver.get, api.base_url + "/")
        wait = WebDriverWait(driver, 10)
        await asyncio.to_thread(wait.until, ec.text_to_be_present_in_element(
            (By.ID, "stream-state"), "live"))
        await asyncio.to_thread(wait.until, ec.text_to_be_present_in_element(
            (By.ID, "rate-EURJPY"), "160.25"))
        await asyncio.to_thread(wait.until, ec.presence_of_element_located((By.ID, "instance-listener")))

        # A write through the API shows up on the page within a second (highlighted), and
        # feeds the chart of the selected pair (EURJPY: the first one A–Z).
        for rate in ("160.5", "161.125", "160.875"):
            started = time.monotonic()
            assert (await api.client.put("/v1/rates/EUR/JPY", json={"rate": rate})).status_code == 200
            await asyncio.to_thread(WebDriverWait(driver, 1).until,
                                    ec.text_to_be_present_in_element((By.ID, "rate-EURJPY"), rate))
            assert time.monotonic() - started < 1.0
        row_class = await asyncio.to_thread(
            lambda: driver.find_element(By.ID, "rate-EURJPY").get_attribute("class"))
        assert row_class == "changed"
        circles = await asyncio.to_thread(
            lambda: driver.find_elements(By.CSS_SELECTOR, "#chart circle"))
        assert len(circles) == 4  # the snapshot's value and the three changes
        assert await asyncio.to_thread(
            lambda: driver.find_element(By.CSS_SELECTOR, "#chart polyline").get_attribute("points"))
        await asyncio.to_thread(wait.until, ec.presence_of_element_located(
            (By.CSS_SELECTOR, "#updates tbody tr")))
        assert "connected" in await asyncio.to_thread(
            lambda: driver.find_element(By.ID, "instance-listener").text)

        shot = README_SCREENSHOT if os.environ.get("XRATES_TEST_SCREENSHOT") == "1" else (
            tmp_path / "dashboard.png")
        await asyncio.to_thread(driver.save_screenshot, str(shot))
        assert shot.stat().st_size > 10_000
        logs = await asyncio.to_thread(driver.get_log, "browser")
        errors = [entry for entry in logs if entry["level"] in ("SEVERE", "ERROR")]
        assert not errors, errors
    finally:
        await asyncio.to_thread(driver.quit)
