"""The dashboard in headless Chromium against a real stack of Grid processes.

Debian's chromium and chromium-driver packages provide the browser and the
driver (.ci/run installs them); Selenium is given both paths, so Selenium
Manager has nothing to download. Screenshots of every page, at a desktop and
a phone width, are saved under tests/artifacts/dashboard/.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gridsite.stack import ROOT
from tests.dashboard_data import HOSTILE, PASSWORD
from tests.e2e import start_network, stop_network

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = ROOT / "tests" / "artifacts" / "dashboard"
VIEWPORTS = {"desktop": (1280, 900), "phone": (390, 844)}


def missing_browser() -> str:
    """Why the browser tests cannot run here, or '' when they can."""
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        return "Chromium is not installed: apt-get install -y chromium chromium-driver"
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed in the venv: .venv/bin/pip install selenium"
    return ""


pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(bool(missing_browser()), reason=missing_browser() or "ready"),
]

SETUP = f"""
from django.contrib.auth import get_user_model
from apps.registry.models import Dataset, Node

owner = get_user_model().objects.get(username="owner")
owner.set_password({PASSWORD!r})
owner.save()
Dataset.objects.create(
    node=Node.objects.get(name="node-2"), name="digits-test", tags=["digits", "test"], rows=360,
    description="Held-out handwritten digits, 8x8 grey levels.",
)
Dataset.objects.create(node=Node.objects.get(name={HOSTILE!r}), name={HOSTILE!r}, tags=["digits"], description={HOSTILE!r})
"""


def collect_static() -> None:
    """Copy the apps' static files to STATIC_ROOT, where WhiteNoise serves them without DEBUG."""
    subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), "collectstatic", "--no-input"],
        cwd=ROOT,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "gridsite.settings"},
        check=True,
        capture_output=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    collect_static()
    net = start_network(tmp_path_factory.mktemp("grid"), agents=2)
    try:
        net.stack.manage("createnode", HOSTILE)
        net.stack.manage("shell", "-c", SETUP)
        serve_and_run(net)
    except BaseException:
        stop_network(net)
        raise
    yield net
    stop_network(net)


def serve_and_run(net) -> None:
    """Serve a small model on both nodes and run a few requests, so the charts have data."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)
    ).eval()
    with net.client() as gateway:
        gateway.serve_model(
            model,
            "tiny-mlp",
            allow_remote_inference=True,
            replicas=2,
            example_inputs=torch.rand(4, 4),
            progress=False,
        )
        for _ in range(12):
            gateway.run_remote_inference(model_id="tiny-mlp", dataset=torch.rand(8, 4))


@pytest.fixture(scope="module")
def node_ids(network) -> dict[str, int]:
    with network.client() as gateway:
        return {node["name"]: node["id"] for node in gateway.connected_nodes()}


@pytest.fixture(scope="module")
def browser(network, tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
        "--window-size=1280,900",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(
        service=Service(executable_path=str(CHROMEDRIVER)), options=options
    )
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


def wait_for(driver, condition, timeout: float = 15.0, message: str = ""):
    """Poll ``condition`` until it is truthy.

    Live regions are replaced whole when they refresh, so an element found a
    moment ago may be gone: such a poll counts as not yet.
    """
    from selenium.common.exceptions import (
        NoSuchElementException,
        StaleElementReferenceException,
    )
    from selenium.webdriver.support.ui import WebDriverWait

    ignored = (NoSuchElementException, StaleElementReferenceException)
    wait = WebDriverWait(
        driver, timeout, poll_frequency=0.05, ignored_exceptions=ignored
    )
    return wait.until(condition, message)


def click(driver, selector: str) -> None:
    from selenium.webdriver.common.by import By

    wait_for(
        driver,
        lambda d: d.find_element(By.CSS_SELECTOR, selector).click() or True,
        message=f"could not click {selector}",
    )


def status_text(driver, node_id: int) -> str:
    script = "return document.querySelector(arguments[0]).textContent;"
    return driver.execute_script(script, f'[data-node-status="{node_id}"]')


def wait_live(driver) -> None:
    wait_for(
        driver,
        lambda d: (
            d.find_element("css selector", "body").get_attribute("data-live")
            == "connected"
        ),
        message="socket did not open",
    )


def test_login_leads_to_page(network, browser):
    from selenium.webdriver.common.by import By

    browser.get(f"{network.stack.url}/nodes/")
    wait_for(browser, lambda d: "/login/" in d.current_url)
    browser.find_element(By.ID, "id_username").send_keys("owner")
    browser.find_element(By.ID, "id_password").send_keys(PASSWORD)
    browser.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    wait_for(browser, lambda d: d.current_url == f"{network.stack.url}/nodes/")
    assert browser.find_element(By.TAG_NAME, "h1").text == "Nodes"


def test_hostile_name_is_text(network, browser):
    from selenium.common.exceptions import NoAlertPresentException

    browser.get(f"{network.stack.url}/nodes/")
    names = browser.execute_script(
        "return [...document.querySelectorAll('tbody th a')].map(a => a.textContent);"
    )
    assert HOSTILE in names
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.accept()


def test_killed_node_goes_offline_live(network, browser, node_ids):
    browser.get(f"{network.stack.url}/nodes/")
    wait_live(browser)
    node_id = node_ids["node-1"]
    browser.execute_script("window.gridMarker = 'same page';")
    assert status_text(browser, node_id) == "online"

    killed = time.monotonic()
    network.stack.kill("node-1", signal.SIGKILL)
    wait_for(
        browser,
        lambda d: status_text(d, node_id) == "offline",
        message="node-1 never showed offline",
    )
    elapsed = time.monotonic() - killed
    print(f"node-1 showed offline {elapsed:.2f} s after SIGKILL")

    assert browser.execute_script("return window.gridMarker;") == "same page"
    assert elapsed < 5.0


def test_drain_through_confirmation(network, browser, node_ids):
    from selenium.webdriver.common.by import By

    node_id = node_ids["node-2"]
    browser.get(f"{network.stack.url}/nodes/")
    click(browser, '[aria-label="Drain node-2"]')
    wait_for(browser, lambda d: d.current_url.endswith(f"/nodes/{node_id}/drain/"))
    assert browser.find_element(By.TAG_NAME, "h1").text == "Drain node-2?"
    with network.client() as gateway:
        before = {n["name"]: n["status"] for n in gateway.connected_nodes()}
    assert before["node-2"] == "online"

    click(browser, "button[data-confirm]")
    wait_for(browser, lambda d: d.current_url.endswith(f"/nodes/{node_id}/"))
    message = browser.find_element(By.CSS_SELECTOR, ".messages").text
    with network.client() as gateway:
        after = {n["name"]: n["status"] for n in gateway.connected_nodes()}
    assert "node-2 is draining" in message
    assert status_text(browser, node_id) == "draining"
    assert after["node-2"] == "draining"


def save_page(driver, url: str, path: Path, width: int, height: int) -> None:
    """Load ``url`` and save a screenshot of the whole page, not only the viewport."""
    driver.set_window_size(width, height)
    driver.get(url)
    wait_live(driver)
    full = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(width, max(height, min(full + 140, 6000)))
    driver.save_screenshot(str(path))


def test_screenshots(network, browser, node_ids):
    base = network.stack.url
    pages = {
        "overview": "/",
        "nodes": "/nodes/",
        "node": f"/nodes/{node_ids['node-2']}/",
        "models": "/models/",
        "model": "/models/tiny-mlp/",
        "jobs": "/jobs/",
        "search": "/search/?tags=digits&include_offline=on",
        "confirm": f"/nodes/{node_ids['node-2']}/disconnect/",
    }
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    saved = []
    for viewport, (width, height) in VIEWPORTS.items():
        for name, path in pages.items():
            target = ARTIFACTS / f"{name}-{viewport}.png"
            save_page(browser, base + path, target, width, height)
            saved.append(target)
    browser.set_window_size(*VIEWPORTS["desktop"])
    print(f"saved {len(saved)} screenshots in {ARTIFACTS}")
    for target in saved:
        assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", target
