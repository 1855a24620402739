"""Driving the viewer page in the tests: open it with the key, wait for the heatmap, hover a cell,
read a pixel, and the colours the page must draw (matplotlib's viridis, the page's colour scales)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from selenium.webdriver.chrome.webdriver import WebDriver
    from selenium.webdriver.remote.webelement import WebElement

    from tests.ui.conftest import Viewer

T = TypeVar("T")
WAIT_S = 20.0
LOG_FLOOR = 1e-4  # api/ui/colormap.js: the "log" scale spans 1e-4 .. 1


def wait_for(what: str, probe: Callable[[], T | None], timeout_s: float = WAIT_S) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what} (last: {last!r})")


def open_page(browser: WebDriver, viewer: Viewer, route: str = "#/") -> None:
    """Load the page at ``route`` with the key already in localStorage (as after the first visit)."""
    browser.get(viewer.url("/ui/"))
    browser.execute_script("localStorage.setItem('qkvault.apiKey', arguments[0])", viewer.key)
    browser.get(viewer.url("/ui/") + route)
    browser.refresh()  # a hash change alone would not reload the modules


def stats(browser: WebDriver) -> dict[str, Any]:
    result: dict[str, Any] = browser.execute_script("return window.qkvault.stats")
    return result


def heatmap_state(browser: WebDriver) -> dict[str, Any] | None:
    result: dict[str, Any] | None = browser.execute_script(
        "const h = window.qkvault && window.qkvault.heatmap; return h ? h.snapshot() : null"
    )
    return result


def wait_heatmap_loaded(browser: WebDriver) -> dict[str, Any]:
    """The heatmap's state once every tile on screen is drawn (none loading)."""

    def loaded() -> dict[str, Any] | None:
        state = heatmap_state(browser)
        if state and state["visibleTiles"] and not state["loading"]:
            time.sleep(0.1)  # the draw after the last tile landed
            return heatmap_state(browser)
        return None

    return wait_for("the heatmap's tiles", loaded)


def canvas(browser: WebDriver) -> WebElement:
    from selenium.webdriver.common.by import By

    return browser.find_element(By.CSS_SELECTOR, ".heatmap-canvas")


def hover_cell(browser: WebDriver, query: float, key: float) -> tuple[dict[str, str], tuple[int, int]]:
    """Move the real mouse onto the point of fractional token coordinates (query, key), e.g. a
    cell's centre; returns the tooltip's data attributes and the canvas pixel under that point.
    Both are within half a pixel of the point, so they fall in the cell when cells are >= 1.1 px."""
    from selenium.webdriver.common.action_chains import ActionChains

    element = canvas(browser)
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
    at: dict[str, float] = browser.execute_script(
        "const r = arguments[0].getBoundingClientRect();"
        "const p = window.qkvault.heatmap.screenPoint(arguments[1], arguments[2]);"
        "return {left: r.left, top: r.top, x: p.x, y: p.y}",
        element,
        query,
        key,
    )
    actions = ActionChains(browser)
    # viewport coordinates are whole pixels; the canvas may sit at a fractional offset
    actions.w3c_actions.pointer_action.move_to_location(
        round(at["left"] + at["x"]), round(at["top"] + at["y"])
    )
    actions.perform()
    tip: dict[str, str] = wait_for(
        "the heatmap tooltip",
        lambda: browser.execute_script(
            "const t = document.querySelector('.heatmap-tooltip');"
            "return t && !t.hidden ? Object.assign({}, t.dataset, {text: t.textContent}) : null"
        ),
    )
    return tip, (math.floor(at["x"]), math.floor(at["y"]))


def pixel(browser: WebDriver, x: int, y: int) -> tuple[int, int, int]:
    rgba = browser.execute_script(
        "const data = arguments[0].getContext('2d').getImageData(arguments[1], arguments[2], 1, 1).data;"
        "return Array.from(data)",
        canvas(browser),
        x,
        y,
    )
    return int(rgba[0]), int(rgba[1]), int(rgba[2])


def expected_color(value: float, scale: str = "log") -> tuple[int, int, int]:
    """matplotlib's viridis of ``value`` under the page's colour scale (api/ui/colormap.js)."""
    from matplotlib import colormaps

    if scale == "log":
        t = (math.log10(max(value, LOG_FLOOR)) - math.log10(LOG_FLOOR)) / -math.log10(LOG_FLOOR)
    else:
        t = value
    red, green, blue = (round(float(c) * 255) for c in colormaps["viridis"](float(t))[:3])
    return red, green, blue


def choose(browser: WebDriver, name: str, value: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element(By.CSS_SELECTOR, f"select.picker-{name}")).select_by_value(value)


def wheel_at(browser: WebDriver, query: float, key: float, delta_y: int) -> None:
    """Turn the mouse wheel over token (query, key): negative ``delta_y`` zooms in around it."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions.wheel_input import ScrollOrigin

    at: dict[str, float] = browser.execute_script(
        "const r = arguments[0].getBoundingClientRect();"
        "const p = window.qkvault.heatmap.screenPoint(arguments[1], arguments[2]);"
        "return {x: r.left + p.x, y: r.top + p.y}",
        canvas(browser),
        query,
        key,
    )
    origin = ScrollOrigin.from_viewport(round(at["x"]), round(at["y"]))
    ActionChains(browser).scroll_from_origin(origin, 0, delta_y).perform()
