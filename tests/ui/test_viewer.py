"""The web page at /ui/ in a real headless Chromium (docs/viewer.md)."""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, cast

import httpx
import numpy as np
import pytest
import zarr

from tests.ui.conftest import RUNNING_WORKER, Viewer
from tests.ui.page import (
    choose,
    expected_color,
    hover_cell,
    open_page,
    pixel,
    stats,
    wait_for,
    wait_heatmap_loaded,
    wheel_at,
)

if TYPE_CHECKING:
    from selenium.webdriver.chrome.webdriver import WebDriver
    from selenium.webdriver.remote.webelement import WebElement

By = pytest.importorskip("selenium.webdriver.common.by", reason="selenium is not installed").By


def test_root_redirects_to_the_page_which_needs_no_key(viewer: Viewer) -> None:
    root = httpx.get(viewer.url("/"), follow_redirects=False)
    assert root.status_code == 307 and root.headers["location"] == "/ui/"
    page = httpx.get(viewer.url("/ui/"))
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="app.js">' in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    script = httpx.get(viewer.url("/ui/app.js"))
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    missing = httpx.get(viewer.url("/ui/nothing.js"))
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"
    assert "app.js" in missing.json()["detail"]


def test_asks_for_the_key_once_then_lists_my_jobs(viewer: Viewer, browser: WebDriver) -> None:
    browser.get(viewer.url("/"))  # the redirect, as a person would type the address
    browser.execute_script("localStorage.clear()")
    browser.refresh()
    field = wait_for("the key form", lambda: browser.find_elements(By.ID, "api-key"))[0]
    field.send_keys(viewer.key)
    field.submit()
    rows = wait_for("three job rows", lambda: rows_by_id(browser) if len(rows_by_id(browser)) == 3 else None)
    assert set(rows) == set(viewer.jobs.values())
    assert rows[viewer.jobs["long"]].get_attribute("data-state") == "succeeded"
    assert rows[viewer.jobs["running"]].get_attribute("data-state") == "running"
    assert "1 / 8 units (13%) · prefill" in rows[viewer.jobs["running"]].text
    assert browser.execute_script("return localStorage.getItem('qkvault.apiKey')") == viewer.key
    browser.refresh()  # the key is kept: no form the second time
    wait_for("the job rows after a reload", lambda: len(rows_by_id(browser)) == 3)
    assert not browser.find_elements(By.ID, "api-key")


def rows_by_id(browser: WebDriver) -> dict[str, WebElement]:
    return {
        row.get_attribute("data-job-id") or "": row
        for row in browser.find_elements(By.CSS_SELECTOR, "table.jobs tbody tr")
    }


def test_progress_updates_without_a_reload(viewer: Viewer, browser: WebDriver) -> None:
    job_id = viewer.jobs["running"]
    open_page(browser, viewer, "#/")
    row = wait_for("the running job's row", lambda: rows_by_id(browser).get(job_id))
    browser.execute_script("window.notReloaded = true")
    # what the worker's reporter (worker/reporting.py) records as the job advances
    viewer.index.update_progress(job_id, units_done=6, units_total=8, phase="decoding", worker=RUNNING_WORKER)
    wait_for("the new progress in the list", lambda: "6 / 8 units (75%) · decoding" in row.text, timeout_s=10)
    assert browser.execute_script("return window.notReloaded") is True
    mode = browser.find_element(By.CSS_SELECTOR, ".live-mode").text
    if events_route(viewer):  # server-sent events where the API has them, else polling
        assert "events" in mode and stats(browser)["eventMessages"] >= 2, mode
    else:
        assert mode == "live updates: polling" and stats(browser)["jobPolls"] >= 1

    open_page(browser, viewer, f"#/jobs/{job_id}")  # the job's own page follows it too
    head = wait_for("the job page", lambda: browser.find_elements(By.CSS_SELECTOR, ".job-head"))[0]
    wait_for("the progress on the job page", lambda: "6 / 8 units" in head.text)
    viewer.index.update_progress(job_id, units_done=7, phase="finalizing", worker=RUNNING_WORKER)
    wait_for("the job page's progress", lambda: "7 / 8 units (88%) · finalizing" in head.text, timeout_s=10)


def events_route(viewer: Viewer) -> bool:
    paths = httpx.get(viewer.url("/openapi.json")).json()["paths"]
    return "/v1/jobs/{job_id}/events" in paths


def stored(viewer: Viewer, job: str, array: str) -> np.ndarray:
    """A whole array of a job's bundle, read with zarr."""
    return np.asarray(zarr.open_array(f"{viewer.bundles[job]}/{array}", mode="r")[...])


def attention_matrix(viewer: Viewer, name: str) -> np.ndarray:
    """Layer 0, head 0, sequence 0 of a job's bundle, read with zarr (materialised) or rebuilt from
    q and k by the storage reader (derived): float32 [T, T]."""
    group = zarr.open_group(viewer.bundles[name], mode="r")
    tokens = int(stored(viewer, name, "length")[0])
    if "attention" in group:
        attention = zarr.open_array(f"{viewer.bundles[name]}/attention", mode="r")
        return np.asarray(attention[0, 0, 0, :tokens, :tokens], dtype=np.float32)
    from storage.bundle import open_bundle

    ds = open_bundle(viewer.bundles[name])
    return np.asarray(ds["attention"].isel(layer=0, batch=0, head=0).values[:tokens, :tokens], np.float32)


def check_cells(browser: WebDriver, matrix: np.ndarray, level: int, cells: list[tuple[int, int]]) -> None:
    """For each cell (row, col) of ``level``: the tooltip under the real mouse names that block of
    tokens and its value (the max of the block, exactly), and the pixel there has its colour."""
    size = 2**level
    blocks = [matrix[r * size : (r + 1) * size, c * size : (c + 1) * size].max() for r, c in cells]
    assert len({expected_color(float(v)) for v in blocks}) > 2, blocks  # colours tell the cells apart
    for row, col in cells:
        tip, (x, y) = hover_cell(browser, row * size + size / 2, col * size + size / 2)
        query, key = int(tip["query"]), int(tip["key"])
        assert (query // size, key // size) == (row, col), tip
        assert int(tip["level"]) == level, tip
        expected = matrix[row * size : (row + 1) * size, col * size : (col + 1) * size].max()
        assert np.float32(tip["value"]) == expected, (tip, expected)
        assert pixel(browser, x, y) == expected_color(float(expected)), (row, col, tip)


def test_heatmap_draws_the_bundle_and_zoom_fetches_finer_tiles(viewer: Viewer, browser: WebDriver) -> None:
    matrix = attention_matrix(viewer, "long")
    tokens = len(matrix)
    open_page(browser, viewer, f"#/jobs/{viewer.jobs['long']}")
    state = wait_heatmap_loaded(browser)
    assert state["tokens"] == tokens and state["level"] == 1, state  # the overview: 2x2 max-pooled
    choose(browser, "scale", "log")  # attention of a random model is small everywhere: log spreads it
    overview = stats(browser)["tileRequests"]
    assert overview and all(re.search(r"/tiles/0/0/0/1/\d+/\d+\?pool=max", p) for p in overview), overview
    assert len(overview) == 3  # level 1 is 2x2 tiles; the one above the diagonal is zeros, not fetched
    half = (tokens + 1) // 2
    # (the last row of level 1 is half outside the matrix when the token count is odd)
    check_cells(browser, matrix, 1, [(half - 2, 0), (half - 2, half - 3), (150, 149), (200, 10), (3, 1)])

    wheel_at(browser, 400, 380, -1500)  # zoom about 9x around that token: ~8 px per token
    state = wait_heatmap_loaded(browser)
    assert state["level"] == 0 and 6 < state["scale"] < 12 and state["labelsDrawn"] == 0, state
    finer = stats(browser)["tileRequests"][len(overview) :]
    assert finer and all("/tiles/0/0/0/0/" in p for p in finer), finer
    check_cells(browser, matrix, 0, [(400, 380), (400, 379), (403, 360), (398, 398), (420, 381)])

    browser.find_element(By.CSS_SELECTOR, "button.zoom-in").click()  # x2: token labels are readable
    state = wait_heatmap_loaded(browser)
    assert state["labelsDrawn"] > 20, state
    assert state["cachedTiles"] <= state["maxCachedTiles"], state


def test_derived_bundle_is_drawn_from_its_reconstruction(viewer: Viewer, browser: WebDriver) -> None:
    matrix = attention_matrix(viewer, "derived")
    open_page(browser, viewer, f"#/jobs/{viewer.jobs['derived']}")
    state = wait_heatmap_loaded(browser)
    assert state["level"] == 0 and state["labelsDrawn"] > 0, state
    assert "derived" in browser.find_element(By.CSS_SELECTOR, ".attention .badge").text
    choose(browser, "scale", "log")
    tokens = len(matrix)
    for query, key in [(tokens - 1, 0), (tokens - 1, tokens - 1), (5, 2)]:
        tip, (x, y) = hover_cell(browser, query + 0.5, key + 0.5)
        assert (int(tip["query"]), int(tip["key"])) == (query, key)
        assert abs(float(tip["value"]) - matrix[query, key]) < 1e-6, (tip, matrix[query, key])
        assert pixel(browser, x, y) == expected_color(float(tip["value"]))


def test_text_with_alternatives_and_the_label_grid(viewer: Viewer, browser: WebDriver) -> None:
    group = zarr.open_group(viewer.bundles["long"], mode="r")
    tokens, prompt = int(stored(viewer, "long", "length")[0]), int(stored(viewer, "long", "prompt_length")[0])
    open_page(browser, viewer, f"#/jobs/{viewer.jobs['long']}")
    wait_for("the text", lambda: browser.find_elements(By.CSS_SELECTOR, ".tokens .token"))
    shown_tokens: list[list[str]] = browser.execute_script(  # [text, position, generated?] per span
        "return Array.from(document.querySelectorAll('.tokens .token'),"
        " s => [s.textContent, s.dataset.position, s.classList.contains('generated') ? 'yes' : ''])"
    )
    strings = cast(list[list[str]], group.attrs["token_strings"])[0]
    assert [text for text, _, _ in shown_tokens] == strings[:tokens]
    assert [int(position) for _, position, generated in shown_tokens if generated] == list(
        range(prompt, tokens)
    )

    from selenium.webdriver.common.action_chains import ActionChains

    position = tokens - 2  # a generated token: what else the model would have picked there
    target = browser.find_element(By.CSS_SELECTOR, f'.tokens .token[data-position="{position}"]')
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", target)
    ActionChains(browser).move_to_element(target).perform()
    popup = browser.find_element(By.CSS_SELECTOR, ".alternatives")
    wait_for("the alternatives", popup.is_displayed)
    shown = [
        r.find_elements(By.TAG_NAME, "td")[1].text for r in popup.find_elements(By.CSS_SELECTOR, ".alt-row")
    ]
    # "" is the fill of a missing alternative; the byte model's NUL token comes back as "" too
    # (numpy's fixed-width strings drop trailing NULs), so neither is listed
    candidates = [str(t) for t in stored(viewer, "long", "topk_tokens")[0, position]]
    listed = [t.strip("\x00") != "" for t in candidates]
    expected = [
        json.dumps(t, ensure_ascii=False) for t, shows in zip(candidates, listed, strict=True) if shows
    ]
    assert shown == expected, (shown, candidates)
    probabilities = [
        float(r.find_elements(By.TAG_NAME, "td")[2].text)
        for r in popup.find_elements(By.CSS_SELECTOR, ".alt-row")
    ]
    logprobs = stored(viewer, "long", "topk_logprobs")[0, position]
    np.testing.assert_allclose(probabilities, np.exp(logprobs)[listed], atol=6e-4)  # shown to 3 decimals

    cells = wait_for(
        "the label grid", lambda: browser.find_elements(By.CSS_SELECTOR, ".label-grid .label-cell")
    )
    labels = stored(viewer, "long", "summary/label")[:, 0, :]  # (layer, batch, head)
    assert [c.get_attribute("data-label") for c in cells] == [str(v) for v in labels.ravel()]
    cells[-1].click()  # the last layer's last head: its attention in the heatmap
    wait_for(
        "the heatmap of layer 1 head 3",
        lambda: "layer 1 · head 3" in browser.find_element(By.CSS_SELECTOR, ".heatmap-status").text,
    )


def test_progress_falls_back_to_polling_when_events_fail(viewer: Viewer, browser: WebDriver) -> None:
    job_id = viewer.jobs["running"]
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["*/events"]})  # every stream fails
    try:
        open_page(browser, viewer, "#/")
        row = wait_for("the running job's row", lambda: rows_by_id(browser).get(job_id))
        viewer.index.update_progress(
            job_id, units_done=5, units_total=10, phase="decoding", worker=RUNNING_WORKER
        )
        wait_for("the progress read by polling", lambda: "5 / 10 units (50%)" in row.text, timeout_s=10)
        assert stats(browser)["jobPolls"] >= 1 and stats(browser)["eventMessages"] == 0
    finally:
        browser.execute_cdp_cmd("Network.setBlockedURLs", {"urls": []})
        browser.execute_cdp_cmd("Network.disable", {})


# A heatmap of a 65,536-token matrix whose every tile is the long job's first tile (the page's own
# Heatmap module, imported in the page), panned along the diagonal across 24 tiles with an LRU of 6.
LRU_SCRIPT = """
const [tilePath, done] = [arguments[0], arguments[arguments.length - 1]];
const { Heatmap } = await import("./heatmap.js");
const host = document.createElement("div");
host.style.width = "600px";
document.body.append(host);
const tokens = 65536, levels = 9;
const info = { tokens, levels, tile: 256, token_strings: [],
  level_sizes: Array.from({ length: levels }, (_, l) => [tokens >> l, tokens >> l]) };
const requested = new Set();
const map = new Heatmap(host, { info, maxCachedTiles: 6,
  tilePath: (level, row, col) => { requested.add(`${level}/${row}/${col}`); return tilePath; } });
const settled = () => new Promise((resolve) => {
  const poll = () => (map.snapshot().loading ? setTimeout(poll, 20) : resolve());
  setTimeout(poll, 50);
});
let largest = 0;
for (let tile = 0; tile < 24; tile++) {
  map.centerOn(tile * 256 + 128, tile * 256 + 128, 4);  // 4 px per token: one or two tiles on screen
  await settled();
  largest = Math.max(largest, map.cache.size);
}
const onScreen = [...map.visibleKeys].every((key) => map.cache.has(key));
done({ largest, requested: requested.size, cached: map.cache.size, onScreen });
map.destroy();
"""


def test_tile_memory_is_bounded_by_the_lru_not_by_the_matrix(viewer: Viewer, browser: WebDriver) -> None:
    job_id = viewer.jobs["long"]
    open_page(browser, viewer, f"#/jobs/{job_id}")
    wait_heatmap_loaded(browser)
    browser.set_script_timeout(30)
    result = browser.execute_async_script(
        f"(async () => {{ {LRU_SCRIPT} }})()", f"v1/jobs/{job_id}/tiles/0/0/0/0/0/0?format=npy"
    )
    assert result["requested"] >= 24, result  # every tile on the way was fetched...
    assert result["largest"] <= 6 and result["cached"] <= 6, result  # ...and at most 6 were kept
    assert result["onScreen"], result  # never the ones on screen
