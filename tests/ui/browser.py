"""Debian's headless Chromium under selenium, for the web page's tests.

``python3 dev.py setup`` installs the ``chromium`` and ``chromium-driver`` packages when they are
missing and it runs as root (as CI does); elsewhere the tests that need them skip (fail under
``CI=true``) with :data:`INSTALL_HINT`. Selenium is pointed at the system chromedriver, so it never
tries to download a browser or a driver.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from selenium.webdriver.chrome.webdriver import WebDriver

BROWSERS = ("chromium", "chromium-browser")
DRIVER = "chromedriver"
INSTALL_HINT = (
    "install Debian's chromium and chromium-driver: as root, `python3 dev.py setup` does it, or "
    "`apt-get update && apt-get install -y --no-install-recommends chromium chromium-driver`"
)
WINDOW = (1280, 1100)  # CSS pixels; the page's heatmap is 720 px tall


@dataclass(frozen=True)
class Chromium:
    browser: str
    driver: str


def find_chromium() -> Chromium | None:
    browser = next((path for name in BROWSERS if (path := shutil.which(name))), None)
    driver = shutil.which(DRIVER)
    return Chromium(browser, driver) if browser and driver else None


def start_chromium(found: Chromium) -> WebDriver:
    """A headless Chromium at :data:`WINDOW` with one CSS pixel per device pixel."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = found.browser
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        "--force-device-scale-factor=1",
        "--no-first-run",
        "--disable-extensions",
    ):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(found.driver))
