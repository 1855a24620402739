"""Fixtures of the web page's tests: the real API under uvicorn on a SQLite index and a local
store, with jobs whose bundles were made by real exports of a tiny random Llama (the worker's own
``run_job``, in this process), and one headless Chromium for the module.

Jobs (``Viewer.jobs``):

- ``long``: 600+ tokens (byte tokenizer: one token per character), materialised attention, the
  summary (labels) and token alternatives; its matrix needs three pyramid levels, so the page opens
  it on a pooled level and zooming fetches finer tiles;
- ``derived``: a short prompt with ``attention: "derived"`` (the tile routes reconstruct it);
- ``running``: claimed by a pretend worker and never run: the tests move its progress in the index
  the way the worker's reporter does.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from storage.index import Index, JobState
from storage.index.apikeys import ApiKeys
from storage.stores.objectstore import ObjectStore
from tests.services import qkvault_env, start_api, unavailable
from tests.ui.browser import INSTALL_HINT, find_chromium, start_chromium

if TYPE_CHECKING:
    from selenium.webdriver.chrome.webdriver import WebDriver

RUNNING_WORKER = "ui-test-worker"
MAX_NEW_TOKENS = 4
# 31 x 22 characters + BOS = 683 prompt tokens (687 with the generated ones): level 0 is 3 x 3
# tiles, level 1 2 x 2, level 2 one
LONG_PROMPT = "".join(f"Line {i:02d}: the cat sat. " for i in range(31))
SHORT_PROMPT = "Attention, please!"


@dataclass
class Viewer:
    base_url: str
    key: str
    index: Index
    jobs: dict[str, str]  # name -> job id
    bundles: dict[str, str] = field(default_factory=dict)  # name -> bundle location

    def url(self, path: str = "/ui/") -> str:
        return self.base_url + path


def _spec(model: str, prompt: str, capture: dict[str, Any], label: str) -> dict[str, Any]:
    return {
        "model": {"id": model},
        "prompts": [prompt],
        "generation": {"max_new_tokens": MAX_NEW_TOKENS},
        "capture": capture,
        "label": label,
    }


def _export(job_id: str, root: Path, database_url: str, store_url: str) -> None:
    """Run the job as a worker would (claim, export, record, finish), in this process."""
    from tests.worker.conftest import model_cache_dir
    from worker.jobs import run_job
    from worker.models import ModelCache
    from worker.settings import WorkerSettings

    settings = WorkerSettings(
        database_url=database_url,
        store_url=store_url,
        progress_interval_s=0.0,
        heartbeat_interval_s=0.5,
        model_cache_dir=model_cache_dir(),
        model_roots=[root],
    )
    index = Index(database_url)
    try:
        state = run_job(
            job_id,
            index=index,
            store=ObjectStore.from_settings(settings),
            models=ModelCache(model_cache_dir(), "cpu"),
            settings=settings,
            worker_id="ui-export",
        )
        assert state == JobState.SUCCEEDED, index.get_job(job_id).error
    finally:
        index.dispose()


@pytest.fixture(scope="module")
def viewer(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Viewer]:
    from tests.worker.tiny_models import build_tiny_model

    root = tmp_path_factory.mktemp("ui")
    models = root / "models"
    # larger random weights than the default 0.02 give peaked attention: distinct colours per cell
    overrides = {"max_position_embeddings": 1024, "initializer_range": 0.5}
    model = str(build_tiny_model("llama", models / "llama", overrides=overrides))
    database_url = f"sqlite:///{root / 'index.db'}"
    store_url = str(root / "store")
    index = Index(database_url)
    index.migrate()
    key, _ = ApiKeys(index).create(owner="viewer", label="ui test")
    env = qkvault_env(
        redis_url=redis_url,
        database_url=database_url,
        store_url=store_url,
        model_roots=[models],
        queue_name=f"qkvault-ui-test-{uuid.uuid4().hex[:12]}",  # no worker consumes it
        migrate_on_startup="false",
    )
    specs = {
        "long": _spec(
            model,
            LONG_PROMPT,
            {"attention": True, "summary": True, "alternatives": True, "prompt_alternatives": True},
            "long",
        ),
        "derived": _spec(model, SHORT_PROMPT, {"attention": "derived"}, "derived"),
        "running": _spec(model, SHORT_PROMPT, {"attention": True}, "running"),
    }
    with contextlib.ExitStack() as stack:
        api = stack.enter_context(start_api(env, log_path=root / "api.log"))
        client = stack.enter_context(
            httpx.Client(base_url=api.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        )
        jobs: dict[str, str] = {}
        for name, spec in specs.items():
            response = client.post("/v1/jobs", json=spec)
            assert response.status_code == 202, response.text
            jobs[name] = response.json()["id"]
        for name in ("long", "derived"):
            _export(jobs[name], models, database_url, store_url)
        assert index.claim(jobs["running"], RUNNING_WORKER) is not None
        index.update_progress(
            jobs["running"], units_done=1, units_total=8, phase="prefill", worker=RUNNING_WORKER
        )
        bundles = {name: index.get_job(jobs[name]).store_url for name in ("long", "derived")}
        yield Viewer(base_url=api.base_url, key=key, index=index, jobs=jobs, bundles=bundles)
    index.dispose()


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    """One headless Chromium for the module (starting one takes about a second)."""
    pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[dev]')")
    found = find_chromium()
    if found is None:
        unavailable(f"headless Chromium not found: {INSTALL_HINT}")
    driver = start_chromium(found)
    try:
        yield driver
    finally:
        driver.quit()
