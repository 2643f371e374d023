"""The dashboard in headless Chromium (Debian's chromium + chromium-driver, Selenium,
SE_OFFLINE so nothing is downloaded) against a real `tlsedge run`: log in, read the
statuses, watch one change without a reload, upload a certificate through the form,
see a mismatched key refused in the CLI's words. Saves test-artifacts/dashboard.png.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from proxy.certs.bundle import load_bundle
from tests.certgen import CA
from tests.support.admin import admin_token, edge_settings, in_store
from tests.support.backend import Backend
from tests.support.edge import Edge

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--disable-dev-shm-usage", "--window-size=1280,820",
                  "--force-device-scale-factor=1"]


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    os.environ["SE_OFFLINE"] = "true"
    options = Options()
    options.binary_location = "/usr/bin/chromium"
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


def populate(edge: Edge, ca: CA) -> None:
    """Domains in every state the dashboard shows, written as the CLI and lifecycle would."""
    letsencrypt = CA.new("Test Let's Encrypt R11")

    async def fill(registry: Any) -> None:
        for name in ("www.pending.example", "shop.example", "creating.example",
                     "www.inuse.example", "notused.example", "broken.example"):
            await registry.add_domain(name, "my-app")
        await registry.set_status("creating.example", state="creating",
                                  message="order placed with the CA")
        await registry.set_status("broken.example", state="error",
                                  last_error="DNS problem: NXDOMAIN looking up A for "
                                             "broken.example <script>alert(1)</script>")
        for name in ("www.inuse.example", "notused.example"):
            issued = letsencrypt.issue([name], not_after=time.time() + 61 * 86400)
            await registry.store_acme_certificate(
                name, load_bundle(issued.chain_pem, issued.key_pem, domain=name))
            await registry.set_status(name, state="issued", message="certificate issued")
        custom = ca.issue(["notused.example"], not_after=time.time() + 300 * 86400)
        await registry.set_custom_certificate("notused.example", custom.chain_pem,
                                              custom.key_pem)

    in_store(edge, fill)


def row(driver: WebDriver, name: str) -> Any:
    return driver.find_element(By.CSS_SELECTOR, f'tr[data-domain="{name}"]')


def cell(driver: WebDriver, name: str, field: str) -> str:
    text: str = row(driver, name).find_element(By.CSS_SELECTOR,
                                               f'[data-field="{field}"]').text
    return text


def wait_for(driver: WebDriver, condition: Any, timeout: float = 10.0) -> Any:
    """Poll until `condition` holds. A click that navigates returns before the new page
    is there, so every look after a click goes through here."""
    return WebDriverWait(driver, timeout, poll_frequency=0.1,
                         ignored_exceptions=(NoSuchElementException,
                                             StaleElementReferenceException)).until(condition)


def test_dashboard_login_statuses_upload_and_validation_error(
        tmp_path: Path, ca: CA, backend: Backend, browser: WebDriver) -> None:
    with Edge(tmp_path, edge_settings(tmp_path, ca, backend), admin=True) as edge:
        populate(edge, ca)
        base = f"http://127.0.0.1:{edge.admin_port}"

        # Log in with the token; the session cookie carries us to the domains table.
        browser.get(base + "/domains")
        assert browser.current_url == base + "/login"
        browser.find_element(By.ID, "token").send_keys("not the token")
        browser.find_element(By.ID, "login").click()
        error = wait_for(browser, lambda d: d.find_element(By.ID, "error"))
        assert error.text == "Wrong admin token."
        browser.find_element(By.ID, "token").send_keys(admin_token(edge))
        browser.find_element(By.ID, "login").click()
        wait_for(browser, lambda d: d.current_url == base + "/domains"
                 and row(d, "broken.example"))

        # This node has no acme: section: a domain waiting for one says so.
        expected = {"www.pending.example": ("ACME off", "s-acme_off", "Platform"),
                    "creating.example": ("Creating", "s-creating", "Platform"),
                    "www.inuse.example": ("In use", "s-in_use", "Let's Encrypt"),
                    "notused.example": ("Not used", "s-not_used", "Custom"),
                    "broken.example": ("Error", "s-error", "Platform")}
        for name, (label, cls, source) in expected.items():
            status = row(browser, name).find_element(By.CSS_SELECTOR, ".status")
            assert status.text == label and cls in status.get_attribute("class")
            assert cell(browser, name, "in_use") == source
        assert "NXDOMAIN" in cell(browser, "broken.example", "message")
        assert "<script>alert(1)</script>" in cell(browser, "broken.example", "message")
        assert cell(browser, "www.inuse.example", "expires").endswith("in 60 days")
        assert cell(browser, "notused.example", "expires").endswith("in 299 days")

        # A status change shows up without a reload (the page polls the JSON API).
        browser.execute_script("window.__sameDocument = true;")
        in_store(edge, lambda r: r.set_status("creating.example", state="error",
                                              last_error="rateLimited: too many orders"))
        wait_for(browser, lambda d: cell(d, "creating.example", "status") == "Error")
        assert cell(browser, "creating.example", "message") == "rateLimited: too many orders"
        assert browser.execute_script("return window.__sameDocument === true;")

        # The domain page: a mismatched key is refused next to the form, nothing changes.
        before = edge.fingerprint("shop.example")
        good = ca.issue(["shop.example", "www.shop.example"], intermediate=True)
        other = ca.issue(["shop.example"])
        cert_file, key_file = good.write(tmp_path, "shop")
        _, wrong_key = other.write(tmp_path, "other")
        row(browser, "shop.example").find_element(By.CSS_SELECTOR, "a.domain").click()
        wait_for(browser, lambda d: d.current_url == base + "/domains/shop.example"
                 and d.find_element(By.ID, "validate"))
        browser.find_element(By.ID, "certificate").send_keys(cert_file)
        browser.find_element(By.ID, "key").send_keys(wrong_key)
        browser.find_element(By.ID, "validate").click()
        error = wait_for(browser, lambda d: d.find_element(By.ID, "error"))
        assert error.text == "private key does not match the certificate"
        ARTIFACTS.mkdir(exist_ok=True)
        browser.set_window_size(1280, 1400)
        browser.save_screenshot(str(ARTIFACTS / "domain-upload-error.png"))
        assert browser.find_element(By.ID, "in-use").text == "Platform"
        assert edge.fingerprint("shop.example") == before

        # The right pair: the page now shows the custom certificate in use.
        browser.find_element(By.ID, "certificate").send_keys(cert_file)
        browser.find_element(By.ID, "key").send_keys(key_file)
        browser.find_element(By.ID, "validate").click()
        ok = wait_for(browser, lambda d: d.find_element(By.ID, "ok"))
        assert ok.text == "Custom certificate validated: it is now in use."
        assert browser.find_element(By.ID, "in-use").text == "Custom"
        custom = browser.find_element(By.ID, "cert-custom")
        assert good.fingerprint in custom.find_element(By.CSS_SELECTOR, ".fingerprint").text
        assert "shop.example, www.shop.example" in custom.text
        deadline = time.monotonic() + 8
        while edge.fingerprint("shop.example") != good.fingerprint:
            assert time.monotonic() < deadline, "the workers did not pick the upload up"
            time.sleep(0.1)

        # Back on the table, then the screenshot of the domains page.
        browser.find_element(By.LINK_TEXT, "← Domains").click()
        wait_for(browser, lambda d: d.current_url == base + "/domains"
                 and cell(d, "shop.example", "in_use") == "Custom")
        browser.set_window_size(1280, 1100)
        assert browser.save_screenshot(str(ARTIFACTS / "dashboard.png"))


def test_live_refresh_fills_certificate_cards_and_words_expiry_and_ca_errors(
        tmp_path: Path, ca: CA, backend: Backend, browser: WebDriver) -> None:
    """Issue #19: the Let's Encrypt card fills in without a reload once a certificate
    is issued; an expired certificate reads "expired N days ago"; an Error status
    shows the CA's problem in words, with its raw URN kept under "CA's answer"."""
    letsencrypt = CA.new("Test Let's Encrypt R12")
    now = time.time()
    expired = letsencrypt.issue(["expired.example"], not_before=now - 90 * 86400,
                                not_after=now - 3 * 86400 - 3600)
    fresh = letsencrypt.issue(["fresh.example"], not_after=now + 61 * 86400)
    urn_error = ("order for failing.example failed: urn:ietf:params:acme:error:dns: "
                 "DNS problem: NXDOMAIN looking up A for failing.example")

    async def fill(registry: Any) -> None:
        for name in ("fresh.example", "expired.example", "failing.example"):
            await registry.add_domain(name, "my-app")
        await registry.store_acme_certificate("expired.example", load_bundle(
            expired.chain_pem, expired.key_pem, domain="expired.example", check_time=False))

    async def issue_fresh(registry: Any) -> None:
        await registry.store_acme_certificate("fresh.example", load_bundle(
            fresh.chain_pem, fresh.key_pem, domain="fresh.example"))
        await registry.set_status("fresh.example", state="issued",
                                  message="certificate issued")

    def acme_card(d: WebDriver) -> str:
        """The text shown in the domain page's "Let's Encrypt certificate" card."""
        text: str = d.find_element(By.XPATH, "//div[contains(@class, 'card')]"
                                   "[h2[contains(., 'Encrypt certificate')]]").text
        return text

    def polled(d: WebDriver) -> str:
        value: str = d.find_element(By.TAG_NAME, "body").get_attribute("data-polled") or ""
        return value

    with Edge(tmp_path, edge_settings(tmp_path, ca, backend), admin=True) as edge:
        in_store(edge, fill)
        base = f"http://127.0.0.1:{edge.admin_port}"
        browser.get(base + "/login")
        browser.find_element(By.ID, "token").send_keys(admin_token(edge))
        browser.find_element(By.ID, "login").click()
        wait_for(browser, lambda d: d.current_url == base + "/domains")

        # An expired certificate, as the page is served and as the script rewrites it.
        browser.get(base + "/domains/expired.example")
        day = time.strftime("%Y-%m-%d", time.gmtime(now - 3 * 86400 - 3600))
        assert f"Expires\n{day} · expired 3 days ago" in acme_card(browser)
        wait_for(browser, lambda d: polled(d) != "")
        assert f"Expires\n{day} · expired 3 days ago" in acme_card(browser)

        # The Let's Encrypt card fills in as soon as the certificate is issued.
        browser.get(base + "/domains/fresh.example")
        assert "None." in acme_card(browser)
        browser.execute_script("window.__sameDocument = true;")
        in_store(edge, issue_fresh)
        wait_for(browser, lambda d: fresh.fingerprint in acme_card(d), 15)
        shown = acme_card(browser)
        assert "None." not in shown and "serving" in shown
        assert "Names\nfresh.example" in shown and "Test Let's Encrypt R12" in shown
        assert "· in 60 days" in shown
        assert browser.find_element(By.ID, "in-use").text == "Let's Encrypt"
        assert browser.execute_script("return window.__sameDocument === true;")

        # A CA error in words, live in the table and then as served; the URN kept.
        browser.get(base + "/domains")
        browser.execute_script("window.__sameDocument = true;")
        in_store(edge, lambda r: r.set_status("failing.example", state="error",
                                              message="order failed; retrying soon",
                                              last_error=urn_error))
        for reloaded in (False, True):
            wait_for(browser, lambda d: cell(d, "failing.example", "status") == "Error", 15)
            message = cell(browser, "failing.example", "message")
            assert message.startswith("The CA could not find the domain in DNS"), message
            assert "urn:" not in message
            assert cell(browser, "failing.example", "detail") == "order failed; retrying soon"
            row(browser, "failing.example").find_element(By.TAG_NAME, "summary").click()
            assert cell(browser, "failing.example", "raw") == urn_error
            assert browser.execute_script("return window.__sameDocument === true;") \
                is not reloaded
            browser.refresh()
